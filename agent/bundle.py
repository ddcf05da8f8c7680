"""A verified bundle on the board: the model's bytes checked once, then loaded fresh on demand.

`Bundle.open` reads the manifest and the board model and checks its sha256; every module is
loaded from those verified bytes, so the file cannot change between check and load. `check`
proves the bundle on this board (engine, one inference at the manifest's input shape, and the
bundled sample reproducing the host's logits and accuracy) on a module of its own: TorchScript
specialises a module on the first input shapes it runs, so the inference loop gets a fresh one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.errors import BundleError
from agent.manifest import MANIFEST, Manifest, embedded_metadata, manifest_bytes
from agent.model import load_scripted, set_engine
from agent.preprocess import normalize
from agent.signing import SIGNATURE_FILE, Signature, verify
from agent.torchwarnings import known_torch_deprecations


@dataclass(frozen=True)
class Bundle:
    dir: Path
    manifest: Manifest
    model_path: Path
    model_bytes: bytes
    signature: Signature | None = None

    @property
    def sha256(self) -> str:
        return str(self.manifest.files[self.manifest.board_model]["sha256"])

    @classmethod
    def open(cls, directory: Path, public_key: Ed25519PublicKey | None = None) -> Bundle:
        """Read the manifest and the sha256-verified board model of `directory`.

        With `public_key`, the manifest must carry a valid signature by that key first.

        Raises:
            BundleError: no manifest, a file missing or changed, or an unusable manifest.
        """
        raw = manifest_bytes(directory)
        signature = None
        if public_key is not None:
            sig_path = directory / SIGNATURE_FILE
            try:
                sig = sig_path.read_bytes() if sig_path.is_file() else None
            except OSError as exc:
                raise BundleError(f"{sig_path}: unreadable ({exc})") from None
            signature = verify(raw, sig, public_key, str(directory))
        # Parsed from the bytes just verified: nothing can change between check and use.
        manifest = Manifest.parse(raw, str(directory / MANIFEST))
        data = manifest.verified_bytes(directory, manifest.board_model)
        path = directory / manifest.board_model
        set_engine(manifest.engine)  # "not available on this board" before anything else
        _agrees_with_model(manifest, path, data)
        return cls(directory, manifest, path, data, signature)

    def load(self) -> torch.jit.ScriptModule:
        """A freshly loaded module, with the manifest's quantized engine selected first."""
        return load_scripted(self.model_path, self.manifest.engine, self.model_bytes)

    def sample(self) -> dict[str, torch.Tensor]:
        """The verified labelled sample: uint8 images, labels and the host's logits."""
        return self.manifest.load_sample(self.dir)

    def check(self) -> dict[str, Any]:
        """Prove the bundle on this board; return what was checked.

        Raises:
            BundleError: anything that means this board must not run the bundle.
        """
        manifest = self.manifest
        sample = self.sample()
        module = self.load()
        shape = manifest.input_shape
        with torch.inference_mode(), known_torch_deprecations():
            try:
                out = module(torch.zeros(1, *shape))
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0]
                raise BundleError(f"{self.model_path}: one inference on input [1, "
                                  f"{', '.join(map(str, shape))}] failed ({first}): the model "
                                  f"does not take the manifest's input shape") from None
            if tuple(out.shape) != (1, len(manifest.classes)):
                raise BundleError(f"{self.model_path}: output shape {tuple(out.shape)}, the "
                                  f"manifest expects (1, {len(manifest.classes)})")
            logits = module(normalize(sample["images"], manifest.mean, manifest.std))
        diff = float((logits - sample["logits"]).abs().max())
        tolerance = float(manifest.sample["logit_tolerance"])
        accuracy = 100.0 * float((logits.argmax(1) == sample["labels"]).float().mean())
        if diff > tolerance:
            raise BundleError(f"{self.model_path}: this board's logits differ from the host's by "
                              f"up to {diff:.3g} (> {tolerance}) on the bundled sample: do not "
                              f"run it here")
        if abs(accuracy - float(manifest.sample["accuracy_pct"])) > 1e-6:
            raise BundleError(f"{self.model_path}: sample accuracy {accuracy:.2f}% here, "
                              f"{manifest.sample['accuracy_pct']:.2f}% on the host")
        return {"bundle": str(self.dir), "engine": manifest.engine,
                "mode": manifest.quantization["mode"],
                "sample_images": int(sample["labels"].shape[0]), "max_abs_logit_diff": diff,
                "bit_exact": diff == 0.0, "sample_accuracy_pct": accuracy,
                "torch_version": torch.__version__}


def _agrees_with_model(manifest: Manifest, path: Path, data: bytes) -> None:
    """Check the manifest against the metadata export embedded in the model, before any run.

    This is the input-shape check: a quantized qnnpack Linear does not check its input's
    width, so a wrong shape is never fed to the model to find out (measured on torch 2.13: a
    [1, 3, 64, 64] input into the 32x32 SimpleCNN returned garbage, corrupted the module's
    later results and crashed a second module in the same process).
    """
    try:
        meta = embedded_metadata(data)
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from None
    if meta is None:
        raise BundleError(f"{path}: no embedded edgeforge metadata (rebuild the bundle with "
                          f"edge-optimize export)")
    for key, ours in (("input_shape", manifest.input_shape), ("engine", manifest.engine),
                      ("classes", manifest.classes)):
        if key in meta and meta[key] != ours:
            raise BundleError(f"{path}: the manifest's {key.replace('_', ' ')} {ours} does not "
                              f"match the model's {meta[key]}: the model does not take the "
                              f"manifest's input shape or labels (rebuild the bundle; the model "
                              f"was not run)")
