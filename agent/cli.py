"""edge-agent: the board side of edgeforge.

    edge-agent check [--config PATH] [--set section.key=value ...]

`check` validates the config and the bundle (manifest, sha256 of every file it loads, the
engine, one inference, and the bundled sample reproducing the host's logits and accuracy);
it exits 0, or 2 with one line naming the problem. Installers and ExecStartPre use it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from agent.config import BOARD_SECTIONS, default_config_path, load_config
from agent.errors import BundleError, EdgeforgeError
from agent.manifest import Manifest
from agent.model import load_scripted, normalize
from agent.torchwarnings import known_torch_deprecations

DEFAULT_CONFIGS = ("/etc/edgeforge/config.yaml", "config.yaml")


def check_bundle(bundle: Path, threads: int = 1) -> dict[str, Any]:
    """Verify `bundle` end to end on this machine; return what was checked.

    Raises:
        BundleError: anything that means this board must not run the bundle.
    """
    manifest = Manifest.read(bundle)
    model_path = manifest.verified_path(bundle, manifest.board_model)
    sample = manifest.load_sample(bundle)
    torch.set_num_threads(threads)
    module = load_scripted(model_path, manifest.engine)
    shape = manifest.input_shape
    with torch.inference_mode(), known_torch_deprecations():
        try:
            out = module(torch.zeros(1, *shape))
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise BundleError(f"{model_path}: one inference on input [1, "
                              f"{', '.join(map(str, shape))}] failed ({first}): the model does "
                              f"not take the manifest's input shape") from None
        if tuple(out.shape) != (1, len(manifest.classes)):
            raise BundleError(f"{model_path}: output shape {tuple(out.shape)}, the manifest "
                              f"expects (1, {len(manifest.classes)})")
        logits = module(normalize(sample["images"], manifest.mean, manifest.std))
    diff = float((logits - sample["logits"]).abs().max())
    tolerance = float(manifest.sample["logit_tolerance"])
    accuracy = 100.0 * float((logits.argmax(1) == sample["labels"]).float().mean())
    if diff > tolerance:
        raise BundleError(f"{model_path}: this board's logits differ from the host's by up to "
                          f"{diff:.3g} (> {tolerance}) on the bundled sample: do not run it here")
    if abs(accuracy - float(manifest.sample["accuracy_pct"])) > 1e-6:
        raise BundleError(f"{model_path}: sample accuracy {accuracy:.2f}% here, "
                          f"{manifest.sample['accuracy_pct']:.2f}% on the host")
    return {"bundle": str(bundle), "engine": manifest.engine, "mode":
            manifest.quantization["mode"], "sample_images": int(sample["labels"].shape[0]),
            "max_abs_logit_diff": diff, "bit_exact": diff == 0.0,
            "sample_accuracy_pct": accuracy, "torch_version": torch.__version__}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("check", help="validate the config and the bundle, exit 0 or 2")
    s.add_argument("--config", type=Path, default=None,
                   help=f"config file (default: the first of {', '.join(DEFAULT_CONFIGS)}, "
                        f"else built-in defaults)")
    s.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one config key (repeatable)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = load_config(args.config or default_config_path(DEFAULT_CONFIGS), args.overrides,
                          BOARD_SECTIONS)
        result = check_bundle(Path(cfg["model"].dir), cfg["loop"].threads)
    except EdgeforgeError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"ok: {result['bundle']} ({result['mode']}, engine {result['engine']}, torch "
          f"{result['torch_version']}): sample of {result['sample_images']} images reproduced, "
          f"max |logit diff| {result['max_abs_logit_diff']:.3g}, accuracy "
          f"{result['sample_accuracy_pct']:.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
