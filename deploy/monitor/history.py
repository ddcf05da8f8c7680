"""`edge-monitor record` and `plot`: every good telemetry window in SQLite, drawn over time.

One row per window, numbers only (about 70 bytes a window with its indexes, README):

    windows(device_id, ts_ms, seq, p50_us, p90_us, p99_us, max_us, ips_x10, cpu_x10,
            sys_cpu_x10, rss_x10, temp_x10, spool_depth, dropped_total, throttling, model_id)

Fixed-point integers (microseconds, tenths) because SQLite stores a small integer in 1 to 4
bytes and a float in 8; device ids and model shas are numbered once in their own tables.
`ts` is the board's window end. A message that fails the checks in fleet.py never gets here.

Rows are buffered and committed in one transaction every second or every `BATCH` rows
(one commit per message cost 203 us against 12.5 us batched). Rows older than
`monitor.history_max_age_s` are deleted through the `ts_ms` index in slices of `PRUNE_ROWS`,
one slice per flush, so the clean-up never holds the writer for long. A file of the old
layout (one JSON per row, table `telemetry`) is read for `plot` as before and not written.
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
CREATE TABLE IF NOT EXISTS devices (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS models (id INTEGER PRIMARY KEY, sha256 TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS windows (
    device_id INTEGER NOT NULL, ts_ms INTEGER NOT NULL, seq INTEGER, p50_us INTEGER,
    p90_us INTEGER, p99_us INTEGER, max_us INTEGER, ips_x10 INTEGER, cpu_x10 INTEGER,
    sys_cpu_x10 INTEGER, rss_x10 INTEGER, temp_x10 INTEGER, spool_depth INTEGER,
    dropped_total INTEGER, throttling INTEGER, model_id INTEGER,
    PRIMARY KEY (device_id, ts_ms, seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS windows_ts ON windows (ts_ms);
"""
# (column, telemetry key, scale): stored as round(value * scale), read back as / scale.
COLUMNS = (("p50_us", "latency_p50_ms", 1000), ("p90_us", "latency_p90_ms", 1000),
           ("p99_us", "latency_p99_ms", 1000), ("max_us", "latency_max_ms", 1000),
           ("ips_x10", "throughput_ips", 10), ("cpu_x10", "proc_cpu_percent", 10),
           ("sys_cpu_x10", "sys_cpu_percent", 10), ("rss_x10", "rss_mb", 10),
           ("temp_x10", "soc_temp_c", 10), ("spool_depth", "spool_depth", 1),
           ("dropped_total", "dropped_total", 1))
BATCH = 500  # rows per transaction at most
FLUSH_S = 1.0  # and at least this often while rows wait
PRUNE_ROWS = 5000  # rows deleted per flush at most
PRUNE_EVERY_S = 60.0
OPEN_WAIT_S = 10.0  # how long a recorder waits for another one that holds the file


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


INTEGER_MAX = 2**63 - 1  # SQLite's INTEGER


def _fixed(value: Any, scale: int) -> int | None:
    if value is None:
        return None
    try:  # an int stays exact: as a float, 2**63 - 1 would round up past the limit
        scaled = value * scale if isinstance(value, int) else round(float(value) * scale)
    except (OverflowError, ValueError):  # infinity, NaN
        scaled = None
    if scaled is None or not -INTEGER_MAX <= scaled <= INTEGER_MAX:
        raise ValueError(f"{value!r:.40} does not fit a history column (x{scale})")
    return int(scaled)


class History:
    """The SQLite file of recorded telemetry."""

    def __init__(self, path: Path, max_age_s: float) -> None:
        self.path = path
        self.max_age_s = max_age_s
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None, timeout=OPEN_WAIT_S)
            self._set_up(time.monotonic() + OPEN_WAIT_S)
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{path}: not a usable history file ({exc}); point "
                              f"monitor.history elsewhere or move it aside") from None
        self._ids: dict[tuple[str, str], int] = {}
        self._rows: list[tuple[Any, ...]] = []
        self._flushed = time.monotonic()
        self._pruned = 0.0
        self.stored = 0  # rows committed by this process
        self.pruned = 0  # rows deleted by this process
        self.slowest_flush_s = 0.0  # the longest flush (commit and clean-up) so far
        self.slowest_prune_s = 0.0  # the longest clean-up slice so far

    def _set_up(self, deadline: float) -> None:
        """WAL mode and the tables, waiting out another recorder that opens the file now.

        Switching to WAL needs the file to itself and SQLite reports "database is locked"
        at once rather than through the busy timeout, so the whole set-up is retried.
        """
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at each checkpoint
                self.db.executescript(SCHEMA)
                self.legacy = self.db.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' "
                    "AND name = 'telemetry'").fetchone() is not None
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self.flush()
        self.db.close()

    def _id(self, table: str, column: str, name: str) -> int:
        key = (table, name)
        if key not in self._ids:
            self.db.execute(f"INSERT OR IGNORE INTO {table} ({column}) VALUES (?)", (name,))
            row = self.db.execute(f"SELECT id FROM {table} WHERE {column} = ?", (name,))
            self._ids[key] = int(row.fetchone()[0])
        return self._ids[key]

    def add(self, msg: dict[str, Any]) -> None:
        """Buffer one checked telemetry message; committed by `flush` within FLUSH_S or BATCH
        rows (a duplicate delivery is stored once).

        Raises:
            ValueError: a value no column can hold (nothing is buffered): one such row would
                fail the whole batch's transaction.
        """
        model = msg.get("model_sha256")
        values = (_fixed(msg["ts"], 1000), _fixed(msg.get("seq") or 0, 1),
                  *(_fixed(msg.get(key), scale) for _, key, scale in COLUMNS))
        self._rows.append((
            self._id("devices", "name", msg["device"]), *values,
            None if msg.get("throttling") is None else int(bool(msg["throttling"])),
            self._id("models", "sha256", model) if model else None))
        if len(self._rows) >= BATCH or time.monotonic() - self._flushed >= FLUSH_S:
            self.flush()

    def due(self) -> bool:
        """Rows have waited FLUSH_S: the caller's idle moments flush them."""
        return bool(self._rows) and time.monotonic() - self._flushed >= FLUSH_S

    def flush(self) -> None:
        """Commit the buffered rows in one transaction; delete one slice of expired rows."""
        t0 = time.monotonic()
        if self._rows:
            marks = ", ".join("?" * (3 + len(COLUMNS) + 2))
            with self.db:  # one transaction
                self.db.execute("BEGIN")
                self.db.executemany(f"INSERT OR IGNORE INTO windows VALUES ({marks})",
                                    self._rows)
            self.stored += len(self._rows)
            self._rows.clear()
        now = time.time()
        if now - self._pruned > PRUNE_EVERY_S:
            cut = int((now - self.max_age_s) * 1000)
            p0 = time.monotonic()
            gone = self.db.execute(
                "DELETE FROM windows WHERE (device_id, ts_ms, seq) IN (SELECT device_id, "
                "ts_ms, seq FROM windows WHERE ts_ms < ? ORDER BY ts_ms LIMIT ?)",
                (cut, PRUNE_ROWS)).rowcount
            self.slowest_prune_s = max(self.slowest_prune_s, time.monotonic() - p0)
            self.pruned += gone
            if gone < PRUNE_ROWS:  # all expired rows gone: wait a minute; else next flush
                self._pruned = now
        self._flushed = time.monotonic()
        self.slowest_flush_s = max(self.slowest_flush_s, self._flushed - t0)

    def query(self, device: str, since_ts: float) -> list[dict[str, Any]]:
        """`device`'s windows since `since_ts`, oldest first, as telemetry-keyed dicts."""
        if self.legacy:
            rows = self.db.execute("SELECT message FROM telemetry WHERE device = ? AND ts >= ? "
                                   "ORDER BY ts", (device, since_ts)).fetchall()
            if rows:
                return [json.loads(r[0]) for r in rows]
        cols = ", ".join(c for c, _, _ in COLUMNS)
        rows = self.db.execute(
            f"SELECT ts_ms, seq, {cols}, throttling FROM windows JOIN devices ON devices.id = "
            f"device_id WHERE devices.name = ? AND ts_ms >= ? ORDER BY ts_ms",
            (device, int(since_ts * 1000))).fetchall()
        out = []
        for ts_ms, seq, *values, throttling in rows:
            msg: dict[str, Any] = {"device": device, "ts": ts_ms / 1000, "seq": seq,
                                   "throttling": None if throttling is None else
                                   bool(throttling)}
            for (_, key, scale), value in zip(COLUMNS, values, strict=True):
                msg[key] = None if value is None else value / scale
            out.append(msg)
        return out

    def count(self, device: str) -> int:
        """How many windows of `device` are committed."""
        row = self.db.execute("SELECT COUNT(*) FROM windows JOIN devices ON devices.id = "
                              "device_id WHERE devices.name = ?", (device,)).fetchone()
        return int(row[0])

    def total(self, since_ts: float = 0.0) -> int:
        """How many windows of every device are committed, those ending at `since_ts` or
        later."""
        return int(self.db.execute("SELECT COUNT(*) FROM windows WHERE ts_ms >= ?",
                                   (int(since_ts * 1000),)).fetchone()[0])

    def devices(self) -> list[str]:
        names = {r[0] for r in self.db.execute(
            "SELECT DISTINCT name FROM windows JOIN devices ON devices.id = device_id")}
        if self.legacy:
            names |= {r[0] for r in self.db.execute("SELECT DISTINCT device FROM telemetry")}
        return sorted(names)


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
