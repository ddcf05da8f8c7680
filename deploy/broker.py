"""Per-board broker identities: a username and password of its own for each board, and the
mosquitto `password_file` and `acl_file` that let a board publish and read only its own
topics, so a stolen board's credentials can do nothing to another board.

Kept on the operator's machine in the broker folder (`--broker-dir`, default
~/.config/edgeforge/broker), every file mode 0600:

    secrets.json    {"operator": {...}, "boards": {id: {"username", "password", "issued_utc"}}}
    passwd          mosquitto's password_file: `username:$7$101$<salt>$<PBKDF2-SHA512>` lines
    acl             mosquitto's acl_file (below)
    operator.yaml   the operator's mqtt credentials, for edge-deploy and edge-monitor
                    (`--config` it, or copy its mqtt keys into config.yaml)

A board's username is its device id. Its ACL lets it publish only under
`<prefix>/<id>/` (status, info, telemetry, summary, event, result, cmd_result, and reply/#
for MQTT 5 response topics), its Home Assistant discovery configs, and read only its own
`cmd/#`, its `infer` requests and Home Assistant's status. The operator
(`edgeforge-operator`) reads and writes everything under the prefix and reads Home
Assistant's topics. `edge-deploy flash` issues a board's credential the first time and
reuses it after (`--rotate-credential` makes a new one); the broker reads the new files on
SIGHUP (`systemctl reload mosquitto`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

from deploy.errors import FleetError

DEFAULT_DIR = Path("~/.config/edgeforge/broker")
OPERATOR = "edgeforge-operator"
ITERATIONS = 101  # mosquitto_passwd's default for $7$ (PBKDF2-SHA512)
USERNAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
BOARD_WRITES = ("status", "info", "telemetry", "summary", "event", "result", "cmd_result",
                "reply/#")
BOARD_READS = ("cmd/#", "infer", "infer/#")


def hash_password(password: str, salt: bytes | None = None) -> str:
    """mosquitto's `$7$` password hash (what `mosquitto_passwd` writes)."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS)
    return f"$7${ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def acl_text(boards: list[str], prefix: str, discovery_prefix: str) -> str:
    """The acl_file for `boards` under topic `prefix`, and the operator."""
    prefix, ha = prefix.rstrip("/"), discovery_prefix.rstrip("/")
    lines = ["# Written by edge-deploy (deploy/broker.py); edit the boards with edge-deploy.",
             "# No `topic` line before the first `user`: anonymous clients get nothing.", "",
             f"user {OPERATOR}", f"topic readwrite {prefix}/#", f"topic read {ha}/#", ""]
    for device in sorted(boards):
        node = "".join(c if c.isalnum() or c in "_-" else "_" for c in device)
        lines += [f"user {device}",
                  *(f"topic write {prefix}/{device}/{t}" for t in BOARD_WRITES),
                  *(f"topic read {prefix}/{device}/{t}" for t in BOARD_READS),
                  f"topic write {ha}/sensor/{node}/#", f"topic read {ha}/status", ""]
    return "\n".join(lines)


def mosquitto_conf(broker_dir: Path) -> str:
    """The listener settings that use the files (README: the fleet's broker)."""
    d = broker_dir.expanduser().resolve()
    return (f"allow_anonymous false\npassword_file {d / 'passwd'}\nacl_file {d / 'acl'}\n")


class BrokerFiles:
    """The broker folder: issue, reuse and rotate credentials; write passwd and acl."""

    def __init__(self, broker_dir: Path, prefix: str, discovery_prefix: str) -> None:
        self.dir = broker_dir.expanduser()
        self.prefix = prefix
        self.discovery_prefix = discovery_prefix
        self.path = self.dir / "secrets.json"
        try:
            self.secrets: dict[str, Any] = json.loads(self.path.read_text()) \
                if self.path.exists() else {"operator": None, "boards": {}}
        except (OSError, ValueError) as exc:
            raise FleetError(f"{self.path}: unreadable ({exc}); restore it from a backup, or "
                             f"move it away and flash every board again") from None

    def board(self, device: str, rotate: bool = False) -> tuple[str, str]:
        """(username, password) of `device`: its existing credential, or a new one when it
        has none or `rotate`. Writes every file before it returns.

        Raises:
            FleetError: the id cannot be a broker username, or the folder is not writable.
        """
        if not USERNAME.fullmatch(device) or device == OPERATOR:
            raise FleetError(f"device id {device!r} cannot be a broker username: use 1-64 "
                             f"letters, digits, '.', '_' or '-' (and not {OPERATOR})")
        entry = self.secrets["boards"].get(device)
        if entry is None or rotate:
            entry = {"username": device, "password": secrets.token_urlsafe(24),
                     "issued_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            self.secrets["boards"][device] = entry
        self.write()
        return str(entry["username"]), str(entry["password"])

    def operator(self) -> tuple[str, str]:
        """The operator's (username, password), made the first time."""
        if not self.secrets.get("operator"):
            self.secrets["operator"] = {"username": OPERATOR,
                                        "password": secrets.token_urlsafe(24)}
        self.write()
        op = self.secrets["operator"]
        return str(op["username"]), str(op["password"])

    def write(self) -> None:
        """secrets.json, passwd, acl and operator.yaml, each replaced whole (mode 0600)."""
        if not self.secrets.get("operator"):
            self.secrets["operator"] = {"username": OPERATOR,
                                        "password": secrets.token_urlsafe(24)}
        op = self.secrets["operator"]
        boards = self.secrets["boards"]
        passwd = "".join(f"{u}:{hash_password(p)}\n" for u, p in
                         [(op["username"], op["password"]),
                          *((b["username"], b["password"]) for b in boards.values())])
        operator_yaml = (f"# The operator's broker identity (edge-deploy, edge-monitor): "
                         f"--config this file.\nmqtt:\n  username: {op['username']}\n"
                         f"  password: {op['password']}\n")
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            for name, text in (("secrets.json", json.dumps(self.secrets, indent=2) + "\n"),
                               ("passwd", passwd),
                               ("acl", acl_text(list(boards), self.prefix,
                                                self.discovery_prefix)),
                               ("operator.yaml", operator_yaml)):
                tmp = self.dir / f".{name}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                os.replace(tmp, self.dir / name)
        except OSError as exc:
            raise FleetError(f"{self.dir}: cannot write the broker files ({exc.strerror}): "
                             f"pass --broker-dir to a folder you can write") from None
