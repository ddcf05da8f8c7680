"""Shared fixtures: a small config, real bundles built by the real CLI, a signing key, a real
mosquitto per test and a CPU hog. Their helpers live in tests/support/."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import SMALL_CONFIG, Agent, build_bundle, run_cli
from tests.support.broker import Broker
from tests.tiers import pytest_collection_modifyitems, unit_stays_in_process  # noqa: F401


@pytest.fixture(scope="session", autouse=True)
def fresh_engine_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The proven-files cache (agent/first_load.py) of this session only, as on a new board:
    the first proof of each file runs in a child, and nothing is left in the user's cache."""
    saved = {k: os.environ.get(k) for k in ("XDG_CACHE_HOME", "CACHE_DIRECTORY")}
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.pop("CACHE_DIRECTORY", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def no_agent_outlives_its_test() -> Iterator[None]:
    """Kills and reaps any agent subprocess a test left running (a failed assertion before
    its stop), so the failure stays in that test."""
    yield
    while Agent.started:
        Agent.started.pop().kill()


@pytest.fixture(scope="session")
def small_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "small.yaml"
    path.write_text(SMALL_CONFIG)
    return path


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory, small_config: Path) -> Path:
    """`edge-optimize run --data synthetic` end to end, once per test session."""
    return build_bundle(tmp_path_factory, small_config)


@pytest.fixture(scope="session")
def bundle_v2(tmp_path_factory: pytest.TempPathFactory, small_config: Path) -> Path:
    """The same architecture trained from another seed: a model update with new weights
    (no host report: the tests use its files and manifest)."""
    return build_bundle(tmp_path_factory, small_config, "train.seed=1",
                        steps=("train", "prune", "quantize", "export"))


@pytest.fixture(scope="session")
def slow_bundle(tmp_path_factory: pytest.TempPathFactory, small_config: Path) -> Path:
    """A valid update that runs much slower (tests/support/slow_model.py): a latency regression.

    Its accuracy does not matter, so it trains on little data and skips the report step
    (timing the wide fp32 model at batch 64 is most of a full run's minute and a half)."""
    return build_bundle(tmp_path_factory, small_config,
                        "train.factory=tests.support.slow_model:WideCNN", "train.epochs=1",
                        "prune.finetune_epochs=0", "data.synthetic_train=512",
                        "data.synthetic_test=200", "quantize.calibration_images=32",
                        steps=("train", "prune", "quantize", "export"))


@pytest.fixture(scope="session")
def fleet_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fleet's signing key, made by `edge-deploy keygen` (public half at <key>.pub)."""
    key = tmp_path_factory.mktemp("keys") / "signing.key"
    proc = run_cli("deploy.cli", "keygen", "--key", key)
    assert proc.returncode == 0, proc.stderr
    return key


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A real mosquitto on a free loopback port, stopped after the test."""
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def cpu_hog() -> Iterator[None]:
    """Both cores kept busy for the whole test, as a camera pipeline keeps a board busy."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(os.cpu_count() or 2)]
    yield
    for h in hogs:
        h.kill()
        h.wait(10)
