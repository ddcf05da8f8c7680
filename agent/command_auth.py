"""Signed commands: only the holder of the fleet key commands a board, once, and only the
board it addressed.

Every remote command (agent/remote_commands.py) carries `auth` beside its `args`:

    {"request_id": "...", "schema": "edgeforge.cmd/1", "args": {...},
     "auth": {"key_id": "<16 hex>", "device": "board1", "issued_ts": 1796000000.0,
              "nonce": "<32 hex>", "signature": "<base64 of 64 bytes>"}}

The signature is Ed25519 by the fleet's key (the one `update.public_key` names) over the
canonical JSON (sorted keys, no spaces) of the command's name, the request id, the args and
every `auth` field but the signature. A board refuses, answering with one of these codes:

    no_key         the board has no fleet key (update.public_key unset): it takes no command
    not_signed     no `auth`, or one that is malformed
    untrusted_key  signed by a key this board does not trust (its key_id)
    forged         the signature does not match what was sent: altered, or forged
    wrong_device   addressed to another board (a command copied from another board's topic)
    expired        issued more than update.command_max_age_s ago
    clock_skew     issued more than CLOCK_SKEW_S in the future: a clock is wrong
    nonce_reused   a nonce this board has already taken: a replay

(The codes differ from an update's own bundle refusals, `unsigned`, `bad_signature` and
`replay`, which are about the bundle's signature.json, not the command.)

Nonces are remembered until their command would have expired anyway, in a small JSON file
beside the spool (`<spool>.nonces.json`), written before the command runs: a restart does not
open a replay window. Every command is signed, `diagnostics` too: it costs the board work and
shows its versions, config fingerprint and recent errors, and the operator who can send it
holds the key anyway.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import Refused
from agent.signing import key_id
from agent.untrusted import loads_json, read_regular

log = logging.getLogger(__name__)

CLOCK_SKEW_S = 60.0  # how far in the future a command's issue time may be (clocks differ)
MAX_NONCES = 100_000  # remembered at once; more refuses commands (busy) until some expire
NONCE = re.compile(r"[0-9a-f]{32}")


def _signed_bytes(command: str, request_id: str, args: dict[str, Any],
                  auth: dict[str, Any]) -> bytes:
    body = {"command": command, "request_id": request_id, "args": args,
            **{k: v for k, v in auth.items() if k != "signature"}}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_command(key: Ed25519PrivateKey, command: str, device: str, request_id: str,
                 args: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """The `auth` object of one command to `device`, issued now, with a fresh nonce."""
    auth: dict[str, Any] = {"key_id": key_id(key.public_key()), "device": device,
                            "issued_ts": round(time.time() if now is None else now, 3),
                            "nonce": secrets.token_hex(16)}
    auth["signature"] = base64.b64encode(
        key.sign(_signed_bytes(command, request_id, args, auth))).decode()
    return auth


class Nonces:
    """The nonces of commands taken in the last `max_age_s`, kept in `path` (JSON) across
    restarts. Only the commands thread uses it."""

    def __init__(self, path: Path, max_age_s: float) -> None:
        self.path = path
        self.max_age_s = max_age_s
        self.seen: dict[str, float] = {}
        self.floor = 0.0  # commands issued before this are refused (the store was lost)
        try:
            raw = loads_json(read_regular(path, 16_000_000, "nonce store"), str(path))
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
            self.seen = {str(k): float(v) for k, v in raw.items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError) as exc:
            # Which nonces were taken is lost: any command issued before now may be a replay,
            # so only commands issued from now on are taken. The file is kept for a look.
            self.floor = time.time()
            aside = path.with_name(path.name + ".unreadable")
            log.error("commands: %s is unreadable (%s): moved to %s; commands issued before "
                      "now are refused as possible replays", path, exc, aside.name)
            try:
                os.replace(path, aside)
            except OSError:
                pass

    def take(self, nonce: str, issued_ts: float, now: float) -> None:
        """Remember `nonce` (on disk first), or refuse it as replayed.

        Raises:
            Refused: replayed; busy when MAX_NONCES are remembered.
        """
        if issued_ts < self.floor:
            raise Refused("nonce_reused", "issued before this board lost its record of taken "
                                      "commands (see its log): send it again")
        horizon = now - self.max_age_s - CLOCK_SKEW_S
        self.seen = {n: ts for n, ts in self.seen.items() if ts >= horizon}
        if nonce in self.seen:
            raise Refused("nonce_reused", f"nonce {nonce[:8]}... was already used by a command "
                                      f"this board took; send the command again (edge-deploy "
                                      f"makes a new nonce for every command)")
        if len(self.seen) >= MAX_NONCES:
            raise Refused("busy", f"{MAX_NONCES:,} commands in the last "
                                  f"{self.max_age_s:g} s; retry later")
        self.seen[nonce] = issued_ts
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with tmp.open("w") as f:
                json.dump(self.seen, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:  # not taken: a command whose nonce is not on disk may replay
            del self.seen[nonce]
            raise Refused("internal", f"cannot record the command's nonce in {self.path} "
                                      f"({exc.strerror}): free space or fix its permissions"
                          ) from None


def authorize(command: str, request_id: str, args: dict[str, Any], auth: Any, device: str,
              public: Ed25519PublicKey | None, nonces: Nonces, max_age_s: float,
              now: float | None = None) -> str:
    """Check one command's `auth` for this board (`device`); return the signer's key id.

    Raises:
        Refused: with one of the codes in the module docstring.
    """
    now = time.time() if now is None else now
    if public is None:
        raise Refused("no_key", "this board has no fleet key (update.public_key), so it takes "
                                "no command: flash it with edge-deploy flash")
    if auth is None:
        raise Refused("not_signed", "the command is not signed: send it with edge-deploy, which "
                                  "signs it with the fleet's key (--key)")
    try:
        if not isinstance(auth, dict):
            raise ValueError("auth is not a JSON object")
        raw = base64.b64decode(auth["signature"], validate=True)
        issued = auth["issued_ts"]
        if isinstance(issued, bool) or not isinstance(issued, (int, float)):
            raise ValueError(f"issued_ts {issued!r} is not a number")
        if not isinstance(auth["nonce"], str) or not NONCE.fullmatch(auth["nonce"]):
            raise ValueError("nonce must be 32 lowercase hex digits")
        if not isinstance(auth["device"], str) or not isinstance(auth["key_id"], str):
            raise ValueError("device and key_id must be strings")
    except (KeyError, ValueError, TypeError, binascii.Error) as exc:
        raise Refused("not_signed", f"malformed auth ({exc}): send the command with "
                                  f"edge-deploy") from None
    ours = key_id(public)
    if auth["key_id"] != ours:
        raise Refused("untrusted_key", f"signed with key {auth['key_id'][:16]}, this board "
                                   f"trusts key {ours}")
    try:
        public.verify(raw, _signed_bytes(command, request_id, args, auth))
    except InvalidSignature:
        raise Refused("forged", f"the signature does not match this {command} "
                                       f"command: it was altered, or not made by key "
                                       f"{ours}") from None
    if auth["device"] != device:
        raise Refused("wrong_device", f"addressed to {auth['device']!r}, this board is "
                                      f"{device!r}")
    if issued < now - max_age_s:
        raise Refused("expired", f"issued {now - issued:.0f} s ago, more than "
                                 f"update.command_max_age_s ({max_age_s:g} s): send it again "
                                 f"(or check this board's clock: NTP)")
    if issued > now + CLOCK_SKEW_S:
        raise Refused("clock_skew", f"issued {issued - now:.0f} s in the future by this "
                                    f"board's clock: the sender's clock or this board's is "
                                    f"wrong (NTP)")
    nonces.take(auth["nonce"], float(issued), now)
    return ours
