"""`edge-agent bench`: a one-shot latency benchmark of the verified bundle on this board.

Each batch size gets a freshly loaded module (TorchScript specialises on the first shapes it
runs), `warmup` untimed passes, then `iters` timed forward passes on random inputs.
"""

from __future__ import annotations

from typing import Any

import torch

from agent.bundle import Bundle
from agent.loop import Inputs
from agent.timing import Latency, time_passes


def bench(bundle: Bundle, batch_sizes: list[int], iters: int, warmup: int,
          threads: int) -> dict[str, Any]:
    """Time the board model at each batch size; return the rows and the set-up."""
    torch.set_num_threads(threads)
    rows = []
    for batch in batch_sizes:
        module = bundle.load()
        inputs = Inputs.random(batch, bundle.manifest.input_shape).batches
        s = Latency.of(time_passes(module, inputs, iters, warmup))
        rows.append({"batch_size": batch, "iters": iters,
                     "p50_ms": s.p50_s * 1000, "p90_ms": s.p90_s * 1000,
                     "p99_ms": s.p99_s * 1000, "max_ms": s.max_s * 1000,
                     "mean_ms": s.mean_s * 1000, "throughput_ips": batch * iters / s.total_s})
    return {"bundle": str(bundle.dir), "model_sha256": bundle.sha256,
            "engine": bundle.manifest.engine, "threads": threads, "warmup": warmup,
            "torch_version": torch.__version__, "rows": rows}


def table(result: dict[str, Any]) -> str:
    """The benchmark as a fixed-width table."""
    head = (f"{result['bundle']} (sha256 {result['model_sha256'][:12]}...), engine "
            f"{result['engine']}, {result['threads']} thread(s), torch "
            f"{result['torch_version']}, {result['warmup']} warm-up runs")
    cols = f"{'batch':>5} {'iters':>6} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} " \
           f"{'max ms':>9} {'mean ms':>9} {'img/s':>10}"
    lines = [head, cols]
    for r in result["rows"]:
        lines.append(f"{r['batch_size']:>5} {r['iters']:>6} {r['p50_ms']:>9.3f} "
                     f"{r['p90_ms']:>9.3f} {r['p99_ms']:>9.3f} {r['max_ms']:>9.3f} "
                     f"{r['mean_ms']:>9.3f} {r['throughput_ips']:>10.1f}")
    return "\n".join(lines)
