"""Host latency and throughput of a model variant, warm-up excluded, threads recorded.

Timed with the board's own loop and percentile (agent/timing.py), so the report's p99 and a
board's p99 are the same statistic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from agent.timing import Latency, time_passes
from agent.torchwarnings import known_torch_deprecations

Model = Callable[[torch.Tensor], torch.Tensor]


def measure(make: Callable[[], Model], input_shape: list[int], *,
            threads: int, warmup: int, iters: int, throughput_batches: int,
            throughput_batch: int = 64, seed: int = 0) -> dict[str, Any]:
    """Batch-1 latency percentiles (us) and batch-64 throughput (images/s).

    `make` returns a fresh instance of the variant for each of the two measurements:
    TorchScript's profiling executor specialises a module on the first input shape it runs,
    so a module first run at another batch size times slower at batch 1.
    """
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(1, *input_shape, generator=g)
    xb = torch.randn(throughput_batch, *input_shape, generator=g)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with known_torch_deprecations():  # make() may load or script a module
            single, batched = make(), make()
        with torch.inference_mode(), known_torch_deprecations():
            lat = time_passes(single, [x1], iters, warmup)
            # A fresh module for batch 64: TorchScript specialises on the first shape it runs.
            throughput = Latency.of(time_passes(batched, [xb], throughput_batches,
                                                max(1, warmup // 10)))
    finally:
        torch.set_num_threads(previous)
    s = Latency.of(lat)
    return {"p50_us": s.p50_s * 1e6, "p90_us": s.p90_s * 1e6, "p99_us": s.p99_s * 1e6,
            "mean_us": s.mean_s * 1e6,
            "throughput_ips": throughput_batches * throughput_batch / throughput.total_s,
            "threads": threads, "iters": iters, "warmup": warmup,
            "samples_us": [v * 1e6 for v in lat]}
