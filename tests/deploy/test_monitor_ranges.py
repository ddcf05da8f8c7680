"""The monitor checks ranges, not only types: every numeric telemetry field outside what a
real board can produce is refused (counted for its device), and the history writer takes
every message that passed, whatever its values."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from agent.telemetry import OPTIONAL_TELEMETRY_KEYS, TELEMETRY_KEYS, WHOLE_KEYS
from deploy.monitor.fleet import RANGES, Fleet, check_telemetry
from deploy.monitor.history import History
from tests.test_bad_input_sweep import good_telemetry

pytestmark = pytest.mark.unit

NUMERIC = [key for key, _, _ in RANGES]
EXTREMES: list[Any] = [2**63, 2**64 + 1, 10**40, -(10**40), 1e300, -1e300, 1.7e308,
                       2**63 - 1, -1, 0, 1e-300, 5e-324]


def message(**changes: Any) -> bytes:
    return json.dumps({**good_telemetry("b1"), **changes}).encode()


def test_every_numeric_telemetry_key_has_a_range() -> None:
    numeric = {k for k in (*TELEMETRY_KEYS, *OPTIONAL_TELEMETRY_KEYS)
               if k not in ("schema", "device", "model_sha256", "engine", "source",
                            "under_voltage", "freq_capped", "throttling")}
    assert numeric == set(NUMERIC)


@pytest.mark.parametrize("key, lo, hi", [r for r in RANGES if r[0] != "ts"])
def test_a_value_past_either_end_of_its_range_is_refused_and_counted(key: str, lo: float,
                                                                     hi: float) -> None:
    fleet = Fleet("edgeforge")
    whole = key in WHOLE_KEYS
    for value in ((int(hi) + 1, int(lo) - 1, 10**30) if whole else (hi * 2 + 1, lo - 1, 1e300)):
        assert fleet.ingest("edgeforge/b1/telemetry", message(**{key: value})) is None
    dev = fleet.devices["b1"]
    assert dev.bad_messages == 3 and key in (dev.last_problem or ""), dev.last_problem
    assert fleet.ingest("edgeforge/b1/telemetry", message()) is not None


def test_the_history_writer_takes_every_message_that_passed(tmp_path: Path) -> None:
    """10,000 messages of extreme values from 200 devices: each is refused by the check or
    stored; none raises in the writer."""
    rng = random.Random(7)
    history = History(tmp_path / "h.sqlite3", 86_400)
    fleet = Fleet("edgeforge")
    passed = 0
    now = time.time()
    for i in range(10_000):
        changes = {rng.choice(NUMERIC): rng.choice(EXTREMES) for _ in range(rng.randint(1, 4))}
        if "ts" in changes:
            changes["ts"] = now - rng.random() * 100
        changes["seq"] = i if "seq" not in changes else changes["seq"]
        device = f"d{rng.randrange(200)}"
        payload = json.dumps({**good_telemetry(device), **changes}).encode()
        good = fleet.ingest(f"edgeforge/{device}/telemetry", payload)
        if good is not None:
            history.add(good[1])
            passed += 1
    history.flush()
    assert history.total() == passed > 100
    refused = sum(d.bad_messages for d in fleet.devices.values())
    assert passed + refused == 10_000
    history.close()


@pytest.mark.parametrize("ts", [-1e300, -1.0, 1e300, 2**70])
def test_a_timestamp_outside_any_clock_is_refused(ts: float) -> None:
    with pytest.raises(ValueError, match="ts"):
        check_telemetry(message(ts=ts))


def test_check_telemetry_names_the_key_and_quotes_a_short_value() -> None:
    with pytest.raises(ValueError) as err:
        check_telemetry(message(rss_mb=10**39))
    assert "rss_mb" in str(err.value) and len(str(err.value)) < 200
