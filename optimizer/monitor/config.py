"""The `monitor` section of config.yaml: staleness, alert thresholds, history."""

from __future__ import annotations

from dataclasses import dataclass

from agent.config import require

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

    def __post_init__(self) -> None:
        require(self.stale_s > 0, "stale_s", f"must be > 0, got {self.stale_s}")
        require(self.listen_s > 0, "listen_s", f"must be > 0, got {self.listen_s}")
        require(self.refresh_s > 0, "refresh_s", f"must be > 0, got {self.refresh_s}")
        require(self.sort in SORT_KEYS, "sort", f"must be one of {', '.join(SORT_KEYS)}, "
                f"got {self.sort!r}")
        for key in ("alert_p99_ms", "alert_temp_c", "alert_offline_s"):
            value = getattr(self, key)
            require(value is None or value > 0, key, f"must be > 0 or null, got {value}")
        require(self.alert_spool_growing >= 0, "alert_spool_growing",
                f"must be >= 0, got {self.alert_spool_growing}")
        require(self.history_max_age_s > 0, "history_max_age_s",
                f"must be > 0, got {self.history_max_age_s}")
