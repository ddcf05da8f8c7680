"""A model factory with a bug: calling it raises (for train.factory's error path)."""

from __future__ import annotations

from torch import nn


def broken(num_classes: int = 10) -> nn.Module:
    """Fails the way a user's factory with a typo does."""
    layers = {"conv": nn.Conv2d(3, 8, 3)}
    return nn.Sequential(layers["conv"], layers["head"])  # KeyError: 'head'
