"""No thread dies while the process lives on; nothing is lost uncounted; the spool does not
depend on the working directory."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from array import array
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from agent.command_inbox import CommandInbox
from agent.config import LoopConfig, MqttConfig
from agent.loop import InferenceLoop, Inputs, LoopControl, Model
from agent.predictions import result
from agent.publisher import INBOX, Publisher
from agent.runner import supervise
from agent.sdnotify import Notifier
from agent.sources import Frame, now_pair
from agent.spool import SYSTEM_STATE_DIR, Spool
from agent.stats import ResourceStats
from agent.telemetry import Window
from tests.support import ROOT, Agent
from tests.support.broker import Broker, Subscriber

# A named fault injection, not a fake of anything real: the agent runs as it does on a board,
# except that its resource sampler (called on the publisher thread) raises from the third
# window on, the way an unforeseen bug would.
FAULTY_PUBLISHER = (
    "import sys\n"
    "import agent.stats as stats\n"
    "calls = [0]\n"
    "real = stats.ResourceStats.sample\n"
    "def sample(self):\n"
    "    calls[0] += 1\n"
    "    if calls[0] > 2:\n"
    "        raise ValueError('injected fault in the publisher thread')\n"
    "    return real(self)\n"
    "stats.ResourceStats.sample = sample\n"
    "from agent.cli import main\n"
    "raise SystemExit(main(sys.argv[1:]))\n")


@pytest.mark.e2e
def test_a_failed_publisher_thread_stops_the_watchdog_and_exits_1_then_is_reported(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    """Before: the publisher died and the process lived on, feeding the watchdog, a zombie."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(1.0)
    spool = tmp_path / "spool.db"
    args = [sys.executable, "-c", FAULTY_PUBLISHER, "run", "--set", f"model.dir={bundle}",
            "--set", f"mqtt.port={broker.port}", "--set", "mqtt.host=127.0.0.1",
            "--set", "device.id=testboard", "--set", f"spool.path={spool}",
            "--set", "loop.window_s=0.5", "--set", "loop.warmup=2"]
    log = tmp_path / "agent.log"
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "NOTIFY_SOCKET": str(path),
                                     "WATCHDOG_USEC": "3000000"})
    pings: list[float] = []
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if sock.recv(4096) == b"WATCHDOG=1":
                    pings.append(time.monotonic())
            except TimeoutError:
                pass
        code = proc.wait(10)
        ended = time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    out = log.read_text()
    assert code == 1, out
    assert "the publisher thread failed (ValueError: injected fault" in out, out
    fault = out.index("injected fault")
    assert "Traceback" in out[:fault + 2000]  # the bug's own traceback, logged once
    # No watchdog ping after the failure: the last one is more than a check interval old.
    assert pings and ended - pings[-1] > 0.5, pings
    # The next start says why the last run ended, as an event.
    sub = Subscriber(broker.port)
    try:
        again = Agent(bundle, broker.port, tmp_path, duration=1.5)
        assert again.wait() == 0, again.output()
        sub.wait_for(lambda: bool(sub.on("/event")), 10, "the restart event")
        event = json.loads(sub.on("/event")[0][0])
        assert event["event"] == "restarted" and "publisher thread failed" in event["detail"]
    finally:
        sub.close()


@pytest.mark.unit
def test_supervise_names_a_dead_a_failed_and_a_stuck_thread() -> None:
    def thread(alive: bool = True, stalled: float = 0.0, error: Any = None) -> Any:
        return SimpleNamespace(is_alive=lambda: alive, stalled_s=lambda: stalled, error=error)

    assert supervise(thread(), thread()) is None
    assert supervise(thread(alive=False), thread()) == "the publisher thread ended"
    assert "failed (OSError: disk" in str(supervise(thread(error=OSError("disk")), thread()))
    assert "commands thread has made no progress for 601 s" in str(
        supervise(thread(), thread(stalled=601.0)))


def window(i: int) -> Window:
    """A closed window of 20 inferences, as the loop hands it over."""
    return Window(i, time.time(), 0.5, 1, array("d", [0.001] * 20))


@pytest.mark.e2e
def test_a_full_publisher_inbox_burns_seqs_and_counts_every_window_it_refused(
        tmp_path: Path) -> None:
    """Nothing is dropped in silence: a refused window is a seq gap and in dropped_total."""
    spool = Spool(tmp_path / "s.db", 2**24, 3600)
    pub = Publisher(MqttConfig(port=1, host="127.0.0.1"), "b", spool, ResourceStats(), {}, "x")

    accepted = [pub.submit(window(i)) for i in range(INBOX + 5)]
    assert accepted.count(False) == 5
    pub.start()  # drains the inbox into the spool, counts the 5 it refused
    deadline = time.monotonic() + 20
    while spool.depth < INBOX and time.monotonic() < deadline:
        time.sleep(0.05)
    pub.close(1.0)
    assert spool.depth == INBOX
    assert spool.dropped_total == 5
    assert spool.get("seq.telemetry") == INBOX + 5 + 1  # the next window shows the gap
    spool.close()


@pytest.mark.e2e
def test_windows_submitted_while_the_publisher_drains_a_full_inbox_are_all_spooled_or_counted(
        tmp_path: Path) -> None:
    """Before: a pass took INBOX items, fetched one more and let it go, uncounted."""
    spool = Spool(tmp_path / "s.db", 2**24, 3600)
    pub = Publisher(MqttConfig(port=1, host="127.0.0.1"), "b", spool, ResourceStats(), {}, "x")

    assert all(pub.submit(window(i)) for i in range(INBOX))
    pub.start()
    refused = [pub.submit(window(INBOX + i)) for i in range(INBOX)].count(False)
    deadline = time.monotonic() + 30
    while spool.depth + spool.dropped_total < 2 * INBOX and time.monotonic() < deadline:
        time.sleep(0.05)
    pub.close(1.0)
    assert spool.depth == 2 * INBOX - refused
    assert spool.dropped_total == refused
    assert spool.get("seq.telemetry") == 2 * INBOX + 1
    spool.close()


@pytest.mark.e2e
def test_live_results_that_meet_no_broker_are_counted_even_when_the_agent_stops_first(
        tmp_path: Path) -> None:
    """Before: unsent live results were folded into dropped_total only by a later window, so
    those of a run's last moments were lost from every counter."""
    spool = Spool(tmp_path / "s.db", 2**24, 3600)
    pub = Publisher(MqttConfig(port=1, host="127.0.0.1"), "b", spool, ResourceStats(), {}, "x")
    pub.start()
    assert pub.first_attempt()  # refused: the broker is not there
    for i in range(5):
        frame = Frame(str(i), *now_pair())
        assert pub.submit(result("video", frame, [], {}, "x", durable=False))
    pub.close(2.0)
    assert spool.dropped_total == 5
    assert spool.get("seq.result") == 6  # the next live result shows the gap
    spool.close()


@pytest.mark.e2e
def test_the_default_spool_is_the_same_from_any_working_directory(
        bundle: Path, tmp_path: Path) -> None:
    """A relative spool.path lives in the state directory, not the cwd: seq keeps counting."""
    name = f"test-spool-{uuid.uuid4().hex[:8]}.sqlite3"
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local/state") \
        / "edgeforge" if os.geteuid() else SYSTEM_STATE_DIR
    seqs = []
    try:
        for folder in ("a", "b"):
            cwd = tmp_path / folder
            cwd.mkdir()
            proc = subprocess.run([sys.executable, "-m", "agent", "run", "--set",
                                   f"model.dir={bundle}", "--set", "mqtt.port=1",
                                   "--set", f"spool.path={name}", "--set", "loop.window_s=0.5",
                                   "--duration", "1.2"], cwd=cwd, capture_output=True,
                                  text=True, timeout=120, env={**os.environ,
                                                               "PYTHONPATH": str(ROOT)})
            assert proc.returncode == 0, proc.stderr
            assert f"spool {state / name}:" in proc.stderr
            seqs.append([int(line.split(" seq ")[1].split(":")[0])
                         for line in proc.stderr.splitlines() if " seq " in line])
            assert not (cwd / name).exists()
    finally:
        for leftover in state.glob(f"{name}*"):
            leftover.unlink()
    assert seqs[1][0] == seqs[0][-1] + 1, seqs


class FailingModule:
    """A named fault injection: an engine runner whose forward pass raises from its
    `after`-th call on, the way a model that passed its smoke test and then hit a bad kernel
    would."""

    engine, version = "fake", "0"

    def __init__(self, after: int) -> None:
        self.calls, self.after = 0, after
        self.run_prepared = self.__call__

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("injected failure\nsecond line")
        return x.reshape(x.shape[0], -1)[:, :10]

    def prepare(self, x: np.ndarray) -> np.ndarray:
        return x

    def session(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


@pytest.mark.e2e
def test_the_loop_falls_back_by_itself_and_never_takes_the_failed_model_back() -> None:
    """A model on trial that fails a forward pass: the loop runs its fallback from the next
    pass on without waiting for another thread, says which model failed, and refuses a later
    hand-over of the failed model (a confirmation racing the failure)."""
    inputs = Inputs.random(1, [3, 8, 8], count=2)
    good = Model(FailingModule(after=10**9), inputs, "old")  # type: ignore[arg-type]
    bad = Model(FailingModule(after=30), inputs, "new", fallback=good)  # type: ignore[arg-type]
    control = LoopControl()
    windows: list[Window] = []
    notices: list[tuple[str, str]] = []
    loop = InferenceLoop(bad, LoopConfig(window_s=0.5, warmup=0), control, windows.append,
                         Notifier({}), fell_back=lambda sha, why: notices.append((sha, why)))

    def confirm_late() -> None:  # what a confirmation racing the failure would hand over
        while not notices:
            time.sleep(0.01)
        control.swap(replace(bad, fallback=None))
        time.sleep(0.6)
        control.stop()

    racer = threading.Thread(target=confirm_late)
    racer.start()
    loop.run(duration_s=20)
    racer.join()
    assert notices == [("new", "inference failed on the new model: injected failure")]
    assert loop.model.sha256 == "old" and loop.failed == {"new"}
    assert sum(len(w.latencies_s) for w in windows if w.model_sha256 == "new") == 30
    assert sum(len(w.latencies_s) for w in windows if w.model_sha256 == "old") > 0


@pytest.mark.unit
def test_the_command_inbox_refuses_when_full_counts_windows_and_never_drops_a_fallback(
) -> None:
    inbox = CommandInbox(size=2)
    assert inbox.command("set", b'{"request_id": "a1"}') and inbox.command("set", b"{}")
    assert not inbox.command("diagnostics", b'{"request_id": "r-9", "args": {}}')
    busy = inbox.busy_result("diagnostics", b'{"request_id": "r-9", "args": {}}')
    assert busy["request_id"] == "r-9" and busy["code"] == "busy" and not busy["ok"]
    inbox.window(Window(1, time.time(), 1.0, 1, array("d")), {})
    assert inbox.unobserved == 1
    inbox.fell_back("new", "why")  # taken first, although the queue is full
    assert inbox.get(0.1) == ("fallback", ("new", "why"))
    assert inbox.get(0.1) == ("cmd", ("set", b'{"request_id": "a1"}'))
