"""The optimizer's steps, each reading its inputs from and writing its outputs to `out/`.

train -> baseline_cnn.pth -> prune -> pruned_cnn.pth -> quantize -> quantized_cnn.pt ->
export -> quantized_cnn_scripted.pt, quantized_cnn.onnx, quantized_cnn.pte (and fp32_cnn.onnx,
fp32_cnn.pte where export.fp32_candidates ships them), sample.npz, sample.pt, manifest.json
-> report -> report.*
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import agent
from agent.bundle import RACE_PASSES, RACE_ROUNDS
from agent.engines import EXECUTORCH, FP32, ONNXRUNTIME, RUNTIMES, TORCHSCRIPT, engine_of
from agent.engines.torchscript import load_scripted, set_engine
from agent.errors import ConfigError
from agent.manifest import (
    BOARD_MODEL,
    EXECUTORCH_MODEL,
    FP32_MODELS,
    ONNX_MODEL,
    SAMPLE_ARRAYS,
    SAMPLE_FILE,
    Manifest,
    file_entry,
)
from agent.timing import race
from agent.torch_matrix import dist_version
from agent.torchwarnings import known_torch_deprecations
from optimizer import data as datasets
from optimizer import (
    executorch_export,
    latency,
    onnx_export,
    quantize,
    report,
    structured,
    vision_models,
)
from optimizer import export as exporting
from optimizer.config import OptimizerConfig
from optimizer.data import Calibration, Dataset
from optimizer.errors import PruningError
from optimizer.model import (
    accuracy_pct,
    build,
    check_input,
    load_state_dict_into,
    predict,
    save_state_dict,
    serialized_bytes,
)
from optimizer.prune import XZ_PRESET, compressed_size, prune_, sparsity
from optimizer.train import evaluate, first_test_inputs, fit_, logits_on_test, per_class_pct

# Test images the fresh-process verification compares on: all of a small test split, and at
# most about 64 MB of inputs for large images (a 224x224 input is 0.6 MB).
VERIFY_IMAGES, VERIFY_BYTES = 2000, 64 << 20
# export.fp32_candidates: null ships an engine's fp32 file when its int8 file's batch-1 p50 is
# not at least this much faster here (a tie on this host may be a loss on the board's kernels),
# timed in interleaved rounds as the board's race is.
INT8_CLEARLY_FASTER = 0.9

BASELINE, PRUNED, QUANTIZED = "baseline_cnn.pth", "pruned_cnn.pth", "quantized_cnn.pt"


@dataclass
class Context:
    """What every step needs: the built config sections, the output folder, the data."""

    cfg: OptimizerConfig
    out: Path
    _data: Dataset | None = field(default=None, repr=False)
    _checked_input: bool = field(default=False, repr=False)

    @property
    def data(self) -> Dataset:
        if self._data is None:
            print(f"loading data: {self.cfg.data.source}", file=sys.stderr)
            self._data = datasets.load(self.cfg.data, self.cfg.train.input_shape)
            self._check_shape(self._data)
        return self._data

    def _check_shape(self, d: Dataset) -> None:
        want = self.cfg.train.input_shape
        if d.input_shape != want:
            raise ConfigError(f"train.input_shape: {want} does not match the {d.source} images "
                              f"{d.input_shape} (set train.input_shape={d.input_shape})")
        classes = self.cfg.train.classes
        if classes is not None and len(classes) != len(d.classes):
            raise ConfigError(f"train.classes: {len(classes)} names for a dataset with "
                              f"{len(d.classes)} classes (list {len(d.classes)} names or null)")

    @property
    def classes(self) -> list[str]:
        return list(self.cfg.train.classes or self.data.classes)

    def fresh_model(self) -> nn.Module:
        t = self.cfg.train
        model = build(t.factory, len(self.classes))
        if not self._checked_input:
            check_input(model, t.input_shape, t.factory)
            self._checked_input = True
        return model

    def freeze(self, model: nn.Module) -> None:
        """train.freeze_backbone: only the classifier head is trained."""
        if self.cfg.train.freeze_backbone:
            n = vision_models.freeze_backbone_(model)
            print(f"backbone frozen: training {n:,} head parameters", file=sys.stderr)

    def load_fp32(self, name: str, produced_by: str) -> nn.Module:
        model = self.fresh_model()
        if name == PRUNED and (layers := self.pruned_layers()):
            structured.reshape_(model, layers, self.out / structured.STRUCTURE)
        return load_state_dict_into(model, self.out / name,
                                    f"{name.split('_')[0]} checkpoint",
                                    f"run edge-optimize {produced_by} first")

    def pruned_layers(self) -> dict[str, Any]:
        """The channel counts structured pruning changed (empty: none changed)."""
        doc = structured.load_structure(self.out / structured.STRUCTURE)
        return dict(doc["layers"]) if doc else {}

    def pruning(self) -> dict[str, Any]:
        """What the prune step did: its method and, for structured, MACs and parameters."""
        doc = structured.load_structure(self.out / structured.STRUCTURE)
        if doc:
            return dict(doc["summary"])
        return {"method": "unstructured", **{k: getattr(self.cfg.prune, k)
                                             for k in ("amount", "scope")}}

    def quantized_from(self, record: dict[str, Any]) -> nn.Module:
        """The fp32 model the quantize step's `record` quantized: pruned or baseline."""
        pruned = record["source"] == "pruned"
        return self.load_fp32(PRUNED if pruned else BASELINE, "prune" if pruned else "train")


def step_train(ctx: Context) -> nn.Module:
    """Train the baseline (or adopt train.checkpoint) and save baseline_cnn.pth."""
    t = ctx.cfg.train
    ctx.out.mkdir(parents=True, exist_ok=True)
    n = len(ctx.classes)  # the data is loaded (its workers draw from torch's RNG) first
    torch.manual_seed(t.seed)  # the same random start for the same train.seed
    model = ctx.fresh_model()
    if t.weights and not t.checkpoint:
        if not vision_models.is_torchvision(t.factory):
            raise ConfigError(f"train.weights: {t.factory} is not a torchvision model "
                              f"(weights by name are torchvision's; give train.checkpoint, or "
                              f"set train.weights=null)")
        model = vision_models.pretrained(t.factory.partition(":")[2], t.weights, n)
    if t.checkpoint:
        load_state_dict_into(model, Path(t.checkpoint), "train.checkpoint",
                             "point train.checkpoint at a state_dict saved from train.factory")
        print(f"adopted {t.checkpoint}: test accuracy {evaluate(model, ctx.data):.2f}%",
              file=sys.stderr)
    else:
        d = ctx.cfg.data
        ctx.freeze(model)
        fit_(model, ctx.data, epochs=t.epochs, lr=t.lr, weight_decay=t.weight_decay,
             batch_size=d.batch_size, augment=d.augment, seed=t.seed, label="train")
    save_state_dict(model, ctx.out / BASELINE)
    print(f"wrote {ctx.out / BASELINE}", file=sys.stderr)
    return model


def step_prune(ctx: Context) -> nn.Module:
    """Prune the baseline (prune.method), fine-tune, save pruned_cnn.pth (and, when channels
    were removed, pruned_structure.json)."""
    model = ctx.load_fp32(BASELINE, "train")
    before = evaluate(model, ctx.data)
    ctx.freeze(model)
    structure = ctx.out / structured.STRUCTURE
    if ctx.cfg.prune.method == "structured":
        return _prune_structured(ctx, model, before, structure)
    prune_(model, ctx.cfg.prune, ctx.data, ctx.cfg.train, ctx.cfg.data)
    structure.unlink(missing_ok=True)  # an earlier structured run's
    save_state_dict(model, ctx.out / PRUNED)
    s = sparsity(model)
    print(f"pruned to {100 * s['overall']:.1f}% zeros: accuracy {before:.2f}% -> "
          f"{evaluate(model, ctx.data):.2f}%; wrote {ctx.out / PRUNED}", file=sys.stderr)
    return model


def _prune_structured(ctx: Context, model: nn.Module, before: float,
                      structure: Path) -> nn.Module:
    p, t = ctx.cfg.prune, ctx.cfg.train
    try:
        summary = structured.prune_structured_(model, p, ctx.data, t, ctx.cfg.data,
                                               vision_models.head(model), ctx.freeze)
    except PruningError as exc:
        if not p.skip_if_untraceable:
            raise
        print(f"the model stays unpruned (prune.skip_if_untraceable is true): {exc}",
              file=sys.stderr)
        model = ctx.load_fp32(BASELINE, "train")
        macs, params = structured.macs_and_params(model, t.input_shape)
        summary = {"method": "none", "reason": str(exc), "macs_before": macs, "macs": macs,
                   "params_before": params, "params": params, "rounds": []}
    structured.save_structure(structure, model, ctx.fresh_model(), summary)
    save_state_dict(model, ctx.out / PRUNED)
    macs, params = summary["macs"], summary["params"]
    print(f"pruned to {macs / summary['macs_before']:.2f}x MACs ({macs:,} per image) and "
          f"{params / summary['params_before']:.2f}x parameters ({params:,}): accuracy "
          f"{before:.2f}% -> "
          f"{evaluate(model, ctx.data):.2f}%; wrote {ctx.out / PRUNED}, {structure}",
          file=sys.stderr)
    return model


def _calibration(ctx: Context) -> Calibration:
    return ctx.data.calibration(ctx.cfg.quantize.calibration_images, ctx.cfg.train.seed)


def _verify_count(d: Dataset) -> int:
    c, h, w = d.input_shape
    return min(len(d.test_labels), VERIFY_IMAGES, max(1, VERIFY_BYTES // (4 * c * h * w)))


def step_quantize(ctx: Context) -> quantize.GateResult:
    """Quantize for the configured engine behind the accuracy gate; save quantized_cnn.pt."""
    q = ctx.cfg.quantize
    baseline = ctx.load_fp32(BASELINE, "train")
    source = baseline if q.source == "baseline" else ctx.load_fp32(PRUNED, "prune")
    base_acc = evaluate(baseline, ctx.data)
    result = quantize.gate(source, q, _calibration(ctx), lambda m: evaluate(m, ctx.data),
                           base_acc)
    record = {"baseline_accuracy_pct": base_acc, "source": q.source,
              "pruning": ctx.pruning() if q.source == "pruned" else None,
              "max_accuracy_drop": q.max_accuracy_drop, "attempts": result.attempts,
              "calibration_images": q.calibration_images, "data": ctx.data.describe()}
    quantize.save_quantized(ctx.out / QUANTIZED, result.model, mode=result.mode,
                            engine=q.engine, factory=ctx.cfg.train.factory,
                            num_classes=len(ctx.classes), input_shape=ctx.data.input_shape,
                            record=record,
                            layers=ctx.pruned_layers() if q.source == "pruned" else {})
    for a in result.attempts:
        print(f"  {a['mode']:<19} {'passed' if a['passed'] else 'failed'}: {a['reason']}",
              file=sys.stderr)
    print(f"quantized ({result.mode}, engine {q.engine}); wrote {ctx.out / QUANTIZED}",
          file=sys.stderr)
    return result


def step_export(ctx: Context) -> Manifest:
    """Export the board files (TorchScript, and ONNX for ONNX Runtime), verify each in a fresh
    process, write the samples and the manifest."""
    e = ctx.cfg.export
    module, payload = quantize.load_quantized(ctx.out / QUANTIZED)
    engine, record = payload["engine"], payload["record"]
    d = ctx.data
    normalization = {"mean": list(d.mean), "std": list(d.std)}
    metadata = {"engine": engine, "input_shape": d.input_shape, "normalization": normalization,
                "classes": ctx.classes, "torch_version": torch.__version__,
                "quantization_mode": payload["mode"], "data_source": d.source}
    labels = d.test_labels
    n_verify = _verify_count(d)
    checked = first_test_inputs(d, n_verify)
    board = ctx.out / BOARD_MODEL
    exporting.export(module, e, engine, checked[:1], metadata, board)
    set_engine(engine)
    logits = logits_on_test(module, d)
    verification = _verify(ctx, board, engine, checked, logits[:n_verify], labels[:n_verify])
    n = min(e.sample_size, len(labels))
    # The sample's logits come from one batch of exactly the sample, as the board computes
    # them: dynamic quantization scales activations per batch, so the same images inside a
    # larger batch give other logits (measured: up to 0.02 apart for a 16-image sample).
    pixels = d.test_pixels(n)
    sample_inputs = d.preprocess.batch(pixels)
    sample_logits = predict(module, sample_inputs, batch_size=n)
    torch.save({"images": pixels.clone(), "labels": labels[:n].clone(),
                "logits": sample_logits.clone()}, ctx.out / SAMPLE_FILE)
    acc = accuracy_pct(logits, labels)
    sample_acc = accuracy_pct(sample_logits, labels[:n])
    engines = {TORCHSCRIPT: {
        "file": BOARD_MODEL, "runtime": "torch", "runtime_version": torch.__version__,
        "quantized_engine": engine, "sample_logits": f"logits.{TORCHSCRIPT}",
        "sample_accuracy_pct": sample_acc, "logit_tolerance": e.logit_tolerance,
        "accuracy_pct": acc, "verification": verification}}
    arrays = {"images": pixels.numpy(), "labels": labels[:n].numpy(),
              f"logits.{TORCHSCRIPT}": sample_logits.numpy()}
    onnx_entry = _export_onnx(ctx, record, metadata, checked, sample_inputs)
    if onnx_entry is not None:
        arrays[f"logits.{ONNXRUNTIME}"] = onnx_entry.pop("sample_logits_array")
        engines[ONNXRUNTIME] = onnx_entry
    et_entry = _export_executorch(ctx, record, checked, sample_inputs)
    if et_entry is not None:
        arrays[f"logits.{EXECUTORCH}"] = et_entry.pop("sample_logits_array")
        engines[EXECUTORCH] = et_entry
    for name, entry in _fp32_candidates(ctx, record, metadata, checked, sample_inputs,
                                        engines).items():
        arrays[f"logits.{name}"] = entry.pop("sample_logits_array")
        engines[name] = entry
    with (ctx.out / SAMPLE_ARRAYS).open("wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy stubs: kwargs may be allow_pickle
    names = [BASELINE, PRUNED, QUANTIZED, BOARD_MODEL, SAMPLE_FILE, SAMPLE_ARRAYS,
             *([ONNX_MODEL] if onnx_entry is not None else []),
             *([EXECUTORCH_MODEL] if et_entry is not None else []),
             *(FP32_MODELS[name] for name in engines if name.endswith(FP32))]
    files = {name: file_entry(ctx.out / name) for name in names if (ctx.out / name).is_file()}
    base_bytes = files[BASELINE]["bytes"] if BASELINE in files else None
    fp32 = ctx.fresh_model()
    manifest = Manifest(
        created_utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        edgeforge_version=agent.__version__, torch_version=torch.__version__,
        architecture={"factory": payload["factory"], "name": type(fp32).__name__,
                      "parameters": sum(p.numel() for p in fp32.parameters())},
        input={"shape": d.input_shape, "dtype": "float32", "layout": "NCHW",
               "normalization": normalization, "pixel_scale": "uint8 / 255",
               "preprocess": d.preprocess.describe()},
        classes=ctx.classes, engine=engine,
        quantization={"mode": payload["mode"], "source": record["source"],
                      "max_accuracy_drop": record["max_accuracy_drop"],
                      "calibration_images": record["calibration_images"],
                      "pruning": record.get("pruning"), "attempts": record["attempts"]},
        data=d.describe(),
        metrics={"accuracy_pct": acc, "baseline_accuracy_pct": record["baseline_accuracy_pct"],
                 "accuracy_drop_pts": record["baseline_accuracy_pct"] - acc,
                 "board_model_bytes": files[BOARD_MODEL]["bytes"],
                 "baseline_bytes": base_bytes,
                 "test_images": len(labels),
                 "per_class_accuracy_pct": per_class_pct(logits, labels, ctx.classes)},
        sample={"file": SAMPLE_FILE, "arrays": SAMPLE_ARRAYS, "count": n,
                "accuracy_pct": sample_acc, "logit_tolerance": e.logit_tolerance},
        verification=verification, files=files, engines=engines)
    manifest.write(ctx.out)
    written = [board, *[ctx.out / str(entry["file"]) for name, entry in engines.items()
                        if name != TORCHSCRIPT], ctx.out / "manifest.json"]
    print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
    return manifest


def _verify(ctx: Context, path: Path, engine: str, inputs: torch.Tensor,
            expected: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """The board file at `path` reloaded in a fresh process (export.verify), said in a line."""
    e = ctx.cfg.export
    if not e.verify:
        return {"status": "skipped (export.verify=false)", "engine": engine}
    verification = exporting.verify_in_fresh_process(path, engine, inputs, labels, expected,
                                                     e.logit_tolerance)
    print(f"verified {path} in a fresh process: {verification['images']} images, max "
          f"|logit diff| {verification['max_abs_logit_diff']:.3g}, accuracy "
          f"{verification['accuracy_pct_file']:.2f}%", file=sys.stderr)
    return verification


def _gate(ctx: Context, record: dict[str, Any], what: str, acc: float, path: Path,
          otherwise: str) -> float | None:
    """The accuracy drop of the board file at `path` when it passes the gate; else None,
    with the file removed and a line saying why and what ships instead."""
    base = record["baseline_accuracy_pct"]
    drop = float(base - acc)
    limit = ctx.cfg.quantize.max_accuracy_drop
    if drop <= limit:
        return drop
    path.unlink()
    print(f"{what}: accuracy {acc:.2f}% is {drop:.2f} points under the baseline's {base:.2f}% "
          f"(> quantize.max_accuracy_drop {limit}): not shipped; {otherwise}", file=sys.stderr)
    return None


def _export_onnx(ctx: Context, record: dict[str, Any], metadata: dict[str, Any],
                 checked: torch.Tensor, sample_inputs: torch.Tensor) -> dict[str, Any] | None:
    """quantized_cnn.onnx from the same fp32 source and calibration images as the TorchScript
    file, verified in a fresh process and gated on accuracy; its manifest entry, or None when
    export.onnx is off or the model fails the gate (the TorchScript file ships alone)."""
    e, d = ctx.cfg.export, ctx.data
    if not e.onnx:
        return None
    absent = onnx_export.missing()
    if absent:
        raise ConfigError(f"export.onnx: the ONNX export needs onnx, onnxscript and "
                          f"onnxruntime ({absent}, or pip install 'edgeforge[host]'; or set "
                          f"export.onnx=false)")
    source = ctx.quantized_from(record)
    path = ctx.out / ONNX_MODEL
    how = onnx_export.quantize(source, d.input_shape, _calibration(ctx),
                               {k: metadata[k] for k in ("input_shape", "classes",
                                                         "normalization", "data_source")},
                               path)
    acc = evaluate(_ort(path, 1), d)
    drop = _gate(ctx, record, "ONNX int8 QDQ", acc, path,
                 "the bundle carries the TorchScript file alone")
    if drop is None:
        return None
    expected = torch.from_numpy(onnx_export.run(path, checked.numpy()))
    verification = _verify(ctx, path, ONNXRUNTIME, checked, expected,
                           d.test_labels[:checked.shape[0]])
    n = sample_inputs.shape[0]
    sample_logits = onnx_export.run(path, sample_inputs.numpy(), batch_size=n)
    import onnxruntime

    return _entry(ctx, ONNXRUNTIME, ONNX_MODEL, onnxruntime.__version__, sample_logits, acc,
                  drop, verification, quantization=how)


def _export_executorch(ctx: Context, record: dict[str, Any], checked: torch.Tensor,
                       sample_inputs: torch.Tensor) -> dict[str, Any] | None:
    """quantized_cnn.pte from the same fp32 source and calibration images, gated on accuracy
    and verified in a fresh process; its manifest entry, or None when export.executorch is off,
    the package is missing and was not asked for, or the program fails the gate."""
    e, d = ctx.cfg.export, ctx.data
    version = executorch_export.installed()
    if e.executorch is False:
        return None
    if version is None:  # export.executorch true is refused before the run (optimizer.cli)
        print("ExecuTorch: not built (the executorch package is not installed here: pip "
              "install executorch to add quantized_cnn.pte to the bundle)", file=sys.stderr)
        return None
    source = ctx.quantized_from(record)
    path = ctx.out / EXECUTORCH_MODEL
    print(f"ExecuTorch {version}: quantizing (PT2E, XNNPACK) and lowering", file=sys.stderr)
    how = executorch_export.quantize(source, d.input_shape, _calibration(ctx), path)
    expect = {"input_shape": d.input_shape, "classes": ctx.classes}
    acc = evaluate(_et(path, 1, expect), d)
    drop = _gate(ctx, record, "ExecuTorch int8", acc, path, "the bundle goes without it")
    if drop is None:
        return None
    expected = torch.from_numpy(executorch_export.run(path, checked.numpy(), expect))
    verification = _verify(ctx, path, EXECUTORCH, checked, expected,
                           d.test_labels[:checked.shape[0]])
    sample_logits = executorch_export.run(path, sample_inputs.numpy(), expect)
    return _entry(ctx, EXECUTORCH, EXECUTORCH_MODEL, version, sample_logits, acc, drop,
                  verification, quantization=how)


def _fp32_candidates(ctx: Context, record: dict[str, Any], metadata: dict[str, Any],
                     checked: torch.Tensor, sample_inputs: torch.Tensor,
                     shipped: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The fp32 files (fp32_cnn.onnx, fp32_cnn.pte) export.fp32_candidates ships beside the
    int8 ones, for the board to prove and race: each gated and verified like an int8 file.
    With null, an engine's fp32 file ships only where its int8 file is not clearly faster
    here (INT8_CLEARLY_FASTER) or did not pass its gate."""
    e, d = ctx.cfg.export, ctx.data
    for stale in FP32_MODELS.values():  # an earlier export's, which this one may not ship
        (ctx.out / stale).unlink(missing_ok=True)
    if e.fp32_candidates is False:
        return {}
    expect = {"input_shape": d.input_shape, "classes": ctx.classes}
    board_meta = {k: metadata[k] for k in ("input_shape", "classes", "normalization",
                                           "data_source")}
    makers: dict[str, tuple[str, Callable[[nn.Module, Path], None],
                            Callable[[Path], Callable[[torch.Tensor], torch.Tensor]],
                            Callable[[Path, np.ndarray, int | None], np.ndarray]]] = {}
    if e.onnx:
        makers[ONNXRUNTIME] = (
            "ONNX Runtime fp32",
            lambda m, p: onnx_export.export_fp32(m, d.input_shape, p, board_meta),
            lambda p: _ort(p, 1),
            lambda p, x, batch: onnx_export.run(p, x, batch_size=batch))
    if e.executorch is not False and executorch_export.installed() is not None:
        makers[EXECUTORCH] = (
            "ExecuTorch fp32",
            lambda m, p: executorch_export.export_fp32(m, d.input_shape, p),
            lambda p: _et(p, 1, expect),
            lambda p, x, batch: executorch_export.run(p, x, expect))  # one image a pass
    if not makers:
        return {}
    source = ctx.quantized_from(record)
    entries = {}
    for engine, (label, write, runner, run) in makers.items():
        name = f"{engine}{FP32}"
        path = ctx.out / FP32_MODELS[name]
        write(source, path)
        if e.fp32_candidates is None and not _fp32_may_win(label, path, shipped.get(engine),
                                                           ctx.out, runner, d.input_shape):
            path.unlink()
            continue
        acc = evaluate(runner(path), d)
        drop = _gate(ctx, record, label, acc, path, "the bundle goes without it")
        if drop is None:
            continue
        expected = torch.from_numpy(run(path, checked.numpy(), None))
        verification = _verify(ctx, path, engine, checked, expected,
                               d.test_labels[:checked.shape[0]])
        n = sample_inputs.shape[0]
        sample_logits = run(path, sample_inputs.numpy(), n)  # one batch, as the board's proof
        entries[name] = _entry(ctx, name, FP32_MODELS[name], dist_version(RUNTIMES[engine]),
                               sample_logits, acc, drop, verification, precision="fp32")
    return entries


def _entry(ctx: Context, name: str, file: str, version: str | None, sample_logits: np.ndarray,
           acc: float, drop: float, verification: dict[str, Any], **more: Any
           ) -> dict[str, Any]:
    """The manifest's record of the bundle's model file `name` (agent/engines), with its
    sample logits to be moved into sample.npz (`sample_logits_array`)."""
    n = sample_logits.shape[0]
    runtime = RUNTIMES[engine_of(name)]
    return {"file": file, "runtime": runtime, "runtime_version": version, **more,
            "sample_logits": f"logits.{name}",
            "sample_accuracy_pct": accuracy_pct(torch.from_numpy(sample_logits),
                                                ctx.data.test_labels[:n]),
            "logit_tolerance": ctx.cfg.export.logit_tolerance, "accuracy_pct": acc,
            "accuracy_drop_pts": drop, "verification": verification,
            "sample_logits_array": sample_logits}


def _fp32_may_win(label: str, path: Path, int8: dict[str, Any] | None, out: Path,
                  runner: Callable[[Path], Callable[[torch.Tensor], torch.Tensor]],
                  input_shape: list[int]) -> bool:
    """export.fp32_candidates null: whether the fp32 file at `path` ships, said in a line."""
    if int8 is None:
        print(f"{label}: shipped as a candidate (its engine has no int8 file in the bundle)",
              file=sys.stderr)
        return True
    timed = race({"int8": runner(out / str(int8["file"])), "fp32": runner(path)},
                 [torch.zeros(1, *input_shape)], RACE_ROUNDS, RACE_PASSES)
    ratio = timed["int8"].p50_s / timed["fp32"].p50_s
    ships = ratio > INT8_CLEARLY_FASTER
    print(f"{label}: int8 p50 {timed['int8'].p50_s * 1e6:.0f} us, fp32 "
          f"{timed['fp32'].p50_s * 1e6:.0f} us here ({ratio:.2f}x): "
          + ("shipped as a candidate for the board's race" if ships else
             "not shipped, int8 is clearly faster (export.fp32_candidates=true ships it)"),
          file=sys.stderr)
    return ships


def _et(path: Path, threads: int, expect: dict[str, Any] | None
        ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ExecuTorch board file through the board's loader, tensor in, tensor out."""
    from agent.engines import executorch

    return _tensors(executorch.load(path.read_bytes(), path, str(executorch_export.installed()),
                                    threads, expect))


def _row(variant: str, file: str | None, payload: bytes, make: Callable[[], Any],
         ctx: Context, runtime: str, verification: str) -> dict[str, Any]:
    """Measure one variant; `make` gives a fresh instance per measurement (see latency)."""
    r = ctx.cfg.report
    timing = latency.measure(make, ctx.data.input_shape, threads=r.threads, warmup=r.warmup,
                             iters=r.latency_iters, throughput_batches=r.throughput_batches)
    logits = logits_on_test(make(), ctx.data)
    acc = accuracy_pct(logits, ctx.data.test_labels)
    print(f"  measured {variant}: {acc:.2f}%, p50 {timing['p50_us']:.0f} us", file=sys.stderr)
    return {"variant": variant, "file": file, "bytes": len(payload), "payload": payload,
            "accuracy_pct": acc, "runtime": runtime,
            "verification": verification,
            "per_class_accuracy_pct": per_class_pct(logits, ctx.data.test_labels, ctx.classes),
            **timing}


def _compress(rows: list[dict[str, Any]]) -> None:
    """Each row's xz bytes, once every timing is done: one thread per core (lzma releases
    the GIL), so a 45 MB model's eight rows take seconds, not minutes."""
    total = sum(r["bytes"] for r in rows)
    print(f"compressing {len(rows)} variants ({total / 1e6:.1f} MB, xz -{XZ_PRESET})",
          file=sys.stderr)
    with ThreadPoolExecutor(max_workers=min(len(rows), os.cpu_count() or 1)) as pool:
        sizes = list(pool.map(compressed_size, [r.pop("payload") for r in rows]))
    for r, n in zip(rows, sizes, strict=True):
        r["xz_bytes"] = n


def _fp32_file_row(ctx: Context, manifest: Manifest, name: str, variant: str,
                   export: Callable[[Path], None], make: Callable[[Path], Any],
                   runtime: str) -> dict[str, Any]:
    """The fp32 model on an engine: the bundle's fp32 file `name` where it ships one (a
    candidate for the board's race), else an fp32 export made here and measured alike."""
    entry = manifest.engine_entries.get(name)
    if entry is not None:
        path = manifest.verified_path(ctx.out, str(entry["file"]))
        return _row(f"{variant}, board file", path.name, path.read_bytes(), lambda: make(path),
                    ctx, f"{runtime} from disk", entry["verification"]["status"])
    with tempfile.TemporaryDirectory(prefix="edgeforge-fp32-") as tmp:
        path = Path(tmp) / FP32_MODELS[name]
        export(path)
        return _fp32_row(ctx, variant, path, lambda: make(path), runtime)


def _fp32_row(ctx: Context, variant: str, source: nn.Module | Path, make: Callable[[], Any],
              runtime: str) -> dict[str, Any]:
    """The fp32 model on a board engine, measured like the int8 files (not shipped)."""
    payload = (source.read_bytes() if isinstance(source, Path)
               else serialized_bytes(source.state_dict()))
    return _row(variant, None, payload, make, ctx, runtime, "-")


def _scripted(model: nn.Module, engine: str) -> Any:
    """An in-memory frozen TorchScript copy: how dynamic/static variants run on a board."""
    set_engine(engine)
    with known_torch_deprecations():
        return torch.jit.freeze(torch.jit.script(model.eval()))


def _ort(path: Path, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ONNX board file through the board's loader, as a tensor-in tensor-out callable."""
    from agent.engines import onnxrt

    return _tensors(onnxrt.load(path.read_bytes(), path, threads, None))


def _tensors(runner: Callable[[np.ndarray], np.ndarray]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: torch.from_numpy(runner(x.numpy()))


def step_report(ctx: Context) -> dict[str, Any]:
    """Measure every variant and write report.md, report.json and report.png."""
    manifest = Manifest.read(ctx.out)
    engine = manifest.engine
    baseline = ctx.load_fp32(BASELINE, "train")
    pruned = ctx.load_fp32(PRUNED, "prune")
    source = pruned if manifest.quantization["source"] == "pruned" else baseline
    calib = _calibration(ctx)
    dyn = quantize.quantize_dynamic(source, engine)
    static = quantize.quantize_static(source, engine, calib, per_channel=True)
    chosen = manifest.quantization["mode"]
    label = manifest.quantization["source"]
    print("measuring variants", file=sys.stderr)
    rows = [
        _row("fp32 baseline", BASELINE, (ctx.out / BASELINE).read_bytes(),
             lambda: baseline, ctx, "eager", "-"),
        _row("pruned fp32", PRUNED, (ctx.out / PRUNED).read_bytes(), lambda: pruned, ctx,
             "eager", "-"),
        _row(f"dynamic int8 ({label})", QUANTIZED if chosen == "dynamic" else None,
             serialized_bytes(dyn.state_dict()), lambda: _scripted(dyn, engine), ctx,
             "TorchScript (frozen)", "-"),
        _row(f"static int8 ({label})",
             QUANTIZED if chosen == "static_per_channel" else None,
             serialized_bytes(static.state_dict()), lambda: _scripted(static, engine), ctx,
             "TorchScript (frozen)", "-"),
    ]
    board_path = manifest.verified_path(ctx.out, BOARD_MODEL)
    rows.append(_row(f"board file ({chosen})", BOARD_MODEL, board_path.read_bytes(),
                     lambda: load_scripted(board_path, engine), ctx,
                     "TorchScript from disk", manifest.verification["status"]))
    pairs = []  # (engine, int8 row, fp32 row on the same engine)
    fp32_script = _fp32_row(ctx, f"fp32 {label} (TorchScript, frozen)", source,
                            lambda: _scripted(source, engine), "TorchScript (frozen)")
    rows.append(fp32_script)
    pairs.append((TORCHSCRIPT, rows[-2], fp32_script))
    onnx_entry = manifest.engine_entries.get(ONNXRUNTIME)
    if onnx_entry is not None:
        onnx_path = manifest.verified_path(ctx.out, str(onnx_entry["file"]))
        rows.append(_row("board file (ONNX int8 QDQ)", onnx_path.name, onnx_path.read_bytes(),
                         lambda: _ort(onnx_path, ctx.cfg.report.threads), ctx,
                         f"ONNX Runtime {onnx_entry['runtime_version']} from disk",
                         onnx_entry["verification"]["status"]))
        fp32_onnx = _fp32_file_row(
            ctx, manifest, f"{ONNXRUNTIME}{FP32}", f"fp32 {label} (ONNX Runtime)",
            lambda p: onnx_export.export_fp32(source, ctx.data.input_shape, p),
            lambda p: _tensors(onnx_export.unshipped_runner(p, ctx.cfg.report.threads)),
            f"ONNX Runtime {onnx_entry['runtime_version']}")
        rows.append(fp32_onnx)
        pairs.append((ONNXRUNTIME, rows[-2], fp32_onnx))
    et_entry = manifest.engine_entries.get(EXECUTORCH)
    if et_entry is not None and executorch_export.installed() is not None:
        threads = ctx.cfg.report.threads
        et_path = manifest.verified_path(ctx.out, str(et_entry["file"]))
        rows.append(_row("board file (ExecuTorch XNNPACK int8)", et_path.name,
                         et_path.read_bytes(), lambda: _et(et_path, threads, None), ctx,
                         f"ExecuTorch {et_entry['runtime_version']} from disk",
                         et_entry["verification"]["status"]))
        fp32_et = _fp32_file_row(
            ctx, manifest, f"{EXECUTORCH}{FP32}", f"fp32 {label} (ExecuTorch XNNPACK)",
            lambda p: executorch_export.export_fp32(source, ctx.data.input_shape, p),
            lambda p: _et(p, threads, None), f"ExecuTorch {et_entry['runtime_version']}")
        rows.append(fp32_et)
        pairs.append((EXECUTORCH, rows[-2], fp32_et))
    same_engine = [{"engine": name, "int8": q["variant"], "fp32": f["variant"],
                    "int8_p50_us": q["p50_us"], "fp32_p50_us": f["p50_us"],
                    "ratio": q["p50_us"] / f["p50_us"],
                    "int8_slower": round(q["p50_us"] / f["p50_us"], 2) > 1.0}
                   for name, q, f in pairs]
    _compress(rows)
    # MACs and parameters are the architecture's: every int8 file of the quantized model
    # runs that model's layers (unstructured zeros are still multiplied and stored)
    shapes = [structured.macs_and_params(m, ctx.data.input_shape)
              for m in (baseline, pruned, source)]
    for i, r in enumerate(rows):
        r["macs"], r["params"] = shapes[min(i, 2)]
    base = rows[0]
    for r in rows:
        r["size_ratio"] = r["bytes"] / base["bytes"]
        r["xz_ratio"] = r["xz_bytes"] / base["bytes"]
        r["accuracy_change_pts"] = r["accuracy_pct"] - base["accuracy_pct"]
    result = {
        "schema": "edgeforge.report/1", "created_utc": manifest.created_utc,
        "data": ctx.data.describe(),
        "environment": {"engine": engine, "torch_version": torch.__version__,
                        "threads": ctx.cfg.report.threads,
                        "warmup": ctx.cfg.report.warmup,
                        "latency_iters": ctx.cfg.report.latency_iters,
                        "cpu": platform.processor() or platform.machine(),
                        "machine": platform.machine()},
        "model": {**manifest.architecture, "input_shape": ctx.data.input_shape},
        "same_engine": same_engine,
        "quantization": manifest.quantization, "sparsity": sparsity(pruned),
        "pruning": ctx.pruning(), "rows": rows,
    }
    paths = report.write(ctx.out, result)
    print(report.table(result))
    for pair in same_engine:
        slower = " (int8 is SLOWER than fp32 on this host)" if pair["int8_slower"] else ""
        print(f"{pair['engine']}: int8 p50 {pair['int8_p50_us']:.0f} us, fp32 "
              f"{pair['fp32_p50_us']:.0f} us on the same engine: {pair['ratio']:.2f}x{slower}")
    print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return result


def step_run(ctx: Context) -> dict[str, Any]:
    """The whole pipeline; trains only when no baseline exists yet."""
    if (ctx.out / BASELINE).is_file():
        print(f"using existing {ctx.out / BASELINE} (delete it to retrain)", file=sys.stderr)
    else:
        step_train(ctx)
    step_prune(ctx)
    step_quantize(ctx)
    step_export(ctx)
    return step_report(ctx)
