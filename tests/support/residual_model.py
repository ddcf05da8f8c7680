"""A model factory for tests: the blocks real image models are made of, in a small network.

Conv-BN-ReLU stem, a residual block (the skip connection is a float `add` that eager-mode
quantization cannot take), a MobileNet-style inverted block (depthwise convolution,
hardswish, squeeze-excite with hardsigmoid) and adaptive pooling. It has no `FUSE` list, so
the optimizer quantizes it in graph mode.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False),
                         nn.BatchNorm2d(cout))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, channels // 4, 1)
        self.relu = nn.ReLU()
        self.expand = nn.Conv2d(channels // 4, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))


class ResidualCNN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16), nn.ReLU())
        self.block = nn.Sequential(conv_bn(16, 16), nn.ReLU(), conv_bn(16, 16))
        self.relu = nn.ReLU()
        self.down = nn.MaxPool2d(2)
        self.depthwise = nn.Sequential(conv_bn(16, 16, groups=16), nn.Hardswish())
        self.se = SqueezeExcite(16)
        self.project = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.down(self.relu(x + self.block(x)))
        x = self.project(self.se(self.depthwise(x)))
        return self.fc(torch.flatten(self.pool(x), 1))
