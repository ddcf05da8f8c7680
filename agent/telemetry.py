"""The agent's MQTT messages: topics and payloads. Owned by the board; monitors read it.

Under `<topic_prefix>/<device_id>/`:

    status     retained "online" / "offline" (plain text; the last will is "offline")
    info       retained JSON birth message (schema edgeforge.info/1)
    telemetry  one JSON message per closed window, QoS from config (schema edgeforge.telemetry/1)
    event      JSON notices a person should see (schema edgeforge.event/1): spool reset, ...
    cmd/<name>  commands to the agent (schema edgeforge.cmd/1, agent/remote_commands.py)
    cmd_result  one JSON answer per command, with its request_id (edgeforge.cmd_result/1)
    result     one JSON prediction per input (edgeforge.result/1, agent/predictions.py)
    infer      an application's image to classify (source.kind mqtt); infer/<request_id>
               names the request for MQTT 3.1.1 clients, MQTT 5 clients may instead set a
               response topic and correlation data and get the result there too

Payloads are flat JSON objects whose numbers carry their unit in the key. A value the board
cannot measure is null, never a guess. Every message has `schema`, `device`, `seq`, `ts`.
`seq` of telemetry increases by one per window, across restarts (the spool persists it), so a
subscriber can tell a gap from a pause.
"""

from __future__ import annotations

import json
import math
import re
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.untrusted import loads_json

TELEMETRY_SCHEMA = "edgeforge.telemetry/1"
INFO_SCHEMA = "edgeforge.info/1"
EVENT_SCHEMA = "edgeforge.event/1"
CMD_SCHEMA = "edgeforge.cmd/1"
CMD_RESULT_SCHEMA = "edgeforge.cmd_result/1"
RESULT_SCHEMA = "edgeforge.result/1"
SUMMARY_SCHEMA = "edgeforge.summary/1"

# The commands an agent answers on cmd/<name> (agent/remote_commands.py).
COMMANDS = ("update_model", "rollback", "set", "benchmark", "diagnostics", "rotate_key")

ONLINE = "online"
OFFLINE = "offline"

# Every telemetry message has these keys, plus the source's (SOURCE_TELEMETRY_KEYS, which the
# agent always sends) and `accuracy_pct` when source.kind is sample.
TELEMETRY_KEYS = (
    "schema", "device", "seq", "ts", "window_s", "batch_size", "inferences", "throughput_ips",
    "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "latency_max_ms", "latency_mean_ms",
    "proc_cpu_percent", "sys_cpu_percent", "rss_mb", "mem_percent", "load_1m", "soc_temp_c",
    "cpu_freq_mhz", "throttled", "under_voltage", "freq_capped", "throttling",
    "spool_depth", "dropped_total", "model_sha256",
)
# What the source did in the window (agent/sources.py); the agent always sends them, the
# stage percentiles are null for random and sample, which have no capture or preprocess.
SOURCE_TELEMETRY_KEYS = (
    "source", "frames_in", "frames_dropped", "frames_failed", "results_published",
    "capture_p50_ms", "preprocess_p50_ms", "preprocess_p99_ms", "total_p50_ms",
    "total_p90_ms", "total_p99_ms",
)
# The bundle file that ran the window (agent/engines): an engine, or <engine>-fp32.
OPTIONAL_TELEMETRY_KEYS = ("accuracy_pct", "engine", *SOURCE_TELEMETRY_KEYS)
# The retained summary of the last window on <prefix>/<id>/summary (about 400 bytes against
# the telemetry's 900): what the monitor's table and alerts read, so a one-shot view judges
# every board the moment it subscribes instead of waiting a window for its telemetry.
SUMMARY_KEYS = (
    "schema", "device", "seq", "ts", "window_s", "inferences", "throughput_ips",
    "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "proc_cpu_percent", "rss_mb",
    "soc_temp_c", "throttling", "spool_depth", "dropped_total", "model_sha256", "engine",
    "accuracy_pct",
)


@dataclass(frozen=True)
class Topics:
    """The topics of one device."""

    status: str
    info: str
    telemetry: str
    event: str
    cmd_result: str
    cmd_prefix: str  # a command NAME arrives on <cmd_prefix>NAME
    result: str
    infer: str  # requests arrive here, or on infer/<request_id>
    summary: str  # the last window's summary, retained

    @classmethod
    def for_device(cls, prefix: str, device: str) -> Topics:
        base = f"{prefix.rstrip('/')}/{device}"
        return cls(f"{base}/status", f"{base}/info", f"{base}/telemetry", f"{base}/event",
                   f"{base}/cmd_result", f"{base}/cmd/", f"{base}/result", f"{base}/infer",
                   f"{base}/summary")

    def cmd(self, name: str) -> str:
        return f"{self.cmd_prefix}{name}"


def encode(message: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON, the wire format of every JSON topic."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode()


# The type of every telemetry and summary key that is not a plain number (a number or null):
# a monitor refuses a message whose value is of another type.
WHOLE_KEYS = ("seq", "batch_size", "inferences", "spool_depth", "dropped_total", "throttled",
              "frames_in", "frames_dropped", "frames_failed", "results_published")
FLAG_KEYS = ("under_voltage", "freq_capped", "throttling")
NAME_KEYS = ("source", "engine")
REQUIRED = ("seq", "ts", "device")  # never null
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}")
SHA256 = re.compile(r"[0-9a-f]{64}")


def check_value(kind: str, key: str, value: Any) -> None:
    """ValueError unless `value` has the type `key` has in telemetry and summaries."""
    if value is None:
        if key in REQUIRED:
            raise ValueError(f"{kind} {key} is null")
        return
    if key == "schema":
        return  # checked against the expected schema already
    if key == "device":  # any topic level; the monitor checks it against the topic's
        if not isinstance(value, str) or not 0 < len(value) <= 256:
            raise ValueError(f"{kind} device must be a name of 1-256 characters, got "
                             f"{value!r:.60}")
        return
    if key in FLAG_KEYS:
        if not isinstance(value, bool):
            raise ValueError(f"{kind} {key} must be true, false or null, got {value!r:.60}")
    elif key in NAME_KEYS:
        if not isinstance(value, str) or not NAME.fullmatch(value):
            raise ValueError(f"{kind} {key} must be a name (letters, digits, ._:+-; up to 128),"
                             f" got {value!r:.60}")
    elif key == "model_sha256":
        if not isinstance(value, str) or not SHA256.fullmatch(value):
            raise ValueError(f"{kind} model_sha256 must be 64 lowercase hex digits, got "
                             f"{value!r:.80}")
    elif key in WHOLE_KEYS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{kind} {key} must be a whole number, got {value!r:.60}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{kind} {key} must be a number or null, got {value!r:.60}")


def decode_telemetry(payload: bytes) -> dict[str, Any]:
    """Parse and check one telemetry payload.

    Raises:
        ValueError: not JSON, another schema, missing keys, or a value of the wrong type
            (check_value). The message says which.
    """
    msg = _json_message(payload, "telemetry", TELEMETRY_SCHEMA, TELEMETRY_KEYS)
    for key in (*TELEMETRY_KEYS, *OPTIONAL_TELEMETRY_KEYS):
        check_value("telemetry", key, msg.get(key))
    return msg


def _json_message(payload: bytes, kind: str, schema: str,
                  keys: Sequence[str]) -> dict[str, Any]:
    """A JSON object of `schema` with every one of `keys`, or ValueError saying what is not."""
    msg = loads_json(payload, f"{kind} payload")
    if not isinstance(msg, dict):
        raise ValueError(f"{kind} payload is not a JSON object")
    if msg.get("schema") != schema:
        raise ValueError(f"{kind} schema {msg.get('schema')!r}, expected {schema}")
    missing = [k for k in keys if k not in msg]
    if missing:
        raise ValueError(f"{kind} lacks {', '.join(missing)}")
    return msg


def summary_of(telemetry: dict[str, Any]) -> dict[str, Any]:
    """The retained summary of a telemetry message (SUMMARY_KEYS)."""
    return {"schema": SUMMARY_SCHEMA,
            **{k: telemetry.get(k) for k in SUMMARY_KEYS if k != "schema"}}


def decode_summary(payload: bytes) -> dict[str, Any]:
    """Parse and check one summary payload: the telemetry's rules on the summary's keys.

    Raises:
        ValueError: not JSON, another schema, missing keys or a wrong type; says which.
    """
    msg = _json_message(payload, "summary", SUMMARY_SCHEMA, SUMMARY_KEYS)
    for key in SUMMARY_KEYS:
        check_value("summary", key, msg[key])
    return {k: msg[k] for k in SUMMARY_KEYS}


def percentile(ordered: array | Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending sequence: the one percentile of every edgeforge
    figure (telemetry, the optimizer's report, benchmarks, smoke tests, trials)."""
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Window:
    """What the loop measured in one window; the publisher turns it into telemetry."""

    index: int
    end_ts: float  # wall clock, seconds since the epoch
    duration_s: float
    batch_size: int
    latencies_s: array  # one per forward pass
    correct: int | None = None  # top-1 hits when the input is the labelled sample
    labelled: int = 0
    model_sha256: str = ""  # the model that ran this window (updates switch it mid-run)
    shadow_latencies_s: array | None = None  # the old model's passes beside it, on trial
    source: Served | None = None  # what the source did, when it is one (not random/sample)
    engine: str = ""  # the engine that ran it (agent/engines)


@dataclass
class Served:
    """A window's real work: counts and per-stage latencies of every input (seconds)."""

    kind: str
    frames_in: int = 0  # accepted from the source, including those later dropped as stale
    frames_dropped: int = 0  # dropped or refused because inference was slower
    frames_failed: int = 0  # not a usable image
    inferred: int = 0  # images through the model (batches may be smaller than batch_size)
    results_published: int = 0  # handed to the publisher (after the publishing policy)
    capture_s: array = field(default_factory=lambda: array("d"))
    preprocess_s: array = field(default_factory=lambda: array("d"))
    total_s: array = field(default_factory=lambda: array("d"))


def telemetry_fields(window: Window) -> dict[str, Any]:
    """The loop-derived part of a telemetry message (latencies in ms)."""
    lat = sorted(window.latencies_s)
    n = len(lat)
    images = window.source.inferred if window.source is not None else n * window.batch_size
    ms = 1000.0
    fields: dict[str, Any] = {
        "window_s": round(window.duration_s, 3),
        "batch_size": window.batch_size,
        "inferences": images,
        "throughput_ips": round(images / window.duration_s, 2) if window.duration_s > 0 else None,
        "latency_p50_ms": round(percentile(lat, 50) * ms, 4) if n else None,
        "latency_p90_ms": round(percentile(lat, 90) * ms, 4) if n else None,
        "latency_p99_ms": round(percentile(lat, 99) * ms, 4) if n else None,
        "latency_max_ms": round(lat[-1] * ms, 4) if n else None,
        "latency_mean_ms": round(sum(lat) / n * ms, 4) if n else None,
    }
    fields.update(source_fields(window))
    if window.correct is not None:
        fields["accuracy_pct"] = (round(100.0 * window.correct / window.labelled, 2)
                                  if window.labelled else None)
    return fields


def source_fields(window: Window) -> dict[str, Any]:
    """The source part of a telemetry message: counts, and stage percentiles in ms."""
    served = window.source
    if served is None:
        kind = "sample" if window.correct is not None else "random"
        return {"source": kind, "frames_in": None, "frames_dropped": None,
                "frames_failed": None, "results_published": None,
                **{k: None for k in SOURCE_TELEMETRY_KEYS[5:]}}

    def pct(values: array, p: float) -> float | None:
        return round(percentile(sorted(values), p) * 1000.0, 4) if values else None

    return {"source": served.kind, "frames_in": served.frames_in,
            "frames_dropped": served.frames_dropped, "frames_failed": served.frames_failed,
            "results_published": served.results_published,
            "capture_p50_ms": pct(served.capture_s, 50),
            "preprocess_p50_ms": pct(served.preprocess_s, 50),
            "preprocess_p99_ms": pct(served.preprocess_s, 99),
            "total_p50_ms": pct(served.total_s, 50), "total_p90_ms": pct(served.total_s, 90),
            "total_p99_ms": pct(served.total_s, 99)}
