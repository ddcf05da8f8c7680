"""`edge-monitor record` and `plot`: every good telemetry message in SQLite, drawn over time.

One row per message: (device, ts, seq, the message as JSON). `ts` is the board's window end.
A message that fails the checks in fleet.py never gets here. Rows older than
`monitor.history_max_age_s` are deleted as new ones arrive, at most once a minute.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

SCHEMA = """
CREATE TABLE IF NOT EXISTS telemetry (
    device TEXT NOT NULL, ts REAL NOT NULL, seq INTEGER, message TEXT NOT NULL,
    PRIMARY KEY (device, seq, ts));
CREATE INDEX IF NOT EXISTS telemetry_device_ts ON telemetry (device, ts);
"""


def parse_since(text: str) -> float:
    """'90s', '15m', '1h', '2d' -> seconds.

    Raises:
        ConfigError: anything else.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if not m:
        raise ConfigError(f"--since {text!r}: expected a number and a unit, e.g. 90s, 15m, 1h "
                          f"or 2d")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


class History:
    """The SQLite file of recorded telemetry."""

    def __init__(self, path: Path, max_age_s: float) -> None:
        self.path = path
        self.max_age_s = max_age_s
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{path}: not a usable history file ({exc}); point "
                              f"monitor.history elsewhere or move it aside") from None
        self._pruned = 0.0

    def close(self) -> None:
        self.db.close()

    def add(self, msg: dict[str, Any]) -> None:
        """Store one checked telemetry message (a duplicate delivery is stored once)."""
        self.db.execute("INSERT OR IGNORE INTO telemetry VALUES (?, ?, ?, ?)",
                        (msg["device"], float(msg["ts"]), msg.get("seq"), json.dumps(msg)))
        now = time.time()
        if now - self._pruned > 60:
            self.db.execute("DELETE FROM telemetry WHERE ts < ?", (now - self.max_age_s,))
            self._pruned = now

    def query(self, device: str, since_ts: float) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT message FROM telemetry WHERE device = ? AND ts >= ? "
                               "ORDER BY ts", (device, since_ts)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def devices(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT device FROM telemetry ORDER BY 1")]


def plot(rows: list[dict[str, Any]], device: str, out: Path) -> None:
    """Latency p50/p90/p99, throughput, CPU and temperature over time, as a PNG.

    Raises:
        ConfigError: matplotlib (the host extra) is not installed.
    """
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ConfigError("edge-monitor plot needs matplotlib, part of the host extra: pip "
                          "install 'edgeforge[host]'") from None

    matplotlib.use("Agg")
    from datetime import datetime

    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    times = [datetime.fromtimestamp(r["ts"]) for r in rows]

    def series(key: str) -> list[float]:
        return [float("nan") if r.get(key) is None else r[key] for r in rows]

    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    for key, label in (("latency_p50_ms", "p50"), ("latency_p90_ms", "p90"),
                       ("latency_p99_ms", "p99")):
        axes[0].plot(times, series(key), label=label)
    axes[0].set_ylabel("latency (ms)")
    axes[0].legend(loc="upper left")
    axes[1].plot(times, series("throughput_ips"), color="tab:green")
    axes[1].set_ylabel("throughput (img/s)")
    axes[2].plot(times, series("proc_cpu_percent"), label="agent")
    axes[2].plot(times, series("sys_cpu_percent"), label="system")
    axes[2].set_ylabel("CPU (%)")
    axes[2].legend(loc="upper left")
    temps = series("soc_temp_c")
    axes[3].plot(times, temps, color="tab:red")
    axes[3].set_ylabel("SoC temperature (C)")
    if all(t != t for t in temps):  # all NaN
        axes[3].text(0.5, 0.5, "no temperature sensor on this board", ha="center",
                     va="center", transform=axes[3].transAxes)
    axes[3].xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{device}: {len(rows)} telemetry windows, {times[0]:%Y-%m-%d %H:%M:%S} to "
                 f"{times[-1]:%H:%M:%S}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
