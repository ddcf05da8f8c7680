"""Benchmark: the host optimizer's targets, measured in one run on this machine.

    .venv/bin/python benchmarks/host_targets.py [--out build/bench-x86]

Runs `edge-optimize run --data synthetic --set quantize.engine=x86` (the stand-in data, x86
engine, every other setting at its default) into a fresh folder, then reads its report.json
and checks, as ratios within that one run:
  1. static int8 scripted batch-1 p50  <= 0.7 x  dynamic int8 scripted (the reference method)
  2. quantized_cnn_scripted.pt bytes   <= 0.27 x baseline_cnn.pth
  3. pruned + int8 board file, xz      <= 0.15 x baseline_cnn.pth
  4. board file accuracy drop          <= 1.0 point (pruned + fine-tuned + int8)
Prints a table and exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--out", type=Path, default=Path("build/bench-x86"))
    args = p.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    cmd = [sys.executable, "-m", "optimizer", "run", "--data", "synthetic", "--out",
           str(args.out), "--set", "quantize.engine=x86"]
    print("$", " ".join(cmd), file=sys.stderr)
    if subprocess.run(cmd).returncode != 0:
        return 2
    report = json.loads((args.out / "report.json").read_text())
    rows = {r["variant"].split(" (")[0]: r for r in report["rows"]}
    base, board = rows["fp32 baseline"], rows["board file"]
    checks = [
        ("static int8 p50 / dynamic int8 p50 (scripted, x86, batch 1)",
         rows["static int8"]["p50_us"] / rows["dynamic int8"]["p50_us"], 0.7),
        ("board file bytes / baseline bytes", board["bytes"] / base["bytes"], 0.27),
        ("board file xz bytes / baseline bytes", board["xz_bytes"] / base["bytes"], 0.15),
        ("board file accuracy drop (points)", base["accuracy_pct"] - board["accuracy_pct"], 1.0),
    ]
    env = report["environment"]
    print(f"\nmode {report['quantization']['mode']}, torch {env['torch_version']}, "
          f"{env['threads']} thread(s), data {report['data']['source']}")
    print(f"{'target':<62} {'measured':>9} {'limit':>6}  result")
    ok = True
    for name, value, limit in checks:
        passed = value <= limit
        ok &= passed
        print(f"{name:<62} {value:>9.3f} {limit:>6}  {'PASS' if passed else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
