"""Host latency and throughput of a model variant, warm-up excluded, threads recorded."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from agent.torchwarnings import known_torch_deprecations


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


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
        with torch.inference_mode(), known_torch_deprecations():
            model = make()
            for _ in range(warmup):
                model(x1)
            samples = []
            for _ in range(iters):
                t0 = time.perf_counter_ns()
                model(x1)
                samples.append((time.perf_counter_ns() - t0) / 1000.0)
            model = make()
            for _ in range(max(1, warmup // 10)):
                model(xb)
            start = time.perf_counter()
            for _ in range(throughput_batches):
                model(xb)
            elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    ordered = sorted(samples)
    return {"p50_us": percentile(ordered, 50), "p90_us": percentile(ordered, 90),
            "p99_us": percentile(ordered, 99), "mean_us": sum(samples) / len(samples),
            "throughput_ips": throughput_batches * throughput_batch / elapsed,
            "threads": threads, "iters": iters, "warmup": warmup, "samples_us": samples}
