"""prune.method=structured: channels removed through torch-pruning's dependency graph, a
smaller dense model saved with its shape (pruned_structure.json), and every later step, the
board's files and the board's check working on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from agent.errors import ConfigError
from optimizer import data as datasets
from optimizer import structured, vision_models
from optimizer.config import DataConfig, PruneConfig, TrainConfig
from optimizer.errors import CheckpointError
from optimizer.quantize import load_quantized
from tests.optimizer.test_cli_errors import assert_one_line_error
from tests.support import copy_bundle, run_cli
from tests.support.residual_model import ResidualCNN

STRUCTURED = ["--set", "prune.method=structured", "--set", "prune.finetune_epochs=1"]


@pytest.mark.e2e
def test_structured_run_halves_the_macs_and_the_board_file_and_the_board_checks_it(
        bundle: Path, small_config: Path, tmp_path: Path) -> None:
    """The session bundle's baseline pruned again with channels removed: MACs and parameters
    at most half (the target, within one pruner step), the int8 board file at most 0.55x the
    unpruned bundle's, each engine's file verified, and `edge-agent check` reproduces the
    sample bit-exactly from every file."""
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "baseline_cnn.pth").write_bytes((bundle / "baseline_cnn.pth").read_bytes())
    proc = run_cli("optimizer", "run", "--data", "synthetic", "--config", small_config,
                   "--out", out, *STRUCTURED)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    doc = json.loads((out / structured.STRUCTURE).read_text())
    s = doc["summary"]
    assert s["method"] == "structured" and s["macs"] <= 0.5 * s["macs_before"]
    assert s["params"] < s["params_before"] and s["macs"] > 0.4 * s["macs_before"]
    assert doc["layers"]["conv1"]["out_channels"] < 16  # channels really removed
    assert doc["layers"]["fc2"]["out_features"] == 10  # the head keeps every class
    board = (out / "quantized_cnn_scripted.pt").stat().st_size
    assert board <= 0.55 * (bundle / "quantized_cnn_scripted.pt").stat().st_size
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["pruning"]["macs"] == s["macs"]
    assert all(e["verification"]["status"] == "passed" for e in manifest["engines"].values())
    report = json.loads((out / "report.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert rows["fp32 baseline"]["macs"] == s["macs_before"]
    assert rows["pruned fp32"]["macs"] == rows["board file (static_per_channel)"]["macs"] \
        == s["macs"]
    assert "## Pruning" in (md := (out / "report.md").read_text()) and "Structured" in md
    check = run_cli("agent", "check", "--set", f"model.dir={out}")
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count("bit-exact") >= len(manifest["engines"]), check.stdout

    # An unstructured prune afterwards takes the structure file away with the old model.
    again = run_cli("optimizer", "prune", "--data", "synthetic", "--config", small_config,
                    "--out", out)
    assert again.returncode == 0, again.stderr
    assert not (out / structured.STRUCTURE).exists()


def tiny_data() -> datasets.Dataset:
    return datasets.load(DataConfig(source="synthetic", synthetic_train=64,
                                    synthetic_test=16, batch_size=16), [3, 32, 32])


def prune_in_process(model: nn.Module, cfg: PruneConfig) -> dict[str, object]:
    torch.manual_seed(0)
    return structured.prune_structured_(model.eval(), cfg, tiny_data(), TrainConfig(),
                                        DataConfig(batch_size=16), vision_models.head(model),
                                        lambda m: None)


@pytest.mark.e2e
@pytest.mark.parametrize("factory, importance", [
    (lambda: ResidualCNN(10), "l2"),
    (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), "taylor")],
    ids=["residual-depthwise-se", "mobilenet_v3_small"])
def test_residual_and_depthwise_models_prune_and_rebuild_from_their_structure(
        factory: object, importance: str, tmp_path: Path) -> None:
    """The dependency graph keeps a residual add's branches, a depthwise convolution's groups
    and squeeze-excite's channels consistent: the pruned model runs at the target, and a
    fresh model given the saved structure and state_dict computes exactly the same logits."""
    assert callable(factory)
    model = factory()
    summary = prune_in_process(model, PruneConfig(method="structured", importance=importance,
                                                  target_macs_ratio=0.6, steps=2,
                                                  finetune_epochs=0))
    assert summary["macs"] <= 0.6 * summary["macs_before"]  # type: ignore[operator]
    assert len(summary["rounds"]) == 2  # type: ignore[arg-type]
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    path = tmp_path / structured.STRUCTURE
    structured.save_structure(path, model, factory(), summary)
    doc = structured.load_structure(path)
    assert doc is not None
    fresh = structured.reshape_(factory(), doc["layers"], path)
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))


@pytest.mark.unit
def test_a_params_target_and_channel_rounding_are_followed() -> None:
    model = ResidualCNN(10)
    s = prune_in_process(model, PruneConfig(method="structured", target_params_ratio=0.5,
                                            round_to=4, finetune_epochs=0))
    assert s["params"] <= 0.5 * s["params_before"]  # type: ignore[operator]
    assert s["target"] == {"params": 0.5}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1
             and m.out_channels > 4]
    assert convs and all(m.out_channels % 4 == 0 for m in convs)


@pytest.mark.unit
def test_ignore_naming_no_layer_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="prune.ignore: stem.9 is not a layer"):
        prune_in_process(ResidualCNN(10), PruneConfig(method="structured", ignore=["stem.9"],
                                                      finetune_epochs=0))


@pytest.mark.unit
def test_ignored_layers_keep_their_channels() -> None:
    model = ResidualCNN(10)
    first = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    before = dict(model.named_modules())[first].out_channels
    prune_in_process(model, PruneConfig(method="structured", ignore=[first],
                                        finetune_epochs=0))
    assert dict(model.named_modules())[first].out_channels == before


@pytest.mark.e2e
@pytest.mark.parametrize("key, value, message", [
    ("target_macs_ratio", "1.0", "between 0 and 1"), ("target_macs_ratio", "0", "between 0"),
    ("target_params_ratio", "-0.2", "between 0 and 1"), ("importance", "random", "l1, l2"),
    ("steps", "0", "steps"), ("method", "channels", "unstructured, structured"),
    ("round_to", "0", "round_to")])
def test_bad_structured_settings_are_one_line_and_exit_2(key: str, value: str, message: str,
                                                         tmp_path: Path) -> None:
    proc = run_cli("optimizer", "prune", "--set", f"prune.{key}={value}", "--out", tmp_path)
    assert_one_line_error(proc, "ConfigError", f"prune.{key}", message)
    assert not any(tmp_path.iterdir())


@pytest.mark.e2e
def test_ignore_naming_no_layer_stops_the_run_and_keeps_the_old_model(
        bundle: Path, small_config: Path, tmp_path: Path) -> None:
    out = copy_bundle(bundle, tmp_path)
    before = (out / "pruned_cnn.pth").read_bytes()
    proc = run_cli("optimizer", "prune", "--data", "synthetic", "--config", small_config,
                   "--out", out, *STRUCTURED, "--set", "prune.ignore=[conv9]")
    assert_one_line_error(proc, "ConfigError", "prune.ignore: conv9", "conv1")
    assert (out / "pruned_cnn.pth").read_bytes() == before
    assert not (out / structured.STRUCTURE).exists()


@pytest.mark.e2e
def test_a_model_that_fixes_a_layer_size_in_code_is_one_line_unless_told_to_skip(
        small_config: Path, tmp_path: Path) -> None:
    """tests/support/fixed_view_model.py (x.view(-1, 16 * 8 * 8)) stops running once conv's
    channels go: one line naming the layer it failed after; with prune.skip_if_untraceable
    the run goes on with the model unpruned, and says so."""
    out = tmp_path / "bundle"
    sets = ["--set", "train.factory=tests.support.fixed_view_model:FixedViewCNN",
            "--set", "train.epochs=1", "--set", "data.synthetic_train=64",
            "--set", "data.synthetic_test=32"]
    trained = run_cli("optimizer", "train", "--data", "synthetic", "--config", small_config,
                      "--out", out, *sets)
    assert trained.returncode == 0, trained.stderr
    proc = run_cli("optimizer", "prune", "--data", "synthetic", "--config", small_config,
                   "--out", out, *sets, *STRUCTURED)
    assert_one_line_error(proc, "PruningError", "after layer pool", "prune.ignore",
                          "skip_if_untraceable")
    assert not (out / "pruned_cnn.pth").exists()
    skipped = run_cli("optimizer", "prune", "--data", "synthetic", "--config", small_config,
                      "--out", out, *sets, *STRUCTURED, "--set",
                      "prune.skip_if_untraceable=true")
    assert skipped.returncode == 0, skipped.stderr
    assert "stays unpruned" in skipped.stderr and "after layer pool" in skipped.stderr
    assert json.loads((out / structured.STRUCTURE).read_text())["summary"]["method"] == "none"
    quantized = run_cli("optimizer", "quantize", "--data", "synthetic", "--config",
                        small_config, "--out", out, *sets)
    assert quantized.returncode == 0, quantized.stderr
    module, payload = load_quantized(out / "quantized_cnn.pt")
    assert payload["layers"] == {} and payload["record"]["pruning"]["method"] == "none"


@pytest.mark.e2e
def test_a_damaged_structure_file_is_one_line(bundle: Path, tmp_path: Path) -> None:
    out = copy_bundle(bundle, tmp_path)
    (out / structured.STRUCTURE).write_text("{not json")
    with pytest.raises(CheckpointError, match="pruned_structure.json: not readable JSON"):
        structured.load_structure(out / structured.STRUCTURE)
    (out / structured.STRUCTURE).write_text(json.dumps(
        {"schema": structured.SCHEMA, "layers": {"conv1": {"out_channels": 0}}}))
    doc = structured.load_structure(out / structured.STRUCTURE)
    assert doc is not None
    with pytest.raises(CheckpointError, match="bad out_channels=0"):
        structured.reshape_(ResidualCNN(10), {"stem.0.0": {"out_channels": 0}},
                            out / structured.STRUCTURE)
