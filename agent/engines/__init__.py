"""The engines that run a bundle's model on the board, behind one small interface.

A bundle carries one int8 model file per engine (agent/manifest.py, `engines`): TorchScript
for torch's qnnpack, always built, ONNX QDQ for ONNX Runtime, and an ExecuTorch program lowered
to XNNPACK. It may also carry an fp32 file for an engine, named `<engine>-fp32` (for example
`onnxruntime-fp32`), where int8 is not sure to be the faster file: the board proves and races
it like the others. An engine takes the file's verified bytes and gives a `Runner`: float32
NCHW numpy batch in, float32 logits out; the runner's `engine` is the bundle's name for the
file.
Each engine's runtime is imported only when that engine is loaded, so a board without torch
runs the ONNX model and never imports torch.

    engine        runtime               module
    torchscript   torch                 agent/engines/torchscript.py
    onnxruntime   onnxruntime           agent/engines/onnxrt.py
    executorch    executorch (+ torch)  agent/engines/executorch.py
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from agent import torch_matrix
from agent.errors import BundleError
from agent.interrupts import ctrl_c_held
from agent.torch_matrix import dist_version

TORCHSCRIPT, ONNXRUNTIME, EXECUTORCH = "torchscript", "onnxruntime", "executorch"
ENGINES = (TORCHSCRIPT, ONNXRUNTIME, EXECUTORCH)
RUNTIMES = {TORCHSCRIPT: "torch", ONNXRUNTIME: "onnxruntime", EXECUTORCH: "executorch"}
NEEDS = {EXECUTORCH: ("torch",)}  # packages an engine's runtime imports besides its own
FP32 = "-fp32"  # the suffix of a bundle's fp32 file for an engine
# Every name a bundle's file may have. TorchScript has no fp32 file: its file is the bundle's
# identity, and its manifest checks (embedded metadata) are made for that one file.
FILES = (*ENGINES, f"{ONNXRUNTIME}{FP32}", f"{EXECUTORCH}{FP32}")
ONNX_METADATA_KEY = "edgeforge"  # the ONNX model's metadata_props entry the optimizer writes


class Runner(Protocol):
    """A loaded model: one forward pass per call, a float32 NCHW numpy batch in, the logits
    out as the engine makes them (ONNX Runtime: numpy; TorchScript: a CPU tensor), which
    `np.asarray` reads without a copy where numpy is needed.

    Raises RuntimeError when a pass fails (the loop's fallback catches exactly that).
    """

    engine: str
    version: str
    # One pass on what `prepare` made, with no Python frame of ours where the engine allows
    # (TorchScript: the module itself); the loop's hot path. Same result and errors as a call.
    run_prepared: Callable[[Any], Any]

    def __call__(self, batch: Any) -> npt.ArrayLike:
        """One forward pass on a numpy batch, or on what `prepare` made of one."""
        ...

    def prepare(self, batch: np.ndarray) -> Any:
        """`batch` as this engine takes it, for a batch that is run many times (the loop's
        pre-built inputs): TorchScript's tensor sharing its memory, ONNX Runtime's array."""
        ...

    def session(self) -> contextlib.AbstractContextManager[None]:
        """A context to run many passes in (torch's inference mode; nothing for ORT)."""
        ...


def engine_of(name: str) -> str:
    """The engine that runs the bundle's file `name` (onnxruntime-fp32: onnxruntime)."""
    return name.removesuffix(FP32)


def installed(engine: str) -> str | None:
    """The version of `engine`'s runtime on this machine, or None; nothing is imported."""
    runtime = RUNTIMES[engine]
    if any(importlib.util.find_spec(m) is None for m in (runtime, *NEEDS.get(engine, ()))):
        return None
    return dist_version(runtime) or dist_version(f"{runtime}-gpu") or "unknown"


def load(name: str, data: bytes, path: Path, entry: dict[str, Any], threads: int,
         expect: dict[str, Any] | None) -> Runner:
    """A fresh Runner of the bundle's file `name` (one of FILES) for its verified bytes.

    `entry` is the manifest's record of the file, `expect` what the model must agree with
    (input_shape, classes) before it is run.

    Raises:
        BundleError: the runtime is missing, or the file is not a model it can load.
    """
    engine = engine_of(name)
    if installed(engine) is None:
        raise BundleError(f"{path}: engine {engine} needs {RUNTIMES[engine]}, which is not "
                          f"installed on this board (install it, or set model.engine to an "
                          f"installed one)")
    if engine == TORCHSCRIPT:
        with ctrl_c_held():  # torch's native modules
            from agent.engines import torchscript
        return torchscript.load(data, path, str(entry.get("quantized_engine", "qnnpack")),
                                threads, name)
    if engine == EXECUTORCH:
        version = str(installed(engine))
        verdict, message = torch_matrix.assess(version, torch_matrix.read_cpu(), EXECUTORCH)
        if verdict == "bad":  # loading it would kill the process: SIGILL, no Python error
            raise BundleError(f"{path}: not loaded: {message}")
        with ctrl_c_held():  # torch's and executorch's native modules
            from agent.engines import executorch
        return executorch.load(data, path, version, threads, expect, name)
    with ctrl_c_held():  # onnxruntime's
        from agent.engines import onnxrt
    return onnxrt.load(data, path, threads, expect, name)


@contextlib.contextmanager
def no_session() -> Iterator[None]:
    """The session of a runner that needs none."""
    yield
