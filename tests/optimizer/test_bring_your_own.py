"""A user's own model and photos: a factory model and torchvision's classifiers trained on an
ImageFolder of PNG and JPEG files, quantized to static int8, checked by the board and served
from a watched folder with the host's results. Every bad folder, model name, weights name and
input size is one line and exit 2, with nothing written to --out."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

from agent.manifest import BOARD_MODEL
from tests.support import Agent, run_cli
from tests.support.broker import Broker, Subscriber
from tests.support.image_folder import CLASSES, encode, image, write
from tests.support.media import host_top, results

QUICK = ["train.epochs=1", "prune.finetune_epochs=0", "data.batch_size=16",
         "quantize.calibration_images=32", "quantize.max_accuracy_drop=100",
         "report.latency_iters=10", "report.warmup=2", "report.throughput_batches=1",
         "export.sample_size=8", "export.fp32_candidates=false"]


def optimize(root: Path, out: Path, *sets: str, step: str = "run"
             ) -> tuple[int, str]:
    args = [a for s in [f"data.root={root}", *QUICK, *sets] for a in ("--set", s)]
    proc = run_cli("optimizer", step, "--data", "folder", "--out", out, *args, timeout=900)
    return proc.returncode, proc.stderr


def aged(folder: Path) -> None:
    """Files written a minute ago: complete, so the folder source takes them at once."""
    old = time.time() - 60
    for p in folder.iterdir():
        os.utime(p, (old, old))


@pytest.mark.e2e
@pytest.mark.parametrize("factory,layout", [
    ("tests.support.residual_model:ResidualCNN", "val"),
    ("torchvision.models:mobilenet_v3_small", "split"),
    ("torchvision.models:resnet18", "val"),
])
def test_a_model_and_an_image_folder_become_a_static_int8_bundle_the_board_serves(
        factory: str, layout: str, tmp_path: Path, broker: Broker) -> None:
    """Train, prune, quantize (static int8, not a fallback), export both board files, check
    them on the board, then drop the val images (PNG and JPEG of three sizes) into a folder
    the agent watches: each result is the host's for that file. The report step runs for
    the factory model (timing ten variants of a torchvision model is most of a run here)."""
    photos = tmp_path / "photos"
    write(photos, 12)
    val = write(photos, 3, split="val", seed=1) if layout == "val" else []
    out = tmp_path / "bundle"
    reported = not factory.startswith("torchvision.")
    for step in ("run",) if reported else ("train", "prune", "quantize", "export"):
        code, err = optimize(photos, out, f"train.factory={factory}",
                             "train.input_shape=[3,32,32]", step=step)
        assert code == 0 and "Traceback" not in err, err
        if step in ("run", "train"):
            assert "checking images" in err or "loading data: folder" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["mode"] == "static_per_channel", manifest["quantization"]
    assert manifest["quantization"]["attempts"][0]["float_layers"] == []
    assert manifest["classes"] == list(CLASSES)
    assert manifest["data"]["source"] == "folder"
    assert manifest["data"]["test_images"] == (12 if layout == "val" else 4 * 2)
    assert set(manifest["metrics"]["per_class_accuracy_pct"]) == set(CLASSES)
    assert set(manifest["engines"]) == {"torchscript", "onnxruntime", "executorch"}
    if reported:
        report = (out / "report.md").read_text()
        assert factory in report and "3x32x32" in report and "Accuracy per class" in report
    check = run_cli("agent", "check", "--set", f"model.dir={out}")
    assert check.returncode == 0, check.stdout + check.stderr

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    files = val or sorted((photos / "train").rglob("*_000[0-3].*"))[:8]
    for p in files:
        shutil.copy(p, inbox / p.name)
    aged(inbox)
    names = sorted(p.name for p in files)
    sub = Subscriber(broker.port)
    agent = Agent(out, broker.port, tmp_path, "source.kind=folder", f"source.path={inbox}",
                  "source.poll_s=0.2")
    try:
        sub.wait_for(lambda: len(sub.on("/result")) >= len(names), 120, "every file's result")
    finally:
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0, agent.output()
        sub.close()
    got = {r["source_id"]: r for r in results(sub.on("/result"))}
    assert sorted(got) == names
    host = host_top(out, [(inbox / "done" / n).read_bytes() for n in names])
    for i, name in enumerate(names):
        assert got[name]["top"] == host[got[name]["engine"]][i], name


@pytest.mark.e2e
def test_a_pretrained_start_offline_names_train_checkpoint(tmp_path: Path) -> None:
    """train.weights downloads torchvision's file; with no way out (a proxy that refuses),
    one line says so and how to give the weights as a file."""
    photos = tmp_path / "photos"
    write(photos, 3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections to it are refused
    proxy = f"http://127.0.0.1:{port}"
    env = {**os.environ, "https_proxy": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy,
           "TORCH_HOME": str(tmp_path / "hub")}
    import subprocess
    import sys

    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "optimizer", "train", "--data", "folder", "--out", str(out),
         "--set", f"data.root={photos}", "--set", "train.factory=torchvision.models:resnet18",
         "--set", "train.weights=IMAGENET1K_V1"], capture_output=True, text=True,
        timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("DataError: train.weights IMAGENET1K_V1: cannot download"), last
    assert "train.checkpoint" in last and "Traceback" not in proc.stderr
    assert not (out / "baseline_cnn.pth").exists()


@pytest.mark.e2e
def test_a_frozen_backbone_trains_only_the_head(tmp_path: Path) -> None:
    """train.freeze_backbone: every weight but the classifier's is the one it started as."""
    import torch

    photos = tmp_path / "photos"
    write(photos, 6)
    out = tmp_path / "out"
    from optimizer.model import build

    code, err = optimize(photos, out, "train.factory=torchvision.models:mobilenet_v3_small",
                         "train.freeze_backbone=true", "train.seed=0", step="train")
    assert code == 0, err
    assert "backbone frozen: training" in err
    trained = torch.load(out / "baseline_cnn.pth", weights_only=True)
    torch.manual_seed(0)  # train.seed: the model starts from the same random weights
    fresh = build("torchvision.models:mobilenet_v3_small", 4).state_dict()
    changed = sorted(k for k in trained if not torch.equal(trained[k], fresh[k]))
    assert changed and all(k.startswith("classifier.3.") for k in changed), changed


BAD = {
    "no root": (lambda r: None, [], "no such folder"),
    "no train": (lambda r: (r / "val" / "a").mkdir(parents=True), [], "no train/ folder"),
    "no class folders": (lambda r: (r / "train").mkdir(parents=True), [], "no class folders"),
    "an empty class": (lambda r: (write(r, 3), (r / "train" / "zebra").mkdir()), [],
                       "zebra: no images"),
    "val classes differ": (lambda r: (write(r, 3), write(r, 2, split="val",
                                                         classes=("cat", "dog", "emu"))),
                           [], "only in val/: emu"),
    "a single class": (lambda r: write(r, 4, classes=("cat",)), [], "one class (cat)"),
    "a class too small to split": (lambda r: write(r, 1), [], "too few"),
    "too many unreadable images": (
        lambda r: (write(r, 4), (r / "train" / "cat" / "cut.jpg").write_bytes(
            encode(image(0, __import__("numpy").random.default_rng(0), (40, 40)),
                   "JPEG")[:300])),
        [], "more than data.max_bad_fraction"),
    "an unknown torchvision model": (lambda r: write(r, 3),
                                     ["train.factory=torchvision.models:mobilenet_v3_smal"],
                                     "did you mean mobilenet_v3_small"),
    "weights the model does not have": (lambda r: write(r, 3),
                                        ["train.factory=torchvision.models:resnet18",
                                         "train.weights=IMAGENET1K_V9"],
                                        "no weights 'IMAGENET1K_V9' (use one of DEFAULT"),
    "an input size the model cannot take": (lambda r: write(r, 3),
                                            ["train.factory=torchvision.models:squeezenet1_1",
                                             "train.input_shape=[3,4,4]"],
                                            "cannot take it"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_folder_or_model_is_one_line_and_nothing_is_written(case: str,
                                                                   tmp_path: Path) -> None:
    make, sets, needle = BAD[case]
    root = tmp_path / "photos"
    make(root)
    out = tmp_path / "out"
    code, err = optimize(root, out, *sets, step="train")
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err and needle in lines[-1], err
    assert lines[-1].split(":")[0] in ("DataError", "ConfigError"), lines[-1]
    assert not out.exists() or list(out.iterdir()) == [], list(out.iterdir())


@pytest.mark.e2e
def test_one_unreadable_image_under_the_limit_is_skipped_and_named(tmp_path: Path) -> None:
    import numpy as np

    root = tmp_path / "photos"
    write(root, 6)
    cut = root / "train" / "dog" / "cut.jpg"
    cut.write_bytes(encode(image(1, np.random.default_rng(0), (40, 40)), "JPEG")[:300])
    out = tmp_path / "out"
    code, err = optimize(root, out, "data.max_bad_fraction=0.1", "train.epochs=1",
                         step="run")
    assert code == 0, err
    assert f"skipping 1 unreadable image(s) of 25; first: {cut}" in err
    data = json.loads((out / "manifest.json").read_text())["data"]
    assert data["unreadable_images"] == 1 and data["unreadable"][0]["path"] == str(cut)
    assert "corrupt or truncated" in data["unreadable"][0]["reason"]
    assert (out / BOARD_MODEL).is_file()
