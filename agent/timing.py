"""The one timing loop: forward passes timed the same way on the host and on the board.

The optimizer's report, `edge-agent bench`, the update's smoke test and the agent's warm-up
all call `time_passes`, and summarise with `Latency.of` (the nearest-rank percentile of
agent/telemetry.py), so a p99 from the workstation and a p99 from a board mean one thing.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from agent.telemetry import percentile
from agent.torchwarnings import known_torch_deprecations


def time_passes(module: Callable[[torch.Tensor], object], batches: Sequence[torch.Tensor],
                iters: int, warmup: int = 0) -> array:
    """Run `warmup` untimed passes, then `iters` timed ones, cycling through `batches`;
    return each timed pass's seconds (perf_counter), in order.

    Raises:
        RuntimeError: a forward pass failed (the caller decides what that means).
    """
    lat = array("d")
    perf = time.perf_counter
    with torch.inference_mode(), known_torch_deprecations():
        for i in range(warmup):
            module(batches[i % len(batches)])
        for i in range(warmup, warmup + iters):
            t0 = perf()
            module(batches[i % len(batches)])
            lat.append(perf() - t0)
    return lat


@dataclass(frozen=True)
class Latency:
    """Summary of timed passes, in seconds."""

    passes: int
    p50_s: float
    p90_s: float
    p99_s: float
    max_s: float
    mean_s: float
    total_s: float

    @classmethod
    def of(cls, lat: array | Sequence[float]) -> Latency:
        """Summarise at least one pass."""
        ordered = sorted(lat)
        total = sum(ordered)
        return cls(len(ordered), percentile(ordered, 50), percentile(ordered, 90),
                   percentile(ordered, 99), ordered[-1], total / len(ordered), total)
