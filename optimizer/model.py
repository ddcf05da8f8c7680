"""The reference SimpleCNN, user model factories, and safe state_dict checkpoints."""

from __future__ import annotations

import importlib
import io
import math
import pickle
import traceback
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agent.errors import ConfigError
from agent.torchwarnings import known_torch_deprecations
from optimizer.errors import CheckpointError


class SimpleCNN(nn.Module):
    """The reference CIFAR-10 CNN: 2 conv blocks, 2 linear layers, about 1053 KB in fp32.

    Parameter names (conv1, conv2, fc1, fc2) match the reference checkpoint; the ReLU and
    pool modules carry no weights and exist so the layers can be fused for int8.
    """

    # conv/linear + ReLU pairs fused before static quantization (see optimizer.quantize).
    FUSE = [["conv1", "relu1"], ["conv2", "relu2"], ["fc1", "relu3"]]

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 8 * 8, 128)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc2(self.relu3(self.fc1(x)))


def build(factory: str, num_classes: int) -> nn.Module:
    """Call `package.module:callable` (with num_classes) and return the module in eval mode.

    `torchvision.models:<name>` builds torchvision's classifier `name`, randomly initialised.

    Raises:
        ConfigError: the factory cannot be imported or does not return an nn.Module.
    """
    from optimizer import vision_models

    module_name, _, attr = factory.partition(":")
    if vision_models.is_torchvision(factory):
        return vision_models.build(attr, num_classes).eval()
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"train.factory: cannot import {factory!r} ({exc}) (give an "
                          f"importable package.module:callable)") from None
    try:
        try:
            model = obj(num_classes=num_classes)
        except TypeError:
            model = obj()  # a factory that takes no arguments
    except Exception as exc:  # noqa: BLE001 -- the user's code: one line, where it failed
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
        said = (str(exc).splitlines() or [""])[0][:200]
        raise ConfigError(f"train.factory: calling {factory} failed{where}: "
                          f"{type(exc).__name__}: {said} (fix the factory, or name another)"
                          ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"train.factory: {factory!r} returned {type(model).__name__}, "
                          f"not a torch.nn.Module")
    return model.eval()


def check_input(model: nn.Module, input_shape: list[int], factory: str) -> None:
    """One forward pass of zeros at `input_shape`: the model takes that size.

    Raises:
        ConfigError: the model cannot run on that input; names the size and the reason.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), known_torch_deprecations():
            model(torch.zeros(1, *input_shape))
    except (RuntimeError, ValueError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"train.input_shape {list(input_shape)}: {factory} cannot take it "
                          f"({first}) (give the size the model is made for, e.g. "
                          f"[3, 224, 224])") from None
    finally:
        model.train(was_training)


def save_state_dict(model: nn.Module, path: Path) -> None:
    """Write `model`'s state_dict atomically (a crash never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)


def load_payload(path: Path, what: str, hint: str) -> Any:
    """torch.load(weights_only=True), with every failure turned into one CheckpointError.

    `what` names the file's role ("baseline checkpoint"); `hint` says how to get a good one.
    """
    corrupt = f"{path}: {what} is corrupt or truncated"
    try:
        if path.is_file() and not zipfile.is_zipfile(path):  # torch.save writes a zip archive
            raise CheckpointError(f"{corrupt} (not a torch.save archive) ({hint})")
        with known_torch_deprecations():
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found ({hint})") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: {what} is a directory, not a file ({hint})") from None
    except pickle.UnpicklingError as exc:
        # weights_only refuses pickled code; say so rather than echo torch's long advice.
        detail = str(exc).strip().splitlines()[0][:160]
        raise CheckpointError(f"{path}: {what} holds more than tensors and was refused "
                              f"unloaded ({detail}) ({hint})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(f"{corrupt} ({type(exc).__name__}) ({hint})") from None


def load_state_dict_into(model: nn.Module, path: Path, what: str, hint: str) -> nn.Module:
    """Load a state_dict checkpoint into `model`, checking that it fits the architecture."""
    state = load_payload(path, what, hint)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise CheckpointError(f"{path}: {what} is not a state_dict of tensors ({hint})")
    check_fits(model, state, path, what)
    model.load_state_dict(state)
    return model.eval()


def check_fits(model: nn.Module, state: dict[str, Any], path: Path, what: str) -> None:
    """Raise CheckpointError naming the first keys/shapes where `state` and `model` differ."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and isinstance(state[k], torch.Tensor)
              and isinstance(own[k], torch.Tensor) and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}")
    if extra:
        problems.append(f"unexpected {', '.join(extra[:3])}")
    if shapes:
        problems.append(f"shape {', '.join(shapes[:2])}")
    if problems:
        raise CheckpointError(f"{path}: {what} does not fit {type(model).__name__}: "
                              f"{'; '.join(problems)} (check train.factory, or retrain)")


def serialized_bytes(obj: Any) -> bytes:
    """The bytes torch.save writes for `obj` (sizes of variants that are not saved)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# Elements of one evaluation batch: 256 images at 3x32x32, 27 at 3x224x224, so that a
# batch's activations stay within a couple of hundred MB whatever the input size.
EVAL_BATCH_ELEMENTS = 1 << 22


def eval_batch_size(input_shape: Sequence[int]) -> int:
    """Images per batch when a model is run for its logits (evaluation, verification)."""
    return max(1, min(256, EVAL_BATCH_ELEMENTS // max(1, math.prod(input_shape))))


@torch.inference_mode()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int | None = None
            ) -> torch.Tensor:
    """Logits for already-normalised `inputs`, computed in batches."""
    batch_size = batch_size or eval_batch_size(inputs.shape[1:])
    with known_torch_deprecations():
        return torch.cat([model(inputs[i:i + batch_size])
                          for i in range(0, inputs.shape[0], batch_size)])


def accuracy_pct(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * float((logits.argmax(dim=1) == labels).float().mean())
