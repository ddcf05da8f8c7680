"""The SQLite outbox: order, acknowledgement, persistence, bounds, corruption, ownership."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.spool import ROW_OVERHEAD, Spool

pytestmark = pytest.mark.unit


class Clock:
    """A hand-driven clock, so age limits are tested without waiting."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def payload_of(size: int):  # type: ignore[no-untyped-def]
    return lambda seq: f"{seq:08d}".encode().ljust(size, b".")


def test_pending_is_in_order_and_ack_removes_rows(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", 10**6, 3600)
    ids = [spool.append("t", payload_of(10), "telemetry")[0] for _ in range(5)]
    assert [e.payload[:8] for e in spool.pending()] == [f"{s:08d}".encode() for s in range(1, 6)]
    assert spool.ack(ids[:2]) == 2 and spool.depth == 3
    assert [e.id for e in spool.pending()] == ids[2:]
    assert [e.id for e in spool.pending(after_id=ids[3])] == ids[4:]
    spool.close()


def test_seq_and_unacked_rows_survive_reopening(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", 10**6, 3600)
    for _ in range(3):
        spool.append("t", payload_of(10), "telemetry")
    spool.ack([spool.pending()[0].id])
    spool.close()  # as after kill -9: nothing else is written at exit
    again = Spool(tmp_path / "s.db", 10**6, 3600)
    assert again.depth == 2
    assert again.append("t", payload_of(10), "telemetry")[1] == 4  # seq never reused
    assert again.append("e", payload_of(10), "event")[1] == 1  # counters are independent
    again.close()


def test_size_bound_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    row = 100 + 1 + ROW_OVERHEAD
    spool = Spool(tmp_path / "s.db", 10 * row, 3600)
    for _ in range(25):
        spool.append("t", payload_of(100), "telemetry")
    assert spool.depth == 10 and spool.stored_bytes <= 10 * row
    assert spool.dropped_total == 15
    assert [int(e.payload[:8]) for e in spool.pending()] == list(range(16, 26))
    spool.close()
    again = Spool(tmp_path / "s.db", 10 * row, 3600)
    assert again.dropped_total == 15
    again.close()


def test_age_bound_drops_messages_older_than_max_age(tmp_path: Path) -> None:
    clock = Clock()
    spool = Spool(tmp_path / "s.db", 10**6, 60, clock=clock)
    for _ in range(3):
        spool.append("t", payload_of(10), "telemetry")
        clock.now += 25
    # Now the first is 75 s old, the second 50 s: only the first goes.
    spool.append("t", payload_of(10), "telemetry")
    assert [int(e.payload[:8]) for e in spool.pending()] == [2, 3, 4]
    assert spool.dropped_total == 1
    spool.close()


def test_unreadable_file_is_moved_aside_and_replaced(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    path.write_bytes(b"\x00garbage" * 512)
    spool = Spool(path, 10**6, 3600)
    assert spool.reset_reason and "moved to" in spool.reset_reason
    assert spool.depth == 0 and spool.append("t", payload_of(5), "telemetry")[1] == 1
    (aside,) = tmp_path.glob("s.db.corrupt-*")
    assert aside.read_bytes().startswith(b"\x00garbage")
    spool.close()


def test_a_second_agent_on_the_same_spool_is_refused(tmp_path: Path) -> None:
    first = Spool(tmp_path / "s.db", 10**6, 3600)
    with pytest.raises(ConfigError, match="in use by another edge-agent"):
        Spool(tmp_path / "s.db", 10**6, 3600)
    first.close()
    Spool(tmp_path / "s.db", 10**6, 3600).close()


def test_unwritable_location_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="spool.path"):
        Spool(blocker / "s.db", 10**6, 3600)


def test_a_full_database_rolls_back_whole_counts_the_loss_and_recovers(tmp_path: Path) -> None:
    """SQLITE_FULL (here from max_page_count, the error a full disk gives) rolls the
    transaction back itself: nothing is claimed as stored, the seq is burnt, the loss is
    counted at once and reaches the file with the next write that succeeds."""
    import sqlite3

    spool = Spool(tmp_path / "s.db", 10**8, 3600)
    spool.append("t", payload_of(10), "telemetry")
    pages = spool._db.execute("PRAGMA page_count").fetchone()[0]
    spool._db.execute(f"PRAGMA max_page_count = {pages + 1}")
    failed = 0
    for _ in range(50):
        try:
            spool.append("t", payload_of(3000), "telemetry")
        except sqlite3.Error as exc:
            assert "full" in str(exc)
            failed += 1
    stored = spool._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    assert failed > 0 and spool.depth == stored  # never claims what is not in the file
    assert spool.dropped_total == failed and spool.trouble is not None
    spool.skip("live_result", 2)  # counted in memory while the file is full
    assert spool.dropped_total == failed + 2
    spool._db.execute("PRAGMA max_page_count = 1000000")
    _, seq = spool.append("t", payload_of(10), "telemetry")
    assert seq == stored + failed + 1 and spool.trouble is None
    spool.close()
    again = Spool(tmp_path / "s.db", 10**8, 3600)
    assert again.dropped_total == failed + 2 and again.next_seq("telemetry") == seq + 1
    assert again.next_seq("live_result") == 3
    again.close()


def test_a_marker_is_stored_with_its_result_and_forgotten_after_a_week(tmp_path: Path) -> None:
    clock = Clock()
    spool = Spool(tmp_path / "s.db", 10**6, 30 * 86400, clock)
    spool.append("r", payload_of(10), "result", marker="file:a.png:10:1")
    assert spool.answered("file:a.png:10:1") and not spool.answered("file:b.png:10:1")
    assert spool.markers("file:") == {"file:a.png:10:1"} and spool.markers("request:") == set()
    clock.now += 8 * 86400
    spool.append("r", payload_of(10), "result", marker="file:b.png:10:1")
    assert spool.markers("file:") == {"file:b.png:10:1"}
    spool.close()
