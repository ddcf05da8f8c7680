"""The tests' helpers: bundle builders and editors, the agent and the CLIs as real
subprocesses. The fixtures that use them are in tests/conftest.py; the real mosquitto, the
real sshd and the slow test model are beside this file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.manifest import sha256_of

ROOT = Path(__file__).resolve().parents[2]


def bundle_config(synthetic_train: int, epochs: int, lr: float, sample_size: int,
                  fp32_candidates: bool = False) -> str:
    """A config.yaml for a quick `edge-optimize run --data synthetic`: the int8 files alone
    unless `fp32_candidates` (whose default, null, decides on this host's timing)."""
    return (f"data: {{synthetic_train: {synthetic_train}, synthetic_test: 500}}\n"
            f"train: {{epochs: {epochs}, lr: {lr}}}\n"
            "prune: {finetune_epochs: 1}\n"
            # A model that barely learns loses 2-3 points of a 500-image test set to int8 now
            # and then (seed 1 did in a CI run: the board file fell back to fp32, without
            # its ONNX file): the gate is open, the tests need both engines' int8 files.
            "quantize: {calibration_images: 128, max_accuracy_drop: 100}\n"
            f"export: {{sample_size: {sample_size}, "
            f"fp32_candidates: {str(fp32_candidates).lower()}}}\n"
            "report: {latency_iters: 30, warmup: 3, throughput_batches: 2}\n")


# A few seconds per step; the model barely learns (the tests check plumbing, not accuracy).
SMALL_CONFIG = bundle_config(3000, 3, 0.003, 16)


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    """A copy of the session bundle that a test may damage."""
    dest = tmp_path / "bundle"
    shutil.copytree(bundle, dest)
    return dest


def edit_manifest(bundle: Path, **changes: object) -> None:
    """Overwrite top-level manifest fields of a copied bundle."""
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m))


def run_cli(module: str, *args: str | Path, cwd: Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `python -m <module> ARGS` as a real subprocess and capture its output."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout)


def build_bundle(tmp_path_factory: pytest.TempPathFactory, config: Path, *overrides: str,
                 steps: tuple[str, ...] = ("run",)) -> Path:
    """A bundle from `edge-optimize run --data synthetic` (or the named steps, one by one)
    with `config` and overrides."""
    out = tmp_path_factory.mktemp("bundle")
    sets = [a for o in overrides for a in ("--set", o)]
    for step in steps:
        proc = run_cli("optimizer", step, "--data", "synthetic", "--config", config, "--out",
                       out, *sets)
        assert proc.returncode == 0, proc.stderr
    return out


def signed_copy(bundle: Path, dest: Path, key: Path, version: int) -> Path:
    """A copy of `bundle` at `dest`, signed by `edge-deploy sign` as `version`."""
    shutil.copytree(bundle, dest)
    proc = run_cli("deploy.cli", "sign", dest, "--key", key, "--version", str(version))
    assert proc.returncode == 0, proc.stderr
    return dest


def sign_unchecked(bundle: Path, key: Path, version: int) -> None:
    """Sign `bundle`'s manifest as `version` without `edge-deploy sign`'s checks (which refuse
    a bundle whose files do not load): a bad bundle signed elsewhere, for the board's own
    defences to meet."""
    from agent.manifest import manifest_bytes
    from agent.signing import SIGNATURE_FILE, sign_manifest
    from deploy.keys import load_private_key

    signature = sign_manifest(manifest_bytes(bundle), load_private_key(key), version)
    (bundle / SIGNATURE_FILE).write_bytes(signature)


def resampled_copy(bundle: Path, dest: Path, key: Path, version: int,
                   change: Callable[[dict[str, Any]], dict[str, Any]]) -> Path:
    """A signed copy whose sample.npz is change(arrays), with the manifest's sha256 of it
    updated and signed again: every sha256 and the signature are right, so only the
    on-board check (or the smoke test, or edge-deploy's own check) can refuse it."""
    signed_copy(bundle, dest, key, version)
    with np.load(dest / "sample.npz") as z:
        arrays = {k: z[k] for k in z.files}
    with (dest / "sample.npz").open("wb") as f:
        np.savez(f, **change(arrays))
    m = json.loads((dest / "manifest.json").read_text())
    m["files"]["sample.npz"] = {"bytes": (dest / "sample.npz").stat().st_size,
                                "sha256": sha256_of(dest / "sample.npz")}
    (dest / "manifest.json").write_text(json.dumps(m))
    proc = run_cli("deploy.cli", "sign", dest, "--key", key, "--version", str(version))
    assert proc.returncode == 0, proc.stderr
    return dest


def wrong_logits_copy(bundle: Path, dest: Path, key: Path, version: int) -> Path:
    """A signed copy whose sample logits (every engine's) are not what its models compute."""
    return resampled_copy(bundle, dest, key, version, lambda s: {
        k: v + 1.0 if k.startswith("logits.") else v for k, v in s.items()})


def tree(root: Path, parts: tuple[str, ...] = ("",)) -> dict[str, str]:
    """Every file's sha256 and every link's target under root/part for each part (a file or
    a folder): what 'unchanged' means on disk."""
    out = {}
    for part in parts:
        top = root / part
        for path in [top, *sorted(top.rglob("*"))] if top.is_dir() else [top]:
            if path.is_symlink():
                out[str(path.relative_to(root))] = "-> " + os.readlink(path)
            elif path.is_file():
                out[str(path.relative_to(root))] = sha256_of(path)
    return out


def model_sha(bundle: Path) -> str:
    """The sha256 of a bundle's board model, as its manifest lists it."""
    return str(json.loads((bundle / "manifest.json").read_text())["files"]
               ["quantized_cnn_scripted.pt"]["sha256"])


def make_store(bundle: Path, tmp_path: Path, key: Path, version: int = 1) -> Path:
    """A versioned store holding `bundle` signed as `version`; returns its `current` link."""
    current = tmp_path / "store" / "current"
    signed = signed_copy(bundle, tmp_path / f"v{version}", key, version)
    proc = run_cli("agent", "activate", signed, "--set", f"model.dir={current}",
                   "--set", f"update.public_key={key}.pub")
    assert proc.returncode == 0, proc.stderr
    return current


class Agent:
    """`python -m agent run` as a real subprocess, its log captured to a file.

    Every agent started is kept in `Agent.started` until the test ends: the autouse fixture
    `no_agent_outlives_its_test` (tests/conftest.py) kills one a failed assertion left
    running, which would otherwise be reported (ResourceWarning) in a later test."""

    started: list[Agent] = []

    def __init__(self, bundle: Path, port: int, workdir: Path, *overrides: str,
                 duration: float | None = None, env: dict[str, str] | None = None,
                 without: tuple[str, ...] = ()) -> None:
        """`without`: packages this agent process finds not installed (sys.modules[name] =
        None makes both `import` and importlib.util.find_spec see no such package)."""
        self.log = workdir / f"agent-{time.monotonic_ns()}.log"
        start = ["-c", f"import sys; sys.modules.update(dict.fromkeys({list(without)!r})); "
                       f"from agent.cli import main; raise SystemExit(main(sys.argv[1:]))"] \
            if without else ["-m", "agent"]
        args = [sys.executable, *start, "run", "--set", f"model.dir={bundle}",
                "--set", f"mqtt.port={port}", "--set", "mqtt.host=127.0.0.1",
                "--set", "device.id=testboard", "--set", f"spool.path={workdir / 'spool.db'}",
                "--set", "loop.window_s=0.5", "--set", "loop.warmup=2"]
        for item in overrides:
            args += ["--set", item]
        if duration is not None:
            args += ["--duration", str(duration)]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})
        Agent.started.append(self)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
