"""Training the fp32 baseline (and the masked fine-tune after pruning).

Default recipe, meant to reach about 70 % on real CIFAR-10 with SimpleCNN: Adam, lr 1e-3,
batch 64, 10 epochs, random crop (padding 4) and horizontal flip, cross-entropy loss.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from agent.torchwarnings import known_torch_deprecations
from optimizer.data import Dataset
from optimizer.model import accuracy_pct, eval_batch_size

Model = Callable[[torch.Tensor], torch.Tensor]


@torch.inference_mode()
def logits_on_test(model: Model, data: Dataset, batch_size: int | None = None) -> torch.Tensor:
    """Logits of the whole test split, read batch by batch (never all inputs at once)."""
    batch_size = batch_size or eval_batch_size(data.input_shape)
    if isinstance(model, nn.Module):
        model.eval()
    with known_torch_deprecations():
        return torch.cat([model(x) for x, _ in data.test_batches(batch_size)])


def first_test_inputs(data: Dataset, n: int) -> torch.Tensor:
    """The first `n` test images as the model's input, through the board's preprocessing."""
    return data.preprocess.batch(data.test_pixels(n))


def evaluate(model: Model, data: Dataset) -> float:
    """Top-1 test accuracy of `model` in percent."""
    return accuracy_pct(logits_on_test(model, data), data.test_labels)


def per_class_pct(logits: torch.Tensor, labels: torch.Tensor,
                  classes: list[str]) -> dict[str, float | None]:
    """Top-1 accuracy of each class in percent (None: no test image of that class)."""
    hits = logits.argmax(dim=1) == labels
    return {name: (100.0 * float(hits[labels == c].float().mean())
                   if bool((labels == c).any()) else None)
            for c, name in enumerate(classes)}


def _frozen_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
        p.requires_grad for p in m.parameters(recurse=False))


def _hold_frozen_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers whose weights are frozen keep their running statistics too."""
    for m in model.modules():
        if _frozen_batchnorm(m):
            m.eval()


@torch.no_grad()
def recompute_batchnorm_(model: nn.Module, data: Dataset, batch_size: int) -> int:
    """Set the running statistics of every BatchNorm layer that trained to their average over
    one pass of the training images, without augmentation (precise BatchNorm); return how
    many layers there were. A short run leaves the statistics far from the data's:
    torchvision's MobileNetV3 moves them 1 % a step, so after a few dozen steps evaluation
    would normalise with mostly the initial ones."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.track_running_stats and not _frozen_batchnorm(m)]
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    model.eval()  # dropout and frozen layers as in evaluation; only these layers update
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the pass
        m.train()
    try:
        for x, _ in data.train_batches(batch_size, augment=False,
                                       generator=torch.Generator().manual_seed(0)):
            model(x)
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return len(layers)


def fit_(model: nn.Module, data: Dataset, *, epochs: int, lr: float, weight_decay: float,
         batch_size: int, augment: bool, seed: int, label: str) -> list[dict[str, float]]:
    """Train `model` in place with Adam; print one line per epoch; return the epoch history.

    Works unchanged on a model carrying pruning masks (they stay applied), and trains only
    the parameters that require gradients (a frozen backbone stays as it is).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr,
                           weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        _hold_frozen_batchnorm(model)
        seen, correct, loss_sum = 0, 0, 0.0
        started = time.perf_counter()
        bar = tqdm(total=data.train_count, desc=f"{label} {epoch}/{epochs}", unit="img",
                   leave=False, file=sys.stderr, disable=None, mininterval=0.5)
        for x, y in data.train_batches(batch_size, augment=augment, generator=gen):
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            opt.step()
            seen += y.shape[0]
            loss_sum += loss.item() * y.shape[0]
            correct += int((out.argmax(1) == y).sum())
            bar.update(y.shape[0])
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}%")
        bar.close()
        rate = seen / max(time.perf_counter() - started, 1e-9)
        test_acc = evaluate(model, data)
        row = {"epoch": epoch, "loss": loss_sum / seen, "train_acc_pct": 100 * correct / seen,
               "test_acc_pct": test_acc, "images_per_s": rate}
        history.append(row)
        print(f"{label} epoch {epoch}/{epochs}: loss {row['loss']:.3f}, "
              f"train {row['train_acc_pct']:.1f}%, test {test_acc:.2f}%, "
              f"{rate:.0f} img/s", file=sys.stderr)
    if epochs and recompute_batchnorm_(model, data, batch_size):
        test_acc = evaluate(model, data)
        history[-1]["test_acc_pct"] = test_acc
        print(f"{label}: BatchNorm statistics recomputed over the training images: test "
              f"{test_acc:.2f}%", file=sys.stderr)
    model.eval()
    return history
