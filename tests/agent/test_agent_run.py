"""edge-agent run against a real mosquitto: telemetry, retained state, outages, restarts."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from agent.telemetry import OPTIONAL_TELEMETRY_KEYS, TELEMETRY_KEYS, decode_telemetry
from tests.support import Agent
from tests.support.broker import Broker, Subscriber

pytestmark = pytest.mark.e2e


def contiguous(seqs: list[int]) -> bool:
    unique = sorted(set(seqs))
    return unique == list(range(unique[0], unique[-1] + 1))


def run_to_completion_with_broker(bundle: Path, broker: Broker, tmp_path: Path,
                                  *overrides: str, duration: float) -> Subscriber:
    """Start `broker`, run an agent for `duration` while a subscriber records; stop both."""
    broker.start()
    try:
        sub = Subscriber(broker.port)
        agent = Agent(bundle, broker.port, tmp_path, *overrides, duration=duration)
        assert agent.wait() == 0, agent.output()
        sub.wait_for(lambda: sub.status() == "offline", 10, "offline")
        sub.close()
    finally:
        broker.stop()
    return sub


def test_publishes_schema_checked_telemetry_and_retained_status_and_info(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=sample", duration=3)
    assert agent.wait() == 0, agent.output()
    sub.wait_for(lambda: sub.status() == "offline", 10, "offline after a clean exit")
    sub.close()
    messages = [decode_telemetry(p) for p, _ in sub.on("/telemetry")]
    assert len(messages) >= 5
    assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
    for m in messages:
        # Exactly the keys the contract lists (source.kind=sample adds accuracy_pct).
        assert set(m) == {*TELEMETRY_KEYS, *OPTIONAL_TELEMETRY_KEYS} and m["device"] == "testboard"
        assert m["source"] == "sample" and m["frames_in"] is None
        assert m["inferences"] > 0 and 0 < m["latency_p50_ms"] <= m["latency_p99_ms"] \
            <= m["latency_max_ms"]
        assert m["rss_mb"] > 50 and m["proc_cpu_percent"] is not None
        assert m["throttled"] is None  # not a Raspberry Pi: null, not a guess
        assert 0 <= m["accuracy_pct"] <= 100
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert messages[0]["model_sha256"] == manifest["files"][manifest["board_model"]]["sha256"]
    # One readable line per window on the console.
    assert agent.output().count(" seq ") >= len(messages)
    # Retained: a plain mosquitto_sub connecting afterwards sees status and info.
    out = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-t",
                          "edgeforge/testboard/+", "-v", "-C", "2", "-W", "5",
                          "-T", "edgeforge/testboard/telemetry"],
                         capture_output=True, text=True, timeout=10).stdout.splitlines()
    status = [line for line in out if line.startswith("edgeforge/testboard/status ")]
    info = [line for line in out if line.startswith("edgeforge/testboard/info ")]
    assert status == ["edgeforge/testboard/status offline"]
    birth = json.loads(info[0].split(" ", 1)[1])
    assert birth["model_sha256"] == messages[0]["model_sha256"]
    assert birth["quantized_engine"] == "qnnpack" and birth["engine"] in (
        "torchscript", "onnxruntime", "executorch")
    # the choice is measured and explained, and every window names the engine that ran it
    choice = birth["engine_choice"]
    assert choice["setting"] == "auto" and "fastest proven" in choice["reason"]
    assert [e["status"] for e in choice["engines"]] == ["proven"] * 3
    assert {m["engine"] for m in messages} == {birth["engine"]}
    assert birth["restart_count"] == 0 and birth["last_exit"] == "first start"


def test_sigterm_closes_the_window_publishes_offline_and_exits_0_within_5_s(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path, "loop.window_s=60")
    sub.wait_for(lambda: sub.status() == "online", 60, "online")
    time.sleep(1.0)
    t0 = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.wait(10) == 0, agent.output()
    assert time.monotonic() - t0 < 5
    sub.wait_for(lambda: sub.status() == "offline", 5, "offline")
    sub.close()
    # The 60 s window was cut short and still published.
    (only,) = sub.telemetry()
    assert only["seq"] == 1 and 0.5 < only["window_s"] < 10 and only["inferences"] > 0
    assert "stopped (SIGTERM)" in agent.output()


def test_last_will_marks_the_board_offline_after_kill_9(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path)
    sub.wait_for(lambda: sub.status() == "online", 60, "online")
    agent.kill()
    sub.wait_for(lambda: sub.status() == "offline", 10, "the last will")
    sub.close()


def test_broker_restart_mid_run_loses_nothing(bundle: Path, broker: Broker,
                                              tmp_path: Path) -> None:
    """Broker down for over 10 s: the subscriber still sees every seq, in order, no gap."""
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path)
    try:
        sub.wait_for(lambda: len(sub.seqs()) >= 3, 60, "three windows")
        broker.stop()
        time.sleep(11)
        broker.start()
        seen_before = max(sub.seqs())
        # ~22 windows were spooled during the outage; wait for them and a few new ones.
        sub.wait_for(lambda: max(sub.seqs()) >= seen_before + 26, 60, "the spooled windows")
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.wait(10) == 0
    finally:
        agent.kill()
        sub.close()
    seqs = sub.seqs()
    assert contiguous(seqs) and min(seqs) == 1, seqs
    # Arrival order is seq order (duplicates, allowed by QoS 1, only repeat a seq).
    firsts = list(dict.fromkeys(seqs))
    assert firsts == sorted(firsts)
    # It said so once per reconnect attempt, not once per spooled message.
    log = agent.output()
    assert 1 <= log.count("lost the broker") + log.count("cannot reach broker") <= 8, log


def test_messages_spooled_before_kill_9_are_replayed_after_restart(
        bundle: Path, tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker")
    first = Agent(bundle, broker.port, tmp_path)  # no broker yet: it runs and spools
    try:
        deadline = time.monotonic() + 60
        while first.output().count(" seq ") < 6 and time.monotonic() < deadline:
            time.sleep(0.1)
        first.kill()
    finally:
        first.kill()
    spooled = first.output().count(" seq ")
    assert spooled >= 6
    warnings = first.output().count("cannot reach broker")
    assert 1 <= warnings < spooled, first.output()
    sub = run_to_completion_with_broker(bundle, broker, tmp_path, duration=2)
    seqs = sub.seqs()
    assert min(seqs) == 1 and contiguous(seqs) and max(seqs) > spooled, seqs
    birth = json.loads(sub.on("/info")[-1][0])
    assert birth["restart_count"] == 1 and birth["last_exit"].startswith("killed")


def test_corrupt_spool_is_moved_aside_and_reported(bundle: Path, broker: Broker,
                                                   tmp_path: Path) -> None:
    (tmp_path / "spool.db").write_bytes(b"this is not an SQLite database" * 100)
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path, duration=2)
    assert agent.wait() == 0, agent.output()
    sub.wait_for(lambda: bool(sub.on("/event")) and len(sub.seqs()) >= 3, 10, "event")
    sub.close()
    aside = list(tmp_path.glob("spool.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")
    event = json.loads(sub.on("/event")[0][0])
    assert event["event"] == "spool_reset" and "moved to" in event["detail"]
    assert sub.seqs()[0] == 1


def test_a_full_spool_drops_the_oldest_and_reports_dropped_total(bundle: Path,
                                                                 tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker")
    # About three telemetry rows fit in 3 KB: no broker, so the oldest must go.
    first = Agent(bundle, broker.port, tmp_path, "spool.max_mb=0.003", duration=4)
    assert first.wait() == 0, first.output()
    made = first.output().count(" seq ")
    assert made >= 7
    sub = run_to_completion_with_broker(bundle, broker, tmp_path, "spool.max_mb=0.003",
                                        duration=1.5)
    telemetry = sub.telemetry()
    replayed = [m["seq"] for m in telemetry if m["seq"] <= made]
    assert replayed and replayed == list(range(made - len(replayed) + 1, made + 1))
    # The newest few survived (about 5 rows of ~600 bytes fit); the oldest were dropped.
    assert len(replayed) <= 5 and len(replayed) <= made - 2
    newer = [m for m in telemetry if m["seq"] > made]
    assert newer and newer[-1]["dropped_total"] == made - len(replayed)
