"""Benchmark: your own model and photos, torchvision's mobilenet_v3_small at 224x224.

    .venv/bin/python benchmarks/byo_targets.py [--out build/bench-byo] [--images 5000]

1. writes a 4-class folder of generated PNG/JPEG photos (tests/support/image_folder.py) and
   runs `edge-optimize train, prune, quantize, export --data folder` on it with
   `train.factory=torchvision.models:mobilenet_v3_small`, `train.input_shape=[3,224,224]`
   and `quantize.source=baseline` (int8 of the trained model: 70 % unstructured pruning
   leaves a randomly started MobileNet at chance, a separate question from int8);
2. times, in this one process, one thread, batch 1, in interleaved rounds (each round runs
   every variant in turn; the figure is the median of the rounds' medians): the fp32 eager
   model, the int8 TorchScript qnnpack board file, the int8 ONNX QDQ board file and the
   fp32 model exported to ONNX;
3. writes `--images` JPEGs at 224x224 and runs `edge-optimize train` on them (one epoch, a
   frozen backbone) and on an 8-image-a-class folder with the same settings, sampling the
   peak memory (PSS) of the optimizer and its loader workers together in each: the
   difference is what reading the folder costs;
4. reads 1,000 of those images through the training loader with 1 worker and with
   `min(4, CPUs)` workers, in interleaved rounds.
Targets: int8 TorchScript p50 <= 0.6x fp32 eager; ONNX Runtime int8 p50 <= 0.5x fp32 eager;
board file <= 0.3x the fp32 state_dict; int8 accuracy within quantize.max_accuracy_drop of
fp32; memory growth < 300 MB; loader throughput >= 2x one worker's. Writes results.json (date,
CPU and flags, command, figures) and byo.png into --out, prints the table, exits 1 if a
target is missed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.engines import onnxrt  # noqa: E402
from agent.engines.torchscript import load_scripted  # noqa: E402
from agent.manifest import Manifest  # noqa: E402
from agent.timing import time_passes  # noqa: E402
from agent.torchwarnings import known_torch_deprecations  # noqa: E402
from benchmarks.engine_targets import host_cpu  # noqa: E402
from benchmarks.targets import Check, as_json, report  # noqa: E402
from optimizer import onnx_export  # noqa: E402
from optimizer.config import DataConfig  # noqa: E402
from optimizer.folder import FolderData  # noqa: E402
from optimizer.model import build, load_state_dict_into  # noqa: E402
from tests.support.image_folder import write  # noqa: E402

FACTORY = "torchvision.models:mobilenet_v3_small"
SHAPE = [3, 224, 224]
SETS = [f"train.factory={FACTORY}", "train.input_shape=[3,224,224]", "train.epochs=3",
        "data.batch_size=16", "prune.finetune_epochs=1", "quantize.calibration_images=64",
        "export.sample_size=8", "quantize.source=baseline"]


def optimize(photos: Path, out: Path, steps: tuple[str, ...], *extra: str,
             watch: bool = False) -> int:
    """Run the optimizer's steps; with `watch`, the peak memory (kB) of the optimizer with
    its loader workers: the largest sum of their PSS (shared pages split among the processes
    that map them, not counted once per worker) over 0.2 s samples."""
    sets = [a for s in [f"data.root={photos}", *SETS, *extra] for a in ("--set", s)]
    peak = 0
    for step in steps:
        cmd = [sys.executable, "-m", "optimizer", step, "--data", "folder", "--out", str(out),
               *sets]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        proc = subprocess.Popen(cmd, cwd=ROOT)
        while proc.poll() is None:
            if watch:
                peak = max(peak, _tree_pss_kb(proc.pid))
            time.sleep(0.2)
        if proc.returncode != 0:
            raise SystemExit(f"edge-optimize {step} failed (exit {proc.returncode})")
    return peak


def _tree_pss_kb(pid: int) -> int:
    import psutil

    try:
        main = psutil.Process(pid)
        procs = [main, *main.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass  # a worker that ended between the listing and the reading
    return total // 1024


def speed(variants: dict[str, Callable[[torch.Tensor], Any]], rounds: int,
          passes: int) -> dict[str, float]:
    """Median over rounds of each variant's median batch-1 pass (ms), variants interleaved."""
    x = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(0))
    per: dict[str, list[float]] = {name: [] for name in variants}
    torch.set_num_threads(1)
    with torch.inference_mode(), known_torch_deprecations():
        for run in variants.values():
            time_passes(run, [x], 5, 5)  # warm every variant before the first round
        for r in range(rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                per[name].append(statistics.median(time_passes(variants[name], [x], passes,
                                                               2)) * 1000)
    return {name: statistics.median(v) for name, v in per.items()}


def loader_rate(data: FolderData, workers: int, limit: int) -> float:
    """Images per second through the training loader (augmentation on), `limit` images."""
    from dataclasses import replace

    d = replace(data, workers=workers, train_files=data.train_files[:limit])
    t0, seen = time.perf_counter(), 0
    for x, _ in d.train_batches(64, augment=True, generator=torch.Generator().manual_seed(0)):
        seen += x.shape[0]
    return seen / (time.perf_counter() - t0)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    p50 = results["p50_ms"]
    left.barh(list(p50), list(p50.values()), color=["C7", "C0", "C1", "C2"][:len(p50)])
    for y, v in enumerate(p50.values()):
        left.text(v, y, f" {v:.2f} ms", va="center", fontsize=8)
    left.set_xlabel("batch-1 p50, ms (one thread, this host)")
    left.set_title("mobilenet_v3_small 224x224")
    left.invert_yaxis()
    rates = results["loader"]
    right.bar([f"{k} worker(s)" for k in rates["workers"]], rates["images_per_s"], color="C0")
    right.set_ylabel("training images / s (loader alone)")
    right.set_title("ImageFolder loader, 224x224 JPEG")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("build/bench-byo"))
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--passes", type=int, default=10)
    args = p.parse_args()
    if args.images < 100 or args.rounds < 1 or args.passes < 1:
        p.error("--images must be at least 100, --rounds and --passes at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-byo-"))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    photos, bundle = work / "photos", work / "bundle"
    sizes = ((240, 320), (224, 224), (300, 260))
    write(photos, 40, sizes=sizes)
    write(photos, 10, split="val", seed=1, sizes=sizes)
    optimize(photos, bundle, ("train", "prune", "quantize", "export"))
    m = Manifest.read(bundle)
    fp32 = load_state_dict_into(build(FACTORY, 4), bundle / "baseline_cnn.pth", "baseline", "")
    board = load_scripted(bundle / "quantized_cnn_scripted.pt", m.engine)
    ort_int8 = onnxrt.load((bundle / "quantized_cnn.onnx").read_bytes(),
                           bundle / "quantized_cnn.onnx", 1, None)
    onnx_export.export_fp32(fp32, SHAPE, work / "fp32.onnx")
    ort_fp32 = onnx_export.unshipped_runner(work / "fp32.onnx", 1)
    print("timing four variants, interleaved rounds ...", file=sys.stderr, flush=True)
    p50 = speed({"fp32 eager": fp32,
                 "int8 TorchScript qnnpack": board,
                 "int8 ONNX Runtime QDQ": lambda x: ort_int8(x.numpy()),
                 "fp32 ONNX Runtime": lambda x: ort_fp32(x.numpy())}, args.rounds, args.passes)
    print(f"  p50 ms: {p50}", file=sys.stderr, flush=True)
    baseline_bytes = (bundle / "baseline_cnn.pth").stat().st_size
    board_bytes = (bundle / "quantized_cnn_scripted.pt").stat().st_size
    drop = m.metrics["accuracy_drop_pts"]

    print(f"writing {args.images} JPEGs at 224x224 ...", file=sys.stderr, flush=True)
    big, small = work / "big", work / "small"
    per_class = args.images // 4
    write(big, per_class, sizes=((224, 224),))
    write(small, 8, sizes=((224, 224),))
    only = ("train.epochs=1", "train.freeze_backbone=true")
    empty_kb = optimize(small, work / "out-small", ("train",), *only, watch=True)
    full_kb = optimize(big, work / "out-big", ("train",), *only, watch=True)
    growth_mb = (full_kb - empty_kb) / 1024

    print("loader throughput, 1 worker against several, interleaved ...", file=sys.stderr,
          flush=True)
    many = min(4, os.cpu_count() or 1)
    data = FolderData.scan(DataConfig(source="folder", root=str(big), workers=many), SHAPE)
    rates: dict[int, list[float]] = {1: [], many: []}
    for r in range(3):
        for w in ((1, many) if r % 2 == 0 else (many, 1)):
            rates[w].append(loader_rate(data, w, 1000))
    one, several = statistics.median(rates[1]), statistics.median(rates[many])

    checks: list[Check] = [
        ("int8 TorchScript qnnpack p50 / fp32 eager p50 (batch 1, 1 thread)",
         p50["int8 TorchScript qnnpack"] / p50["fp32 eager"], 0.6, "<="),
        ("int8 ONNX Runtime p50 / fp32 eager p50",
         p50["int8 ONNX Runtime QDQ"] / p50["fp32 eager"], 0.5, "<="),
        ("board file bytes / fp32 state_dict bytes", board_bytes / baseline_bytes, 0.3, "<="),
        ("int8 accuracy drop against fp32, points (mode " + m.quantization["mode"] + ")",
         drop, float(m.quantization["max_accuracy_drop"]), "<="),
        (f"optimizer peak memory growth, {args.images} JPEGs against 32, MB", growth_mb, 300.0,
         "<"),
        (f"loader images/s, {many} workers / 1 worker", several / one, 2.0, ">="),
    ]
    results = {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host_cpu": host_cpu(), "cpus": os.cpu_count(), "torch_version": torch.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "p50_ms": p50, "int8_onnx_over_fp32_onnx": p50["int8 ONNX Runtime QDQ"]
        / p50["fp32 ONNX Runtime"], "board_bytes": board_bytes,
        "baseline_bytes": baseline_bytes, "accuracy": m.metrics,
        "quantization_mode": m.quantization["mode"],
        "peak_pss_kb": {"32 images": empty_kb, f"{args.images} images": full_kb},
        "loader": {"workers": [1, many], "images_per_s": [one, several],
                   "rounds": {str(k): v for k, v in rates.items()}},
        "checks": as_json(checks)}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "byo.png")
    print(f"\nhost CPU: {results['host_cpu']}; {os.cpu_count()} CPUs")
    print("p50 ms: " + ", ".join(f"{k} {v:.2f}" for k, v in p50.items()))
    ratio = results["int8_onnx_over_fp32_onnx"]
    print(f"ONNX Runtime int8 / its own fp32: {ratio:.2f}"
          + (" (int8 is SLOWER than fp32 on this host)" if ratio > 1 else ""))
    print(f"peak PSS: {empty_kb / 1024:.0f} MB (32 images), {full_kb / 1024:.0f} MB "
          f"({args.images}); loader: {one:.0f} img/s (1 worker), {several:.0f} img/s "
          f"({many} workers)")
    ok = report(checks, width=72)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'byo.png'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
