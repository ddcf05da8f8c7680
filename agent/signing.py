"""Bundle signatures: `signature.json` beside `manifest.json`, Ed25519 over the manifest.

Owned by the board side (it verifies); `edge-deploy sign` writes it with `sign_manifest`.

    {"schema": "edgeforge.signature/1", "algorithm": "ed25519", "key_id": "<16 hex>",
     "version": 20261124153012, "signed_utc": "...", "manifest_sha256": "<hex>",
     "signature": "<base64 of 64 bytes>"}

The signature covers the canonical JSON (sorted keys, no spaces) of every field but
`signature`, so it binds the release `version` and, through `manifest_sha256`, the manifest's
exact bytes, which list every file's size and sha256. A manifest edited after signing, a file
that differs from the manifest, or another key: each is refused before anything is written
or loaded. `version` only ever grows on a board (replayed old updates are refused).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import BundleError, ConfigError
from agent.untrusted import Untrusted, loads_json, read_regular

SIGNATURE_FILE = "signature.json"
MAX_SIGNATURE_BYTES = 64_000  # a signature is a few hundred bytes
SIGNATURE_SCHEMA = "edgeforge.signature/1"


def key_id(public: Ed25519PublicKey) -> str:
    """A short name for a public key: the first 16 hex digits of its raw bytes' sha256."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a PEM Ed25519 public key (`edge-deploy keygen` writes one).

    Raises:
        ConfigError: missing, unreadable, or not an Ed25519 public key.
    """
    try:
        key = serialization.load_pem_public_key(read_regular(path, 64_000, "public key"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such public key (edge-deploy flash installs it; or set "
                          f"update.public_key to the .pub file edge-deploy keygen wrote)") from None
    except Untrusted as exc:
        raise ConfigError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: not an Ed25519 public key (make one with edge-deploy keygen)")
    return key


def configured_key(path: str | None) -> Ed25519PublicKey | None:
    """update.public_key loaded, or None when no key is configured.

    Raises:
        ConfigError: as load_public_key.
    """
    return load_public_key(Path(path)) if path else None


def _signed_bytes(fields: dict[str, Any]) -> bytes:
    body = {k: v for k, v in fields.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_manifest(manifest: bytes, key: Ed25519PrivateKey, version: int) -> bytes:
    """The signature.json content for a manifest's exact bytes at release `version`."""
    fields: dict[str, Any] = {
        "schema": SIGNATURE_SCHEMA, "algorithm": "ed25519", "key_id": key_id(key.public_key()),
        "version": int(version),
        "signed_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
    }
    fields["signature"] = base64.b64encode(key.sign(_signed_bytes(fields))).decode()
    return (json.dumps(fields, indent=2) + "\n").encode()


@dataclass(frozen=True)
class Signature:
    """A verified signature: who signed which release."""

    key_id: str
    version: int
    signed_utc: str
    manifest_sha256: str


def verify(manifest: bytes, signature: bytes | None,
           public: Ed25519PublicKey | tuple[Ed25519PublicKey, ...],
           origin: str = "bundle") -> Signature:
    """Check `signature` (signature.json's bytes) over `manifest` with `public`: one key, or
    the keys a board trusts for its stored versions (agent/fleet_key.py), the current first.

    Raises:
        BundleError: unsigned, malformed, another key, a bad signature, or a manifest that
            is not the one that was signed. The message names which.
    """
    if signature is None:
        raise BundleError(f"{origin}: unsigned (no {SIGNATURE_FILE}): sign it on the host with "
                          f"edge-deploy sign")
    try:
        fields = loads_json(signature, SIGNATURE_FILE, MAX_SIGNATURE_BYTES)
        if not isinstance(fields, dict) or fields.get("schema") != SIGNATURE_SCHEMA:
            raise ValueError(f"schema {fields.get('schema') if isinstance(fields, dict) else ''!r}")
        raw = base64.b64decode(fields["signature"], validate=True)
        version = fields["version"]
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"version {version!r} is not a whole number")
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise BundleError(f"{origin}: malformed {SIGNATURE_FILE} ({exc}): sign the bundle "
                          f"again with edge-deploy sign") from None
    keys = {key_id(k): k for k in (public if isinstance(public, tuple) else (public,))}
    ours = next(iter(keys))
    if fields.get("key_id") not in keys:
        raise BundleError(f"{origin}: signed with key {fields.get('key_id')}, this board "
                          f"trusts key {ours} (sign with the fleet's key, or flash the board "
                          f"with the new public key)")
    ours = str(fields["key_id"])
    try:
        keys[ours].verify(raw, _signed_bytes(fields))
    except InvalidSignature:
        raise BundleError(f"{origin}: bad signature: {SIGNATURE_FILE} was altered or not made "
                          f"by key {ours}") from None
    digest = hashlib.sha256(manifest).hexdigest()
    if digest != fields["manifest_sha256"]:
        raise BundleError(f"{origin}: manifest.json was changed after signing (sha256 "
                          f"{digest[:12]}..., signed {str(fields['manifest_sha256'])[:12]}...): "
                          f"rebuild or sign it again on the host")
    return Signature(ours, version, str(fields.get("signed_utc", "")), digest)
