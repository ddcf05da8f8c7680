"""Three engines, one bundle: the agent proves each engine it has, runs the one model.engine
asks for (auto: the fastest proven, measured here), a board without torch serves from the
ONNX model alone, and one without executorch says so and runs another. Real subprocesses, a
real mosquitto, the session's real bundle."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.manifest import EXECUTORCH_MODEL, sha256_of
from tests.support import ROOT, Agent, copy_bundle, run_cli
from tests.support.broker import Broker, Subscriber
from tests.support.media import host_top, png_bytes, results, sample_images, write_pngs


@pytest.mark.e2e
def test_check_proves_every_engine_and_model_engine_forces_one(bundle: Path) -> None:
    auto = run_cli("agent", "check", "--set", f"model.dir={bundle}")
    assert auto.returncode == 0, auto.stderr
    lines = auto.stdout.strip().splitlines()
    assert lines[0].startswith("torchscript 2.") and "bit-exact to the host" in lines[0]
    assert lines[1].startswith("onnxruntime 1.") and "bit-exact to the host" in lines[1]
    assert lines[2].startswith("executorch 1.") and "bit-exact to the host" in lines[2]
    assert "(fastest proven: p50" in lines[3] and "batch 1, 1 thread(s)" in lines[3]
    forced = run_cli("agent", "check", "--set", f"model.dir={bundle}",
                     "--set", "model.engine=torchscript")
    assert forced.returncode == 0, forced.stderr
    assert "runs on torchscript 2." in forced.stdout
    assert "(model.engine is torchscript;" in forced.stdout
    bad = run_cli("agent", "check", "--set", f"model.dir={bundle}", "--set", "model.engine=tvm")
    assert bad.returncode == 2
    assert ("model.engine: must be one of auto, torchscript, onnxruntime, executorch, "
            "onnxruntime-fp32, executorch-fp32, got 'tvm'") in bad.stderr


@pytest.mark.e2e
def test_without_torch_the_agent_serves_from_the_onnx_model(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    """The torch-free board profile on this host: torch is not importable in the agent's
    process; it proves and runs ONNX Runtime, says why TorchScript is out, and every file
    gets the host's ONNX Runtime result."""
    inbox = tmp_path / "inbox"
    names = write_pngs(bundle, inbox, 4)
    images, _ = sample_images(bundle)
    expected = host_top(bundle, [png_bytes(images[i]) for i in range(4)])["onnxruntime"]
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=folder", f"source.path={inbox}",
                  "source.poll_s=0.2", without=("torch",))
    try:
        sub.wait_for(lambda: len(sub.on("/result")) >= 4 and len(sub.seqs()) >= 2, 60,
                     "4 results and 2 windows")
    finally:
        agent.proc.send_signal(signal.SIGTERM)
        code = agent.wait(15)
        sub.close()
    out = agent.output()
    assert code == 0 and "Traceback" not in out, out
    got = {r["source_id"]: r for r in results(sub.on("/result"))}
    assert [got[n]["top"] for n in names] == expected
    assert {r["engine"] for r in got.values()} == {"onnxruntime"}
    assert {m["engine"] for m in sub.telemetry()} == {"onnxruntime"}
    info = json.loads(sub.on("/info")[-1][0])
    assert info["engine"] == "onnxruntime" and info["runtimes"]["torchscript"] is None
    assert info["engine_choice"]["reason"].startswith(
        "the only proven engine (torchscript not installed, executorch not installed)")
    assert "engine torchscript -: not installed (pip install torch to run it)" in out


@pytest.mark.e2e
def test_a_forced_engine_runs_and_every_window_names_it(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    """model.engine=torchscript on a board with both: every window of the run names it."""
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path, "model.engine=torchscript")
    try:
        sub.wait_for(lambda: len(sub.seqs()) >= 2, 60, "2 windows")
    finally:
        agent.proc.send_signal(signal.SIGTERM)
        agent.wait(15)
        sub.close()
    assert {m["engine"] for m in sub.telemetry()} == {"torchscript"}
    info = json.loads(sub.on("/info")[-1][0])
    assert info["engine"] == "torchscript" and info["engine_choice"]["setting"] == "torchscript"


@pytest.mark.e2e
def test_a_forced_executorch_engine_serves_each_file_with_the_host_result(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    """model.engine=executorch: the XNNPACK program runs on a watched folder, and each file's
    result is what the host's ExecuTorch runtime computes for it."""
    inbox = tmp_path / "inbox"
    names = write_pngs(bundle, inbox, 4)
    images, _ = sample_images(bundle)
    expected = host_top(bundle, [png_bytes(images[i]) for i in range(4)])["executorch"]
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=folder", f"source.path={inbox}",
                  "source.poll_s=0.2", "model.engine=executorch", "loop.batch_size=2")
    try:
        sub.wait_for(lambda: len(sub.on("/result")) >= 4, 60, "4 results")
    finally:
        agent.proc.send_signal(signal.SIGTERM)
        code = agent.wait(15)
        sub.close()
    out = agent.output()
    assert code == 0 and "Traceback" not in out, out
    got = {r["source_id"]: r for r in results(sub.on("/result"))}
    assert [got[n]["top"] for n in names] == expected
    assert {r["engine"] for r in got.values()} == {"executorch"}
    info = json.loads(sub.on("/info")[-1][0])
    assert info["engine"] == "executorch" and info["runtimes"]["executorch"].startswith("1.")


@pytest.mark.e2e
def test_without_executorch_check_says_so_and_runs_another_engine(bundle: Path) -> None:
    """A board without the executorch package: its row says how to add it, auto runs one of
    the other two, and model.engine=executorch is one line and exit 2."""
    hide = "import sys; sys.modules['executorch'] = None; from agent.cli import main; "
    auto = subprocess.run([sys.executable, "-c", hide + "sys.exit(main(sys.argv[1:]))",
                           "check", "--set", f"model.dir={bundle}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert auto.returncode == 0, auto.stdout + auto.stderr
    assert "executorch: not installed (pip install executorch to run it)" in auto.stdout
    assert "runs on torchscript" in auto.stdout or "runs on onnxruntime" in auto.stdout
    forced = subprocess.run([sys.executable, "-c", hide + "sys.exit(main(sys.argv[1:]))",
                             "check", "--set", f"model.dir={bundle}",
                             "--set", "model.engine=executorch"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = forced.stderr.strip().splitlines()
    assert forced.returncode == 2 and len(lines) == 1 and "Traceback" not in forced.stderr
    assert "engine executorch cannot run on this board" in lines[0] and "not installed" in lines[0]


@pytest.mark.e2e
def test_a_damaged_executorch_program_is_one_line_and_another_engine_runs(
        bundle: Path, tmp_path: Path) -> None:
    """A .pte that is not a program (its sha256 updated in the manifest, as a bad export
    would leave it): forced, one line and exit 2; on auto, its row fails and the check goes
    on with the engines that pass."""
    b = copy_bundle(bundle, tmp_path)
    pte = b / EXECUTORCH_MODEL
    pte.write_bytes(pte.read_bytes()[:4096])
    m = json.loads((b / "manifest.json").read_text())
    m["files"][EXECUTORCH_MODEL] = {"sha256": sha256_of(pte), "bytes": pte.stat().st_size}
    (b / "manifest.json").write_text(json.dumps(m))
    forced = run_cli("agent", "check", "--set", f"model.dir={b}",
                     "--set", "model.engine=executorch")
    lines = forced.stderr.strip().splitlines()
    assert forced.returncode == 2 and len(lines) == 1 and "Traceback" not in forced.stderr, \
        forced.stdout + forced.stderr
    assert "past the file's 4,096 bytes" in lines[0]  # its header, before the runtime reads it
    auto = run_cli("agent", "check", "--set", f"model.dir={b}")
    assert auto.returncode == 0, auto.stdout + auto.stderr
    assert "executorch 1." in auto.stdout and "failed" in auto.stdout
    assert "runs on executorch" not in auto.stdout


class FakeBindings:
    """A fake of an older ExecuTorch runtime's bindings (1.0 has no thread-pool size call,
    and is not on this host): counts the pool resets, and lacks every loading call."""

    def __init__(self) -> None:
        self.resets: list[int] = []

    def _unsafe_reset_threadpool(self, threads: int) -> None:
        self.resets.append(threads)


@pytest.mark.unit
def test_a_runtime_whose_bindings_differ_is_one_line_and_its_pool_is_sized_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A release without a call the engine uses is a BundleError naming the call (the proof
    fails and another engine runs), not an AttributeError; the one thread pool of a runtime
    that cannot say its size is reset once per size, never under a running method."""
    from agent.engines import executorch
    from agent.errors import BundleError

    fake = FakeBindings()
    monkeypatch.setattr(executorch, "bindings", lambda: fake)
    monkeypatch.setattr(executorch, "_pool_threads", None)
    program = b"\x10\0\0\0ET12" + bytes(24)  # a header the pre-check passes
    with pytest.raises(BundleError, match=r"executorch 1\.0\.0's runtime lacks _is_available"):
        executorch.load(program, Path("m.pte"), "1.0.0", 1, None)
    with pytest.raises(BundleError):
        executorch.load(program, Path("m.pte"), "1.0.0", 1, None)
    assert fake.resets == [1]
