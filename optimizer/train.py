"""Training the fp32 baseline (and the masked fine-tune after pruning).

Default recipe, meant to reach about 70 % on real CIFAR-10 with SimpleCNN: Adam, lr 1e-3,
batch 64, 10 epochs, random crop (padding 4) and horizontal flip, cross-entropy loss.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from tqdm import tqdm

from optimizer.data import ImageData, batches
from optimizer.model import accuracy_pct, predict


def normalized_test(data: ImageData) -> torch.Tensor:
    """The whole test split as the model's input, through the board's own preprocessing."""
    prep = data.preprocess
    return torch.cat([prep.batch(data.test_images[i:i + 1024])
                      for i in range(0, data.test_images.shape[0], 1024)])


def evaluate(model: nn.Module, data: ImageData) -> float:
    """Top-1 test accuracy of `model` in percent."""
    model.eval()
    return accuracy_pct(predict(model, normalized_test(data)), data.test_labels)


def fit_(model: nn.Module, data: ImageData, *, epochs: int, lr: float, weight_decay: float,
         batch_size: int, augment: bool, seed: int, label: str) -> list[dict[str, float]]:
    """Train `model` in place with Adam; print one line per epoch; return the epoch history.

    Works unchanged on a model carrying pruning masks (they stay applied).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr,
                           weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    steps = -(-data.train_images.shape[0] // batch_size)
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        seen, correct, loss_sum = 0, 0, 0.0
        bar = tqdm(batches(data.train_images, data.train_labels, batch_size, data.mean,
                           data.std, shuffle=True, augment=augment, generator=gen),
                   total=steps, desc=f"{label} {epoch}/{epochs}", unit="batch", leave=False,
                   file=sys.stderr, disable=None, mininterval=0.5)
        for x, y in bar:
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            opt.step()
            seen += y.shape[0]
            loss_sum += loss.item() * y.shape[0]
            correct += int((out.argmax(1) == y).sum())
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}%")
        test_acc = evaluate(model, data)
        row = {"epoch": epoch, "loss": loss_sum / seen, "train_acc_pct": 100 * correct / seen,
               "test_acc_pct": test_acc}
        history.append(row)
        print(f"{label} epoch {epoch}/{epochs}: loss {row['loss']:.3f}, "
              f"train {row['train_acc_pct']:.1f}%, test {test_acc:.2f}%", file=sys.stderr)
    model.eval()
    return history
