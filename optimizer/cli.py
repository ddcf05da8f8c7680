"""edge-optimize: build a verified int8 board bundle from a trained (or trainable) CNN.

    edge-optimize run|train|prune|quantize|export|report [--config PATH] [--set s.k=v ...]
                  [--out DIR] [--data cifar10|synthetic|folder]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from agent.config import AgentConfig, default_config_path, load_config
from agent.errors import ConfigError, EdgeforgeError
from agent.interrupts import interrupted
from optimizer.config import SOURCES, OptimizerConfig

STEPS = {  # command -> (the pipeline's function, what it does)
    "run": ("step_run", "the whole pipeline (trains only when no baseline exists)"),
    "train": ("step_train", "train the fp32 baseline -> baseline_cnn.pth"),
    "prune": ("step_prune", "prune + masked fine-tune -> pruned_cnn.pth"),
    "quantize": ("step_quantize", "int8 behind the accuracy gate -> quantized_cnn.pt"),
    "export": ("step_export",
               "the board files (TorchScript, ONNX, ExecuTorch), each checked in a fresh "
               "process -> quantized_cnn_scripted.pt, .onnx, .pte, manifest.json"),
    "report": ("step_report", "measure every variant -> report.md/.json/.png"),
}


class MissingExtra(ConfigError):
    """A host-only library is not installed (a board install, or edgeforge without [host])."""


def load_pipeline() -> ModuleType:
    """optimizer.pipeline, whose progress bars and plots need the host extra.

    Raises:
        MissingExtra: tqdm or matplotlib is not installed; the message says what to install.
    """
    try:
        from optimizer import pipeline
    except ModuleNotFoundError as exc:
        if exc.name not in ("tqdm", "matplotlib"):
            raise
        raise MissingExtra(f"edge-optimize needs {exc.name}, part of the host extra: "
                           f"pip install 'edgeforge[host]'") from None
    return pipeline


def check_extras(cfg: OptimizerConfig, command: str) -> None:
    """An export the config asks for by name whose package is missing, before any step runs.

    Raises:
        MissingExtra: export.executorch is true and executorch is not installed.
    """
    from optimizer import executorch_export

    if (command in ("run", "export") and cfg.export.executorch
            and executorch_export.installed() is None):
        raise MissingExtra("export.executorch: the ExecuTorch export needs the executorch "
                           "package (pip install executorch, or pip install "
                           "'edgeforge[host]'; or set export.executorch=false)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-optimize", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in STEPS.items():
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.add_argument("--config", type=Path, default=None,
                       help="config file (default: ./config.yaml if present, else built-in "
                            "defaults)")
        s.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="SECTION.KEY=VALUE", help="override one config key (repeatable)")
        s.add_argument("--out", type=Path, default=Path("models"),
                       help="bundle directory (default: models/)")
        s.add_argument("--data", choices=SOURCES, default=None,
                       help="dataset (overrides data.source; synthetic = offline stand-in; "
                            "folder = data.root's train/<class>/ images)")
    return p


def check_out(out: Path) -> None:
    """The bundle folder can be created and written, checked before any training starts.

    Raises:
        ConfigError: --out is a file, or the folder cannot be created or written.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder (name a folder for the "
                          f"bundle)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write there ({exc.strerror}): name a folder "
                          f"you can write to") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.source={args.data}")
    try:
        config_path = args.config or default_config_path(["config.yaml"])
        cfg = load_config(config_path, overrides, OptimizerConfig)
        # The board sections are checked here too, so a config.yaml is found wrong on the
        # workstation before it is copied to a board.
        load_config(config_path, overrides, AgentConfig)
        check_out(args.out)
        check_extras(cfg, args.command)
        pipeline = load_pipeline()
        getattr(pipeline, STEPS[args.command][0])(pipeline.Context(cfg=cfg, out=args.out))
    except EdgeforgeError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return interrupted()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
