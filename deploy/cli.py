"""edge-deploy: put the agent and models on boards, and talk to them.

    edge-deploy keygen [--key PATH] [--force]
    edge-deploy sign BUNDLE [--key PATH] [--version N]
    edge-deploy flash USER@HOST[:PORT] [--bundle DIR] [--device-id ID] [--prefix /] ...
    edge-deploy update (--device ID ... | --all) BUNDLE [--force] [--timeout S]
    edge-deploy cmd DEVICE NAME [KEY=VALUE ...] [--key PATH] [--timeout S]
    edge-deploy rotate-key --new-key PATH (--device ID ... | --all) [--key PATH]
    edge-deploy wait DEVICE SHA256 [--since EPOCH] [--timeout S]
    edge-deploy render --device-id ID --out DIR [--bundle DIR] [--prefix /]   (for Ansible)
    edge-deploy broker [--broker-dir DIR]   mosquitto's password_file and acl_file for the fleet
    edge-deploy files [NAME]     where the installed unit, board config, installer and playbook are

The MQTT commands read the `mqtt` section of the config (--config, --set mqtt.host=...).
Exit 0 when every board did what was asked, 1 when one failed or did not answer, 2 for bad
input (with one line saying what to fix).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.config import (
    Invalid,
    LoopConfig,
    MqttConfig,
    default_config_path,
    load_config,
    loop_changes,
    number_argument,
)
from agent.errors import ConfigError, EdgeforgeError
from agent.fleet_key import pem_of, rotation_statement
from agent.interrupts import interrupted
from agent.signing import key_id
from agent.telemetry import COMMANDS
from agent.torch_matrix import PROFILES
from agent.untrusted import MAX_JSON_DEPTH, json_depth
from deploy import files
from deploy.broker import DEFAULT_DIR as DEFAULT_BROKER_DIR
from deploy.broker import BrokerFiles, mosquitto_conf
from deploy.errors import FleetError, UsageError
from deploy.keys import (
    DEFAULT_KEY,
    ensure_signed,
    keygen,
    load_private_key,
    public_path,
    sign_bundle,
)
from deploy.remote import FINAL_UPDATE_RESULTS, Fleet, new_request_id, update_args


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-deploy", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def broker_args(s: argparse.ArgumentParser) -> None:
        s.add_argument("--broker-dir", type=Path, default=DEFAULT_BROKER_DIR,
                       help=f"the fleet's broker credentials and mosquitto files (default: "
                            f"{DEFAULT_BROKER_DIR}): the board gets its own username and "
                            f"password from here")
        s.add_argument("--rotate-credential", action="store_true",
                       help="give the board a new broker password (reload mosquitto first)")

    def common(s: argparse.ArgumentParser, key: bool = False, mqtt: bool = False) -> None:
        if key:
            s.add_argument("--key", type=Path, default=DEFAULT_KEY,
                           help=f"private signing key (default: {DEFAULT_KEY})")
        if mqtt:
            s.add_argument("--config", type=Path, default=None,
                           help="config file (default: ./config.yaml if present)")
            s.add_argument("--set", dest="overrides", action="append", default=[],
                           metavar="SECTION.KEY=VALUE", help="override one config key")
            s.add_argument("--timeout", type=number_argument(0), default=120.0, metavar="S",
                           help="seconds to wait for the boards' answers (default 120)")

    s = sub.add_parser("keygen", help="make the fleet's Ed25519 signing key pair")
    common(s, key=True)
    s.add_argument("--force", action="store_true", help="replace an existing key")

    s = sub.add_parser("sign", help="sign a bundle's manifest")
    common(s, key=True)
    s.add_argument("bundle", type=Path)
    s.add_argument("--version", type=int, default=None,
                   help="release version, must grow (default: UTC time as YYYYMMDDhhmmss)")

    s = sub.add_parser("flash", help="install the agent and a bundle on a board over SSH")
    common(s, key=True, mqtt=True)
    s.add_argument("target", metavar="USER@HOST[:PORT]")
    s.add_argument("--bundle", type=Path, default=Path("models"))
    s.add_argument("--device-id", default=None, help="the board's MQTT id (default: hostname)")
    s.add_argument("--prefix", default="/", help="install root on the board (default /)")
    s.add_argument("--torch", default=None, metavar="SPEC",
                   help="torch for the board (default: the runtime matrix's pick)")
    s.add_argument("--extras", type=board_extras, default="images", metavar="LIST",
                   help=EXTRAS_HELP)
    s.add_argument("--profile", choices=PROFILES, default="both", help=PROFILE_HELP)
    s.add_argument("--identity", type=Path, default=None, help="ssh private key (ssh -i)")
    s.add_argument("--ssh-option", action="append", default=[], metavar="OPT",
                   help="extra ssh -o option, e.g. StrictHostKeyChecking=accept-new")
    s.add_argument("--restart-command", default=None, metavar="CMD",
                   help="how the board restarts the agent (default: systemctl restart "
                        "edge-agent when systemd runs there)")
    s.add_argument("--no-wait", action="store_true",
                   help="do not wait for the board's birth message (no broker reachable)")
    broker_args(s)

    s = sub.add_parser("render", help="write one board's files for the Ansible playbook")
    common(s, key=True, mqtt=True)
    s.add_argument("--bundle", type=Path, default=Path("models"))
    s.add_argument("--device-id", required=True, help="the board's MQTT id")
    s.add_argument("--prefix", default="/", help="install root on the board (default /)")
    s.add_argument("--out", type=Path, required=True, help="folder to write the files into")
    broker_args(s)
    s.add_argument("--torch", default=None, metavar="SPEC",
                   help="torch for the board (default: the runtime matrix's pick)")
    s.add_argument("--extras", type=board_extras, default="images", metavar="LIST",
                   help=EXTRAS_HELP)
    s.add_argument("--profile", choices=PROFILES, default="both", help=PROFILE_HELP)

    s = sub.add_parser("files", help="print where the installed playbook, unit, board config "
                                     "and installer are")
    s.add_argument("name", nargs="?", default=None,
                   help=f"one of {', '.join(files.PACKAGED)} (default: list them all)")

    s = sub.add_parser("update", help="send a signed model update over MQTT")
    common(s, key=True, mqtt=True)
    s.add_argument("bundle", type=Path)
    who = s.add_mutually_exclusive_group(required=True)
    who.add_argument("--device", action="append", default=[], metavar="ID")
    who.add_argument("--all", action="store_true", help="every board whose status is online")
    s.add_argument("--force", action="store_true", help="install even if not a newer version")
    s.add_argument("--no-watch", action="store_true",
                   help="return when applied, without waiting for the trial's verdict")
    s.add_argument("--canary-pct", type=number_argument(0), default=10.0, metavar="PCT",
                   help="the first wave: this share of the boards, at least one (default 10; "
                        "100 sends to all at once)")
    s.add_argument("--growth", type=number_argument(0), default=2.0, metavar="X",
                   help="each later wave is X times the one before (default 2)")
    s.add_argument("--max-failed-pct", type=number_argument(0), default=0.0, metavar="PCT",
                   help="stop after a wave in which more than this share rolled back, was "
                        "refused or did not answer (default 0: any)")
    s.add_argument("--dry-run", action="store_true",
                   help="print the waves and send nothing")

    s = sub.add_parser("cmd", help="send one command to a board and print its answer")
    common(s, key=True, mqtt=True)
    s.add_argument("device")
    s.add_argument("name", help="benchmark | set | rollback | diagnostics")
    s.add_argument("args", nargs="*", metavar="KEY=VALUE",
                   help="arguments, values as JSON (rate_hz=5, batch_sizes=[1,8]); a value "
                        "that is not JSON is a string")

    s = sub.add_parser("broker", help="write the broker's password_file and acl_file for every "
                                      "flashed board, and the operator's credentials")
    common(s, mqtt=True)
    broker_args(s)
    s.add_argument("--discovery-prefix", default="homeassistant",
                   help="Home Assistant's discovery prefix (default homeassistant)")

    s = sub.add_parser("rotate-key", help="make boards trust a new fleet signing key, in a "
                                          "command signed by the current one")
    common(s, key=True, mqtt=True)
    s.add_argument("--new-key", type=Path, required=True,
                   help="the new private key (edge-deploy keygen --key PATH)")
    who = s.add_mutually_exclusive_group(required=True)
    who.add_argument("--device", action="append", default=[], metavar="ID")
    who.add_argument("--all", action="store_true", help="every board whose status is online")

    s = sub.add_parser("wait", help="wait until a board reports running a model (Ansible)")
    common(s, mqtt=True)
    s.add_argument("device")
    s.add_argument("sha256")
    s.add_argument("--since", type=number_argument(0), default=0.0,
                   help="ignore birth messages older than this epoch time")
    return p


@dataclass(frozen=True)
class DeployConfig:
    """What edge-deploy's MQTT commands read: the broker, as the boards see it."""

    mqtt: MqttConfig = field(default_factory=MqttConfig)


def mqtt_config(args: argparse.Namespace) -> MqttConfig:
    return load_config(args.config or default_config_path(["config.yaml"]), args.overrides,
                       DeployConfig).mqtt


def parse_args_kv(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE arguments; values parsed as JSON (1e12 is a number), else taken as text.

    Raises:
        ConfigError: not KEY=VALUE, a key given twice, or a non-finite number.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"argument {item!r}: expected KEY=VALUE, e.g. rate_hz=5")
        if key in out:
            raise ConfigError(f"argument {key!r} is given twice: give it once")
        if json_depth(value.encode()) > MAX_JSON_DEPTH:
            raise ConfigError(f"argument {key!r}: nested more than {MAX_JSON_DEPTH} levels deep")
        try:
            out[key] = json.loads(value, parse_constant=_no_constant)
        except ValueError as exc:
            if "not a finite number" in str(exc):
                raise ConfigError(f"argument {item!r}: {value} is not a finite number") from None
            out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number")


def check_command(name: str, args: dict[str, Any]) -> None:
    """Refuse here what the board would refuse: an unknown command, a bad `set`.

    Raises:
        ConfigError: the command name or a `set` value, with what is allowed.
    """
    own = {"update_model": " (send models with edge-deploy update)",
           "rotate_key": " (rotate the fleet key with edge-deploy rotate-key)"}
    if name not in COMMANDS or name in own:
        known = ", ".join(c for c in COMMANDS if c not in own)
        hint = own.get(name, "")
        raise ConfigError(f"unknown command {name!r}{hint}: use one of {known}")
    if name != "set":
        return
    try:
        changes: dict[str, Any] = loop_changes(args)
    except ValueError as exc:
        raise ConfigError(f"{exc} (e.g. set window_s=5)") from None
    try:
        replace(LoopConfig(), **changes)
    except Invalid as exc:
        raise ConfigError(f"set {exc}") from None


def online_states(fleet: Fleet, devices: Sequence[str]) -> dict[str, str]:
    """Each named device's retained status: online, offline, or unknown (none retained)."""
    states = fleet.devices()
    return {d: states.get(d, "unknown") for d in devices}


def cmd_update(args: argparse.Namespace) -> int:
    waves([], args.canary_pct, args.growth)  # the wave settings, checked before any work
    if not 0 <= args.max_failed_pct <= 100:
        raise ConfigError(f"--max-failed-pct {args.max_failed_pct:g}: a share from 0 to 100")
    key = load_private_key(args.key)
    signature = ensure_signed(args.bundle, key)
    payload = update_args(args.bundle, args.force)
    rows = []
    failed = 0
    with Fleet(mqtt_config(args), key) as fleet:
        devices = list(dict.fromkeys(args.device))
        if devices:
            states = online_states(fleet, devices)
            for d in [d for d in devices if states[d] != "online"]:
                rows.append((d, "?", "?", "not sent", f"the board is {states[d]} (its "
                             f"retained status on the broker); nothing was sent to it"))
                failed += 1
            devices = [d for d in devices if states[d] == "online"]
        if args.all:
            states = fleet.devices()
            devices = sorted(d for d, state in states.items() if state == "online")
            offline = sorted(d for d, state in states.items() if state != "online")
            if offline:
                print(f"skipping offline: {', '.join(offline)}", file=sys.stderr)
            if not devices:
                raise FleetError("no board is online (none has a retained status 'online')")
        if not devices:
            print(table(("device", "old version", "new version", "result", "reason"), rows))
            return 1
        plan = waves(devices, args.canary_pct, args.growth)
        for n, wave in enumerate(plan, 1):
            print(f"wave {n}: {len(wave)} board(s): {', '.join(wave)}", file=sys.stderr)
        if args.dry_run:
            print(f"dry run: version {signature.version} would go to {len(devices)} board(s) in "
                  f"{len(plan)} wave(s), stopping after a wave with more than "
                  f"{args.max_failed_pct:g} % failed; nothing was sent")
            return 0
        fleet.subscribe([fleet.topics(d).cmd_result for d in devices])
        finals = ("applied", *FINAL_UPDATE_RESULTS) if args.no_watch else FINAL_UPDATE_RESULTS

        def progress(device: str, msg: dict[str, Any]) -> None:
            print(f"  {device}: {msg.get('result')} {msg.get('reason') or ''}".rstrip(),
                  file=sys.stderr)

        for n, wave in enumerate(plan, 1):
            pending = {(d, fleet.send(d, "update_model", payload)): "update_model" for d in wave}
            print(f"wave {n}/{len(plan)}: sent version {signature.version} to {len(wave)} "
                  f"board(s); waiting up to {args.timeout:g} s", file=sys.stderr)
            done = fleet.answers(pending, args.timeout,
                                 lambda m: m.get("result") in finals, progress)
            wave_failed = 0
            for device, rid in pending:
                msg = done.get((device, rid))
                data = (msg or {}).get("data") or {}
                result = msg.get("result") if msg else "no answer"
                ok = bool(msg and msg.get("ok"))
                wave_failed += not ok
                reason = (msg or {}).get("reason") or (
                    "" if msg else f"nothing within {args.timeout:g} s (offline? see "
                                   f"edge-deploy cmd {device} diagnostics)")
                rows.append((device, str(data.get("from") or "?"), str(data.get("to") or "?"),
                             str(result), str(reason)))
            failed += wave_failed
            if 100 * wave_failed / len(wave) > args.max_failed_pct and n < len(plan):
                left = [d for w in plan[n:] for d in w]
                why = (f"the rollout stopped after wave {n}: {wave_failed} of {len(wave)} "
                       f"failed (over --max-failed-pct {args.max_failed_pct:g})")
                print(why, file=sys.stderr)
                rows += [(d, "?", "?", "not sent", f"{why}; still on its old version")
                         for d in left]
                failed += len(left)
                break
    print(table(("device", "old version", "new version", "result", "reason"), rows))
    return 1 if failed else 0


def waves(devices: Sequence[str], canary_pct: float, growth: float) -> list[list[str]]:
    """`devices` in waves: the canary (canary_pct of them, at least one), then each wave
    `growth` times the one before, the last taking whatever is left.

    Raises:
        ConfigError: a share outside 0-100 or a growth below 1.
    """
    if not 0 < canary_pct <= 100:
        raise ConfigError(f"--canary-pct {canary_pct:g}: a share above 0 and at most 100")
    if growth < 1:
        raise ConfigError(f"--growth {growth:g}: at least 1 (each wave as big as the last)")
    out: list[list[str]] = []
    size = max(1.0, len(devices) * canary_pct / 100)
    i = 0
    while i < len(devices):
        take = max(1, math.ceil(size - 1e-9))
        out.append(list(devices[i:i + take]))
        i += take
        size *= growth
    return out


def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A left-aligned text table; the last column is not padded."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(head)]
    widths[-1] = 0
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [head, *rows])


def cmd_cmd(args: argparse.Namespace) -> int:
    payload = parse_args_kv(args.args)
    check_command(args.name, payload)
    key = load_private_key(args.key)
    with Fleet(mqtt_config(args), key) as fleet:
        state = online_states(fleet, [args.device])[args.device]
        if state != "online":
            raise FleetError(f"{args.device} is {state} (its retained status on the broker): "
                             f"nothing was sent (edge-monitor --once lists the boards)")
        fleet.subscribe([fleet.topics(args.device).cmd_result])
        rid = fleet.send(args.device, args.name, payload)
        done = fleet.answers({(args.device, rid): args.name}, args.timeout,
                             lambda m: m.get("result") != "applied")
    msg = done.get((args.device, rid))
    if msg is None:
        raise FleetError(f"{args.device} did not answer {args.name} within {args.timeout:g} s "
                         f"(is it online? edge-deploy update --all lists who is)")
    data = msg.get("data") or {}
    print(f"{args.device} {args.name}: {msg.get('result')}"
          + (f" ({msg['reason']})" if msg.get("reason") else ""))
    if not msg.get("ok"):
        return 1  # the reason line says what went wrong; no data dump on a refusal
    if "table" in data:
        print(data.pop("table"))
    elif data:
        print(json.dumps(data, indent=2))
    return 0 if msg.get("ok") else 1


def targets(fleet: Fleet, args: argparse.Namespace) -> tuple[list[str], list[tuple[str, str]]]:
    """The online boards of --device or --all, and a (device, why) for each named board
    that is not online (nothing is sent to it)."""
    if args.all:
        states = fleet.devices()
        devices = sorted(d for d, state in states.items() if state == "online")
        if not devices:
            raise FleetError("no board is online (none has a retained status 'online')")
        return devices, []
    states = online_states(fleet, list(dict.fromkeys(args.device)))
    return ([d for d, s in states.items() if s == "online"],
            [(d, f"the board is {s}: nothing was sent to it") for d, s in states.items()
             if s != "online"])


def cmd_rotate_key(args: argparse.Namespace) -> int:
    old, new = load_private_key(args.key), load_private_key(args.new_key)
    new_id = key_id(new.public_key())
    rows: list[tuple[str, str, str]] = []
    with Fleet(mqtt_config(args), old) as fleet:
        devices, skipped = targets(fleet, args)
        rows += [(d, "not sent", why) for d, why in skipped]
        fleet.subscribe([fleet.topics(d).cmd_result for d in devices])
        pending = {}
        for d in devices:
            rid = new_request_id()
            proof = base64.b64encode(new.sign(rotation_statement(d, rid, new_id))).decode()
            pending[(d, fleet.send(d, "rotate_key", {"public_key": pem_of(new.public_key()),
                                                     "proof": proof}, rid))] = "rotate_key"
        done = fleet.answers(pending, args.timeout, lambda m: True)
    for d, rid in pending:
        msg = done.get((d, rid))
        rows.append((d, str(msg.get("result")) if msg else "no answer",
                     str((msg or {}).get("reason") or f"nothing within {args.timeout:g} s")))
    print(table(("device", "result", "reason"), rows))
    ok = all(r[1] in ("done", "unchanged") for r in rows)
    if ok:
        print(f"every board trusts key {new_id} now: sign with {args.new_key} from here on "
              f"(and flash new boards with it)", file=sys.stderr)
    return 0 if ok else 1


def cmd_broker(args: argparse.Namespace) -> int:
    broker = BrokerFiles(args.broker_dir, mqtt_config(args).topic_prefix, args.discovery_prefix)
    username, _ = broker.operator()
    boards = sorted(broker.secrets["boards"])
    print(f"wrote {broker.dir}/passwd and {broker.dir}/acl: {len(boards)} board(s)"
          f"{': ' + ', '.join(boards) if boards else ''}, and the operator {username} "
          f"({broker.dir}/operator.yaml: pass it as --config to edge-deploy and edge-monitor)")
    print("mosquitto.conf, in the boards' listener (then: systemctl reload mosquitto):")
    print(mosquitto_conf(broker.dir), end="")
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    with Fleet(mqtt_config(args)) as fleet:
        info = fleet.wait_info(args.device, args.sha256, args.timeout, args.since or None)
    if info is None:
        raise FleetError(f"{args.device} did not report model {args.sha256[:12]}... within "
                         f"{args.timeout:g} s")
    print(f"{args.device}: running {args.sha256[:12]}... (pid {info.get('pid')})")
    return 0


def cmd_files(name: str | None) -> int:
    """Print the installed path of one packaged file, or of each."""
    if name is None:
        for each in files.PACKAGED:
            print(f"{each:<30} {files.path(each)}")
        return 0
    if name not in files.PACKAGED:
        raise UsageError(f"files {name!r}: not a packaged file (one of "
                         f"{', '.join(files.PACKAGED)})")
    print(files.path(name))
    return 0


BOARD_EXTRAS = ("images", "video")
PROFILE_HELP = ("the board's engine runtimes: torch (TorchScript), onnx (ONNX Runtime; no torch "
                "on the board) or both (the agent times them there and runs the faster); "
                "default both")
EXTRAS_HELP = ("the board's input libraries, comma-separated: images (Pillow, watchdog: "
               "folder and mqtt sources), video (also PyAV: video files, streams, cameras), "
               "or none (random and sample only); default images")


def board_extras(text: str) -> str:
    """--extras: a checked, comma-separated list of the board package's extras ("" = none)."""
    names = [n.strip() for n in text.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in BOARD_EXTRAS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown extra(s) {', '.join(unknown)} (choose "
                                         f"from {', '.join(BOARD_EXTRAS)}, or none)")
    return ",".join(dict.fromkeys(names))


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "keygen":
            kid = keygen(args.key, args.force)
            print(f"key {kid}: private {args.key.expanduser()} (keep it on this host), public "
                  f"{public_path(args.key.expanduser())} (edge-deploy flash installs it)")
            return 0
        if args.command == "sign":
            sig = sign_bundle(args.bundle, load_private_key(args.key), args.version)
            print(f"signed {args.bundle}: version {sig.version}, key {sig.key_id}, manifest "
                  f"sha256 {sig.manifest_sha256[:12]}...")
            return 0
        if args.command == "flash":
            from deploy.flash import flash

            return flash(args)
        if args.command == "render":
            from deploy.flash import render

            return render(args)
        if args.command == "files":
            return cmd_files(args.name)
        if args.command == "update":
            return cmd_update(args)
        if args.command == "wait":
            return cmd_wait(args)
        if args.command == "broker":
            return cmd_broker(args)
        if args.command == "rotate-key":
            return cmd_rotate_key(args)
        return cmd_cmd(args)
    except EdgeforgeError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return interrupted()


if __name__ == "__main__":
    raise SystemExit(main())

