"""models/report.md, report.json and report.png: one row per variant, side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402


def write(out: Path, report: dict[str, Any]) -> list[Path]:
    """Write report.json, report.md and report.png into `out`; return their paths."""
    paths = [out / "report.json", out / "report.md", out / "report.png"]
    slim = {**report, "rows": [{k: v for k, v in r.items() if k != "samples_us"}
                               for r in report["rows"]]}
    paths[0].write_text(json.dumps(slim, indent=2) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(report), encoding="utf-8")
    plot(report, paths[2])
    return paths


def cell(text: str) -> str:
    """`text` as one Markdown table cell: control characters shown escaped (a class folder's
    name may hold a newline), a pipe escaped."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return shown.replace("|", "\\|")


def _fmt(value: Any, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def table(report: dict[str, Any]) -> str:
    """The variants table in Markdown (also what the CLI prints)."""
    head = ("| variant | file | params | MACs | bytes | x baseline | xz bytes | xz x baseline | "
            "accuracy % | change pts | p50 us | p90 us | p99 us | batch-64 img/s | runtime | "
            "verified |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in report["rows"]:
        lines.append(
            f"| {r['variant']} | {r['file'] or '(not saved)'} | {_fmt(r.get('params'), ',')} | "
            f"{_fmt(r.get('macs'), ',')} | {r['bytes']} | "
            f"{r['size_ratio']:.3f} | {r['xz_bytes']} | {r['xz_ratio']:.3f} | "
            f"{r['accuracy_pct']:.2f} | {r['accuracy_change_pts']:+.2f} | "
            f"{r['p50_us']:.0f} | {r['p90_us']:.0f} | {r['p99_us']:.0f} | "
            f"{r['throughput_ips']:.0f} | {r['runtime']} | {r['verification']} |")
    return "\n".join(lines) + "\n"


def markdown(report: dict[str, Any]) -> str:
    """The whole human-readable report."""
    data, env, q = report["data"], report["environment"], report["quantization"]
    parts = [
        "# edgeforge optimization report\n",
        f"- data: **{data['source']}**: {data['description']} "
        f"({data['train_images']} train / {data['test_images']} test images)",
        *([f"- model: `{report['model']['factory']}` ({report['model']['name']}, "
           f"{report['model']['parameters']:,} parameters), input "
           f"{'x'.join(str(v) for v in report['model']['input_shape'])}"]
          if "model" in report else []),
        f"- engine: `{env['engine']}`; torch {env['torch_version']}; timing threads "
        f"{env['threads']}; {env['latency_iters']} batch-1 runs after {env['warmup']} warm-up "
        f"runs; CPU: {env['cpu']}",
        f"- board file mode: **{q['mode']}** (max accuracy drop {q['max_accuracy_drop']} pts "
        f"against the fp32 baseline, quantized from the {q['source']} model)",
        f"- created: {report['created_utc']}\n",
        "## Variants\n", table(report),
        "Sizes are bytes on disk (state_dict for .pth, TorchScript archive for the board "
        "file); `xz` is the transfer size after `xz -3`. Rows marked (not saved) were measured "
        "in memory. Latency is single-image forward time on this host, not a board.\n",
        "## Quantization gate\n", "| mode | accuracy % | drop pts | result |", "|---|---|---|---|",
    ]
    for a in q["attempts"]:
        parts.append(f"| {a['mode']} | {_fmt(a['accuracy_pct'], '.2f')} | "
                     f"{_fmt(a['drop_pts'], '+.2f')} | "
                     f"{'passed' if a['passed'] else 'failed'}: {a['reason']} |")
    parts += same_engine(report)
    parts += per_class(report)
    parts += pruning(report)
    parts += ["", "![size, accuracy and latency](report.png)", ""]
    return "\n".join(parts)


def pruning(report: dict[str, Any]) -> list[str]:
    """What the prune step did (Markdown lines): channels removed, or weights zeroed."""
    p = report.get("pruning") or {"method": "unstructured"}
    if p["method"] in ("structured", "none"):
        lines = ["", "## Pruning\n"]
        if p["method"] == "none":
            lines.append(f"Structured pruning was skipped (prune.skip_if_untraceable): "
                         f"{p['reason']}\n")
        else:
            target = ", ".join(f"{v}x the {'MACs' if k == 'macs' else 'parameters'}"
                               for k, v in p["target"].items())
            lines.append(f"Structured ({p['importance']} importance, target {target}): "
                         f"channels removed in {len(p['rounds'])} step(s), each followed by "
                         f"a fine-tune.\n")
        lines += ["| | MACs per image | parameters |", "|---|---|---|",
                  f"| before | {p['macs_before']:,} | {p['params_before']:,} |",
                  f"| after | {p['macs']:,} ({p['macs'] / p['macs_before']:.2f}x) | "
                  f"{p['params']:,} ({p['params'] / p['params_before']:.2f}x) |"]
        return lines
    lines = ["", "## Pruning\n",
             f"Unstructured: overall sparsity of conv and linear weights "
             f"{100 * report['sparsity']['overall']:.1f} % (zeros are still stored and "
             f"multiplied: the gain is in the xz column)\n",
             "| layer | weights | zeros | sparsity % |", "|---|---|---|---|"]
    for name, s in report["sparsity"]["layers"].items():
        lines.append(f"| {name} | {s['weights']} | {s['zeros']} | {100 * s['sparsity']:.1f} |")
    return lines


def same_engine(report: dict[str, Any]) -> list[str]:
    """Each int8 board file against the fp32 model on the same engine (Markdown lines)."""
    pairs = report.get("same_engine") or []
    if not pairs:
        return []
    lines = ["", "## int8 against fp32 on the same engine (batch 1, this host)\n",
             "| engine | int8 p50 us | fp32 p50 us | int8 / fp32 | |", "|---|---|---|---|---|"]
    for p in pairs:
        verdict = ("**int8 is slower than fp32 here**" if p["int8_slower"] else
                   "as fast" if round(p["ratio"], 2) == 1.0 else
                   f"int8 is {1 / p['ratio']:.2f}x as fast")
        lines.append(f"| {p['engine']} | {p['int8_p50_us']:.0f} | {p['fp32_p50_us']:.0f} | "
                     f"{p['ratio']:.2f} | {verdict} |")
    lines.append("\nA board's own engine timing (`edge-agent bench`) decides what runs there; "
                 "these are this host's figures.")
    return lines


def per_class(report: dict[str, Any]) -> list[str]:
    """Per-class test accuracy of every variant, one column each (Markdown lines)."""
    rows = [r for r in report["rows"] if r.get("per_class_accuracy_pct")]
    if not rows:
        return []
    lines = ["", "## Accuracy per class (test split)\n",
             "| class | " + " | ".join(r["variant"] for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for name in rows[0]["per_class_accuracy_pct"]:
        lines.append(f"| {cell(name)} | " + " | ".join(
            _fmt(r["per_class_accuracy_pct"].get(name), ".1f") for r in rows) + " |")
    return lines


def plot(report: dict[str, Any], path: Path) -> None:
    """Sizes with accuracy (left) and batch-1 latency distributions (right), one PNG."""
    rows = report["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    names = [r["variant"] for r in rows]
    ys = range(len(rows))
    left.barh([y + 0.2 for y in ys], [r["bytes"] / 1024 for r in rows], height=0.4,
              label="on disk")
    left.barh([y - 0.2 for y in ys], [r["xz_bytes"] / 1024 for r in rows], height=0.4,
              label="xz -3 (transfer)")
    for y, r in enumerate(rows):
        left.text(r["bytes"] / 1024, y + 0.2, f"  {r['accuracy_pct']:.1f} %", va="center",
                  fontsize=8)
    left.set_yticks(list(ys), names, fontsize=8)
    left.invert_yaxis()
    left.set_xlim(0, max(r["bytes"] for r in rows) / 1024 * 1.25)
    left.set_xlabel(f"KiB (label: top-1 accuracy, {report['data']['source']} test set)")
    left.set_title("size on disk and to ship")
    left.legend(loc="lower right", fontsize=8)
    left.grid(alpha=0.3, axis="x")
    right.boxplot([r["samples_us"] for r in rows], showfliers=False)
    right.set_xticks(range(1, len(rows) + 1), [r["variant"] for r in rows], rotation=20,
                     ha="right", fontsize=8)
    right.set_ylabel("batch-1 latency (us)")
    right.set_title(f"latency distribution, engine {report['environment']['engine']}, "
                    f"{report['environment']['threads']} thread(s)")
    right.grid(alpha=0.3, axis="y")
    if report["data"]["source"] != "cifar10":
        fig.suptitle("stand-in synthetic data: accuracy is not CIFAR-10 accuracy", color="C3")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
