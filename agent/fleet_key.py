"""The fleet key a board trusts: `update.public_key`, then every rotation signed by it.

`edge-deploy rotate-key` sends `rotate_key` (agent/remote_commands.py): a command signed by
the key the board trusts now (agent/command_auth.py), carrying the new public key and a
proof that the sender holds the new private key (its signature over the board's id, the
request id and the new key's id). The board then trusts only the new key for commands and
updates. Rotations are kept beside the spool (`<spool>.keys.json`, the agent's own state
directory: /etc/edgeforge is not the agent's to write) as a chain:

    {"rotations": [{"from": "<key id>", "to": "<key id>", "pem": "...", "utc": "..."}]}

At start the board follows the chain from the configured key: a rotation applies only to the
key it was signed by, so a board flashed again with another key trusts that key, whatever
it rotated to before. Keys it rotated away from stay trusted for one thing only: the
signatures of versions already in its store (a rollback to a version signed before the
rotation); new updates and commands need the current key.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.errors import ConfigError
from agent.signing import configured_key, key_id
from agent.untrusted import loads_json, read_regular


def keys_path(spool: Path) -> Path:
    """Where the rotations live: beside the spool, in the agent's own state directory."""
    return spool.with_name(spool.name + ".keys.json")


def rotation_statement(device: str, request_id: str, new_key_id: str) -> bytes:
    """What the new key signs to prove its holder asked for the rotation."""
    return f"edgeforge rotate_key to {new_key_id} for {device}, request {request_id}".encode()


def parse_public_key(pem: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM text.

    Raises:
        ValueError: not a PEM Ed25519 public key.
    """
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def pem_of(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@dataclass
class FleetKey:
    """The key trusted now (None: no key configured) and the keys rotated away from."""

    current: Ed25519PublicKey | None
    path: Path  # the rotations file
    retired: list[Ed25519PublicKey] = field(default_factory=list)
    rotations: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def load(cls, configured: str | None, path: Path) -> FleetKey:
        """`configured` (update.public_key) followed along the rotations in `path`.

        Raises:
            ConfigError: the configured key or the rotations file is unusable.
        """
        current = configured_key(configured)
        try:
            raw = loads_json(read_regular(path, 1_000_000, "key rotations file"), str(path)) \
                if path.exists() else {"rotations": []}
            rotations = [dict(r) for r in raw["rotations"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: unreadable key rotations ({exc}): move it away and "
                              f"flash the board again with the fleet's current key") from None
        keys = cls(current, path, [], rotations)
        by_from = {r["from"]: r for r in rotations}
        while keys.current is not None and key_id(keys.current) in by_from:
            step = by_from.pop(key_id(keys.current))
            try:
                new = parse_public_key(step["pem"])
            except (ValueError, KeyError) as exc:
                raise ConfigError(f"{path}: rotation to {step.get('to')} is unusable ({exc}): "
                                  f"move the file away and flash the board again") from None
            keys.retired.append(keys.current)
            keys.current = new
        return keys

    def trusted(self) -> tuple[Ed25519PublicKey, ...] | None:
        """Every key a stored version may be signed by, the current one first."""
        return None if self.current is None else (self.current, *self.retired)

    def rotate(self, new: Ed25519PublicKey) -> None:
        """Trust `new` from now on, on disk first.

        Raises:
            OSError: the rotations file cannot be written (nothing changed).
        """
        assert self.current is not None
        step = {"from": key_id(self.current), "to": key_id(new), "pem": pem_of(new),
                "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        rotations = [*self.rotations, step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w") as f:
            json.dump({"rotations": rotations}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.rotations = rotations
        self.retired.append(self.current)
        self.current = new
