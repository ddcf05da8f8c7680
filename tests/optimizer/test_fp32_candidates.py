"""fp32 files beside the int8 ones (export.fp32_candidates): built, gated, verified and hashed
by the optimizer; proven, raced, forced and served by the board like any engine's file."""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path

import pytest

from agent.manifest import FP32_MODELS, Manifest, sha256_of
from tests.support import Agent, run_cli
from tests.support.broker import Broker, Subscriber
from tests.support.media import host_top, png_bytes, results, sample_images, write_pngs

pytestmark = pytest.mark.e2e

FP32_NAMES = ("onnxruntime-fp32", "executorch-fp32")


def export(bundle: Path, config: Path, setting: str) -> str:
    """`edge-optimize export` again on `bundle` with export.fp32_candidates=`setting`."""
    proc = run_cli("optimizer", "export", "--data", "synthetic", "--config", config, "--out",
                   bundle, "--set", f"export.fp32_candidates={setting}")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


@pytest.fixture(scope="module")
def fp32_bundle(bundle: Path, small_config: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session bundle exported again with export.fp32_candidates=true."""
    out = tmp_path_factory.mktemp("fp32") / "bundle"
    shutil.copytree(bundle, out)
    export(out, small_config, "true")
    return out


def test_true_ships_each_fp32_file_gated_verified_and_hashed(fp32_bundle: Path) -> None:
    """Both fp32 files are in the manifest with precision fp32, a passed fresh-process
    verification, their own sample logits and the sha256 of the file on disk."""
    manifest = json.loads((fp32_bundle / "manifest.json").read_text())
    for name in FP32_NAMES:
        entry = manifest["engines"][name]
        file = fp32_bundle / FP32_MODELS[name]
        assert entry["file"] == FP32_MODELS[name] and entry["precision"] == "fp32"
        assert entry["verification"]["status"] == "passed", entry["verification"]
        assert entry["sample_logits"] == f"logits.{name}"
        assert manifest["files"][entry["file"]]["sha256"] == sha256_of(file)
    sample = Manifest.read(fp32_bundle).load_sample(fp32_bundle)
    assert set(sample["logits"]) >= {f"logits.{n}" for n in FP32_NAMES}


def test_check_proves_the_fp32_files_and_bench_races_all_five(fp32_bundle: Path) -> None:
    """`edge-agent check` proves five files; `bench` times each and runs the fastest of them."""
    check = run_cli("agent", "check", "--set", f"model.dir={fp32_bundle}")
    out = check.stdout + check.stderr
    assert check.returncode == 0, out
    for name in FP32_NAMES:
        assert re.search(rf"^{name} \S+: proven, sample of 16 bit-exact", out, re.M), out
    bench = run_cli("agent", "bench", "--set", f"model.dir={fp32_bundle}",
                    "--set", "loop.batch_size=1")
    assert bench.returncode == 0, bench.stderr
    rows = [line.split()[0] for line in bench.stdout.splitlines()
            if re.match(r"^\S+\s+1\s+\d+\s", line)]
    assert sorted(rows) == sorted(["torchscript", "onnxruntime", "executorch", *FP32_NAMES])
    runs = re.search(r"^runs: (\S+) ", bench.stdout, re.M)
    assert runs is not None and runs.group(1) in rows, bench.stdout


def test_a_forced_fp32_file_serves_each_file_with_the_host_result(
        fp32_bundle: Path, broker: Broker, tmp_path: Path) -> None:
    """model.engine=onnxruntime-fp32 serves a watched folder: each result is the host's for
    that file on the fp32 model, and every result, window and the info name the fp32 file."""
    inbox = tmp_path / "inbox"
    names = write_pngs(fp32_bundle, inbox, 4)
    images, _ = sample_images(fp32_bundle)
    expected = host_top(fp32_bundle, [png_bytes(images[i]) for i in range(4)])
    sub = Subscriber(broker.port)
    agent = Agent(fp32_bundle, broker.port, tmp_path, "source.kind=folder",
                  f"source.path={inbox}", "source.poll_s=0.2",
                  "model.engine=onnxruntime-fp32")
    try:
        sub.wait_for(lambda: len(sub.on("/result")) >= 4 and len(sub.seqs()) >= 1, 60,
                     "4 results and a window")
    finally:
        agent.proc.send_signal(signal.SIGTERM)
        code = agent.wait(15)
        sub.close()
    out = agent.output()
    assert code == 0 and "Traceback" not in out, out
    got = {r["source_id"]: r for r in results(sub.on("/result"))}
    assert [got[n]["top"] for n in names] == expected["onnxruntime-fp32"]
    assert {r["engine"] for r in got.values()} == {"onnxruntime-fp32"}
    assert {m["engine"] for m in sub.telemetry()} == {"onnxruntime-fp32"}
    info = json.loads(sub.on("/info")[-1][0])
    assert info["engine"] == "onnxruntime-fp32"


def test_an_fp32_program_changed_after_export_is_refused_in_one_line(
        fp32_bundle: Path, tmp_path: Path) -> None:
    """One byte of fp32_cnn.pte changed: the bundle is refused, naming the file, exit 2."""
    out = tmp_path / "bundle"
    shutil.copytree(fp32_bundle, out)
    pte = out / FP32_MODELS["executorch-fp32"]
    data = bytearray(pte.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pte.write_bytes(bytes(data))
    check = run_cli("agent", "check", "--set", f"model.dir={out}")
    err = check.stderr.strip().splitlines()
    assert check.returncode == 2 and "Traceback" not in check.stderr, check.stderr
    assert len(err) == 1 and "fp32_cnn.pte" in err[0] and "sha256" in err[0], err


def test_false_ships_no_fp32_file(bundle: Path) -> None:
    """The session bundle is built with export.fp32_candidates=false: the int8 files alone."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["engines"]) == {"torchscript", "onnxruntime", "executorch"}
    assert not any((bundle / f).exists() for f in FP32_MODELS.values())


def test_null_ships_an_fp32_file_exactly_when_its_timing_line_says_so(
        fp32_bundle: Path, small_config: Path, tmp_path: Path) -> None:
    """The default decides on this host's timing: each engine's line gives both p50s and the
    decision, and the manifest and the disk agree with it (an earlier export's fp32 file that
    this one does not ship is gone, not left beside the bundle)."""
    out = tmp_path / "bundle"
    shutil.copytree(fp32_bundle, out)
    err = export(out, small_config, "null")
    manifest = json.loads((out / "manifest.json").read_text())
    for name, label in zip(FP32_NAMES, ("ONNX Runtime fp32", "ExecuTorch fp32"), strict=True):
        line = re.search(rf"^{label}: int8 p50 \d+ us, fp32 \d+ us here \([\d.]+x\): (.*)$",
                         err, re.M)
        assert line is not None, err
        shipped = line.group(1).startswith("shipped")
        assert (name in manifest["engines"]) == shipped, (line.group(0), manifest["engines"])
        assert (out / FP32_MODELS[name]).exists() == shipped
        assert (FP32_MODELS[name] in manifest["files"]) == shipped
    check = run_cli("agent", "check", "--set", f"model.dir={out}")
    assert check.returncode == 0, check.stdout + check.stderr
