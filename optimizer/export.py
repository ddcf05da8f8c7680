"""TorchScript export of the board model, and its verification in a fresh process."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from agent.engines.torchscript import set_engine
from agent.manifest import METADATA_FILE, embedded_metadata
from agent.torchwarnings import known_torch_deprecations
from optimizer.config import ExportConfig
from optimizer.errors import ExportError, VerificationError
from optimizer.model import accuracy_pct


def export(model: nn.Module, cfg: ExportConfig, engine: str, example: torch.Tensor,
           metadata: dict[str, Any], path: Path) -> None:
    """Script (or trace) `model`, freeze it, embed `metadata`, and save it to `path`.

    Raises:
        ExportError: the model cannot be scripted/traced (try the other export.method).
    """
    set_engine(engine)
    model.eval()
    try:
        with known_torch_deprecations(), torch.inference_mode(False):
            if cfg.method == "script":
                module = torch.jit.script(model)
            else:
                module = torch.jit.trace(model, example)
            if cfg.freeze:
                module = torch.jit.freeze(module)
            tmp = path.with_suffix(path.suffix + ".tmp")
            torch.jit.save(module, str(tmp),
                           _extra_files={METADATA_FILE: json.dumps(metadata, sort_keys=True)})
    except (RuntimeError, torch.jit.Error) as exc:
        other = "trace" if cfg.method == "script" else "script"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"cannot {cfg.method} the model ({first}) (set "
                          f"export.method={other}, or make the model TorchScript-able)") from None
    tmp.replace(path)


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata embedded by `export`, read without running the model's code."""
    return embedded_metadata(path) or {}


def verify_in_fresh_process(path: Path, engine: str, inputs: torch.Tensor,
                            labels: torch.Tensor, expected: torch.Tensor,
                            tolerance: float) -> dict[str, Any]:
    """Reload `path` in a new Python process with `engine`, compare with `expected` logits.

    `engine` is torch's quantized engine for a TorchScript file, or onnxruntime for an ONNX
    file. The child uses the board's loader (agent/engines), so this checks what a board will
    do. Returns the verification record for the manifest.

    Raises:
        VerificationError: the child fails, or logits or accuracy differ beyond `tolerance`.
    """
    with tempfile.TemporaryDirectory(prefix="edgeforge-verify-") as tmp:
        inputs_file, out_file = Path(tmp) / "inputs.npy", Path(tmp) / "logits.npy"
        np.save(inputs_file, inputs.numpy(), allow_pickle=False)
        proc = subprocess.run(
            [sys.executable, "-m", "optimizer.verify_worker", str(path), engine,
             str(inputs_file), str(out_file)],
            capture_output=True, text=True, errors="replace", timeout=600)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            killed = ""
            if proc.returncode < 0:  # the runtime aborted the process: no Python error
                with contextlib.suppress(ValueError):
                    killed = f" (killed by {signal.Signals(-proc.returncode).name})"
            raise VerificationError(f"{path}: reloading in a fresh process failed{killed}: "
                                    f"{tail}")
        got = torch.from_numpy(np.load(out_file, allow_pickle=False))
    if got.shape != expected.shape:
        raise VerificationError(f"{path}: reloaded model gives logits of shape "
                                f"{tuple(got.shape)}, the in-memory model {tuple(expected.shape)}")
    max_diff = float((got - expected).abs().max())
    acc_file, acc_mem = accuracy_pct(got, labels), accuracy_pct(expected, labels)
    record = {"status": "passed", "engine": engine, "images": int(labels.shape[0]),
              "max_abs_logit_diff": max_diff, "logit_tolerance": tolerance,
              "accuracy_pct_file": acc_file, "accuracy_pct_in_memory": acc_mem,
              "bit_exact": bool(torch.equal(got, expected))}
    if max_diff > tolerance or acc_file != acc_mem:
        raise VerificationError(
            f"{path}: the reloaded file disagrees with the in-memory model (max |logit diff| "
            f"{max_diff:.3g} > {tolerance}, accuracy {acc_file:.2f}% vs {acc_mem:.2f}%): the "
            f"export is not trustworthy, so it was not accepted")
    return record
