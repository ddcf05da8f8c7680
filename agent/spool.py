"""The durable outbox: every message is written here before MQTT sees it.

One SQLite file in WAL mode with two tables:

    outbox(id INTEGER PRIMARY KEY AUTOINCREMENT, ts, topic, qos, retain, payload)
    meta(key PRIMARY KEY, value)      counters: seq.<name>, dropped_total, starts, last_exit

A row leaves `outbox` only when the broker has acknowledged it (`ack`), so after an outage
or a restart (kill -9 included) `pending` hands back everything unacknowledged in id order.
Message counters (`seq.telemetry`) live in the same file and are advanced in the same
transaction as the insert, so a seq is never reused, even across a crash.

The outbox is bounded by `max_bytes` and `max_age_s`: the oldest rows go first and are counted
in `dropped_total`. A file SQLite cannot read is moved aside (`<path>.corrupt-<utc time>`) and
a fresh spool is created; `reset_reason` says so, for the agent to publish as an event.
One agent owns a spool at a time (an flock on `<path>.lock`).

Not thread-safe: one thread (the publisher) owns the Spool.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from agent.errors import ConfigError

SYSTEM_STATE_DIR = Path("/var/lib/edgeforge")

# A row's cost against max_bytes: its payload and topic plus SQLite's per-row overhead,
# estimated. The file itself is somewhat larger (pages, WAL).
ROW_OVERHEAD = 64


def spool_path(configured: str, environ: Mapping[str, str], is_root: bool) -> Path:
    """Where the spool lives, whatever the working directory.

    An absolute `spool.path` is used as it is. A relative one lives in the agent's state
    directory: $STATE_DIRECTORY (systemd's StateDirectory=), else /var/lib/edgeforge for
    root, else $XDG_STATE_HOME/edgeforge (~/.local/state/edgeforge), so an agent started by
    hand from any folder finds the same spool and its seq keeps counting.
    """
    path = Path(configured).expanduser()
    if path.is_absolute():
        return path
    state = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state) / path
    if is_root:
        return SYSTEM_STATE_DIR / path
    xdg = environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if xdg.startswith("/") else Path.home() / ".local" / "state"
    return base / "edgeforge" / path


@dataclass(frozen=True)
class Entry:
    id: int
    ts: float
    topic: str
    qos: int
    retain: bool
    payload: bytes


class Spool:
    """An SQLite outbox bounded by size and age; see the module docstring."""

    def __init__(self, path: Path, max_bytes: int, max_age_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._clock = clock
        self.reset_reason: str | None = None
        self._lock = self._take_lock()
        self._db = self._open_or_reset()
        self._depth = self._bytes = 0
        self._recount()

    # --- opening ---------------------------------------------------------------------

    def _take_lock(self) -> IO[str]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(f"{self.path}.lock", "a+")  # noqa: SIM115 -- held for our lifetime
        except OSError as exc:
            raise ConfigError(f"spool.path: cannot create {self.path} ({exc.strerror}): point "
                              f"spool.path at a writable location") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise ConfigError(f"spool.path: {self.path} is in use by another edge-agent (stop "
                              f"it, or give this one its own spool.path)") from None
        return lock

    def _open_or_reset(self) -> sqlite3.Connection:
        try:
            return self._open()
        except sqlite3.OperationalError as exc:
            raise ConfigError(f"spool.path: cannot open {self.path} ({exc}): point spool.path "
                              f"at a writable location") from None
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(
                f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{self.path}{suffix}")
                if src.exists():
                    os.replace(src, f"{aside}{suffix}")
            self.reset_reason = f"spool {self.path} was unreadable ({exc}); moved to {aside}"
            return self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA busy_timeout=2000")
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed window survives power loss too. One fsync per window is cheap.
            db.execute("PRAGMA synchronous=FULL")
            status = db.execute("PRAGMA quick_check").fetchone()[0]
            if status != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {status}")
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)")
            db.execute("CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY "
                       "AUTOINCREMENT, ts REAL NOT NULL, topic TEXT NOT NULL, qos INTEGER NOT "
                       "NULL, retain INTEGER NOT NULL, payload BLOB NOT NULL)")
            db.execute("SELECT id, ts, topic, qos, retain, payload FROM outbox LIMIT 1")
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        """Close the database and release the lock."""
        self._db.close()
        self._lock.close()

    # --- counters --------------------------------------------------------------------

    def get(self, key: str, default: int | str | None = None) -> int | str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def set(self, key: str, value: int | str | None) -> None:
        self._db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) "
                         "DO UPDATE SET value = excluded.value", (key, value))

    @property
    def dropped_total(self) -> int:
        return int(self.get("dropped_total", 0) or 0)

    @property
    def depth(self) -> int:
        """Messages waiting for the broker's acknowledgement."""
        return self._depth

    @property
    def stored_bytes(self) -> int:
        return self._bytes

    # --- the outbox ------------------------------------------------------------------

    def append(self, topic: str, make_payload: Callable[[int], bytes], counter: str,
               qos: int = 1, retain: bool = False) -> tuple[int, int]:
        """Take the next `counter` seq, store make_payload(seq), enforce the bounds.

        Returns (row id, seq). The seq and the row are committed together.
        """
        now = self._clock()
        key = f"seq.{counter}"
        self._db.execute("BEGIN IMMEDIATE")
        try:
            seq = int(self.get(key, 1) or 1)
            payload = make_payload(seq)
            cur = self._db.execute("INSERT INTO outbox(ts, topic, qos, retain, payload) "
                                   "VALUES(?, ?, ?, ?, ?)", (now, topic, qos, int(retain),
                                                             payload))
            self.set(key, seq + 1)
            self._depth += 1
            self._bytes += len(payload) + len(topic.encode()) + ROW_OVERHEAD
            self._enforce_bounds(now)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            self._recount()
            raise
        return int(cur.lastrowid or 0), seq

    def skip(self, counter: str, count: int) -> None:
        """Burn `count` seqs of `counter` for messages lost before they reached the spool
        (the publisher's queue was full): a subscriber sees the gap, `dropped_total` counts
        them, both in one transaction."""
        if count <= 0:
            return
        key = f"seq.{counter}"
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self.set(key, int(self.get(key, 1) or 1) + count)
            self.set("dropped_total", self.dropped_total + count)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def pending(self, after_id: int = 0, limit: int = 100) -> list[Entry]:
        """Unacknowledged rows with id > after_id, oldest first."""
        rows = self._db.execute("SELECT id, ts, topic, qos, retain, payload FROM outbox "
                                "WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit))
        return [Entry(int(r[0]), float(r[1]), r[2], int(r[3]), bool(r[4]), bytes(r[5]))
                for r in rows]

    def ack(self, ids: Iterable[int]) -> int:
        """Delete acknowledged rows in one transaction; returns how many were still there."""
        ids = list(ids)
        if not ids:
            return 0
        self._db.execute("BEGIN IMMEDIATE")
        try:
            removed = self._delete(f"id IN ({','.join('?' * len(ids))})", ids)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            self._recount()
            raise
        return removed

    def _measure(self, where: str, params: list[object]) -> tuple[int, int]:
        """(rows, their cost against max_bytes) of the rows matching `where`."""
        count, size = self._db.execute(f"SELECT COUNT(*), COALESCE(SUM(LENGTH(payload) + "
                                       f"LENGTH(topic)), 0) FROM outbox WHERE {where}",
                                       params).fetchone()
        return int(count), int(size) + ROW_OVERHEAD * int(count)

    def _delete(self, where: str, params: Iterable[object]) -> int:
        params = list(params)
        count, cost = self._measure(where, params)
        if count:
            self._db.execute(f"DELETE FROM outbox WHERE {where}", params)
            self._depth -= count
            self._bytes -= cost
        return count

    def _enforce_bounds(self, now: float) -> None:
        dropped = self._delete("ts < ?", [now - self.max_age_s])
        while self._bytes > self.max_bytes and self._depth > 1:
            excess = self._bytes - self.max_bytes
            # Oldest rows first; estimate how many to drop from the average row size.
            n = max(1, min(self._depth - 1, -(-excess * self._depth // self._bytes)))
            dropped += self._delete("id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)", [n])
        if dropped:
            self.set("dropped_total", self.dropped_total + dropped)

    def _recount(self) -> None:
        self._depth, self._bytes = self._measure("1", [])
