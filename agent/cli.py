"""edge-agent: the board side of edgeforge.

    edge-agent run   [--config PATH] [--set section.key=value ...] [--duration S]
    edge-agent check [--config PATH] [--set section.key=value ...]
    edge-agent bench [--config PATH] [--set ...] [--batch-sizes 1,8] [--iters N] [--json]

`run` verifies the bundle, runs the timed inference loop and publishes telemetry over MQTT
through the on-disk spool; it runs until SIGTERM/SIGINT (or --duration). `check` validates
the config and the bundle (manifest, sha256, engine, one inference, the bundled sample
reproducing the host's logits and accuracy) and exits 0, or 2 with one line naming the
problem: installers and ExecStartPre use it. `bench` times the model on this board.

    edge-agent activate DIR [--trial]   copy a bundle into the versioned store, check it on
                                        this board, switch `current` to it (edge-deploy flash)
    edge-agent confirm                  end the current version's trial
    edge-agent rollback [--reason TEXT] switch `current` back to the previous version
    edge-agent versions                 the store as JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

# Nothing here imports torch at module level: agent.torch_matrix must vet it first (a torch that
# does not fit the CPU dies with SIGILL at import).
from agent.config import AgentConfig, default_config_path, load_config
from agent.errors import ConfigError, EdgeforgeError
from agent.interrupts import ctrl_c_held, interrupted
from agent.torch_matrix import check_runtime

if TYPE_CHECKING:
    from agent.fleet_key import FleetKey

log = logging.getLogger("agent")

DEFAULT_CONFIGS = ("/etc/edgeforge/config.yaml", "config.yaml")


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers such as "
                                         f"1,8, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return sizes


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {
        "run": sub.add_parser("run", help="run the inference loop and publish telemetry"),
        "check": sub.add_parser("check", help="validate the config and the bundle, exit 0 or 2"),
        "bench": sub.add_parser("bench", help="one-shot latency benchmark on this board"),
        "activate": sub.add_parser("activate", help="install a bundle into the versioned "
                                                    "store and switch to it"),
        "confirm": sub.add_parser("confirm", help="end the current version's trial"),
        "rollback": sub.add_parser("rollback", help="switch back to the previous version"),
        "versions": sub.add_parser("versions", help="the versioned store as JSON"),
    }
    commands["activate"].add_argument("source", type=Path, help="a bundle directory")
    commands["activate"].add_argument("--trial", action="store_true",
                                      help="on trial: the next agent start that fails to "
                                           "confirm it rolls back")
    commands["rollback"].add_argument("--reason", default="rollback requested on the board")
    for s in commands.values():
        s.add_argument("--config", type=Path, default=None,
                       help=f"config file (default: the first of {', '.join(DEFAULT_CONFIGS)}, "
                            f"else built-in defaults)")
        s.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="SECTION.KEY=VALUE", help="override one config key (repeatable)")
    commands["run"].add_argument("--duration", type=_positive(float), default=None,
                                 metavar="S", help="stop after S seconds (default: run until "
                                                   "SIGTERM or Ctrl-C)")
    b = commands["bench"]
    b.add_argument("--batch-sizes", type=_batch_sizes, default=None, metavar="1,8",
                   help="batch sizes to time (default: loop.batch_size)")
    b.add_argument("--iters", type=_positive(int), default=500, help="timed runs per batch size")
    b.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def store_command(args: argparse.Namespace, cfg: AgentConfig) -> int:
    """activate, confirm, rollback and versions: the versioned store behind model.dir."""
    from agent.store import CURRENT, Store

    model_dir = Path(cfg.model.dir)
    if args.command == "activate":
        from agent.update import activate

        if model_dir.name != CURRENT:
            raise ConfigError(f"model.dir {model_dir}: must end in /current (the store's link) "
                              f"for activate; for example /var/lib/edgeforge/models/current")
        result = activate(args.source, Store(model_dir.parent), fleet_key(cfg).current,
                          args.trial, cfg.model.engine, cfg.loop.threads)
    else:
        store = Store.for_model_dir(model_dir)
        if args.command == "confirm":
            current = store.current()
            result = {"confirmed": current, "pruned": store.confirm(current or "",
                                                                    cfg.update.keep)}
        elif args.command == "rollback":
            left, target = store.rollback(args.reason)
            result = {"from": left, "to": target["id"]}
        else:
            result = store.summary()
    print(json.dumps(result, indent=2))
    return 0


def fleet_key(cfg: AgentConfig) -> FleetKey:
    """The fleet key the board trusts: update.public_key and its rotations (the agent's)."""
    from agent.fleet_key import FleetKey, keys_path
    from agent.spool import spool_path

    return FleetKey.load(cfg.update.public_key,
                         keys_path(spool_path(cfg.spool.path, os.environ, os.geteuid() == 0)))


def setup_logging() -> None:
    """Log lines to stderr; journald adds its own timestamps, a terminal gets ours."""
    under_journald = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(message)s" if under_journald else \
        "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, datefmt="%H:%M:%S", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config or default_config_path(DEFAULT_CONFIGS), args.overrides,
                          AgentConfig)
        unproven = check_runtime()
        if unproven:
            log.warning("%s", unproven)
        if args.command in ("activate", "confirm", "rollback", "versions"):
            return store_command(args, cfg)
        with ctrl_c_held():  # numpy's native modules
            from agent.bench import bench, engine_line, table
            from agent.bundle import Bundle, describe

        if args.command == "run":
            with ctrl_c_held():
                from agent.runner import run_agent  # paho and psutil only where needed

            return run_agent(cfg, args.duration)
        bundle = Bundle.open(Path(cfg.model.dir), fleet_key(cfg).trusted())
        if args.command == "check":
            r = bundle.check(cfg.model.engine, cfg.loop.batch_size, cfg.loop.threads,
                             every=True)
            for row in r["engines"]:
                print(engine_line(row, r["sample_images"]))
            print(f"ok: {r['bundle']} runs on {describe(r)}: sample of {r['sample_images']} "
                  f"images reproduced, max |logit diff| {r['max_abs_logit_diff']:.3g}, accuracy "
                  f"{r['sample_accuracy_pct']:.2f}%")
            return 0
        result = bench(bundle, args.batch_sizes or [cfg.loop.batch_size], args.iters,
                       cfg.loop.warmup, cfg.loop.threads, cfg.model.engine)
        print(json.dumps(result, indent=2) if args.json else table(result))
        return 0
    except EdgeforgeError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C before the loop installed its own handler
        print("interrupted", file=sys.stderr)
        return interrupted()


if __name__ == "__main__":
    raise SystemExit(main())
