"""edge-monitor's one-shot views against a simulated fleet of thousands of boards
(benchmarks/fleet_sim.py) on a real mosquitto with its default limits."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.fleet_sim import SLOW_P99_MS, FleetSim, window_message
from deploy.monitor.history import PRUNE_ROWS, History
from tests.deploy.test_monitor import metric, metrics, wait
from tests.support import ROOT, run_cli
from tests.support.broker import Broker, Subscriber, free_port

# 10,000 boards: 30,000 retained messages, more than mosquitto writes to one subscriber at once
# with its default limits (a plain `+/summary` subscription got 1,535 of the 10,000 summaries):
# the monitor pages through them (deploy/monitor/paging.py).
BOARDS = 10_000


class Monitors:
    """edge-monitor subprocesses on one broker, each logging to `<name>.log`, stopped with
    SIGTERM (as systemd stops them)."""

    def __init__(self, tmp_path: Path, port: int) -> None:
        self.tmp_path, self.port = tmp_path, port
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []
        self.names: list[str] = []

    def start(self, name: str, *args: str) -> None:
        self.names.append(name)
        log = (self.tmp_path / f"{name}.log").open("w")
        self.logs.append(log)
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "deploy.monitor.cli", "--set", f"mqtt.port={self.port}",
             "--set", "mqtt.host=127.0.0.1", *args], cwd=ROOT, stdout=log,
            stderr=subprocess.STDOUT))

    def wait_connected(self, timeout: float = 60) -> None:
        """Until every one has logged its connect (it subscribes in the same callback)."""
        deadline = time.monotonic() + timeout
        while not all("connected to" in (self.tmp_path / f"{name}.log").read_text()
                      for name in self.names):
            ended = [name for name, proc in zip(self.names, self.procs, strict=True)
                     if proc.poll() is not None]
            assert not ended and time.monotonic() < deadline, (
                f"the monitors did not connect ({', '.join(ended) or 'none'} ended):\n"
                + "\n".join(f"{name}: {(self.tmp_path / f'{name}.log').read_text()}"
                            for name in self.names))
            time.sleep(0.1)
        time.sleep(0.5)  # the SUBSCRIBE sent with it has reached the broker

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        for log in self.logs:
            log.close()


@pytest.mark.e2e
def test_once_and_check_see_every_board_and_every_slow_one_at_subscribe(tmp_path: Path) -> None:
    """10,000 boards' retained state, 30 of them slow and 2 that never sent a window: `--once`
    lists every board with its info and its last window's age the moment it subscribes, and
    `check` names all 30 slow boards and both silent ones (never OK about them)."""
    broker = Broker(tmp_path / "broker")
    broker.start()
    sim = FleetSim("127.0.0.1", broker.port, BOARDS, window_s=10, slow=30, silent=2)
    try:
        sim.announce(windows_ago=0.5)
        # The limit the monitor has to get past: a QoS 1 subscriber is sent at most
        # mosquitto's in-flight plus queued limit of the retained messages (20 + 1,000).
        qos1 = Subscriber(broker.port, "edgeforge/+/info", client_id="qos1-info")
        qos1.wait_for(lambda: len(qos1.on("/info")) >= 1000, 30, "the first 1,000 info")
        sim.sync()
        assert len(qos1.on("/info")) < BOARDS
        qos1.close()

        args = ("--set", f"mqtt.port={broker.port}", "--set", "mqtt.host=127.0.0.1",
                "--listen", "3")
        once = run_cli("deploy.monitor.cli", "--once", "--json", *args, timeout=120)
        assert once.returncode == 0, once.stderr
        rows = {r["device"]: r for r in json.loads(once.stdout)["devices"]}
        boards = set(sim.ids)
        assert set(rows) == boards | set(sim.silent)
        assert all(rows[d]["model_version"] == 1 for d in rows)  # every board's info
        assert all(rows[d]["data_from"] == "summary" for d in boards)
        ages = [rows[d]["seconds_since_telemetry"] for d in boards]
        assert all(4 <= a <= 30 for a in ages), (min(ages), max(ages))  # 5 s old, and says so
        assert all(rows[d]["state"] == "online" for d in boards)
        assert all(rows[d]["seconds_since_telemetry"] is None for d in sim.silent)

        check = run_cli("deploy.monitor.cli", "check", *args, timeout=120)
        assert check.returncode == 1, check.stdout + check.stderr
        alerted = {line.split()[1] for line in check.stdout.splitlines()
                   if line.startswith("ALERT ") and " p99_high: " in line}
        assert alerted == sim.slow and len(alerted) == 30
        assert f"latency p99 {SLOW_P99_MS:g} ms > 50 ms" in check.stdout
        no_data = {line.split()[2].rstrip(":") for line in check.stdout.splitlines()
                   if line.startswith("NO DATA ")}
        assert no_data == set(sim.silent)
        assert "OK" not in check.stdout
    finally:
        sim.close()
        broker.stop()


@pytest.mark.e2e
def test_check_is_ok_only_when_it_has_judged_every_board(tmp_path: Path) -> None:
    """No slow and no silent board: OK, with the age of the data it judged by."""
    broker = Broker(tmp_path / "broker")
    broker.start()
    sim = FleetSim("127.0.0.1", broker.port, 200, window_s=10)
    try:
        sim.announce(windows_ago=0.2)
        check = run_cli("deploy.monitor.cli", "check", "--set", f"mqtt.port={broker.port}",
                        "--set", "mqtt.host=127.0.0.1", "--listen", "2", timeout=120)
        assert check.returncode == 0, check.stdout + check.stderr
        assert check.stdout.startswith("OK: 200 device(s) judged, no alert; their latest "
                                       "windows are "), check.stdout
    finally:
        sim.close()
        broker.stop()


@pytest.mark.e2e
def test_recorders_that_open_one_new_history_file_at_once_all_get_it(tmp_path: Path) -> None:
    """Eight processes opening a history file that does not exist yet, at the same moment:
    each waits its turn to set it up and none is told the file is unusable."""
    path = tmp_path / "history.sqlite3"
    code = ("import sys, time; from pathlib import Path; "
            "from deploy.monitor.history import History; "
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); "
            "h = History(Path(sys.argv[1]), 3600); "
            "h.add({'device': sys.argv[3], 'ts': time.time(), 'seq': 1}); h.close()")
    start_at = time.time() + 3  # the interpreters have started and imported by then
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(start_at),
                               f"board-{i}"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(8)]
    outs = [proc.communicate(timeout=60)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 8, outs
    history = History(path, 3600)
    assert sorted(history.devices()) == [f"board-{i}" for i in range(8)]
    history.close()


@pytest.mark.unit
def test_history_stores_numbers_in_batches_and_prunes_in_slices(tmp_path: Path) -> None:
    """20,000 windows of 200 boards: under 150 bytes a window on disk, read back as sent,
    and the clean-up of expired rows goes through the index in bounded slices."""
    path = tmp_path / "history.sqlite3"
    history = History(path, max_age_s=3600)
    now = time.time()
    history._pruned = now  # a clean-up just ran: none is due while the rows go in
    boards = [f"sim-{i:05d}" for i in range(200)]
    sent = {}
    for k in range(100):  # the first 40 windows are over the hour old
        ts = now - 7200 + k * 60 if k < 40 else now - 60 + k * 0.1
        for device in boards:
            msg = window_message(device, k + 1, ts, slow=device == "sim-00007")
            history.add(msg)
            sent[(device, k + 1)] = msg
    history.flush()
    assert history.stored == 20_000
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    pages = db.execute("PRAGMA page_count").fetchone()[0] - db.execute(
        "PRAGMA freelist_count").fetchone()[0]
    per_window = pages * db.execute("PRAGMA page_size").fetchone()[0] / 20_000
    db.close()
    assert per_window < 150, per_window
    rows = history.query("sim-00007", now - 10_000)
    assert len(rows) == 100
    for row in rows:
        msg = sent[("sim-00007", row["seq"])]
        assert row["ts"] == pytest.approx(msg["ts"], abs=1e-3)
        for key in ("latency_p50_ms", "latency_p99_ms", "throughput_ips", "rss_mb",
                    "soc_temp_c", "spool_depth"):
            assert row[key] == pytest.approx(msg[key], abs=1e-3), key
    # Expired: 40 windows x 200 boards = 8,000 rows, deleted PRUNE_ROWS at a time.
    history._pruned = 0.0  # the minute since the last clean-up has passed
    history.flush()
    assert history.pruned == PRUNE_ROWS
    history.flush()
    assert history.pruned == 8000
    assert len(history.query("sim-00007", 0)) == 60
    history.close()


@pytest.mark.e2e
def test_two_recorders_of_one_share_group_store_every_window_once(tmp_path: Path) -> None:
    """`record --share g` twice on one history file: the broker splits the telemetry between
    them (both store some), and together they store every window the fleet sent, once."""
    broker = Broker(tmp_path / "broker")
    broker.start()
    history = tmp_path / "history.sqlite3"
    sim = None
    monitors = Monitors(tmp_path, broker.port)
    try:
        for n in range(2):
            monitors.start(f"record{n}", "--set", f"monitor.history={history}", "record",
                           "--share", "g")
        monitors.wait_connected()
        sim = FleetSim("127.0.0.1", broker.port, 300, window_s=1.0, slow=10)
        sim.run(6)
        sent = sum(sim.seq.values())
        # SIGTERM at once: the last windows are still on their way to a recorder. Each one
        # unsubscribes, takes what the broker sent before its UNSUBACK, and commits it.
    finally:
        monitors.stop()
        if sim is not None:
            sim.close()
        broker.stop()
    stored = [int(re.search(r"record: (\d+) window\(s\) stored", (tmp_path / f"record{n}.log")
                            .read_text()).group(1)) for n in range(2)]  # type: ignore[union-attr]
    assert sent > 1000 and all(s > 0 for s in stored), (sent, stored)
    # Recorders of a group record: no alerts from their part of each board's windows.
    assert not any("ALERT" in (tmp_path / f"record{n}.log").read_text() for n in range(2))
    assert sum(stored) == sent  # no window twice, none lost
    h = History(history, 3600)
    try:
        assert sum(h.count(d) for d in sim.ids) == sent
    finally:
        h.close()


@pytest.mark.e2e
def test_two_serve_shards_split_the_boards_each_board_in_one_every_window_once(
        tmp_path: Path) -> None:
    """`serve --shard 0/2` and `--shard 1/2`: each board's metrics are on exactly one of the
    two /metrics pages, both have some, and the windows the two took of each board add up
    to the windows it sent (none twice, none missed)."""
    broker = Broker(tmp_path / "broker")
    broker.start()
    sim = FleetSim("127.0.0.1", broker.port, 200, window_s=1.0)
    ports = [free_port(), free_port()]
    monitors = Monitors(tmp_path, broker.port)
    try:
        sim.announce()  # retained status: each shard subscribes to its boards' telemetry
        for k, port in enumerate(ports):
            monitors.start(f"serve{k}", "serve", "--prometheus", f"127.0.0.1:{port}",
                           "--shard", f"{k}/2")
        wait(lambda: sum(metrics(p).count("edgeforge_up{") for p in ports) == 200, 60,
             "both shards to list their boards")
        time.sleep(1)  # the per-board subscriptions follow the retained status
        sim.run(5)
        sent = sum(sim.seq.values()) - len(sim.ids)  # the announce's summaries are not windows
        wait(lambda: sum(metric(metrics(p), "edgeforge_monitor_windows_total", d) or 0
                         for p in ports for d in sim.ids) >= sent, 30, "every window at a shard")
        pages = [metrics(p) for p in ports]
    finally:
        monitors.stop()
        sim.close()
        broker.stop()
    owners = [{d for d in sim.ids if metric(page, "edgeforge_up", d) is not None}
              for page in pages]
    assert owners[0] and owners[1] and not owners[0] & owners[1]
    assert owners[0] | owners[1] == set(sim.ids)
    for d in sim.ids:  # run() sent seq - 1 windows of each board
        took = [metric(page, "edgeforge_monitor_windows_total", d) for page in pages]
        assert sorted(took, key=lambda t: t is None) == [sim.seq[d] - 1, None], (d, took)
