"""Benchmark: structured pruning's targets, SimpleCNN on the stand-in data and MobileNet.

    .venv/bin/python benchmarks/prune_targets.py [--out build/bench-prune] [--rounds 41]

1. trains SimpleCNN once (`edge-optimize train --data synthetic`, --epochs), then builds two
   bundles from that one baseline: the unpruned int8 model (`quantize.source=baseline`) and
   the model structured-pruned to 0.5 of its MACs with a fine-tune
   (`prune.method=structured`, `prune.finetune_epochs` 2), each quantized, exported to every
   engine the host has and verified;
2. loads every file of both bundles through the board's loader (agent.bundle) and times them
   in this one process at batch 1, one thread, in --rounds interleaved rounds (the agent's
   own `race`): the structured file against the unpruned one on the same engine;
3. mobilenet_v3_small at 224x224 from a generated 4-class photo folder, structured to 0.6 of
   its MACs, through train, prune, quantize and export; `edge-agent check` on the bundle.
Targets: structured TorchScript int8 file <= 0.55x the unpruned one's bytes; its batch-1 p50
<= 0.65x the unpruned int8 file's; its accuracy within 1 point of the unpruned int8 model's;
MobileNet's MACs <= 0.6x with every bundle file verified and the board's check passing. (The
emulated Pi 5's guest instructions per image are counted by the ARM proof, tests/prove_arm.py,
on its structured bundle.) Writes results.json (date, CPU and flags, command, figures) and
prune.png into --out, prints the table, exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.bundle import Bundle  # noqa: E402
from agent.loop import Inputs  # noqa: E402
from agent.timing import race  # noqa: E402
from benchmarks.engine_targets import host_cpu  # noqa: E402
from benchmarks.targets import Check, as_json, report  # noqa: E402
from tests.support.image_folder import write  # noqa: E402

STRUCTURED = ("prune.method=structured", "prune.target_macs_ratio=0.5",
              "prune.finetune_epochs=2")
MOBILENET = ("train.factory=torchvision.models:mobilenet_v3_small",
             "train.input_shape=[3,224,224]", "train.epochs=2", "data.batch_size=16",
             "prune.method=structured", "prune.target_macs_ratio=0.6",
             "prune.finetune_epochs=1", "quantize.calibration_images=64",
             "export.sample_size=8", "quantize.max_accuracy_drop=100")


def optimize(out: Path, steps: tuple[str, ...], data: str, *sets: str) -> None:
    args = [a for s in sets for a in ("--set", s)]
    for step in steps:
        cmd = [sys.executable, "-m", "optimizer", step, "--data", data, "--out", str(out),
               *args]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            raise SystemExit(f"edge-optimize {step} failed")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, b) in enumerate(results["bundles"].items()):
        for engine, f in b["files"].items():
            left.scatter(f["p50_us"], b["accuracy_pct"], color=f"C{i}",
                         marker={"torchscript": "o", "onnxruntime": "s"}.get(engine, "^"),
                         label=f"{name}, {engine}")
            right.scatter(f["bytes"] / 1024, b["accuracy_pct"], color=f"C{i}",
                          marker={"torchscript": "o", "onnxruntime": "s"}.get(engine, "^"))
    left.set_xlabel("batch-1 p50, us (one thread, this host)")
    left.set_ylabel("test accuracy, % (stand-in data)")
    left.set_title("SimpleCNN int8: accuracy against latency")
    left.legend(fontsize=7)
    right.set_xlabel("file KiB")
    right.set_title("accuracy against size")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("build/bench-prune"))
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--epochs", type=int, default=6, help="SimpleCNN's training epochs")
    args = p.parse_args()
    if args.rounds < 1 or args.epochs < 1:
        p.error("--rounds and --epochs must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-prune-"))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    unpruned, pruned = work / "unpruned", work / "structured"
    optimize(unpruned, ("train",), "synthetic", f"train.epochs={args.epochs}")
    pruned.mkdir()
    shutil.copy2(unpruned / "baseline_cnn.pth", pruned / "baseline_cnn.pth")
    optimize(unpruned, ("prune", "quantize", "export"), "synthetic", "quantize.source=baseline")
    optimize(pruned, ("prune", "quantize", "export"), "synthetic", *STRUCTURED)

    bundles = {"unpruned": Bundle.open(unpruned), "structured 0.5 MACs": Bundle.open(pruned)}
    runners = {f"{name}|{engine}": b.load(engine, 1)
               for name, b in bundles.items() for engine in b.engines}
    x = Inputs.random(1, bundles["unpruned"].manifest.input_shape).batches
    print(f"timing {len(runners)} files, {args.rounds} interleaved rounds ...", file=sys.stderr,
          flush=True)
    torch.set_num_threads(1)
    timed = race(runners, x, args.rounds, 100, warmup=30)
    pruning = json.loads((pruned / "manifest.json").read_text())["quantization"]["pruning"]
    results_bundles: dict[str, Any] = {}
    for name, b in bundles.items():
        m = b.manifest
        results_bundles[name] = {
            "accuracy_pct": m.metrics["accuracy_pct"], "mode": m.quantization["mode"],
            "files": {e: {"file": str(entry["file"]),
                          "bytes": (b.dir / str(entry["file"])).stat().st_size,
                          "p50_us": timed[f"{name}|{e}"].p50_s * 1e6,
                          "verification": entry["verification"]["status"]}
                      for e, entry in m.engine_entries.items()}}
    un, st = results_bundles["unpruned"], results_bundles["structured 0.5 MACs"]

    photos, mobile = work / "photos", work / "mobilenet"
    sizes = ((240, 320), (224, 224), (300, 260))
    write(photos, 24, sizes=sizes)
    optimize(mobile, ("train", "prune", "quantize", "export"), "folder",
             f"data.root={photos}", *MOBILENET)
    mm = json.loads((mobile / "manifest.json").read_text())
    mp = mm["quantization"]["pruning"]
    check = subprocess.run([sys.executable, "-m", "agent", "check", "--set",
                            f"model.dir={mobile}"], cwd=ROOT, capture_output=True, text=True)
    print(check.stdout + check.stderr, file=sys.stderr)
    verified = all(e["verification"]["status"] == "passed" for e in mm["engines"].values())

    ts = "torchscript"
    checks: list[Check] = [
        ("structured TorchScript int8 file bytes / unpruned int8 file's",
         st["files"][ts]["bytes"] / un["files"][ts]["bytes"], 0.55, "<="),
        ("structured TorchScript int8 p50 / unpruned int8 p50 (batch 1, 1 thread)",
         st["files"][ts]["p50_us"] / un["files"][ts]["p50_us"], 0.65, "<="),
        ("accuracy, unpruned int8 minus structured int8, points",
         un["accuracy_pct"] - st["accuracy_pct"], 1.0, "<="),
        ("SimpleCNN MACs after / before", pruning["macs"] / pruning["macs_before"], 0.5, "<="),
        ("mobilenet_v3_small MACs after / before", mp["macs"] / mp["macs_before"], 0.6, "<="),
        (f"mobilenet_v3_small: {len(mm['engines'])} files verified, edge-agent check exit",
         float(check.returncode if verified else 99), 0.0, "<="),
    ]
    results = {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host_cpu": host_cpu(), "cpus": os.cpu_count(), "torch_version": torch.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "data": "stand-in synthetic data (not CIFAR-10)", "bundles": results_bundles,
        "pruning": pruning, "mobilenet": {"pruning": mp, "mode": mm["quantization"]["mode"],
                                          "engines": sorted(mm["engines"]),
                                          "check_exit": check.returncode},
        "checks": as_json(checks)}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "prune.png")
    print(f"\nhost CPU: {results['host_cpu']}; {os.cpu_count()} CPUs; stand-in data")
    print(f"{'bundle':<22} {'engine':<12} {'bytes':>9} {'p50 us':>8} {'accuracy %':>10}")
    for name, b in results_bundles.items():
        for engine, f in b["files"].items():
            print(f"{name:<22} {engine:<12} {f['bytes']:>9,} {f['p50_us']:>8.0f} "
                  f"{b['accuracy_pct']:>10.2f}")
    ok = report(checks, width=76)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'prune.png'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
