"""Two engines, one bundle: the agent proves each engine it has, runs the one model.engine
asks for (auto: the fastest proven, measured here), and a board without torch serves from the
ONNX model alone. Real subprocesses, a real mosquitto, the session's real bundle."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from tests.support import Agent, run_cli
from tests.support.broker import Broker, Subscriber
from tests.support.media import host_top, png_bytes, results, sample_images, write_pngs


def test_check_proves_both_engines_and_model_engine_forces_one(bundle: Path) -> None:
    auto = run_cli("agent", "check", "--set", f"model.dir={bundle}")
    assert auto.returncode == 0, auto.stderr
    lines = auto.stdout.strip().splitlines()
    assert lines[0].startswith("torchscript 2.") and "bit-exact to the host" in lines[0]
    assert lines[1].startswith("onnxruntime 1.") and "bit-exact to the host" in lines[1]
    assert "(fastest proven: p50" in lines[2] and "batch 1, 1 thread(s)" in lines[2]
    forced = run_cli("agent", "check", "--set", f"model.dir={bundle}",
                     "--set", "model.engine=torchscript")
    assert forced.returncode == 0, forced.stderr
    assert "runs on torchscript 2." in forced.stdout
    assert "(model.engine is torchscript;" in forced.stdout
    bad = run_cli("agent", "check", "--set", f"model.dir={bundle}", "--set", "model.engine=tvm")
    assert bad.returncode == 2
    assert "model.engine: must be one of auto, torchscript, onnxruntime, got 'tvm'" in bad.stderr


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
    assert info["engine_choice"]["reason"].startswith("the only proven engine (torchscript "
                                                      "not installed)")
    assert "engine torchscript -: not installed (pip install torch to run it)" in out


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
