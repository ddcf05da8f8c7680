"""Every bad input to edge-optimize ends in one clear line and exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optimizer.model import SimpleCNN
from tests.support import ROOT, run_cli

pytestmark = pytest.mark.e2e

TINY = ["--data", "synthetic", "--set", "data.synthetic_train=20",
        "--set", "data.synthetic_test=20"]


def assert_one_line_error(proc, kind: str, *fragments: str) -> None:  # type: ignore[no-untyped-def]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{kind}: "), last
    for fragment in fragments:
        assert fragment in last, last


def test_unknown_config_key_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epoch: 3\n")
    proc = run_cli("optimizer", "train", "--config", cfg, "--out", tmp_path, *TINY)
    assert_one_line_error(proc, "ConfigError", "train.epoch", "unknown key")


def test_invalid_value_in_set_is_named(tmp_path: Path) -> None:
    proc = run_cli("optimizer", "prune", "--set", "prune.amount=1.5", "--out", tmp_path)
    assert_one_line_error(proc, "ConfigError", "prune.amount", "[0, 1)")


def test_unknown_engine(tmp_path: Path) -> None:
    proc = run_cli("optimizer", "quantize", "--set", "quantize.engine=neon", "--out", tmp_path)
    assert_one_line_error(proc, "ConfigError", "quantize.engine", "qnnpack")


def test_missing_dataset_that_cannot_be_downloaded(tmp_path: Path) -> None:
    proc = run_cli("optimizer", "train", "--data", "cifar10", "--set",
                   f"data.root={tmp_path}", "--set", "data.download=false", "--out", tmp_path)
    assert_one_line_error(proc, "DataError", "CIFAR-10 not found", "--data synthetic")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_or_truncated_checkpoint(tmp_path: Path, damage: str) -> None:
    good = tmp_path / "good.pth"
    torch.save(SimpleCNN().state_dict(), good)
    bad = tmp_path / "baseline_cnn.pth"
    bad.write_bytes(b"not a checkpoint" if damage == "garbage" else good.read_bytes()[:4000])
    proc = run_cli("optimizer", "prune", "--out", tmp_path, *TINY)
    assert_one_line_error(proc, "CheckpointError", "baseline_cnn.pth", "corrupt or truncated")


def test_state_dict_that_does_not_fit_the_architecture(tmp_path: Path) -> None:
    state = SimpleCNN().state_dict()
    state["fc1.weight"] = torch.zeros(64, 2048)
    torch.save(state, tmp_path / "baseline_cnn.pth")
    proc = run_cli("optimizer", "prune", "--out", tmp_path, *TINY)
    assert_one_line_error(proc, "CheckpointError", "does not fit SimpleCNN", "fc1.weight")


def test_missing_previous_step_says_which_command_to_run(tmp_path: Path) -> None:
    proc = run_cli("optimizer", "export", "--out", tmp_path, *TINY)
    assert_one_line_error(proc, "CheckpointError", "quantized_cnn.pt", "edge-optimize quantize")


def test_unimportable_factory(tmp_path: Path) -> None:
    proc = run_cli("optimizer", "train", "--set", "train.factory=nowhere.mod:Net",
                   "--out", tmp_path, *TINY)
    assert_one_line_error(proc, "ConfigError", "train.factory", "nowhere.mod:Net")


def test_a_factory_that_raises_when_called_is_one_line_naming_where(tmp_path: Path) -> None:
    """Before: a 27-line traceback."""
    proc = run_cli("optimizer", "train", "--set",
                   "train.factory=tests.support.broken_factory:broken", "--out", tmp_path, *TINY)
    assert_one_line_error(proc, "ConfigError", "calling tests.support.broken_factory:broken",
                          "KeyError: 'head'")
    assert "broken_factory.py:11" in proc.stderr


def test_bring_your_own_checkpoint_is_adopted_as_baseline(tmp_path: Path) -> None:
    mine = tmp_path / "mine.pth"
    torch.save(SimpleCNN().state_dict(), mine)
    out = tmp_path / "out"
    proc = run_cli("optimizer", "train", "--set", f"train.checkpoint={mine}", "--out", out,
                   *TINY)
    assert proc.returncode == 0, proc.stderr
    assert "adopted" in proc.stderr
    adopted = torch.load(out / "baseline_cnn.pth", weights_only=True)
    assert all(torch.equal(adopted[k], v) for k, v in torch.load(mine, weights_only=True).items())


def test_executorch_asked_for_by_name_without_the_package(tmp_path: Path) -> None:
    """export.executorch=true on a host without executorch: one line before any step runs
    (nothing is trained)."""
    hide = ("import sys; sys.modules['executorch'] = None; from optimizer.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", hide, "run", "--out", str(tmp_path / "b"),
                           "--set", "export.executorch=true", *TINY],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert_one_line_error(proc, "MissingExtra", "export.executorch", "pip install executorch")
    assert not (tmp_path / "b" / "baseline_cnn.pth").exists()
