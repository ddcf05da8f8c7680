"""Structured pruning: whole channels removed by importance, through torch-pruning.

torch-pruning's DependencyGraph traces the model once and groups every layer whose channels
are tied (a convolution's filters, the BatchNorm after it, the next layer's inputs, every
branch of a residual add, a depthwise convolution's groups), so removing a channel keeps the
model valid. The result is a smaller dense model: fewer multiply-accumulates on every engine,
with no masks and no torch-pruning on the board.

A pruned model's architecture differs from a fresh `train.factory` model, so beside its
state_dict the prune step writes `pruned_structure.json`: the channel counts of each layer it
changed. `reshape_` gives a fresh model those counts before its state_dict is loaded.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agent.errors import ConfigError
from optimizer.config import DataConfig, PruneConfig, TrainConfig
from optimizer.data import Dataset
from optimizer.errors import CheckpointError, PruningError
from optimizer.train import fit_

STRUCTURE = "pruned_structure.json"
SCHEMA = "edgeforge.pruned-structure/1"
# The layer attributes a channel change touches; each is recorded where the layer has it.
SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features",
               "num_features", "num_parameters")
# torch-pruning's linear schedule: pruner step k of STEP_RESOLUTION removes up to
# k / STEP_RESOLUTION * MAX_CHANNEL_RATIO of each layer's channels. Steps repeat until the
# target is met, so the result lands within one step (about 1 % of the channels) of it.
STEP_RESOLUTION = 100
MAX_CHANNEL_RATIO = 0.95  # torch-pruning's pruning_ratio at the last step
TAYLOR_BATCHES = 2  # training batches whose loss gradients rank channels for `taylor`


def macs_and_params(model: nn.Module, input_shape: list[int]) -> tuple[int, int]:
    """(multiply-accumulates per image, parameters) of `model` at batch 1."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, *input_shape))
    model.train(was_training)
    return int(macs), int(params)


def _importance(name: str) -> Any:
    import torch_pruning as tp

    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.GroupMagnitudeImportance(p=1 if name == "l1" else 2)


def ignored_layers(model: nn.Module, names: list[str], head: str) -> list[nn.Module]:
    """The modules `prune.ignore` names, and always the classifier head `head`."""
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        near = ", ".join(n for n in modules if n and "." not in n)
        raise ConfigError(f"prune.ignore: {', '.join(unknown)} is not a layer of the model "
                          f"(its top-level layers: {near})")
    return [modules[n] for n in [*names, head] if n in modules]


def _graph_problem(exc: BaseException) -> str:
    """One line out of torch-pruning's failure to trace or prune a model."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def prune_structured_(model: nn.Module, cfg: PruneConfig, data: Dataset, train: TrainConfig,
                      data_cfg: DataConfig, head: str,
                      refreeze: Callable[[nn.Module], None]) -> dict[str, Any]:
    """Remove channels until the MACs (or parameters) fall to the target, in `cfg.steps`
    rounds with `cfg.finetune_epochs` of fine-tuning after each; returns what was done.

    Raises:
        PruningError: torch-pruning cannot trace or prune the model (its reason in one line).
        ConfigError: `prune.ignore` names a layer the model does not have.
    """
    import torch_pruning as tp

    shape = data.input_shape
    example = torch.zeros(1, *shape)
    by_params = cfg.target_params_ratio is not None
    target = cfg.target_params_ratio if by_params else cfg.target_macs_ratio
    assert target is not None
    macs0, params0 = macs_and_params(model, list(shape))
    start = params0 if by_params else macs0
    model.eval()
    ignored = ignored_layers(model, list(cfg.ignore or ()), head)
    try:
        pruner = tp.pruner.MetaPruner(
            model, example, importance=_importance(cfg.importance),
            pruning_ratio=MAX_CHANNEL_RATIO, iterative_steps=STEP_RESOLUTION,
            ignored_layers=ignored, round_to=cfg.round_to)
    except Exception as exc:  # torch-pruning's tracer raises whatever the model raises
        raise PruningError(f"prune: torch-pruning cannot trace {train.factory}: "
                           f"{_graph_problem(exc)} (prune.method=unstructured works on any "
                           f"model, or prune.skip_if_untraceable=true keeps it unpruned)"
                           ) from exc
    rounds = []
    for step in range(1, cfg.steps + 1):
        goal = 1 - (1 - target) * step / cfg.steps
        removed = 0
        while True:
            macs, params = _measure(model, list(shape), train.factory)
            if (params if by_params else macs) <= goal * start:
                break
            if pruner.current_step >= STEP_RESOLUTION:
                raise PruningError(
                    f"prune: {train.factory} cannot reach {goal:.2f}x its "
                    f"{'parameters' if by_params else 'MACs'} with the layers left "
                    f"prunable (at {(params if by_params else macs) / start:.2f}x): raise "
                    f"prune.target_{'params' if by_params else 'macs'}_ratio or shorten "
                    f"prune.ignore")
            try:
                if cfg.importance == "taylor":
                    _taylor_gradients(model, data, data_cfg.batch_size, train.seed + step)
                pruner.step()
            except Exception as exc:  # the library's, or the model's own forward
                raise PruningError(f"prune: torch-pruning failed on {train.factory}: "
                                   f"{_graph_problem(exc)} (prune.method=unstructured works "
                                   f"on any model)") from exc
            finally:
                model.zero_grad(set_to_none=True)
            removed += 1
        refreeze(model)
        if cfg.finetune_epochs > 0:
            fit_(model, data, epochs=cfg.finetune_epochs, lr=cfg.finetune_lr,
                 weight_decay=train.weight_decay, batch_size=data_cfg.batch_size,
                 augment=data_cfg.augment, seed=train.seed + step, label=f"fine-tune {step}")
        rounds.append({"step": step, "macs": macs, "params": params, "pruner_steps": removed})
        print(f"structured step {step}/{cfg.steps}: {macs / macs0:.2f}x MACs "
              f"({macs:,} per image), {params / params0:.2f}x parameters", file=sys.stderr)
    macs, params = macs_and_params(model, list(shape))
    return {"method": "structured", "importance": cfg.importance,
            "target": {"params" if by_params else "macs": target},
            "macs_before": macs0, "macs": macs, "params_before": params0, "params": params,
            "rounds": rounds}


def _measure(model: nn.Module, shape: list[int], factory: str) -> tuple[int, int]:
    """macs_and_params of a model being pruned; a forward that no longer runs at the new
    channel counts (a layer size written into the model's code) is one line naming the
    layer after which it failed."""
    done: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: done.append(name))
             for name, m in model.named_modules() if name and not list(m.children())]
    try:
        return macs_and_params(model, shape)
    except Exception as exc:  # whatever the model's forward raises at its new sizes
        where = f"after layer {done[-1]}" if done else "before its first layer"
        raise PruningError(f"prune: {factory} does not run with channels removed ({where}: "
                           f"{_graph_problem(exc)}); its forward may fix a layer size in "
                           f"code: prune.ignore that layer, or use prune.method=unstructured, "
                           f"or prune.skip_if_untraceable=true keeps it unpruned") from exc
    finally:
        for h in hooks:
            h.remove()


def _taylor_gradients(model: nn.Module, data: Dataset, batch_size: int, seed: int) -> None:
    """Loss gradients over a few training batches: what Taylor importance ranks channels by."""
    model.eval()  # BatchNorm statistics stay as they are
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for i, (x, y) in enumerate(data.train_batches(batch_size, augment=False, generator=gen)):
        if i == TAYLOR_BATCHES:
            break
        loss_fn(model(x), y).backward()


def structure_of(model: nn.Module) -> dict[str, dict[str, int]]:
    """The shape attributes (SHAPE_ATTRS) of every layer that has any."""
    out = {}
    for name, m in model.named_modules():
        attrs = {a: int(getattr(m, a)) for a in SHAPE_ATTRS
                 if isinstance(getattr(m, a, None), int)}
        if attrs:
            out[name] = attrs
    return out


def save_structure(path: Path, model: nn.Module, fresh: nn.Module,
                   summary: dict[str, Any]) -> None:
    """Write the layers whose shape differs from a fresh model's, with the prune summary."""
    before = structure_of(fresh)
    changed = {n: a for n, a in structure_of(model).items() if before.get(n) != a}
    path.write_text(json.dumps({"schema": SCHEMA, "layers": changed, "summary": summary},
                               indent=1))


def load_structure(path: Path) -> dict[str, Any] | None:
    """pruned_structure.json beside a pruned checkpoint, or None where there is none."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc}; run edge-optimize prune "
                              f"again)") from exc
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA \
            or not isinstance(doc.get("layers"), dict):
        raise CheckpointError(f"{path}: not an {SCHEMA} file (run edge-optimize prune again)")
    return doc


def reshape_(model: nn.Module, layers: dict[str, Any], path: Path) -> nn.Module:
    """Give a fresh model the pruned layers' channel counts, with parameters and buffers of
    the shapes those counts imply (their values come from a load_state_dict after this)."""
    modules = dict(model.named_modules())
    for name, attrs in layers.items():
        m = modules.get(name)
        if m is None or not isinstance(attrs, dict):
            raise CheckpointError(f"{path}: layer {name!r} is not in the model (check "
                                  f"train.factory, or run edge-optimize prune again)")
        for attr, value in attrs.items():
            if attr not in SHAPE_ATTRS or not isinstance(value, int) or value < 1 \
                    or not hasattr(m, attr):
                raise CheckpointError(f"{path}: layer {name!r}: bad {attr}={value!r} (run "
                                      f"edge-optimize prune again)")
            setattr(m, attr, value)
        _resize(m, name, path)
    return model


def _resize(m: nn.Module, name: str, path: Path) -> None:
    """Replace `m`'s tensors by freshly initialised ones of the shapes its (changed)
    attributes give."""
    shapes: dict[str, tuple[int, ...]]
    if isinstance(m, nn.modules.conv._ConvNd):
        io = ((m.in_channels, m.out_channels // m.groups) if m.transposed
              else (m.out_channels, m.in_channels // m.groups))
        shapes = {"weight": (*io, *m.kernel_size), "bias": (m.out_channels,)}
    elif isinstance(m, nn.Linear):
        shapes = {"weight": (m.out_features, m.in_features), "bias": (m.out_features,)}
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        shapes = {k: (m.num_features,) for k in ("weight", "bias", "running_mean",
                                                  "running_var")}
    elif isinstance(m, nn.PReLU):
        shapes = {"weight": (m.num_parameters,)}
    else:
        raise CheckpointError(f"{path}: layer {name!r} ({type(m).__name__}) cannot be "
                              f"rebuilt at its pruned size (prune.ignore it, or use "
                              f"prune.method=unstructured)")
    for local, shape in shapes.items():
        if m._parameters.get(local) is not None:
            old = m._parameters[local]
            assert old is not None
            m._parameters[local] = nn.Parameter(torch.empty(shape, dtype=old.dtype),
                                                old.requires_grad)
        elif m._buffers.get(local) is not None:
            buf = m._buffers[local]
            assert buf is not None
            m._buffers[local] = torch.empty(shape, dtype=buf.dtype)
    reset = getattr(m, "reset_parameters", None)
    if callable(reset):  # a usable start (a calibration pass may run before the load)
        with torch.no_grad():
            reset()
