"""The ExecuTorch board file: int8 through PT2E and XNNPACK, as ExecuTorch's own flow does it.

    fp32 model --torch.export (batch 1)--> ExportedProgram
      --prepare_pt2e(XNNPACKQuantizer: symmetric int8, per-channel weights)
      --calibration (the same images as the other board files, one at a time)
      --convert_pt2e--> q/dq graph
      --torch.export, to_edge_transform_and_lower(XnnpackPartitioner)--> XNNPACK delegates
      --to_executorch--> quantized_cnn.pte

The program's shape is static ([1, C, H, W]): the board runs a batch image by image
(agent/engines/executorch.py). It needs the `executorch` package on the host; the board's
runtime must be a release that loads what this one writes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from optimizer.data import Calibration
from optimizer.errors import ExportError

PACKAGE = "executorch"

# What importing ExecuTorch's exporter raises, and only that: its package reads its resources
# through importlib.resources' legacy calls, marks its Python API experimental, and imports
# torch modules deprecated in torch 2.13.
_KNOWN = (
    (r"(read|open)_text is deprecated", DeprecationWarning),
    (r"This API is experimental", Warning),
    (r"`torch\.jit\.script_method` is deprecated", DeprecationWarning),
)
_PYTREE_LOG = "torch.utils._pytree"  # logs a deprecation of its own while torchao imports


@contextlib.contextmanager
def _known_import_noise() -> Iterator[None]:
    """Silence exactly what importing the exporter raises (listed above), inside the block."""
    log = logging.getLogger(_PYTREE_LOG)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for message, category in _KNOWN:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        log.setLevel(level)


def installed() -> str | None:
    """executorch's version on this host, or None; nothing is imported."""
    if importlib.util.find_spec(PACKAGE) is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's known noise, and only it: its import noise (above), torch's own
    pytree deprecation raised inside torch.export, and ExecuTorch's INFO lines."""
    exir_log = logging.getLogger("executorch")
    level = exir_log.level
    exir_log.setLevel(logging.WARNING)
    try:
        with _known_import_noise(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is "
                                    r"deprecated", category=FutureWarning)
            yield
    finally:
        exir_log.setLevel(level)


def quantize(model: nn.Module, input_shape: list[int], calibration: Calibration,
             path: Path) -> dict[str, Any]:
    """Write the int8 XNNPACK program of fp32 `model` to `path`; return how it was made.

    Raises:
        ExportError: torch.export, the quantizer or the lowering failed.
    """
    _write(_lower(model, input_shape, calibration), path)
    return {"format": "ExecuTorch program, XNNPACK delegate", "batch": 1,
            "weights": "int8 per-channel, symmetric",
            "activations": "int8 (PT2E min/max observers)",
            "calibration_images": calibration.count,
            "exporter": f"executorch {installed()}, torch.export {torch.__version__}"}


def export_fp32(model: nn.Module, input_shape: list[int], path: Path) -> None:
    """Write the fp32 XNNPACK program of `model` (the report's same-engine comparison; never
    shipped).

    Raises:
        ExportError: as quantize().
    """
    _write(_lower(model, input_shape, None), path)


def _lower(model: nn.Module, input_shape: list[int], calibration: Calibration | None) -> bytes:
    """The program's bytes: int8 through PT2E when `calibration` is given, else fp32."""
    example = (torch.zeros(1, *input_shape),)
    try:
        with _quiet_exporter():
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
                XnnpackPartitioner,
            )
            from executorch.exir import to_edge_transform_and_lower

            program = torch.export.export(model.eval(), example)
            if calibration is not None:
                program = torch.export.export(_quantized(program.module(), calibration), example)
            lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            return bytes(lowered.to_executorch().buffer)
    except Exception as exc:  # torch.export and the lowering raise many kinds
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"cannot build the ExecuTorch program ({first}) (set "
                          f"export.executorch=false to build the other board files "
                          f"alone)") from None


def _quantized(graph: Any, calibration: Calibration) -> Any:
    """PT2E with the XNNPACK quantizer, calibrated one image at a time (static batch 1)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for batch in calibration.batches(64):
            for i in range(batch.shape[0]):
                prepared(batch[i:i + 1])
    return convert_pt2e(prepared)


def _write(data: bytes, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def run(path: Path, inputs: np.ndarray, expect: dict[str, Any] | None = None) -> np.ndarray:
    """Logits of the program at `path` on `inputs`, through the board's loader."""
    from agent.engines import executorch

    runner = executorch.load(path.read_bytes(), path, str(installed()), 1, expect)
    return runner(inputs)
