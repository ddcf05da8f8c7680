"""A model factory for tests: the classic tutorial network, whose forward writes a layer size
into its code (`x.view(-1, 16 * 8 * 8)`), so it stops running once channels are removed."""

from __future__ import annotations

import torch
from torch import nn


class FixedViewCNN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(4)
        self.fc1 = nn.Linear(16 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv(x)))
        x = x.view(-1, 16 * 8 * 8)
        return self.fc2(torch.relu(self.fc1(x)))
