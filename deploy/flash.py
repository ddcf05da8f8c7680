"""`edge-deploy flash USER@HOST[:PORT]`: the agent and a signed bundle onto one board, over SSH.

Only the system's OpenSSH client is used (key authentication, BatchMode): each step is one
`ssh ... sh -c SCRIPT`, with files streamed on stdin. The board needs python3 and tar; a
user other than root installing into / needs passwordless sudo (`sudo -n` runs the steps).

    1. probe      one round trip: machine, uid, hostname, and the sha256 of everything
                  flash manages (install stamp, config, public key, unit, current version)
    2. install    only when the agent's source or torch changed: the agent alone (the
                  installed `agent` package and the board's pyproject.toml), a venv in
                  <prefix>/opt/edgeforge/venv, the torch matrix's torch, the agent
    3. files      /etc/edgeforge/config.yaml (the board config plus per-board values),
                  signing.pub, edge-agent.service; each written only when it differs
    4. bundle     copied to <prefix>/var/lib/edgeforge/incoming, then `edge-agent activate
                  --trial` on the board: verified (signature, sha256) and checked on the
                  board, then `current` switched atomically; a bundle that fails stays out
    5. restart    systemctl restart (or --restart-command) when anything changed, then wait
                  for the board's `info` birth message naming the new sha256: then `edge-agent
                  confirm`; silence or another sha means `edge-agent rollback` and a restart

A second run with nothing changed stops after the probe.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from agent.config import AgentConfig, load_config
from agent.manifest import MANIFEST, Manifest
from agent.signing import Signature
from agent.store import version_id
from deploy import files
from deploy.broker import BrokerFiles
from deploy.errors import FleetError, UsageError
from deploy.keys import ensure_signed, load_private_key, public_path
from deploy.remote import Fleet


@dataclass(frozen=True)
class Target:
    user: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def parse_target(text: str) -> Target:
    """USER@HOST[:PORT].

    Raises:
        UsageError: not of that form.
    """
    user, at, rest = text.partition("@")
    host, colon, port = rest.partition(":")
    if not at or not user or not host or (colon and not port.isdigit()):
        raise UsageError(f"target {text!r}: expected USER@HOST or USER@HOST:PORT, e.g. pi@board1")
    number = int(port) if colon else 22
    if not 1 <= number <= 65535:
        raise UsageError(f"target {text!r}: port must be 1-65535")
    return Target(user, host, number)


class Ssh:
    """Runs shell scripts on the board through the system's ssh client."""

    def __init__(self, target: Target, identity: Path | None, options: list[str],
                 sudo: bool = False) -> None:
        """`sudo`: run each script with `sudo -n` (a non-root user installing into /)."""
        self.target = target
        self.sudo = sudo
        self.base = ["ssh", "-p", str(target.port), "-o", "BatchMode=yes",
                     "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=15"]
        for option in options:
            self.base += ["-o", option]
        if identity is not None:
            self.base += ["-i", str(identity)]
        self.base.append(f"{target.user}@{target.host}")

    def run(self, script: str, stdin: bytes = b"", what: str = "a step",
            timeout: float = 1800) -> str:
        """Run `script` with `sh -c`; return stdout.

        Raises:
            FleetError: unreachable (ssh's 255) or the script failed; one line with why.
        """
        shell = f"sh -c {shlex.quote('set -e; ' + script)}"
        cmd = [*self.base, f"sudo -n {shell}" if self.sudo else shell]
        try:
            proc = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout)
        except FileNotFoundError:
            raise FleetError("ssh: not found (install OpenSSH's client)") from None
        except subprocess.TimeoutExpired:
            raise FleetError(f"{self.target}: {what} took over {timeout:g} s") from None
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        last = err[-1] if err else f"exit {proc.returncode}"
        if proc.returncode == 255:
            raise FleetError(f"cannot reach {self.target} over SSH ({last}): check the address, "
                             f"that sshd runs there and that your key is authorised")
        if proc.returncode != 0:
            hint = (" (flash needs root there: allow passwordless sudo for this user, or "
                    "flash as root)") if "sudo" in last and "password" in last else ""
            raise FleetError(f"{self.target}: {what} failed: {last}{hint}")
        return proc.stdout.decode(errors="replace")


def install_stamp(source_digest: str, torch: str | None, extras: str = "",
                  profile: str = "both") -> str:
    """What the board's .stamp says when its install matches: source, torch, extras and
    the runtime profile."""
    return sha(f"{source_digest} {torch or 'matrix'} {extras} {profile}".encode())


def bundle_tar(bundle: Path) -> bytes:
    """The board's files of a signed bundle: manifest, signature, board model, sample."""
    manifest = Manifest.read(bundle)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in manifest.release_files():
            tar.add(bundle / name, arcname=name)
    return buf.getvalue()


def board_config(args: argparse.Namespace, prefix: str, device: str) -> tuple[AgentConfig,
                                                                              bytes]:
    """The board's config.yaml: the board config, --set overrides, then the per-board
    values flash owns (device id, store, public key, spool, and the board's own broker
    credential from --broker-dir: deploy/broker.py)."""
    path = args.config or files.path(files.BOARD_CONFIG)
    owned = [f"device.id={device}", f"model.dir={prefix}/var/lib/edgeforge/models/current",
             f"update.public_key={prefix}/etc/edgeforge/signing.pub",
             f"spool.path={prefix}/var/lib/edgeforge/spool.sqlite3"]
    cfg = load_config(path, [*args.overrides, *owned], AgentConfig)
    broker = BrokerFiles(args.broker_dir, cfg.mqtt.topic_prefix,
                         cfg.homeassistant.discovery_prefix)
    username, password = broker.board(cfg.device.resolved_id, args.rotate_credential)
    cfg = load_config(path, [*args.overrides, *owned, f"mqtt.username={username}",
                             f"mqtt.password={password}"], AgentConfig)
    plain = asdict(cfg)
    text = (f"# Written by edge-deploy flash for {device}; flash again rather than editing.\n"
            + yaml.safe_dump(plain, sort_keys=False))
    return cfg, text.encode()


def unit_file(prefix: str) -> bytes:
    text = files.read(files.UNIT).decode()
    if prefix:
        for path in ("/opt/edgeforge", "/etc/edgeforge/config.yaml", "/var/lib/edgeforge"):
            text = text.replace(path, prefix + path)
    return text.encode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


PROBE = """P={p}
echo "machine=$(uname -m)"
echo "uid=$(id -u)"
echo "hostname=$(hostname)"
echo "systemd=$([ -d /run/systemd/system ] && echo 1 || echo 0)"
echo "stamp=$(cat "$P/opt/edgeforge/.stamp" 2>/dev/null || true)"
echo "current=$(basename "$(readlink "$P/var/lib/edgeforge/models/current" 2>/dev/null || true)")"
for f in etc/edgeforge/config.yaml etc/edgeforge/signing.pub \
         etc/systemd/system/edge-agent.service; do
    echo "$f=$(sha256sum "$P/$f" 2>/dev/null | cut -d' ' -f1)"
done
"""

INSTALL = """P={p}
mkdir -p "$P/opt/edgeforge"
rm -rf "$P/opt/edgeforge/src.new" && mkdir "$P/opt/edgeforge/src.new"
tar xzf - -C "$P/opt/edgeforge/src.new"
rm -rf "$P/opt/edgeforge/src" && mv "$P/opt/edgeforge/src.new" "$P/opt/edgeforge/src"
cd "$P/opt/edgeforge/src"
python3 -c "import ensurepip, venv" 2>/dev/null || {{
    [ "$(id -u)" = 0 ] || {{
        echo "python3-venv is missing: apt-get install python3-venv" >&2; exit 3; }}
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
}}
SPECS=$(python3 -m agent.torch_matrix recommend --profile {profile} --torch {torch}) || {{
    echo "no known-good runtime for $(uname -m): pass --torch SPEC, or --profile onnx" >&2
    exit 3; }}
V="$P/opt/edgeforge/venv"
[ -x "$V/bin/python" ] || python3 -m venv "$V"
"$V/bin/pip" install --quiet --disable-pip-version-check $SPECS numpy
echo "$SPECS" > "$P/opt/edgeforge/torch-constraint.txt"
UNUSED={unused}
[ -z "$UNUSED" ] || "$V/bin/pip" uninstall --quiet --yes $UNUSED 2>/dev/null || true
"$V/bin/pip" install --quiet --disable-pip-version-check \
    -c "$P/opt/edgeforge/torch-constraint.txt" {package}
"$V/bin/python" -m agent.torch_matrix status
echo {stamp} > "$P/opt/edgeforge/.stamp"
"""

# What a board of each profile sheds when it moves there (the onnx profile has no torch).
UNUSED = {"torch": "onnxruntime", "onnx": "torch", "both": ""}

PUT = """f={f}
mkdir -p "$(dirname "$f")"
cat > "$f.tmp"
chmod {mode} "$f.tmp"
mv "$f.tmp" "$f"
"""

SYSTEM = """P={p}
if [ -z "$P" ] && [ "$(id -u)" = 0 ]; then
    id -u edgeforge >/dev/null 2>&1 || \
        useradd --system --home-dir /var/lib/edgeforge --shell /usr/sbin/nologin edgeforge
    chown edgeforge:edgeforge /etc/edgeforge/config.yaml  # its broker password: 0600
    mkdir -p /var/lib/edgeforge && chown -R edgeforge:edgeforge /var/lib/edgeforge
fi
if [ -z "$P" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload && systemctl enable --quiet edge-agent.service
else
    mkdir -p "$P/etc/systemd/system/multi-user.target.wants"
    ln -sf ../edge-agent.service "$P/etc/systemd/system/multi-user.target.wants/edge-agent.service"
fi
"""

ACTIVATE = """P={p}
I="$P/var/lib/edgeforge/incoming/{vid}"
rm -rf "$I" && mkdir -p "$I" && tar xf - -C "$I"
set +e
"$P/opt/edgeforge/venv/bin/edge-agent" activate "$I" {trial} --config "$P/etc/edgeforge/config.yaml"
rc=$?
rm -rf "$I"
[ -z "$P" ] && [ "$(id -u)" = 0 ] && chown -R edgeforge:edgeforge /var/lib/edgeforge
exit $rc
"""

STORE = """P={p}
"$P/opt/edgeforge/venv/bin/edge-agent" {verb} --config "$P/etc/edgeforge/config.yaml"
[ -z "$P" ] && [ "$(id -u)" = 0 ] && chown -R edgeforge:edgeforge /var/lib/edgeforge || true
"""


def release_of(args: argparse.Namespace) -> tuple[Manifest, Signature, str, str]:
    """The --bundle, signed with --key if it is not yet: (manifest, signature, model sha256,
    version id)."""
    if not (args.bundle / MANIFEST).is_file():
        raise UsageError(f"--bundle {args.bundle}: no manifest.json (build one with edge-optimize "
                     f"run, or point --bundle at it)")
    signature = ensure_signed(args.bundle, load_private_key(args.key))
    manifest = Manifest.read(args.bundle)
    model_sha = str(manifest.files[manifest.board_model]["sha256"])
    return manifest, signature, model_sha, version_id(signature.version, model_sha)


def say(message: str) -> None:
    print(f"flash: {message}", file=sys.stderr, flush=True)


def flash(args: argparse.Namespace) -> int:
    """Run `edge-deploy flash`; see the module docstring. Returns the exit code."""
    target = parse_target(args.target)
    prefix = str(args.prefix).rstrip("/")
    if prefix and not prefix.startswith("/"):
        raise UsageError(f"--prefix {args.prefix!r}: must be an absolute path on the board")
    manifest, signature, model_sha, vid = release_of(args)
    src, stamp = files.agent_source()
    stamp = install_stamp(stamp, args.torch, args.extras, args.profile)
    ssh = Ssh(target, args.identity, args.ssh_option)
    q = shlex.quote

    say(f"probing {target}")
    facts = dict(line.partition("=")[::2] for line in
                 ssh.run(PROBE.format(p=q(prefix)), what="the probe").splitlines())
    if facts.get("uid") != "0" and not prefix:
        ssh = Ssh(target, args.identity, args.ssh_option, sudo=True)
    device = args.device_id or facts.get("hostname") or target.host
    cfg, config_bytes = board_config(args, prefix, device)
    pub = public_path(args.key.expanduser()).read_bytes()
    unit = unit_file(prefix)
    changed = []

    if facts.get("stamp") != stamp:
        say(f"installing the agent into {prefix}/opt/edgeforge (venv, {args.profile} "
            f"profile's runtimes, edgeforge; minutes on a Pi)")
        ssh.run(INSTALL.format(p=q(prefix), torch=q(args.torch or ""), stamp=stamp,
                               profile=q(args.profile), unused=q(UNUSED[args.profile]),
                               package=q(f".[{args.extras}]" if args.extras else ".")), src,
                "installing the agent")
        changed.append("agent")
    for rel, data, mode in (("etc/edgeforge/config.yaml", config_bytes, "0600"),
                            ("etc/edgeforge/signing.pub", pub, "0644"),
                            ("etc/systemd/system/edge-agent.service", unit, "0644")):
        if facts.get(rel) != sha(data):
            ssh.run(PUT.format(f=q(f"{prefix}/{rel}"), mode=mode), data, f"writing /{rel}")
            changed.append(rel.rsplit("/", 1)[-1])
    if changed:
        ssh.run(SYSTEM.format(p=q(prefix)), what="enabling edge-agent.service")

    restart = args.restart_command
    if restart is None and facts.get("systemd") == "1" and not prefix:
        restart = "systemctl daemon-reload && systemctl restart edge-agent.service"
    wait = restart is not None and not args.no_wait
    previous = facts.get("current") or None
    if previous != vid:
        say(f"activating {vid} (was {previous or 'none'}): verified and checked on the board")
        ssh.run(ACTIVATE.format(p=q(prefix), vid=q(vid), trial="--trial" if wait else ""),
                bundle_tar(args.bundle), "activating the bundle")
        changed.append("bundle")
    if not changed:
        print(f"{device} ({target}): unchanged, {vid} already current; nothing to do")
        return 0
    if restart is None:
        print(f"{device} ({target}): installed {vid} ({', '.join(changed)}); systemd is not "
              f"running there, so edge-agent.service starts at the next boot")
        return 0
    if not wait:
        ssh.run(restart, what="restarting the agent")
        print(f"{device} ({target}): installed {vid} ({', '.join(changed)}) and restarted")
        return 0
    with Fleet(cfg.mqtt) as fleet:
        fleet.subscribe([fleet.topics(device).info])
        say(f"restarting the agent; waiting up to {args.timeout:g} s for {device}'s birth "
            f"message with {model_sha[:12]}...")
        since = time.time()
        ssh.run(restart, what="restarting the agent")
        info = fleet.wait_info(device, model_sha, args.timeout)
    if info is not None:
        if "bundle" in changed:
            ssh.run(STORE.format(p=q(prefix), verb="confirm"), what="confirming")
        print(f"{device} ({target}): running {vid} ({', '.join(changed)} changed); birth "
              f"message after {time.time() - since:.1f} s, pid {info.get('pid')}")
        return 0
    if "bundle" in changed and previous:
        ssh.run(STORE.format(p=q(prefix), verb="rollback"), what="rolling back")
        ssh.run(restart, what="restarting the agent")
        raise FleetError(f"{device} did not report {vid} within {args.timeout:g} s: rolled back "
                         f"to {previous} and restarted (see journalctl -u edge-agent there)")
    raise FleetError(f"{device} did not report {vid} within {args.timeout:g} s (see "
                     f"journalctl -u edge-agent on the board)")


def render(args: argparse.Namespace) -> int:
    """`edge-deploy render`: what flash would put on one board, as files in --out, for the
    Ansible playbook (deploy/ansible/flash.yml) to copy, or for install-agent.sh to install
    on the board by hand: config.yaml, edge-agent.service, signing.pub, src.tar.gz (the
    agent alone), install-agent.sh, bundle/ (the signed board files) and release.json."""
    prefix = str(args.prefix).rstrip("/")
    manifest, signature, model_sha, vid = release_of(args)
    src, stamp = files.agent_source()
    stamp = install_stamp(stamp, args.torch, args.extras, args.profile)
    out: Path = args.out
    (out / "bundle").mkdir(parents=True, exist_ok=True)
    _, config_bytes = board_config(args, prefix, args.device_id)
    written = {"config.yaml": config_bytes, "edge-agent.service": unit_file(prefix),
             "signing.pub": public_path(args.key.expanduser()).read_bytes(), "src.tar.gz": src,
             "install-agent.sh": files.read(files.INSTALLER)}
    for name in manifest.release_files():
        written[f"bundle/{name}"] = (args.bundle / name).read_bytes()
    for name, data in written.items():
        path = out / name
        if not path.is_file() or path.read_bytes() != data:  # unchanged files keep their mtime
            path.write_bytes(data)
    release = {"device": args.device_id, "vid": vid,
               "sha256": model_sha, "version": signature.version, "stamp": stamp,
               "prefix": prefix, "extras": args.extras, "profile": args.profile}
    (out / "release.json").write_text(json.dumps(release, indent=2) + "\n")
    print(json.dumps(release))
    return 0
