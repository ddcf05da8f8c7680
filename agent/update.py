"""A model update received over MQTT: verify everything in memory, stage, smoke-test.

Order matters, because a TorchScript file is code: the payload's size, its JSON, the
signature over the manifest, the replay check (version), the engine and input shape, and
every file's sha256 are all checked on bytes in memory. Only then is anything written, into a
new folder of the store (`Store.stage`), and only then is the model loaded: `smoke_test`
proves it (signature again, sample logits within tolerance, sample accuracy, p99 latency
within budget) before the caller switches `current`.

The update's `args`: {"files": {"<name>": "<base64>", ...}, "force": false}; the files are
manifest.json, signature.json and the board's files the manifest lists (the board model and
the sample). Nothing else is accepted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.bundle import Bundle
from agent.config import LoopConfig
from agent.errors import BundleError, Refused
from agent.loop import Inputs
from agent.manifest import MANIFEST, MAX_MANIFEST_BYTES, Manifest
from agent.signing import SIGNATURE_FILE, Signature, verify
from agent.store import Store, version_id
from agent.timing import Latency, time_passes
from agent.untrusted import Untrusted, read_regular


@dataclass(frozen=True)
class Release:
    """A verified update, ready to stage."""

    vid: str
    version: int
    sha256: str
    manifest: Manifest
    signature: Signature
    files: dict[str, bytes]


def decode_files(args: dict[str, Any]) -> dict[str, bytes]:
    """The update's files, base64-decoded; names must be plain file names.

    Raises:
        Refused: "malformed" for a missing or broken files map.
    """
    files = args.get("files")
    if not isinstance(files, dict) or not files:
        raise Refused("malformed", "update args need a 'files' map of name -> base64 content")
    out: dict[str, bytes] = {}
    for name, text in files.items():
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise Refused("malformed", f"update file name {name!r} is not a plain file name")
        if not isinstance(text, str):
            raise Refused("malformed", f"update file {name}: content must be a base64 string")
        try:
            out[name] = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise Refused("malformed", f"update file {name}: not valid base64 (truncated "
                                       f"payload?)") from None
    return out


def verify_release(files: dict[str, bytes], public_key: Ed25519PublicKey | None,
                   running: Manifest, max_version: int, force: bool) -> Release:
    """Check an update's files completely, in memory; nothing is written.

    Raises:
        Refused: with code unsigned, bad_signature, replay, engine, input_shape, sha256,
            missing_file, extra_file or manifest; the message says what to do.
    """
    if public_key is None:
        raise Refused("no_key", "this board has no update.public_key: remote updates are off "
                                "(flash it with edge-deploy flash, which installs the key)")
    if MANIFEST not in files:
        raise Refused("missing_file", f"the update carries no {MANIFEST}")
    if SIGNATURE_FILE not in files:
        raise Refused("unsigned", f"the update carries no {SIGNATURE_FILE}: sign the bundle "
                                  f"with edge-deploy sign")
    try:
        signature = verify(files[MANIFEST], files[SIGNATURE_FILE], public_key, "update")
    except BundleError as exc:
        raise Refused("bad_signature", str(exc)) from None
    try:
        manifest = Manifest.parse(files[MANIFEST], f"update {MANIFEST}")
    except BundleError as exc:
        raise Refused("manifest", str(exc)) from None
    if signature.version <= max_version and not force:
        raise Refused("replay", f"version {signature.version} is not newer than {max_version}, "
                                f"the newest this board has applied (replayed or old update; "
                                f"send it with --force to install it anyway)")
    if manifest.engine != running.engine:
        raise Refused("engine", f"the update is for engine {manifest.engine}, this board runs "
                                f"{running.engine} (rebuild with quantize.engine={running.engine})")
    if manifest.input_shape != running.input_shape:
        raise Refused("input_shape", f"the update takes input {manifest.input_shape}, this "
                                     f"board feeds {running.input_shape} (a new input shape "
                                     f"needs edge-deploy flash, not an update)")
    needed = manifest.board_files()
    for name in needed:
        if name not in files:
            raise Refused("missing_file", f"the update lacks {name}, which the board needs")
    for name, data in files.items():
        if name in (MANIFEST, SIGNATURE_FILE):
            continue
        if name not in needed:
            raise Refused("extra_file", f"the update carries {name}, which is not a board file "
                                        f"of its manifest")
        digest = hashlib.sha256(data).hexdigest()
        expected = manifest.files.get(name, {}).get("sha256")
        if digest != expected:
            raise Refused("sha256", f"{name}: sha256 {digest[:12]}... differs from the signed "
                                    f"manifest's {str(expected)[:12]}... (tampered or corrupted "
                                    f"in transit)")
    sha = str(manifest.files[manifest.board_model]["sha256"])
    return Release(version_id(signature.version, sha), signature.version, sha, manifest,
                   signature, files)


def smoke_test(directory: Path, public_key: Ed25519PublicKey | None, loop_cfg: LoopConfig,
               iters: int, max_p99_ms: float, engine: str = "auto"
               ) -> tuple[Bundle, dict[str, Any], float]:
    """Open and check a staged version (its engine chosen as at start: `engine`, at the
    loop's batch size and threads) and time `iters` passes; return (bundle, check, p99).

    Raises:
        Refused: code smoke_failed, with what failed.
    """
    try:
        bundle = Bundle.open(directory, public_key)
        checked = bundle.check(engine, loop_cfg.batch_size, loop_cfg.threads)
        runner = bundle.load(checked["engine"], loop_cfg.threads)
    except BundleError as exc:
        raise Refused("smoke_failed", f"smoke test: {exc}") from None
    inputs = Inputs.random(loop_cfg.batch_size, bundle.manifest.input_shape).batches
    try:
        # A fresh TorchScript module's first runs profile and optimise: 5 untimed passes.
        lat = time_passes(runner, inputs, iters, warmup=5)
    except RuntimeError as exc:
        raise Refused("smoke_failed", f"smoke test: inference failed "
                                      f"({str(exc).strip().splitlines()[0]})") from None
    p99 = Latency.of(lat).p99_s * 1000
    if p99 > max_p99_ms:
        raise Refused("smoke_failed", f"smoke test: p99 latency {p99:.2f} ms is over the "
                                      f"budget update.smoke_max_p99_ms={max_p99_ms:g}")
    return bundle, checked, p99


def activate(src: Path, store: Store, public_key: Ed25519PublicKey | None,
             trial: bool, engine: str = "auto", threads: int = 1) -> dict[str, Any]:
    """Copy bundle `src` into the store, prove it on this board, switch `current` to it.

    What `edge-deploy flash` runs on the board. The staged copy (the bytes that will run) is
    verified and checked, not `src`; a copy that fails is removed and `current` stays.

    Raises:
        BundleError: unsigned or tampered with (when a key is configured), or the check failed.
    """
    manifest = Manifest.read(src)
    names = [n for n in manifest.release_files()
             if n != SIGNATURE_FILE or (src / SIGNATURE_FILE).is_file()]
    def limit(name: str) -> int:
        size = manifest.files.get(name, {}).get("bytes")
        return size if isinstance(size, int) and size >= 0 else MAX_MANIFEST_BYTES

    try:
        files = {name: read_regular(src / name, limit(name), name) for name in names}
    except (OSError, Untrusted) as exc:
        raise BundleError(f"{src}: cannot read the bundle ({exc})") from None
    signature = verify(files[MANIFEST], files.get(SIGNATURE_FILE), public_key, str(src)) \
        if public_key is not None else None
    version = signature.version if signature else 0
    sha = str(manifest.files[manifest.board_model]["sha256"])
    vid = version_id(version, sha)
    before = store.current()
    if vid == before:
        return {"from": before, "to": vid, "changed": False}
    existed = store.path(vid).is_dir()
    path = store.stage(vid, files)
    try:
        checked = Bundle.open(path, public_key).check(engine, 1, threads, every=True)
    except BundleError:
        if not existed:
            store.discard(vid)
        raise
    store.switch(vid, version, sha, "flash", pending=trial)
    return {"from": before, "to": vid, "changed": True, "sha256": sha,
            "engine": checked["engine"], "engine_reason": checked["reason"],
            "sample_accuracy_pct": checked["sample_accuracy_pct"],
            "max_abs_logit_diff": checked["max_abs_logit_diff"],
            "engines": {r["engine"]: r["status"] for r in checked["engines"]}}
