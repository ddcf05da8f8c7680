"""The ONNX Runtime engine: the int8 QDQ model on ORT's CPU execution provider.

Imports onnxruntime and numpy only, so a board installed with the `onnx` profile runs the
agent without torch. ORT's errors are Exceptions of its own; a failed pass is raised as
RuntimeError, the engine interface's contract (the loop's fallback catches exactly that).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.engines import ONNX_METADATA_KEY, no_session
from agent.errors import BundleError
from agent.untrusted import Untrusted, loads_json

ENGINE = "onnxruntime"


class OrtRunner:
    """An InferenceSession behind the engine interface (agent/engines)."""

    def __init__(self, session: ort.InferenceSession, name: str = ENGINE) -> None:
        self.engine = name  # the bundle's name for the file: onnxruntime or onnxruntime-fp32
        self.inference_session = session  # the runtime's own object (the benchmarks' bare loop)
        self._run = session.run
        self._input = session.get_inputs()[0].name
        self.version = ort.__version__
        self.run_prepared: Callable[[Any], Any] = self.__call__

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        try:
            return self._run(None, {self._input: batch})[0]
        except Exception as exc:  # ORT's Fail, InvalidArgument...: not RuntimeErrors
            raise RuntimeError(f"onnxruntime: {exc}") from None

    def prepare(self, batch: np.ndarray) -> np.ndarray:
        return batch

    def session(self) -> contextlib.AbstractContextManager[None]:
        return no_session()


def options(threads: int) -> ort.SessionOptions:
    """One pass at a time on `threads` threads, every graph optimisation on."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: ORT's warnings go to stderr, not to logging
    return so


def load(data: bytes, path: Path, threads: int, expect: dict[str, Any] | None,
         name: str = ENGINE) -> OrtRunner:
    """A fresh session for the verified ONNX bytes, checked against `expect` (input_shape,
    classes; None: the model's own metadata) before any run; `name` is the bundle's name for
    the file (agent/engines: `<engine>-fp32` for an fp32 file).

    Raises:
        BundleError: not an ONNX model ORT loads, or one that disagrees with the manifest.
    """
    try:
        session = ort.InferenceSession(data, options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"{path}: not a loadable ONNX model ({first}) (copy the bundle "
                          f"again, or rebuild it with edge-optimize)") from None
    agrees(session, path, expect)
    return OrtRunner(session, name)


def metadata(session: ort.InferenceSession) -> dict[str, Any] | None:
    """The edgeforge metadata the optimizer wrote into the model, or None."""
    raw = session.get_modelmeta().custom_metadata_map.get(ONNX_METADATA_KEY)
    if raw is None:
        return None
    try:
        data = loads_json(raw, "the model's edgeforge metadata")
    except Untrusted:
        return None
    return data if isinstance(data, dict) else None


def agrees(session: ort.InferenceSession, path: Path, expect: dict[str, Any] | None) -> None:
    """The model carries edgeforge metadata, and its input, output and metadata match the
    manifest's (`expect`; None: the metadata's own)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    meta = metadata(session)
    if meta is None:
        raise BundleError(f"{path}: no embedded edgeforge metadata (rebuild the bundle with "
                          f"edge-optimize export)")
    expect = expect or meta
    shape = list(expect["input_shape"])
    if len(inputs) != 1 or len(outputs) != 1 or list(inputs[0].shape[1:]) != shape:
        got = [list(i.shape) for i in inputs]
        raise BundleError(f"{path}: the ONNX model takes {got}, the manifest says one input "
                          f"[N, {', '.join(map(str, shape))}] (rebuild the bundle; the model "
                          f"was not run)")
    for key in ("input_shape", "classes"):
        if key in meta and meta[key] != expect[key]:
            raise BundleError(f"{path}: the manifest's {key.replace('_', ' ')} {expect[key]} "
                              f"does not match the model's {meta[key]} (rebuild the bundle; "
                              f"the model was not run)")
