"""int8 quantization for the board's engine, behind an accuracy gate.

Modes, in the order the gate tries them:
    static_per_channel  whole network int8: conv/linear(+BN)+ReLU fused, per-channel weights
    static_per_tensor   the same with one scale per weight tensor
    dynamic             int8 weights for nn.Linear only (the reference method)
    fp32                no quantization (always passes: it is the baseline's own accuracy)

Static modes take one of two routes. A model that lists its fusable layers in a `FUSE`
attribute (the reference SimpleCNN) goes through eager mode, unchanged, so its board files
stay what the boards were proven on. Any other model goes through FX graph mode
(`prepare_fx`/`convert_fx`): the graph is traced, so residual adds, BatchNorm, depthwise
convolutions, hardswish/hardsigmoid, squeeze-excite products and adaptive pooling are fused
and quantized without a hand-written list, and the result scripts into the same qnnpack
TorchScript file. PT2E (torch.export + torchao) is not used for that file: its converted graph
holds quantize/dequantize ops around float kernels, which TorchScript runs in float, not as
qnnpack int8 kernels. A layer graph mode leaves in float is named in the gate's record.

`quantized_cnn.pt` is a plain dict of tensors and strings, loadable with
`torch.load(weights_only=True)` (no pickled code); `load_quantized` rebuilds the module.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.ao.quantization as tq
from torch import nn

from agent.engines.torchscript import set_engine
from agent.torchwarnings import known_torch_deprecations
from optimizer import structured
from optimizer.config import QuantizeConfig
from optimizer.data import Calibration
from optimizer.errors import CheckpointError, QuantizationError
from optimizer.model import build, check_fits, load_payload

MODES = ("static_per_channel", "static_per_tensor", "dynamic", "fp32")
FORMAT = "edgeforge.quantized/1"


def qconfig(engine: str, per_channel: bool) -> tq.QConfig:
    """Histogram-calibrated uint8 activations, symmetric int8 weights for `engine`.

    x86/fbgemm kernels want activations in 7 bits (their int16 accumulation can overflow);
    qnnpack uses the full 8.
    """
    quant_max = 255 if engine == "qnnpack" else 127
    activation = tq.HistogramObserver.with_args(dtype=torch.quint8, quant_min=0,
                                                quant_max=quant_max)
    if per_channel:
        weight = tq.PerChannelMinMaxObserver.with_args(dtype=torch.qint8,
                                                       qscheme=torch.per_channel_symmetric)
    else:
        weight = tq.MinMaxObserver.with_args(dtype=torch.qint8,
                                             qscheme=torch.per_tensor_symmetric)
    return tq.QConfig(activation=activation, weight=weight)


def _prepare_static(model: nn.Module, engine: str, per_channel: bool,
                    example: torch.Tensor) -> nn.Module:
    """Attach observers: eager mode for a model with a FUSE list, FX graph mode otherwise."""
    set_engine(engine)
    if not hasattr(model, "FUSE"):
        return _prepare_graph(model, engine, per_channel, example)
    wrapped = tq.QuantWrapper(copy.deepcopy(model).eval())
    with known_torch_deprecations():
        groups = [[f"module.{name}" for name in group]
                  for group in getattr(model, "FUSE", [])]
        if groups:
            wrapped = tq.fuse_modules(wrapped, groups)
        wrapped.qconfig = qconfig(engine, per_channel)  # type: ignore[assignment]
        return tq.prepare(wrapped)


def _prepare_graph(model: nn.Module, engine: str, per_channel: bool,
                   example: torch.Tensor) -> nn.Module:
    """Trace `model` and attach observers (FX graph mode); hardsigmoid and the other
    fixed-range ops keep the fixed scales torch's default mapping gives them."""
    from torch.ao.quantization.quantize_fx import prepare_fx

    mapping = tq.get_default_qconfig_mapping(engine).set_global(qconfig(engine, per_channel))
    try:
        with known_torch_deprecations():
            return prepare_fx(copy.deepcopy(model).eval(), mapping, (example,))
    except Exception as exc:  # symbolic tracing raises many kinds; all mean "cannot trace"
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise QuantizationError(f"graph-mode quantization cannot trace {type(model).__name__} "
                                f"({type(exc).__name__}: {first}) (make forward() free of "
                                f"data-dependent control flow; the gate tries the next mode)"
                                ) from None


def _convert(prepared: nn.Module) -> nn.Module:
    with known_torch_deprecations():
        if isinstance(prepared, torch.fx.GraphModule):
            from torch.ao.quantization.quantize_fx import convert_fx

            converted = convert_fx(prepared)
            # The traced signature's annotations (arguments and result) are strings under
            # `from __future__ import annotations` ("torch.Tensor"): names TorchScript
            # cannot resolve in the generated code. The graph needs none.
            for node in converted.graph.nodes:
                node.type = None
            converted.recompile()
            return converted.eval()
        return tq.convert(prepared).eval()


def float_layers(model: nn.Module) -> list[str]:
    """Conv and linear layers a static int8 model still runs in float32 (empty: all int8)."""
    return [name for name, m in model.named_modules()
            if type(m) in (nn.Conv2d, nn.Linear, nn.Conv1d, nn.Conv3d)]


def quantize_static(model: nn.Module, engine: str, calibration: Calibration,
                    per_channel: bool = True) -> nn.Module:
    """Static post-training int8 of the whole network, calibrated on `calibration` inputs
    (read a batch at a time).

    Raises:
        QuantizationError: an observer saw no data (its layer is never reached in forward, or
            there are no calibration images).
    """
    batches = calibration.batches(64)
    first = next(batches, None)
    if first is None or first.shape[0] == 0:
        raise QuantizationError("observers saw no data during calibration: there are no "
                                "calibration images (set quantize.calibration_images > 0)")
    prepared = _prepare_static(model, engine, per_channel, first[:1])
    with torch.inference_mode(), known_torch_deprecations():
        for batch in itertools.chain([first], batches):
            prepared(batch)
    blind = [name for name, m in prepared.named_modules()
             if isinstance(m, tq.ObserverBase) and _never_saw_data(m)]
    if blind:
        raise QuantizationError(f"observers {', '.join(blind[:3])} saw no data during "
                                f"calibration (is quantize.calibration_images > 0, and does "
                                f"forward() reach every layer?)")
    return _convert(prepared)


def _never_saw_data(observer: nn.Module) -> bool:
    low = getattr(observer, "min_val", None)
    return isinstance(low, torch.Tensor) and (low.numel() == 0 or bool(torch.isinf(low).any()))


def quantize_dynamic(model: nn.Module, engine: str) -> nn.Module:
    """The reference method: int8 weights for nn.Linear, activations quantized on the fly."""
    set_engine(engine)
    with known_torch_deprecations():
        return tq.quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear},
                                   dtype=torch.qint8)


def make(mode: str, model: nn.Module, engine: str, calibration: Calibration) -> nn.Module:
    """Build the `mode` variant of fp32 `model`."""
    if mode == "static_per_channel":
        return quantize_static(model, engine, calibration, per_channel=True)
    if mode == "static_per_tensor":
        return quantize_static(model, engine, calibration, per_channel=False)
    if mode == "dynamic":
        return quantize_dynamic(model, engine)
    return copy.deepcopy(model).eval()


@dataclass(frozen=True)
class GateResult:
    mode: str
    model: nn.Module
    attempts: list[dict[str, Any]]  # one per mode tried: mode, accuracy, drop, passed, reason


def gate(model: nn.Module, cfg: QuantizeConfig, calibration: Calibration,
         accuracy: Callable[[nn.Module], float], baseline_accuracy: float) -> GateResult:
    """Try each mode in order for `cfg.engine`; keep the first whose accuracy drop (by
    `accuracy`, a model's test accuracy in percent) is within `cfg.max_accuracy_drop`."""
    engine, max_drop = cfg.engine, cfg.max_accuracy_drop
    attempts: list[dict[str, Any]] = []
    for mode in MODES:
        try:
            candidate = make(mode, model, engine, calibration)
        except (QuantizationError, RuntimeError) as exc:
            attempts.append({"mode": mode, "passed": False, "accuracy_pct": None,
                             "drop_pts": None, "reason": f"could not be built: {exc}"})
            continue
        try:
            acc = accuracy(candidate)
        except RuntimeError as exc:  # an int8 kernel refused the model's scales, say
            first = str(exc).strip().splitlines()[0][-200:] if str(exc).strip() else ""
            attempts.append({"mode": mode, "passed": False, "accuracy_pct": None,
                             "drop_pts": None,
                             "reason": f"built, but could not run on {engine}: {first}"})
            continue
        drop = baseline_accuracy - acc
        passed = mode == "fp32" or drop <= max_drop
        reason = (f"accuracy drop {drop:.2f} pts <= {max_drop} allowed" if passed else
                  f"accuracy drop {drop:.2f} pts > {max_drop} allowed")
        floats = float_layers(candidate) if mode.startswith("static") else []
        if floats:
            reason += f"; kept in float32: {', '.join(floats[:5])}" + \
                (f" and {len(floats) - 5} more" if len(floats) > 5 else "")
        attempts.append({"mode": mode, "passed": passed, "accuracy_pct": acc,
                         "drop_pts": drop, "reason": reason, "float_layers": floats})
        if passed:
            return GateResult(mode=mode, model=candidate, attempts=attempts)
    raise AssertionError("unreachable: fp32 always passes the gate")


def save_quantized(path: Path, model: nn.Module, *, mode: str, engine: str, factory: str,
                   num_classes: int, input_shape: list[int], record: dict[str, Any],
                   layers: dict[str, Any] | None = None) -> None:
    """Write `quantized_cnn.pt`: the state_dict plus what is needed to rebuild the module
    (`layers`: the channel counts structured pruning gave it, see optimizer.structured)."""
    payload = {"format": FORMAT, "mode": mode, "engine": engine, "factory": factory,
               "num_classes": num_classes, "input_shape": list(input_shape),
               "layers": layers or {}, "record": record, "state_dict": model.state_dict()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_quantized(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the quantized module saved by `save_quantized`; returns (module, payload).

    Loading is `torch.load(weights_only=True)`: no code from the file is ever run.
    """
    hint = "run edge-optimize quantize to write it again"
    payload = load_payload(path, "quantized model", hint)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an edgeforge quantized model (expected format "
                              f"{FORMAT!r}) ({hint})")
    mode, engine = payload["mode"], payload["engine"]
    if mode not in MODES:
        raise CheckpointError(f"{path}: unknown quantization mode {mode!r} ({hint})")
    shell = build(payload["factory"], payload["num_classes"])
    if payload.get("layers"):
        structured.reshape_(shell, payload["layers"], path)
    if mode.startswith("static"):
        # Observers must see one batch before convert; the real scales come from the file.
        calib = Calibration.of(torch.randn(2, *payload["input_shape"],
                                           generator=torch.Generator().manual_seed(0)))
        shell = quantize_static(shell, engine, calib, per_channel=mode == "static_per_channel")
    elif mode == "dynamic":
        shell = quantize_dynamic(shell, engine)
    check_fits(shell, payload["state_dict"], path, "quantized model")
    set_engine(engine)
    shell.load_state_dict(payload["state_dict"])
    return shell.eval(), payload
