"""The ONNX Runtime board file: int8 QDQ through torch's exporter and onnxruntime.quantization.

    fp32 model --torch.onnx.export (dynamo, opset 18, dynamic batch)--> fp32 .onnx
      --quant_pre_process (shape inference, graph clean-up)-->
      --quantize_static (QDQ, per-channel int8 weights in 7 bits, uint8 activations, MinMax
        calibration on the same images as the TorchScript model)--> quantized_cnn.onnx
        + edgeforge metadata

Why uint8 activations with reduce_range (7-bit weights), measured with ONNX Runtime 1.32 on
this x86 host (AVX2) against emulated Cortex-A72 and A76 on 64 inputs: x86's int8 kernels
multiply u8 by s8 into saturating 16-bit sums, so full-range weights (S8S8, the quantizer's
default, which ORT runs on x86 as U8S8, and U8S8) gave logits up to 1.19 apart from the
ARM boards', and another top-1 on 23 % of the inputs. With 7-bit weights no sum saturates:
logits bit-identical on all three CPUs. U8U8 is bit-identical too, but costs 19 % more guest
instructions per inference on the A72 (1.46 M against 1.23 M). The edgeforge metadata (input
shape, classes) goes into the model's metadata_props, where the board checks it before the
first run (agent/engines/onnxrt.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from agent.engines import ONNX_METADATA_KEY
from optimizer.data import Calibration
from optimizer.errors import ExportError

OPSET = 18  # the exporter's lowest native opset in torch 2.13 (older ones are converted)
MAX_BATCH = 4096


def missing() -> str | None:
    """What to install for the ONNX export, or None when onnx, onnxscript and onnxruntime
    are all there."""
    import importlib.util

    absent = [m for m in ("onnx", "onnxscript", "onnxruntime")
              if importlib.util.find_spec(m) is None]
    return f"pip install {' '.join(absent)}" if absent else None


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's known noise, and only it: torch's own pytree deprecation raised inside
    torch.export, and log lines about torchvision's ops (torchvision is not installed here
    on purpose) and about opset conversion."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is "
                                    r"deprecated", category=FutureWarning)
            yield
    finally:
        exporter_log.setLevel(level)


def export_fp32(model: nn.Module, input_shape: list[int], path: Path,
                metadata: dict[str, Any] | None = None) -> None:
    """Export the fp32 `model` to ONNX with a dynamic batch dimension, weights inline, and
    with `metadata` (the edgeforge metadata a board checks) when the file is to be shipped.

    Raises:
        ExportError: torch.export cannot capture the model.
    """
    example = torch.zeros(1, *input_shape)
    try:
        with _quiet_exporter():
            torch.onnx.export(model.eval(), (example,), str(path), dynamo=True,
                              opset_version=OPSET, external_data=False,
                              input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1,
                                                                   max=MAX_BATCH)},),
                              verbose=False)
    except Exception as exc:  # torch.export raises many kinds; all mean "cannot capture"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"cannot export the model to ONNX ({first}) (set export.onnx=false "
                          f"to build the TorchScript board file alone)") from None
    if metadata is not None:
        _embed(path, metadata, path)


def _embed(source: Path, metadata: dict[str, Any], path: Path) -> None:
    """The ONNX model at `source` written to `path` with the edgeforge metadata."""
    import onnx

    proto = onnx.load(str(source))
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(metadata, sort_keys=True)
    tmp_out = path.with_suffix(path.suffix + ".tmp")
    onnx.save(proto, str(tmp_out))
    tmp_out.replace(path)


class _Calibration:
    """onnxruntime.quantization's CalibrationDataReader over the calibration images, read a
    batch at a time."""

    def __init__(self, calibration: Calibration, batch_size: int = 64) -> None:
        self._batches = ({"input": x.numpy()} for x in calibration.batches(batch_size))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize(model: nn.Module, input_shape: list[int], calibration: Calibration,
             metadata: dict[str, Any], path: Path) -> dict[str, Any]:
    """Write the int8 QDQ model of fp32 `model` to `path`; return how it was quantized.

    Raises:
        ExportError: the export or the quantization failed.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="edgeforge-onnx-") as tmp:
        fp32, pre, q = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "q.onnx"
        export_fp32(model, input_shape, fp32)
        try:
            quant_pre_process(str(fp32), str(pre))
            quantize_static(str(pre), str(q), _Calibration(calibration),
                            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"onnxruntime.quantization failed ({first}) (set "
                              f"export.onnx=false to build the TorchScript board file "
                              f"alone)") from None
        _embed(q, metadata, path)
        import onnxruntime

        return {"format": "QDQ", "opset": OPSET,
                "weights": "int8 per-channel, symmetric, 7-bit range (reduce_range)",
                "activations": "uint8 (MinMax calibration)",
                "calibration_images": calibration.count,
                "exporter": f"torch.onnx (dynamo) {torch.__version__}",
                "quantizer": f"onnxruntime.quantization {onnxruntime.__version__}"}


def run(path: Path, inputs: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """Logits of the ONNX model at `path` on `inputs`, through the board's loader."""
    from agent.engines import onnxrt
    from optimizer.model import eval_batch_size

    batch_size = batch_size or eval_batch_size(inputs.shape[1:])
    runner = onnxrt.load(path.read_bytes(), path, 1, None)
    return np.concatenate([runner(inputs[i:i + batch_size])
                           for i in range(0, inputs.shape[0], batch_size)])


def unshipped_runner(path: Path, threads: int) -> Any:
    """An ONNX file that is never shipped (the fp32 export the report compares against, which
    carries no edgeforge metadata) in a session with the board's options."""
    from agent.engines import onnxrt

    session = onnxrt.ort.InferenceSession(str(path), onnxrt.options(threads),
                                          providers=["CPUExecutionProvider"])
    return onnxrt.OrtRunner(session)
