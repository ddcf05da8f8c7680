"""What the monitor knows about each board, built from the agents' own MQTT messages.

`Fleet.ingest` takes every message under `<prefix>/+/status|info|telemetry|summary`: the
retained status, info and summary (the board's last window, agent/telemetry.py) give every
board's state the moment the monitor subscribes, live telemetry keeps it current. A payload
over `monitor.max_payload_kb` is refused before it is parsed. A telemetry message must pass the
agent's own schema check (`agent.telemetry.decode_telemetry`) and a sanity check (no NaN or
infinity; every number inside what a real board can produce, RANGES: counters under 2**63,
latencies under an hour, CPU 0-100 per core, RSS under a terabyte, a temperature of -40 to
150 C; a timestamp no more than a day ahead and not older than the history horizon); one
that fails is counted and shown as a warning for its device, and never reaches the state,
the alerts, the history or Prometheus. Keys the schema does not know are dropped, so nothing
unchecked is stored.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from agent.telemetry import (
    OFFLINE,
    ONLINE,
    OPTIONAL_TELEMETRY_KEYS,
    TELEMETRY_KEYS,
    check_value,
    decode_summary,
    decode_telemetry,
)
from agent.untrusted import loads_json, shown
from deploy.monitor.history import INTEGER_MAX  # what its columns (and Prometheus) hold

HOUR_MS = 3_600_000.0
MAX_CORES = 1024  # a process's CPU percent is 0-100 per core
# What a real board can send: (key, lowest, highest) for every numeric telemetry and summary
# key. Outside it a value is a bug or a forgery, and is refused (counted for its device), so
# nothing stored, shown or exported can overflow.
RANGES = (
    ("seq", 0, INTEGER_MAX), ("ts", 0, 1e11), ("window_s", 0, 86_400.0),
    ("batch_size", 1, 1 << 20), ("inferences", 0, INTEGER_MAX), ("throughput_ips", 0, 1e7),
    *((key, 0, HOUR_MS) for key in (
        "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "latency_max_ms",
        "latency_mean_ms", "capture_p50_ms", "preprocess_p50_ms", "preprocess_p99_ms",
        "total_p50_ms", "total_p90_ms", "total_p99_ms")),
    ("proc_cpu_percent", 0, 100.0 * MAX_CORES), ("sys_cpu_percent", 0, 100.0),
    ("rss_mb", 0, 1024.0 * 1024), ("mem_percent", 0, 100.0), ("load_1m", 0, 1e6),
    ("soc_temp_c", -40.0, 150.0), ("cpu_freq_mhz", 0, 100_000.0), ("throttled", 0, 2**32 - 1),
    ("accuracy_pct", 0, 100.0),
    *((key, 0, INTEGER_MAX) for key in (
        "spool_depth", "dropped_total", "frames_in", "frames_dropped", "frames_failed",
        "results_published")),
)
FUTURE_S = 86_400.0  # a timestamp further ahead than this is a wrong clock


def check_telemetry(payload: bytes, now: float | None = None,
                    horizon_s: float | None = None) -> dict[str, Any]:
    """A telemetry message that is safe to show, alert on and record (known keys only).

    `horizon_s`: a timestamp older than this (the history's age limit) is refused too.

    Raises:
        ValueError: not JSON, wrong schema, missing fields, or absurd values; says which.
    """
    msg = decode_telemetry(payload)
    msg = {k: msg[k] for k in (*TELEMETRY_KEYS, *OPTIONAL_TELEMETRY_KEYS) if k in msg}
    return sane(msg, "telemetry", now, horizon_s)


def check_summary(payload: bytes, now: float | None = None,
                  horizon_s: float | None = None) -> dict[str, Any]:
    """A board's retained summary of its last window (agent/telemetry.py), checked as
    telemetry is.

    Raises:
        ValueError: as check_telemetry, naming the summary.
    """
    return sane(decode_summary(payload), "summary", now, horizon_s)


def sane(msg: dict[str, Any], kind: str, now: float | None,
         horizon_s: float | None) -> dict[str, Any]:
    """`msg` if its values make physical sense, else ValueError naming the first that does
    not (`kind`: telemetry or summary, for the message)."""
    for key, value in msg.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{kind} {key} is {value}")
    for key, lo, hi in RANGES:
        value = msg.get(key)
        if value is not None and not lo <= value <= hi:
            if lo == 0 and value < 0:
                raise ValueError(f"{kind} {key} is negative ({shown(value)})")
            raise ValueError(f"{kind} {key} {shown(value)} is outside {lo:g} to {hi:g}")
    now = time.time() if now is None else now
    ts = msg["ts"]
    if ts is None:
        raise ValueError(f"{kind} ts is null")
    if ts > now + FUTURE_S:
        raise ValueError(f"{kind} ts {ts} is more than a day in the future (check the "
                         f"board's clock)")
    if horizon_s is not None and ts < now - horizon_s:
        raise ValueError(f"{kind} ts {ts} is older than the history horizon "
                         f"({horizon_s:g} s)")
    p50, p99 = msg.get("latency_p50_ms"), msg.get("latency_p99_ms")
    if p50 is not None and p99 is not None and p99 < p50:
        raise ValueError(f"{kind} latency_p99_ms {p99} is below latency_p50_ms {p50}")
    return msg


def check_info(info: dict[str, Any]) -> None:
    """ValueError unless the fields of a board's `info` the monitor shows and exports have
    their types: model_sha256 (hex), model_version (whole number), engine (name), ts."""
    for key in ("model_sha256", "engine", "device"):
        check_value("info", key, info.get(key))
    version = info.get("model_version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                or version < 0):
        raise ValueError(f"info model_version must be a whole number or null, got "
                         f"{version!r:.60}")
    ts = info.get("ts")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, (int, float))
                           or not math.isfinite(ts)):
        raise ValueError(f"info ts must be a number, got {ts!r:.60}")


@dataclass
class Device:
    """One board as the monitor sees it."""

    id: str
    status: str | None = None  # online | offline | None (never said)
    status_at: float | None = None  # when the monitor learned it (wall clock)
    info: dict[str, Any] = field(default_factory=dict)
    telemetry: dict[str, Any] | None = None  # the latest window: telemetry or a summary
    seen_at: float | None = None  # when the last good telemetry arrived (wall clock); for a
    # retained summary, its window's end on the board's clock (it may be minutes old)
    data_from: str | None = None  # "telemetry" (heard live) or "summary" (retained)
    bad_messages: int = 0
    last_problem: str | None = None
    spool_depths: list[int] = field(default_factory=list)  # the latest few, oldest first
    changed: int = 0  # counts the messages that touched it (the Prometheus cache's key)
    windows: int = 0  # good telemetry windows taken live (not summaries)

    def age_s(self, now: float) -> float | None:
        return None if self.seen_at is None else now - self.seen_at

    def state(self, now: float, stale_s: float) -> str:
        """online, offline, stale (no telemetry for stale_s though not offline) or unknown."""
        if self.status == OFFLINE:
            return "offline"
        age = self.age_s(now)
        if age is not None and age > stale_s:
            return "stale"
        if self.status == ONLINE:
            return "online"
        return "unknown" if age is None else "online"

    @property
    def model_sha256(self) -> str | None:
        sha = (self.telemetry or {}).get("model_sha256") or self.info.get("model_sha256")
        return str(sha) if sha else None

    def row(self, now: float, stale_s: float) -> dict[str, Any]:
        """The snapshot of this device that `--once --json` prints and the table shows."""
        t = self.telemetry or {}
        age = self.age_s(now)
        return {
            "device": self.id, "state": self.state(now, stale_s),
            "model_sha256": self.model_sha256,
            "model_version": self.info.get("model_version"),
            "engine": t.get("engine") or self.info.get("engine"),
            "latency_p50_ms": t.get("latency_p50_ms"), "latency_p90_ms": t.get("latency_p90_ms"),
            "latency_p99_ms": t.get("latency_p99_ms"), "throughput_ips": t.get("throughput_ips"),
            "proc_cpu_percent": t.get("proc_cpu_percent"), "soc_temp_c": t.get("soc_temp_c"),
            "throttling": t.get("throttling"), "rss_mb": t.get("rss_mb"),
            "spool_depth": t.get("spool_depth"), "dropped_total": t.get("dropped_total"),
            "seq": t.get("seq"), "data_from": self.data_from,
            "seconds_since_telemetry": None if age is None else round(age, 1),
            "bad_messages": self.bad_messages, "last_problem": self.last_problem,
        }


class Fleet:
    """Every device seen under one topic prefix."""

    def __init__(self, prefix: str, max_payload_bytes: int = 64_000,
                 horizon_s: float | None = None) -> None:
        self.prefix = prefix.rstrip("/")
        self.max_payload_bytes = max_payload_bytes
        self.horizon_s = horizon_s
        self.devices: dict[str, Device] = {}

    def device(self, device_id: str) -> Device:
        if device_id not in self.devices:
            self.devices[device_id] = Device(device_id)
        return self.devices[device_id]

    def ingest(self, topic: str, payload: bytes, now: float | None = None
               ) -> tuple[Device, dict[str, Any]] | None:
        """Take one message; returns (device, telemetry) for a good telemetry message."""
        now = time.time() if now is None else now
        parts = topic.split("/")
        if len(parts) < 3 or "/".join(parts[:-2]) != self.prefix:
            return None
        device_id, kind = parts[-2], parts[-1]
        if kind not in ("status", "info", "telemetry", "summary"):
            return None
        dev = self.device(device_id)
        dev.changed += 1
        if len(payload) > self.max_payload_bytes:
            self._bad(dev, f"{kind} payload of {len(payload):,} bytes is over "
                           f"monitor.max_payload_kb ({self.max_payload_bytes:,} bytes)")
            return None
        if kind == "status":
            text = payload.decode(errors="replace")
            if text in (ONLINE, OFFLINE):
                dev.status, dev.status_at = text, now
            elif payload:  # an empty payload clears a retained status: nothing to say
                self._bad(dev, f"status {text[:40]!r} is neither online nor offline")
            return None
        if kind == "info":
            try:
                info = loads_json(payload, "info", self.max_payload_bytes)
                if not isinstance(info, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                if payload:
                    self._bad(dev, f"info is not a JSON object ({exc})")
                return None
            try:
                check_info(info)
            except ValueError as exc:
                self._bad(dev, str(exc))
                return None
            if info.get("device") != device_id:
                self._bad(dev, f"info names device {info.get('device')!r} on {topic}")
                return None
            dev.info = info
            return None
        if kind == "summary" and not payload:
            return None  # an empty retained payload clears it: nothing to say
        try:
            msg = (check_summary if kind == "summary" else check_telemetry)(
                payload, now, self.horizon_s)
        except ValueError as exc:
            self._bad(dev, str(exc))
            return None
        # A board speaks only for itself: the broker's ACL (deploy/broker.py) keeps it off
        # other boards' topics, and a payload that names another device is not believed.
        if msg.get("device") != device_id:
            self._bad(dev, f"{kind} names device {msg.get('device')!r} on {topic}")
            return None
        if kind == "summary":
            # The state a one-shot view starts from; live telemetry as new or newer wins.
            if dev.telemetry is None or msg["ts"] > dev.telemetry["ts"]:
                dev.telemetry, dev.seen_at, dev.data_from = msg, min(now, msg["ts"]), kind
            return None
        dev.telemetry, dev.seen_at, dev.data_from = msg, now, kind
        dev.windows += 1
        if isinstance(msg.get("spool_depth"), int):
            dev.spool_depths = [*dev.spool_depths, msg["spool_depth"]][-50:]
        return dev, msg

    def refuse(self, dev: Device, problem: str) -> None:
        """Count a message that passed the checks here but that a consumer refused."""
        self._bad(dev, problem)

    @staticmethod
    def _bad(dev: Device, problem: str) -> None:
        dev.bad_messages += 1
        dev.last_problem = problem

    def rows(self, now: float, stale_s: float) -> list[dict[str, Any]]:
        return [d.row(now, stale_s) for d in sorted(self.devices.values(), key=lambda d: d.id)]
