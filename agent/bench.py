"""`edge-agent bench`: a one-shot latency benchmark of every engine of the verified bundle.

Every engine in the bundle is proven first (`Bundle.check`, which also makes model.engine's
choice); each proven engine then gets, per batch size, a freshly loaded runner (TorchScript
specialises on the first shapes it runs), `warmup` untimed passes, and `iters` timed passes
on random inputs, the engines taking turns in interleaved rounds (agent/timing.py `race`) so
a machine that gets busier halfway slows them alike.
"""

from __future__ import annotations

from typing import Any

from agent.bundle import Bundle, describe
from agent.loop import Inputs
from agent.timing import race

ROUNDS = 5  # bench's interleaved rounds; iters are split between them


def bench(bundle: Bundle, batch_sizes: list[int], iters: int, warmup: int, threads: int,
          engine: str = "auto") -> dict[str, Any]:
    """Prove every engine, time the proven ones at each batch size; return the rows, the
    proofs and the engine the agent runs (`engine`: the model.engine setting)."""
    checked = bundle.check(engine, max(1, batch_sizes[0]), threads, every=True)
    proven = [r["engine"] for r in checked["engines"] if r["status"] == "proven"]
    rows = []
    for batch in batch_sizes:
        inputs = Inputs.random(batch, bundle.manifest.input_shape).batches
        runners = {name: bundle.load(name, threads) for name in proven}
        rounds = min(ROUNDS, iters)
        timed = race(runners, inputs, rounds, max(1, iters // rounds), warmup)
        for name, s in timed.items():
            rows.append({"engine": name, "batch_size": batch, "iters": s.passes,
                         "p50_ms": s.p50_s * 1000, "p90_ms": s.p90_s * 1000,
                         "p99_ms": s.p99_s * 1000, "max_ms": s.max_s * 1000,
                         "mean_ms": s.mean_s * 1000,
                         "throughput_ips": batch * s.passes / s.total_s})
    return {"bundle": str(bundle.dir), "model_sha256": bundle.sha256, "threads": threads,
            "warmup": warmup, "engine": checked["engine"], "choice": describe(checked),
            "sample_images": checked["sample_images"], "engines": checked["engines"],
            "rows": rows}


def engine_line(row: dict[str, Any], sample_images: int) -> str:
    """One engine's proof on this board, in one line."""
    name = f"{row['engine']} {row['version'] or ''}".strip()
    if row["status"] != "proven":
        return f"{name}: {row['status']}" + (f" ({row['detail']})" if "detail" in row else "")
    exact = "bit-exact" if row["bit_exact"] else f"max |logit diff| {row['max_abs_logit_diff']:.3g}"
    return (f"{name}: proven, sample of {sample_images} {exact} to the host, accuracy "
            f"{row['sample_accuracy_pct']:.2f}%")


def table(result: dict[str, Any]) -> str:
    """The benchmark as a fixed-width table, with every engine's proof and the choice."""
    head = (f"{result['bundle']} (sha256 {result['model_sha256'][:12]}...), "
            f"{result['threads']} thread(s), {result['warmup']} warm-up runs")
    lines = [head, *(engine_line(r, result["sample_images"]) for r in result["engines"])]
    width = max(12, *(len(r["engine"]) for r in result["rows"]))  # onnxruntime-fp32: 16
    lines.append(f"{'engine':<{width}} {'batch':>5} {'iters':>6} {'p50 ms':>9} {'p90 ms':>9} "
                 f"{'p99 ms':>9} {'max ms':>9} {'mean ms':>9} {'img/s':>10}")
    for r in result["rows"]:
        lines.append(f"{r['engine']:<{width}} {r['batch_size']:>5} {r['iters']:>6} "
                     f"{r['p50_ms']:>9.3f} {r['p90_ms']:>9.3f} {r['p99_ms']:>9.3f} "
                     f"{r['max_ms']:>9.3f} {r['mean_ms']:>9.3f} {r['throughput_ips']:>10.1f}")
    lines.append(f"runs: {result['choice']}")
    return "\n".join(lines)
