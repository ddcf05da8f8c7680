"""A model factory for tests: SimpleCNN's layout, about 60x the convolution work.

Same input (3x32x32) and classes as the reference, so a bundle built with it is a valid
update for a board running SimpleCNN: the injected latency regression of the rollback test.
"""

from __future__ import annotations

from torch import nn

from optimizer.model import SimpleCNN


class WideCNN(SimpleCNN):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes)
        self.conv1 = nn.Conv2d(3, 128, 3, padding=1)
        self.conv2 = nn.Conv2d(128, 256, 3, padding=1)
        self.fc1 = nn.Linear(256 * 8 * 8, 128)
