"""The bundle manifest (`manifest.json`): what a bundle is, how it was made, how to check it.

Owned by the board side; the optimizer writes it through `Manifest.write`. A bundle is a
directory holding the manifest and every file it lists with its size and sha256:

    {"schema": "edgeforge.bundle/1", "created_utc": ..., "edgeforge_version": ...,
     "torch_version": ..., "architecture": {...}, "input": {"shape": [3, 32, 32],
     "dtype": "float32", "layout": "NCHW", "normalization": {"mean": [...], "std": [...]}},
     "classes": [...], "engine": "qnnpack", "quantization": {"mode": ..., "attempts": [...]},
     "data": {"source": ..., "description": ...}, "metrics": {...},
     "board_model": "quantized_cnn_scripted.pt",
     "sample": {"file": "sample.pt", "count": 32, "accuracy_pct": ..., "logit_tolerance": ...},
     "verification": {...}, "files": {"<name>": {"bytes": N, "sha256": "..."}}}

The sample file holds uint8 `images`, int64 `labels` and the host's float `logits`, saved with
torch.save and loadable with weights_only=True.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from agent.errors import BundleError
from agent.signing import SIGNATURE_FILE

SCHEMA_NAME = "edgeforge.bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
BOARD_MODEL = "quantized_cnn_scripted.pt"
SAMPLE_FILE = "sample.pt"
METADATA_FILE = "edgeforge.json"  # the _extra_files entry inside the TorchScript archive


def embedded_metadata(model: bytes | Path) -> dict[str, Any] | None:
    """The metadata `edge-optimize export` embeds in the TorchScript zip, read without running
    any of the model's code; None when the archive has none.

    Raises:
        BundleError: not a zip archive, or metadata that is not a JSON object.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(model) if isinstance(model, bytes) else model) as z:
            names = [n for n in z.namelist() if n.endswith(f"extra/{METADATA_FILE}")]
            if not names:
                return None
            data = json.loads(z.read(names[0]))
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"not a loadable TorchScript file ({exc})") from None
    if not isinstance(data, dict):
        raise BundleError(f"embedded {METADATA_FILE} is not a JSON object")
    return data


def manifest_bytes(bundle: Path) -> bytes:
    """The raw bytes of `bundle/manifest.json` (what a signature covers).

    Raises:
        BundleError: missing or unreadable.
    """
    path = bundle / MANIFEST
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{path}: no manifest (point model.dir at a bundle built by "
                          f"edge-optimize)") from None
    except OSError as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc}) (copy the bundle "
                          f"again)") from None


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """The manifest's record of one file: its size and sha256."""
    return {"bytes": path.stat().st_size, "sha256": sha256_of(path)}


@dataclass(frozen=True)
class Manifest:
    created_utc: str
    edgeforge_version: str
    torch_version: str
    architecture: dict[str, Any]
    input: dict[str, Any]
    classes: list[str]
    engine: str
    quantization: dict[str, Any]
    data: dict[str, Any]
    metrics: dict[str, Any]
    sample: dict[str, Any]
    verification: dict[str, Any]
    files: dict[str, dict[str, Any]]
    board_model: str = BOARD_MODEL
    schema: str = field(default=f"{SCHEMA_NAME}/{SCHEMA_VERSION}")

    @property
    def input_shape(self) -> list[int]:
        return list(self.input["shape"])

    @property
    def mean(self) -> list[float]:
        return list(self.input["normalization"]["mean"])

    @property
    def std(self) -> list[float]:
        return list(self.input["normalization"]["std"])

    def write(self, bundle: Path) -> Path:
        """Write manifest.json atomically into `bundle`."""
        path = bundle / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, bundle: Path) -> Manifest:
        """Read and check `bundle/manifest.json`.

        Raises:
            BundleError: missing, not JSON, another or newer schema, or missing fields.
        """
        return cls.parse(manifest_bytes(bundle), str(bundle / MANIFEST))

    @classmethod
    def parse(cls, data: bytes, origin: str) -> Manifest:
        """Check a manifest's bytes; `origin` names it in messages.

        Raises:
            BundleError: not JSON, another or newer schema, or missing fields.
        """
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{origin}: unreadable manifest ({exc}) (copy the bundle "
                              f"again)") from None
        if not isinstance(raw, dict):
            raise BundleError(f"{origin}: manifest is not a JSON object (copy the bundle again)")
        name, _, version = str(raw.get("schema", "")).partition("/")
        if name != SCHEMA_NAME or not version.isdigit():
            raise BundleError(f"{origin}: not an edgeforge bundle manifest "
                              f"(schema {raw.get('schema')!r})")
        if int(version) > SCHEMA_VERSION:
            raise BundleError(f"{origin}: manifest schema {version} is newer than this agent "
                              f"understands ({SCHEMA_VERSION}): upgrade edgeforge on the board")
        known = set(cls.__dataclass_fields__)
        missing = sorted(known - set(raw) - {"board_model"})
        if missing:
            raise BundleError(f"{origin}: manifest lacks {', '.join(missing)} (rebuild the "
                              f"bundle with edge-optimize)")
        files = raw["files"]
        if not isinstance(files, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in files.values()):
            raise BundleError(f"{origin}: manifest files must map names to sha256 entries "
                              f"(rebuild the bundle with edge-optimize)")
        return cls(**{k: v for k, v in raw.items() if k in known})

    def board_files(self) -> list[str]:
        """The files a board needs: the board model and the labelled sample."""
        return [self.board_model, str(self.sample["file"])]

    def release_files(self) -> list[str]:
        """What a board receives of a signed bundle: manifest, signature, board files."""
        return [MANIFEST, SIGNATURE_FILE, *self.board_files()]

    def verified_path(self, bundle: Path, name: str) -> Path:
        """Path of bundle file `name` after checking its sha256 against the manifest.

        Raises:
            BundleError: not listed, missing, or its sha256 differs (never load it then).
        """
        path = self._listed(bundle, name)
        self._compare(path, sha256_of(path))
        return path

    def verified_bytes(self, bundle: Path, name: str) -> bytes:
        """The content of bundle file `name`, read once and checked against its sha256.

        Loading from these bytes leaves no window for the file to change after the check.
        """
        path = self._listed(bundle, name)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"{path}: cannot read ({exc.strerror})") from None
        self._compare(path, hashlib.sha256(data).hexdigest())
        return data

    def _listed(self, bundle: Path, name: str) -> Path:
        if name not in self.files:
            raise BundleError(f"{bundle / MANIFEST}: does not list {name} (rebuild the bundle)")
        path = bundle / name
        if not path.is_file():
            raise BundleError(f"{path}: missing from the bundle (copy the whole bundle)")
        return path

    def _compare(self, path: Path, digest: str) -> None:
        expected = self.files[path.name]["sha256"]
        if digest != expected:
            raise BundleError(f"{path}: sha256 {digest[:12]}... does not match the manifest's "
                              f"{expected[:12]}... (refusing to load it: copy the bundle again "
                              f"from the host)")

    def load_sample(self, bundle: Path) -> dict[str, torch.Tensor]:
        """The verified labelled sample: uint8 images, labels and the host's logits."""
        path = self.verified_path(bundle, self.sample["file"])
        try:
            sample = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # sha matched, so this is a host-side bug or torch mismatch
            raise BundleError(f"{path}: cannot read the sample ({exc})") from None
        return {k: sample[k] for k in ("images", "labels", "logits")}
