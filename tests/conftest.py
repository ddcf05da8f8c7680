"""Shared fixtures: a small config, and one real bundle built by the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Small enough for a few seconds per step, large enough for the model to learn something.
SMALL_CONFIG = """\
data: {synthetic_train: 3000, synthetic_test: 500}
train: {epochs: 3, lr: 0.003}
prune: {finetune_epochs: 1}
quantize: {calibration_images: 128}
export: {sample_size: 16}
report: {latency_iters: 30, warmup: 3, throughput_batches: 2}
"""


def run_cli(module: str, *args: str | Path, cwd: Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `python -m <module> ARGS` as a real subprocess and capture its output."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def small_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "small.yaml"
    path.write_text(SMALL_CONFIG)
    return path


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory, small_config: Path) -> Path:
    """`edge-optimize run --data synthetic` end to end, once per test session."""
    out = tmp_path_factory.mktemp("bundle")
    proc = run_cli("optimizer", "run", "--data", "synthetic", "--config", small_config,
                   "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out
