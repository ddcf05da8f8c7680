"""The `monitor` section of config.yaml: staleness, alert thresholds, history."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.config import MqttConfig, in_range, require

SORT_KEYS = ("device", "status", "model", "p50", "p99", "throughput", "cpu", "temp", "rss",
             "spool", "age")


@dataclass(frozen=True)
class MonitorConfig:
    stale_s: float = 30.0  # no telemetry for this long: stale, before any last will
    listen_s: float = 3.0  # --once and check: how long to listen before the snapshot
    refresh_s: float = 1.0  # the live table's refresh period
    sort: str = "device"  # the live table's default sort column
    alert_p99_ms: float | None = 50.0  # latency p99 above this; null = off
    alert_temp_c: float | None = 80.0  # SoC temperature above this; null = off
    alert_throttled: bool = True  # the Pi firmware says it is throttling now
    alert_offline_s: float | None = 60.0  # offline or stale for longer than this; null = off
    alert_spool_growing: int = 5  # spool depth grew in this many windows in a row; 0 = off
    history: str = "monitor.sqlite3"  # edge-monitor record's SQLite file
    history_max_age_s: float = 7 * 24 * 3600.0  # older rows are deleted
    max_payload_kb: float = 64.0  # a larger message is refused before it is parsed

    def __post_init__(self) -> None:
        in_range(self.stale_s, "stale_s", 0.1, 86_400, " seconds")
        in_range(self.listen_s, "listen_s", 0.1, 3600, " seconds")
        in_range(self.refresh_s, "refresh_s", 0.1, 3600, " seconds")
        require(self.sort in SORT_KEYS, "sort", f"must be one of {', '.join(SORT_KEYS)}, "
                f"got {self.sort!r}")
        for key, lo, hi, unit in (("alert_p99_ms", 0.001, 3_600_000, " ms"),
                                  ("alert_temp_c", -40, 150, " C"),
                                  ("alert_offline_s", 1, 30 * 86_400, " seconds")):
            value = getattr(self, key)
            if value is not None:
                in_range(value, key, lo, hi, f"{unit} or null")
        in_range(self.alert_spool_growing, "alert_spool_growing", 0, 10_000)
        in_range(self.history_max_age_s, "history_max_age_s", 60, 10 * 365 * 86_400,
                 " seconds")
        in_range(self.max_payload_kb, "max_payload_kb", 1, 16_384, " KB")


@dataclass(frozen=True)
class MonitorCommandConfig:
    """What edge-monitor reads: the broker and the monitor section."""

    mqtt: MqttConfig = field(default_factory=MqttConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
