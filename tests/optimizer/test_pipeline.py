"""The host pipeline end to end: files, manifest, report, safe formats, verification."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.engines.torchscript import load_scripted
from agent.manifest import BOARD_MODEL, Manifest, sha256_of
from agent.preprocess import normalize
from optimizer import export as exporting
from optimizer import quantize
from optimizer.config import DataConfig, PruneConfig, QuantizeConfig, TrainConfig
from optimizer.data import Calibration, synthetic
from optimizer.errors import QuantizationError, VerificationError
from optimizer.model import SimpleCNN, accuracy_pct, predict
from optimizer.prune import prune_, sparsity, state_sizes
from optimizer.train import fit_
from tests.support import copy_bundle, run_cli

FILES = ["baseline_cnn.pth", "pruned_cnn.pth", "quantized_cnn.pt", BOARD_MODEL]


@pytest.mark.e2e
def test_run_writes_the_four_model_files_manifest_and_report(bundle: Path) -> None:
    for name in [*FILES, "manifest.json", "sample.pt", "report.md", "report.json",
                 "report.png"]:
        assert (bundle / name).is_file(), name
    assert (bundle / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.e2e
def test_manifest_lists_every_file_with_its_true_sha256(bundle: Path) -> None:
    m = Manifest.read(bundle)
    for name in FILES:
        assert m.files[name]["sha256"] == sha256_of(bundle / name)
        assert m.files[name]["bytes"] == (bundle / name).stat().st_size
    assert m.engine == "qnnpack" and m.input_shape == [3, 32, 32] and len(m.classes) == 10
    assert m.data["source"] == "synthetic" and m.verification["status"] == "passed"
    assert m.quantization["mode"] in quantize.MODES


@pytest.mark.e2e
def test_reports_say_which_data_was_used(bundle: Path) -> None:
    assert "synthetic" in (bundle / "report.md").read_text()
    assert "not CIFAR-10" in (bundle / "report.md").read_text()
    report = json.loads((bundle / "report.json").read_text())
    assert report["data"]["source"] == "synthetic"
    assert [r["variant"].split(" (")[0] for r in report["rows"]] == [
        "fp32 baseline", "pruned fp32", "dynamic int8", "static int8", "board file",
        "fp32 pruned", "board file", "fp32 pruned", "board file", "fp32 pruned"]
    assert report["rows"][-3]["runtime"].startswith("ONNX Runtime")
    assert report["rows"][-1]["runtime"].startswith("ExecuTorch")
    # Each int8 board file beside the fp32 model on its own engine, and said when slower.
    pairs = {p["engine"]: p for p in report["same_engine"]}
    assert set(pairs) == {"torchscript", "onnxruntime", "executorch"}
    for p in pairs.values():
        assert p["ratio"] == p["int8_p50_us"] / p["fp32_p50_us"] > 0
        assert p["int8_slower"] == (round(p["ratio"], 2) > 1.0)
    md = (bundle / "report.md").read_text()
    assert "int8 against fp32 on the same engine" in md
    assert ("int8 is slower than fp32 here" in md) == any(p["int8_slower"]
                                                          for p in pairs.values())
    for row in report["rows"]:
        assert row["p50_us"] <= row["p90_us"] <= row["p99_us"]
        assert row["threads"] == 1 and row["throughput_ips"] > 0


@pytest.mark.e2e
def test_pruning_pays_in_transfer_size_not_raw_size(bundle: Path) -> None:
    rows = {r["variant"]: r for r in json.loads((bundle / "report.json").read_text())["rows"]}
    base, pruned = rows["fp32 baseline"], rows["pruned fp32"]
    assert abs(pruned["bytes"] - base["bytes"]) < 1024
    assert pruned["xz_bytes"] < 0.6 * base["xz_bytes"]


@pytest.mark.e2e
def test_scripted_file_embeds_metadata_for_the_board(bundle: Path) -> None:
    meta = exporting.read_metadata(bundle / BOARD_MODEL)
    assert meta["engine"] == "qnnpack" and meta["input_shape"] == [3, 32, 32]
    assert set(meta["normalization"]) == {"mean", "std"} and len(meta["classes"]) == 10
    assert meta["torch_version"] == torch.__version__


@pytest.mark.e2e
def test_quantized_pt_loads_with_weights_only_in_a_fresh_process(bundle: Path) -> None:
    """No pickled code: plain torch.load(weights_only=True) reads it in a new interpreter."""
    code = ("import torch,sys; p=torch.load(sys.argv[1], weights_only=True); "
            "print(p['format'], p['mode'])")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code,
                           str(bundle / "quantized_cnn.pt")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == quantize.FORMAT


@pytest.mark.e2e
def test_project_loader_rebuilds_the_same_model_as_the_board_file(bundle: Path) -> None:
    module, payload = quantize.load_quantized(bundle / "quantized_cnn.pt")
    m = Manifest.read(bundle)
    sample = m.load_sample(bundle)
    x = torch.from_numpy(normalize(sample["images"], m.mean, m.std))
    board = load_scripted(bundle / BOARD_MODEL, payload["engine"])
    assert torch.equal(predict(module, x), predict(board, x))
    assert torch.equal(predict(board, x), torch.from_numpy(sample["logits"]["logits.torchscript"]))
    # the sample for agents that predate sample.npz holds the same images, labels and logits
    legacy = torch.load(bundle / "sample.pt", weights_only=True)
    assert np.array_equal(legacy["images"].numpy(), sample["images"])
    assert np.array_equal(legacy["logits"].numpy(), sample["logits"]["logits.torchscript"])


@pytest.mark.e2e
def test_the_onnx_file_is_int8_qdq_and_reproduces_its_sample_in_a_fresh_process(
        bundle: Path) -> None:
    import onnx

    m = Manifest.read(bundle)
    entry = m.engine_entries["onnxruntime"]
    assert entry["file"] == "quantized_cnn.onnx" and entry["verification"]["status"] == "passed"
    assert entry["quantization"]["format"] == "QDQ"
    ops = {n.op_type for n in onnx.load(str(bundle / entry["file"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    sample = m.load_sample(bundle)
    x = torch.from_numpy(normalize(sample["images"], m.mean, m.std))
    logits = torch.from_numpy(sample["logits"][entry["sample_logits"]])
    good = exporting.verify_in_fresh_process(bundle / entry["file"], "onnxruntime", x,
                                             torch.from_numpy(sample["labels"]), logits, 0.0)
    assert good["bit_exact"]
    assert abs(entry["accuracy_pct"] - m.metrics["accuracy_pct"]) <= 5.0


@pytest.mark.e2e
def test_the_executorch_program_is_lowered_to_xnnpack_and_reproduces_its_sample(
        bundle: Path) -> None:
    """quantized_cnn.pte: listed with its sha256, int8 by PT2E, delegated to XNNPACK, and a
    fresh process on the board's loader gives the sample's logits exactly."""
    m = Manifest.read(bundle)
    entry = m.engine_entries["executorch"]
    assert entry["file"] == "quantized_cnn.pte" and entry["verification"]["status"] == "passed"
    assert entry["verification"]["bit_exact"] and entry["quantization"]["batch"] == 1
    assert m.files["quantized_cnn.pte"]["sha256"] == sha256_of(bundle / "quantized_cnn.pte")
    assert b"XnnpackBackend" in (bundle / entry["file"]).read_bytes()
    sample = m.load_sample(bundle)
    x = torch.from_numpy(normalize(sample["images"], m.mean, m.std))
    logits = torch.from_numpy(sample["logits"][entry["sample_logits"]])
    good = exporting.verify_in_fresh_process(bundle / entry["file"], "executorch", x,
                                             torch.from_numpy(sample["labels"]), logits, 0.0)
    assert good["bit_exact"]
    assert abs(entry["accuracy_pct"] - m.metrics["accuracy_pct"]) <= 5.0


@pytest.mark.e2e
def test_fresh_process_verification_catches_a_mismatch(bundle: Path) -> None:
    m = Manifest.read(bundle)
    sample = m.load_sample(bundle)
    x = torch.from_numpy(normalize(sample["images"], m.mean, m.std))
    labels = torch.from_numpy(sample["labels"])
    logits = torch.from_numpy(sample["logits"]["logits.torchscript"])
    good = exporting.verify_in_fresh_process(bundle / BOARD_MODEL, m.engine, x, labels, logits,
                                             1e-4)
    assert good["status"] == "passed" and good["bit_exact"]
    with pytest.raises(VerificationError, match="disagrees with the in-memory model"):
        exporting.verify_in_fresh_process(bundle / BOARD_MODEL, m.engine, x, labels,
                                          logits + 0.5, 1e-4)


@pytest.mark.unit
def test_gate_falls_back_in_order_and_records_why() -> None:
    d = synthetic(200, 100)
    x = torch.from_numpy(normalize(d.test_images.numpy(), d.mean, d.std))
    model = SimpleCNN()
    cfg = QuantizeConfig(engine="qnnpack", max_accuracy_drop=1.0)
    def accuracy(m: torch.nn.Module) -> float:
        return accuracy_pct(predict(m, x), d.test_labels)

    result = quantize.gate(model, cfg, Calibration.of(x[:32]), accuracy,
                           baseline_accuracy=1000.0)  # nothing int8 can pass
    assert result.mode == "fp32"
    assert [a["mode"] for a in result.attempts] == list(quantize.MODES)
    assert all("> 1.0 allowed" in a["reason"] for a in result.attempts[:3])
    lenient = quantize.gate(model, cfg, Calibration.of(x[:32]), accuracy,
                            baseline_accuracy=0.0)
    assert lenient.mode == "static_per_channel" and len(lenient.attempts) == 1


@pytest.mark.unit
def test_observer_that_never_saw_data_is_an_error() -> None:
    with pytest.raises(QuantizationError, match="saw no data"):
        quantize.quantize_static(SimpleCNN(), "qnnpack",
                                 Calibration.of(torch.zeros(0, 3, 32, 32)))


@pytest.mark.unit
def test_pruning_hits_the_amount_and_makes_masks_permanent() -> None:
    d = synthetic(64, 10)
    model = SimpleCNN()
    raw_before, xz_before = state_sizes(model)
    prune_(model, PruneConfig(amount=0.6, finetune_epochs=1), d, TrainConfig(), DataConfig())
    s = sparsity(model)
    assert abs(s["overall"] - 0.6) < 0.01
    assert not any(name.endswith("_orig") for name, _ in model.named_parameters())
    raw_after, xz_after = state_sizes(model)
    assert abs(raw_after - raw_before) < 1024 and xz_after < xz_before
    per_layer = SimpleCNN()
    prune_(per_layer, PruneConfig(amount=0.5, scope="layer", finetune_epochs=0), d,
           TrainConfig(), DataConfig())
    assert all(abs(v["sparsity"] - 0.5) < 0.01 for v in sparsity(per_layer)["layers"].values())


@pytest.mark.e2e
def test_a_dynamic_int8_bundle_passes_its_own_board_check(bundle: Path, small_config: Path,
                                                          tmp_path: Path) -> None:
    """Dynamic quantization scales activations per batch: the sample's logits must come from
    the sample as one batch, as the board computes them (a gate that fell back to dynamic
    once built a bundle whose sample differed from its own model by 0.02)."""
    out = copy_bundle(bundle, tmp_path)
    _, payload = quantize.load_quantized(out / "quantized_cnn.pt")
    pruned = torch.load(out / "pruned_cnn.pth", weights_only=True)
    model = SimpleCNN(len(json.loads((out / "manifest.json").read_text())["classes"]))
    model.load_state_dict(pruned)
    quantize.save_quantized(out / "quantized_cnn.pt",
                            quantize.quantize_dynamic(model.eval(), "qnnpack"),
                            mode="dynamic", engine="qnnpack", factory=payload["factory"],
                            num_classes=payload["num_classes"],
                            input_shape=payload["input_shape"], record=payload["record"])
    proc = run_cli("optimizer", "export", "--data", "synthetic", "--config", small_config,
                   "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "manifest.json").read_text())["quantization"]["mode"] == "dynamic"
    check = run_cli("agent", "check", "--set", f"model.dir={out}")
    assert check.returncode == 0 and "max |logit diff| 0" in check.stdout + check.stderr, \
        check.stdout + check.stderr


@pytest.mark.e2e
def test_a_residual_model_without_a_fuse_list_becomes_a_static_int8_bundle_the_board_checks(
        small_config: Path, tmp_path: Path) -> None:
    """Skip connection, BatchNorm, depthwise convolution, hardswish, squeeze-excite and
    adaptive pooling (tests/support/residual_model.py) go through graph-mode quantization:
    the bundle's mode is static int8, no layer is left in float, and the board's check
    reproduces the sample from both files exactly. The accuracy gate is opened wide
    (one epoch of training says nothing about accuracy): what is tested is that static int8
    is built, not chosen as a fallback."""
    out = tmp_path / "bundle"
    sets = ["train.factory=tests.support.residual_model:ResidualCNN", "train.epochs=1",
            "prune.finetune_epochs=0", "data.synthetic_train=512", "data.synthetic_test=200",
            "quantize.calibration_images=64", "quantize.max_accuracy_drop=100"]
    for step in ("train", "prune", "quantize", "export"):
        proc = run_cli("optimizer", step, "--data", "synthetic", "--config", small_config,
                       "--out", out, *[a for s in sets for a in ("--set", s)])
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    attempt = manifest["quantization"]["attempts"][0]
    assert manifest["quantization"]["mode"] == "static_per_channel", attempt
    assert attempt["passed"] and attempt["float_layers"] == []
    board = load_scripted(out / BOARD_MODEL, "qnnpack")
    graph = str(board.graph)  # int8 kernels for the skip's add, SE's product, hardswish
    assert all(f"quantized::{op}" in graph for op in ("add_relu", "mul", "hardswish"))
    assert set(manifest["engines"]) == {"torchscript", "onnxruntime", "executorch"}
    check = run_cli("agent", "check", "--set", f"model.dir={out}")
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count("bit-exact") >= 3 or "max |logit diff| 0" in check.stdout, \
        check.stdout


@pytest.mark.unit
def test_batchnorm_statistics_are_the_training_images_own_after_a_short_run() -> None:
    d = synthetic(64, 16)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8, momentum=0.01), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    model[4].requires_grad_(False)  # a frozen layer keeps the statistics it came with
    fit_(model, d, epochs=1, lr=1e-3, weight_decay=0.0, batch_size=16, augment=True, seed=0,
         label="t")
    # Four steps at momentum 0.01 would leave the running mean at ~4 % of the data's.
    x = next(d.train_batches(64, augment=False, generator=torch.Generator()))[0]
    with torch.no_grad():
        features = model[0](x)
    assert torch.allclose(model[1].running_mean, features.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(model[1].running_var, features.var((0, 2, 3)), rtol=0.3)
    assert torch.equal(model[4].running_mean, torch.zeros(8))
    assert torch.equal(model[4].running_var, torch.ones(8))
    assert not model.training


class _SkewedAdd(torch.nn.Module):
    """A residual add whose two inputs differ in scale by 10^9: qnnpack's add kernel refuses
    a scale ratio outside [2^-14, 2^8) when the int8 model first runs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.a.weight.mul_(1e-6)
            self.a.bias.zero_()
            self.b.weight.mul_(1e3)
        self.fc = torch.nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((self.a(x) + self.b(x)).mean((2, 3)))


@pytest.mark.e2e
def test_an_int8_model_the_engine_cannot_run_fails_its_mode_and_the_gate_goes_on() -> None:
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model = _SkewedAdd().eval()
    cfg = QuantizeConfig(engine="qnnpack", max_accuracy_drop=100.0)

    def accuracy(m: torch.nn.Module) -> float:
        return accuracy_pct(predict(m, x), torch.zeros(8, dtype=torch.long))

    result = quantize.gate(model, cfg, Calibration.of(x), accuracy, baseline_accuracy=0.0)
    static = [a for a in result.attempts if a["mode"].startswith("static")]
    assert [a["passed"] for a in static] == [False, False]
    assert all("could not run on qnnpack" in a["reason"] for a in static)
    assert result.mode == "dynamic"
