"""What the monitor knows about each board, built from the agents' own MQTT messages.

`Fleet.ingest` takes every message under `<prefix>/+/status|info|telemetry`. A telemetry
message must pass the agent's own schema check (`agent.telemetry.decode_telemetry`) and a
sanity check (no NaN or infinity, no negative latency, throughput, CPU or memory); one that
fails is counted and shown as a warning for its device, and never reaches the state, the
alerts or the history.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from agent.telemetry import OFFLINE, ONLINE, decode_telemetry

NON_NEGATIVE = ("window_s", "inferences", "throughput_ips", "latency_p50_ms", "latency_p90_ms",
                "latency_p99_ms", "latency_max_ms", "latency_mean_ms", "proc_cpu_percent",
                "sys_cpu_percent", "rss_mb", "mem_percent", "spool_depth", "dropped_total")


def check_telemetry(payload: bytes) -> dict[str, Any]:
    """A telemetry message that is safe to show, alert on and record.

    Raises:
        ValueError: not JSON, wrong schema, missing fields, or absurd values; says which.
    """
    msg = decode_telemetry(payload)
    for key, value in msg.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"telemetry {key} is {value}")
    for key in NON_NEGATIVE:
        value = msg.get(key)
        if value is not None and value < 0:
            raise ValueError(f"telemetry {key} is negative ({value})")
    p50, p99 = msg.get("latency_p50_ms"), msg.get("latency_p99_ms")
    if p50 is not None and p99 is not None and p99 < p50:
        raise ValueError(f"telemetry latency_p99_ms {p99} is below latency_p50_ms {p50}")
    return msg


@dataclass
class Device:
    """One board as the monitor sees it."""

    id: str
    status: str | None = None  # online | offline | None (never said)
    status_at: float | None = None  # when the monitor learned it (wall clock)
    info: dict[str, Any] = field(default_factory=dict)
    telemetry: dict[str, Any] | None = None
    seen_at: float | None = None  # when the last good telemetry arrived (wall clock)
    bad_messages: int = 0
    last_problem: str | None = None
    spool_depths: list[int] = field(default_factory=list)  # the latest few, oldest first

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
            "latency_p50_ms": t.get("latency_p50_ms"), "latency_p90_ms": t.get("latency_p90_ms"),
            "latency_p99_ms": t.get("latency_p99_ms"), "throughput_ips": t.get("throughput_ips"),
            "proc_cpu_percent": t.get("proc_cpu_percent"), "soc_temp_c": t.get("soc_temp_c"),
            "throttling": t.get("throttling"), "rss_mb": t.get("rss_mb"),
            "spool_depth": t.get("spool_depth"), "seq": t.get("seq"),
            "seconds_since_telemetry": None if age is None else round(age, 1),
            "bad_messages": self.bad_messages, "last_problem": self.last_problem,
        }


class Fleet:
    """Every device seen under one topic prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.rstrip("/")
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
        if kind not in ("status", "info", "telemetry"):
            return None
        dev = self.device(device_id)
        if kind == "status":
            text = payload.decode(errors="replace")
            if text in (ONLINE, OFFLINE):
                dev.status, dev.status_at = text, now
            elif payload:  # an empty payload clears a retained status: nothing to say
                self._bad(dev, f"status {text[:40]!r} is neither online nor offline")
            return None
        if kind == "info":
            try:
                info = json.loads(payload)
                if not isinstance(info, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                if payload:
                    self._bad(dev, f"info is not a JSON object ({exc})")
                return None
            dev.info = info
            return None
        try:
            msg = check_telemetry(payload)
        except ValueError as exc:
            self._bad(dev, str(exc))
            return None
        if msg.get("device") not in (None, device_id):
            self._bad(dev, f"telemetry names device {msg.get('device')!r} on {topic}")
            return None
        dev.telemetry, dev.seen_at = msg, now
        if isinstance(msg.get("spool_depth"), int):
            dev.spool_depths = [*dev.spool_depths, msg["spool_depth"]][-50:]
        return dev, msg

    @staticmethod
    def _bad(dev: Device, problem: str) -> None:
        dev.bad_messages += 1
        dev.last_problem = problem

    def rows(self, now: float, stale_s: float) -> list[dict[str, Any]]:
        return [d.row(now, stale_s) for d in sorted(self.devices.values(), key=lambda d: d.id)]
