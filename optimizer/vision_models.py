"""torchvision's classification models by name, with their head sized to the dataset.

    train.factory: "torchvision.models:mobilenet_v3_small"   (resnet18, efficientnet_b0, ...)
    train.weights: DEFAULT | IMAGENET1K_V1 | ...              pretrained start (downloads once)
    train.freeze_backbone: true                               train only the head

A model built from pretrained weights keeps torchvision's 1000-class head until the weights
are in, then the last linear layer is replaced by one with the dataset's number of classes.
"""

from __future__ import annotations

import difflib
import sys
from typing import Any

from torch import nn

from agent.errors import ConfigError
from optimizer.errors import DataError

PREFIX = "torchvision.models"


def is_torchvision(factory: str) -> bool:
    """`factory` names one of torchvision's models (torchvision.models:<name>)."""
    return factory.partition(":")[0] == PREFIX


def _classifiers() -> list[str]:
    import torchvision.models

    return list(torchvision.models.list_models(module=torchvision.models))


def builder(name: str) -> Any:
    """torchvision's builder for classification model `name`.

    Raises:
        ConfigError: no such classification model; the message lists close names.
    """
    names = _classifiers()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
        raise ConfigError(f"train.factory: torchvision has no classification model {name!r} "
                          f"({'did you mean ' + ', '.join(close) + '? ' if close else ''}"
                          f"torchvision.models.list_models() lists {len(names)})")
    import torchvision.models

    return torchvision.models.get_model_builder(name)


def build(name: str, num_classes: int) -> nn.Module:
    """Randomly initialised `name` with a `num_classes` head."""
    return builder(name)(weights=None, num_classes=num_classes)


def weights_of(name: str, weights: str) -> Any:
    """The torchvision weights enum member `weights` ("DEFAULT" included) of model `name`.

    Raises:
        ConfigError: the model has no such weights; the message lists the ones it has.
    """
    import torchvision.models

    builder(name)  # an unknown model is named as such, not as a weights problem
    enum = torchvision.models.get_model_weights(name)
    have = ["DEFAULT", *(w.name for w in enum)]
    if weights not in have:
        raise ConfigError(f"train.weights: {name} has no weights {weights!r} (use one of "
                          f"{', '.join(have)}, or null for random initialisation)")
    return enum.DEFAULT if weights == "DEFAULT" else enum[weights]


def pretrained(name: str, weights: str, num_classes: int) -> nn.Module:
    """`name` with torchvision's `weights` loaded and a fresh `num_classes` head.

    Raises:
        ConfigError: unknown weights name.
        DataError: the weights cannot be downloaded (offline); names train.checkpoint.
    """
    member = weights_of(name, weights)
    print(f"loading {name} weights {member.name} ({member.url})", file=sys.stderr)
    try:
        model = builder(name)(weights=member, progress=False)
    except Exception as exc:  # noqa: BLE001 -- urllib, hub and zip errors all mean "no file"
        reason = str(getattr(exc, "reason", exc)).strip().splitlines()
        raise DataError(f"train.weights {weights}: cannot download {member.url} "
                        f"({type(exc).__name__}: {reason[0][:160] if reason else ''}) (on a "
                        f"machine without internet, give a state_dict of this model as "
                        f"train.checkpoint instead, or copy the file into torch's hub cache "
                        f"$TORCH_HOME/hub/checkpoints)") from None
    replace_head_(model, num_classes)
    return model


def head(model: nn.Module) -> str:
    """The name of `model`'s classifier head: its last nn.Linear.

    Raises:
        ConfigError: the model has no linear layer to size to the classes.
    """
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"train.factory: {type(model).__name__} has no linear classifier "
                          f"head to size to the dataset's classes (choose another model)")
    return linears[-1]


def replace_head_(model: nn.Module, num_classes: int) -> None:
    """Swap the last linear layer for a fresh one with `num_classes` outputs."""
    name = head(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def freeze_backbone_(model: nn.Module) -> int:
    """Stop gradients everywhere but the head; BatchNorm statistics stay as loaded.

    Returns the number of parameters left trainable.
    """
    name = head(model)
    trainable = 0
    for pname, p in model.named_parameters():
        p.requires_grad = pname.startswith(name + ".")
        trainable += p.numel() if p.requires_grad else 0
    return trainable
