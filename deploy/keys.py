"""Signing keys and bundle signatures on the host (`edge-deploy keygen` and `sign`).

The private key never leaves the host: a PKCS#8 PEM file, mode 0600. Boards get the public
key (`<key>.pub`, SubjectPublicKeyInfo PEM) when they are flashed. The signature format and
its verification live on the board side, in agent/signing.py.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.bundle import Bundle
from agent.errors import BundleError, ConfigError
from agent.manifest import MANIFEST, Manifest, manifest_bytes
from agent.signing import SIGNATURE_FILE, Signature, key_id, sign_manifest, verify

DEFAULT_KEY = Path("~/.config/edgeforge/signing.key")


def public_path(key: Path) -> Path:
    """Where the public half of `key` lives: beside it, with .pub appended."""
    return key.with_name(key.name + ".pub")


def keygen(key: Path, overwrite: bool = False) -> str:
    """Write a new Ed25519 key pair (`key`, 0600, and `key`.pub); return its key id.

    Raises:
        ConfigError: the key exists (pass overwrite to replace it) or cannot be written.
    """
    key = key.expanduser()
    if key.exists() and not overwrite:
        raise ConfigError(f"{key}: a key already exists (boards trust it; pass --force to "
                          f"replace it, then flash every board again)")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    pub = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        key.parent.mkdir(parents=True, exist_ok=True)
        tmp = key.with_name(f".{key.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.replace(tmp, key)
        public_path(key).write_bytes(pub)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot write the key ({exc.strerror})") from None
    return key_id(private.public_key())


def load_private_key(key: Path) -> Ed25519PrivateKey:
    """Read the host's private signing key.

    Raises:
        ConfigError: missing, unreadable, or not an Ed25519 private key.
    """
    key = key.expanduser()
    try:
        loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(f"{key}: no signing key (make one with edge-deploy keygen, or pass "
                          f"--key)") from None
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{key}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ConfigError(f"{key}: not an Ed25519 key (make one with edge-deploy keygen)")
    return loaded


def sign_bundle(bundle: Path, key: Ed25519PrivateKey, version: int | None = None) -> Signature:
    """Sign `bundle`'s manifest as release `version` (default: the UTC time, YYYYMMDDhhmmss).

    The manifest is checked first: it must parse and every file it lists must match; then
    every model file must load (`Bundle.check_loads`: each whose runtime is installed here,
    and an ExecuTorch program's header always).

    Raises:
        BundleError: not a bundle, a file differs from its manifest, or does not load.
    """
    data = manifest_bytes(bundle)
    manifest = Manifest.parse(data, str(bundle / MANIFEST))
    for name in manifest.files:
        manifest.verified_path(bundle, name)
    Bundle.open(bundle).check_loads()
    if version is None:
        version = int(time.strftime("%Y%m%d%H%M%S", time.gmtime()))
    signature = sign_manifest(data, key, version)
    tmp = bundle / f".{SIGNATURE_FILE}.tmp"
    tmp.write_bytes(signature)
    os.replace(tmp, bundle / SIGNATURE_FILE)
    return verify(data, signature, key.public_key(), str(bundle))


def signed_release(bundle: Path, key: Ed25519PrivateKey) -> Signature:
    """The bundle's existing signature, checked against `key`.

    Raises:
        BundleError: unsigned, signed by another key, or changed since it was signed.
    """
    path = bundle / SIGNATURE_FILE
    sig = path.read_bytes() if path.is_file() else None
    return verify(manifest_bytes(bundle), sig, key.public_key(), str(bundle))


def ensure_signed(bundle: Path, key: Ed25519PrivateKey) -> Signature:
    """The bundle's signature by `key`, signing it now when it carries none.

    Raises:
        BundleError: signed by another key or changed since signing (sign it again).
    """
    if not (bundle / SIGNATURE_FILE).is_file():
        signature = sign_bundle(bundle, key)
    else:
        try:
            signature = signed_release(bundle, key)
        except BundleError as exc:
            raise BundleError(f"{exc} (re-sign with: edge-deploy sign {bundle})") from None
    check_release_files(bundle)
    return signature


def check_release_files(bundle: Path) -> None:
    """What a board will check, checked here first: every board file's sha256 against the
    signed manifest, and the sample's contents, so a broken bundle is never sent.

    Raises:
        BundleError: a file missing, unreadable or changed since the bundle was built.
    """
    manifest = Manifest.read(bundle)
    for name in manifest.board_files():
        path = bundle / name
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            raise BundleError(f"{path}: cannot read ({exc.strerror}); nothing was sent") from None
        expected = str(manifest.files.get(name, {}).get("sha256"))
        if digest != expected:
            raise BundleError(f"{path}: changed after the bundle was built (sha256 "
                              f"{digest[:12]}... is not the signed manifest's {expected[:12]}..."
                              f"): rebuild it with edge-optimize and sign it again; nothing "
                              f"was sent")
    manifest.load_sample(bundle)
