"""The durable outbox: every message is written here before MQTT sees it.

One SQLite file in WAL mode with two tables:

    outbox(id INTEGER PRIMARY KEY AUTOINCREMENT, ts, topic, qos, retain, payload)
    meta(key PRIMARY KEY, value)      counters: seq.<name>, dropped_total, starts, last_exit
    answered(marker PRIMARY KEY, ts)  inputs whose result is spooled (see below)

A row leaves `outbox` only when the broker has acknowledged it (`ack`), so after an outage
or a restart (kill -9 included) `pending` hands back everything unacknowledged in id order.
Message counters (`seq.telemetry`) live in the same file and are advanced in the same
transaction as the insert, so a seq is never reused, even across a crash.

The outbox is bounded by `max_bytes` and `max_age_s`: the oldest rows go first and are counted
in `dropped_total`. A file SQLite cannot read is moved aside (`<path>.corrupt-<utc time>`) and
a fresh spool is created; `reset_reason` says so, for the agent to publish as an event.
One agent owns a spool at a time (an flock on `<path>.lock`).

When a write fails (the disk is full, an I/O error), the transaction is rolled back whole:
nothing is claimed as spooled that is not in the file. The message's seq is burnt and the
message counted as dropped in memory (`dropped_total` includes it at once), and both are
written with the next write that succeeds, so when space returns the gap and the count reach
the file too. `trouble` holds the last write error until a write succeeds again.

`answered` keeps markers of inputs whose result is in the outbox (a watched file, a retained
request), written in the result's own transaction, so a restart after a kill -9 at any
moment answers each input once. Markers older than `MARKER_TTL_S` are forgotten.

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
MARKER_TTL_S = 7 * 24 * 3600.0  # an answered input is remembered this long


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
        self.trouble: str | None = None  # the last write error, until a write succeeds
        self._owed_seq: dict[str, int] = {}  # seqs burnt while writes failed
        self._owed_dropped = 0  # messages lost while writes failed
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
            raise ConfigError(f"spool.path: cannot create {self.path} ({exc.strerror}: "
                              f"{exc.filename}): point spool.path at a writable location"
                              ) from None
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
            db.execute("CREATE TABLE IF NOT EXISTS answered (marker TEXT PRIMARY KEY, "
                       "ts REAL NOT NULL)")
            # the week-old markers are deleted by age at each marked result: by index
            db.execute("CREATE INDEX IF NOT EXISTS answered_by_age ON answered(ts)")
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
        """Write a counter. Outside a transaction, a failed write is kept in `trouble`
        instead of raised: these counters (starts, last_exit) must not stop the agent."""
        try:
            self._db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) "
                             "DO UPDATE SET value = excluded.value", (key, value))
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                raise
            self.trouble = str(exc)

    @property
    def dropped_total(self) -> int:
        """Messages lost, including those lost while writes failed."""
        return int(self.get("dropped_total", 0) or 0) + self._owed_dropped

    def next_seq(self, counter: str) -> int:
        """The seq the next `counter` message gets (seqs burnt while writes failed count)."""
        return int(self.get(f"seq.{counter}", 1) or 1) + self._owed_seq.get(counter, 0)

    @property
    def depth(self) -> int:
        """Messages waiting for the broker's acknowledgement."""
        return self._depth

    @property
    def stored_bytes(self) -> int:
        return self._bytes

    # --- the outbox ------------------------------------------------------------------

    def append(self, topic: str, make_payload: Callable[[int], bytes], counter: str,
               qos: int = 1, retain: bool = False, marker: str | None = None
               ) -> tuple[int, int]:
        """Take the next `counter` seq, store make_payload(seq), enforce the bounds; with
        `marker`, record it in `answered` too.

        Returns (row id, seq). The seq, the row and the marker are committed together.

        Raises:
            sqlite3.Error: the write failed (disk full, I/O error): nothing was stored, the
                seq is burnt and the message counted in `dropped_total`.
        """
        now = self._clock()
        key = f"seq.{counter}"
        seq = self.next_seq(counter)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            payload = make_payload(seq)
            cur = self._db.execute("INSERT INTO outbox(ts, topic, qos, retain, payload) "
                                   "VALUES(?, ?, ?, ?, ?)", (now, topic, qos, int(retain),
                                                             payload))
            if marker is not None:  # the table grows only here: forget the old ones here
                self._db.execute("DELETE FROM answered WHERE ts < ?", (now - MARKER_TTL_S,))
                self._db.execute("INSERT OR REPLACE INTO answered(marker, ts) VALUES(?, ?)",
                                 (marker, now))
            self._settle_owed(skip=counter)
            self.set(key, seq + 1)
            self._depth += 1
            self._bytes += len(payload) + len(topic.encode()) + ROW_OVERHEAD
            self._enforce_bounds(now)
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._failed(exc)
            self._owe(counter, 1)
            raise
        except BaseException:
            self._failed(None)
            raise
        self._written()
        return int(cur.lastrowid or 0), seq

    def skip(self, counter: str, count: int) -> None:
        """Burn `count` seqs of `counter` for messages lost before they reached the spool
        (the publisher's queue was full): a subscriber sees the gap, `dropped_total` counts
        them, both in one transaction (or, while writes fail, in memory until one works)."""
        if count <= 0:
            return
        self._owe(counter, count)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._settle_owed()
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._failed(exc)
            return
        self._written()

    def answered(self, marker: str) -> bool:
        """Whether an input with this marker already has its result spooled."""
        return self._db.execute("SELECT 1 FROM answered WHERE marker = ?",
                                (marker,)).fetchone() is not None

    def markers(self, prefix: str) -> frozenset[str]:
        """Every remembered marker that starts with `prefix`."""
        rows = self._db.execute("SELECT marker FROM answered WHERE substr(marker, 1, ?) = ?",
                                (len(prefix), prefix))
        return frozenset(str(r[0]) for r in rows)

    def _owe(self, counter: str, count: int) -> None:
        self._owed_seq[counter] = self._owed_seq.get(counter, 0) + count
        self._owed_dropped += count

    def _settle_owed(self, skip: str | None = None) -> None:
        """Write the seqs and drops owed from failed writes, inside the caller's transaction
        (`skip`: the counter the caller sets itself, from next_seq)."""
        for counter, count in self._owed_seq.items():
            if counter != skip:
                key = f"seq.{counter}"
                self.set(key, int(self.get(key, 1) or 1) + count)
        if self._owed_dropped:
            self.set("dropped_total", int(self.get("dropped_total", 0) or 0)
                     + self._owed_dropped)

    def _written(self) -> None:
        """A transaction committed: what was owed is in the file now."""
        self._owed_seq.clear()
        self._owed_dropped = 0
        self.trouble = None

    def _failed(self, exc: sqlite3.Error | None) -> None:
        """Undo a failed transaction. SQLite may have rolled it back itself (SQLITE_FULL
        does), so a ROLLBACK is sent only while one is open; the counts are read again."""
        if exc is not None:
            self.trouble = str(exc)
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the connection stays usable; SQLite undoes the journal on the next write
        try:
            self._recount()
        except sqlite3.Error:
            pass
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
        try:
            self._db.execute("BEGIN IMMEDIATE")
            removed = self._delete(f"id IN ({','.join('?' * len(ids))})", ids)
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._failed(exc)
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
            self.set("dropped_total", int(self.get("dropped_total", 0) or 0) + dropped)

    def _recount(self) -> None:
        self._depth, self._bytes = self._measure("1", [])
