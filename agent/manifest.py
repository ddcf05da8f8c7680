"""The bundle manifest (`manifest.json`): what a bundle is, how it was made, how to check it.

Owned by the board side; the optimizer writes it through `Manifest.write`. A bundle is a
directory holding the manifest and every file it lists with its size and sha256:

    {"schema": "edgeforge.bundle/1", "created_utc": ..., "edgeforge_version": ...,
     "torch_version": ..., "architecture": {...}, "input": {"shape": [3, 32, 32],
     "dtype": "float32", "layout": "NCHW", "normalization": {"mean": [...], "std": [...]},
     "preprocess": {"resize": "shorter", ...}},  # agent/preprocess.py
     "classes": [...], "engine": "qnnpack", "quantization": {"mode": ..., "attempts": [...]},
     "data": {"source": ..., "description": ...}, "metrics": {...},
     "board_model": "quantized_cnn_scripted.pt",
     "sample": {"file": "sample.pt", "arrays": "sample.npz", "count": 32, "accuracy_pct": ...,
                "logit_tolerance": ...},
     "engines": {"torchscript": {"file": "quantized_cnn_scripted.pt", "runtime": "torch",
                                 "quantized_engine": "qnnpack", "sample_logits":
                                 "logits.torchscript", "sample_accuracy_pct": ...,
                                 "logit_tolerance": ..., ...},
                 "onnxruntime": {"file": "quantized_cnn.onnx", "runtime": "onnxruntime", ...}},
     "verification": {...}, "files": {"<name>": {"bytes": N, "sha256": "..."}}}

`board_model` is the TorchScript file: always built, always proven, the bundle's identity
(its sha256 names the version everywhere). `engines` lists every model file a board may run
(agent/engines), by engine, and fp32 files where the bundle carries them by `<engine>-fp32`
(`"onnxruntime-fp32": {"file": "fp32_cnn.onnx", "precision": "fp32", ...}`); a bundle from
before `engines` has the TorchScript file alone.

The sample (`arrays`, a numpy .npz read with allow_pickle=False, so a board needs no torch)
holds uint8 `images`, int64 `labels` and each engine's host logits (`logits.<engine>`).
`file` is the same sample for agents that predate `arrays`: torch.save'd uint8 `images`,
int64 `labels` and the TorchScript model's `logits`, loadable with weights_only=True.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.engines import FILES, TORCHSCRIPT
from agent.errors import BundleError
from agent.preprocess import RESIZE_POLICIES, Preprocess
from agent.signing import SIGNATURE_FILE
from agent.untrusted import TooLarge, Untrusted, loads_json, read_regular, shown

SCHEMA_NAME = "edgeforge.bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 4_000_000  # a manifest is a few kB; a larger one is refused unread
BOARD_MODEL = "quantized_cnn_scripted.pt"
SAMPLE_FILE = "sample.pt"  # for agents that predate SAMPLE_ARRAYS
SAMPLE_ARRAYS = "sample.npz"
ONNX_MODEL = "quantized_cnn.onnx"
EXECUTORCH_MODEL = "quantized_cnn.pte"
FP32_MODELS = {"onnxruntime-fp32": "fp32_cnn.onnx", "executorch-fp32": "fp32_cnn.pte"}
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
            info = z.getinfo(names[0])
            if info.file_size > MAX_MANIFEST_BYTES:
                raise Untrusted(f"embedded {METADATA_FILE} is {info.file_size:,} bytes")
            data = loads_json(z.read(info), f"embedded {METADATA_FILE}", MAX_MANIFEST_BYTES)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
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
        return read_regular(path, MAX_MANIFEST_BYTES, "manifest")
    except Untrusted as exc:
        raise BundleError(f"{exc} (copy the bundle again)") from None
    except FileNotFoundError:
        raise BundleError(f"{path}: no manifest (point model.dir at a bundle built by "
                          f"edge-optimize)") from None
    except OSError as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc}) (copy the bundle "
                          f"again)") from None


def check_sample(sample: dict[str, Any], input_shape: list[int], classes: int,
                 logit_keys: list[str], origin: str) -> dict[str, Any]:
    """The sample as numpy arrays, after checking they fit the manifest: `images`, `labels`
    and `logits` (one array per key of `logit_keys`).

    Raises:
        BundleError: a key missing, a wrong dtype or shape, or labels that do not match.
    """
    def bad(problem: str) -> BundleError:
        return BundleError(f"{origin}: {problem} (rebuild the bundle with edge-optimize)")

    missing = [k for k in ("images", "labels", *logit_keys)
               if not isinstance(sample.get(k), np.ndarray)]
    if missing:
        raise bad(f"the sample lacks the array(s) {', '.join(missing)} (it has "
                  f"{', '.join(map(str, sample)) or 'nothing'})")
    images, labels = sample["images"], sample["labels"]
    n = int(images.shape[0]) if images.ndim else 0
    if images.dtype != np.uint8 or list(images.shape[1:]) != input_shape or n < 1:
        raise bad(f"sample images must be uint8 [N, {', '.join(map(str, input_shape))}] "
                  f"with N >= 1, got {images.dtype} {list(images.shape)}")
    if labels.dtype != np.int64 or list(labels.shape) != [n]:
        raise bad(f"sample labels must be int64 [{n}] (one per image), got {labels.dtype} "
                  f"{list(labels.shape)}")
    for key in logit_keys:
        logits = sample[key]
        if logits.dtype.kind != "f" or list(logits.shape) != [n, classes]:
            raise bad(f"sample {key} must be float [{n}, {classes}], got {logits.dtype} "
                      f"{list(logits.shape)}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise bad(f"sample labels must be 0-{classes - 1}, got {int(labels.min())}-"
                  f"{int(labels.max())}")
    return {"images": images, "labels": labels,
            "logits": {k: sample[k].astype(np.float32) for k in logit_keys}}


def _check_fields(raw: dict[str, Any], origin: str) -> None:
    """The manifest fields a board computes with have the types it needs."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    inp, sample = raw.get("input"), raw.get("sample")
    shape = inp.get("shape") if isinstance(inp, dict) else None
    norm = inp.get("normalization") if isinstance(inp, dict) else None
    problems = []
    if not (isinstance(shape, list) and len(shape) == 3
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        problems.append(f"input.shape must be [channels, height, width], got {shape!r}")
    elif not (isinstance(norm, dict) and all(
            isinstance(norm.get(k), list) and len(norm[k]) == shape[0]
            and all(number(x) for x in norm[k]) for k in ("mean", "std"))):
        problems.append("input.normalization needs mean and std, one number per channel")
    prep = inp.get("preprocess") if isinstance(inp, dict) else None
    if prep is not None and not (isinstance(prep, dict)
                                 and prep.get("resize", "shorter") in RESIZE_POLICIES):
        problems.append(f"input.preprocess.resize must be one of {', '.join(RESIZE_POLICIES)}")
    classes = raw.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        problems.append("classes must be a non-empty list of names")
    if not (isinstance(sample, dict) and isinstance(sample.get("file"), str)
            and number(sample.get("accuracy_pct")) and number(sample.get("logit_tolerance"))):
        problems.append("sample needs file, accuracy_pct and logit_tolerance")
    if not isinstance(raw.get("engine"), str):
        problems.append("engine must be a name")
    engines = raw.get("engines", {})
    files = raw.get("files") or {}
    quantization = raw.get("quantization")
    mode = quantization.get("mode") if isinstance(quantization, dict) else None
    if not isinstance(engines, dict):
        problems.append("engines must map engine names to their files")
    else:
        for name, entry in engines.items():
            if name not in FILES:
                continue  # a newer optimizer's engine: this agent cannot run it anyway
            if not (isinstance(entry, dict) and entry.get("file") in files
                    and isinstance(entry.get("sample_logits"), str)
                    and number(entry.get("sample_accuracy_pct"))
                    and number(entry.get("logit_tolerance"))):
                problems.append(f"engines.{name} needs file (listed in files), sample_logits, "
                                f"sample_accuracy_pct and logit_tolerance")
                continue
            precision = entry.get("precision")
            fp32_name = name.endswith("-fp32")
            if precision is not None and (
                    (fp32_name and precision != "fp32")
                    or (not fp32_name and precision == "fp32" and mode != "fp32")):
                problems.append(f"engines.{name} says precision {shown(precision)}, but "
                                f"{name} names the bundle's "
                                f"{'fp32' if fp32_name else 'quantized'} file")
    if engines and not (isinstance(sample, dict) and isinstance(sample.get("arrays"), str)):
        problems.append("sample.arrays must name the .npz sample of a bundle with engines")
    if problems:
        raise BundleError(f"{origin}: {'; '.join(problems)} (rebuild the bundle with "
                          f"edge-optimize)")


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
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)
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

    @property
    def engine_entries(self) -> dict[str, dict[str, Any]]:
        """Every model file this agent knows that the bundle carries, by its name (an
        engine, or `<engine>-fp32`): TorchScript first, the int8 files before the fp32 ones."""
        if not self.engines:  # a bundle from before `engines`: the TorchScript file alone
            return {TORCHSCRIPT: {"file": self.board_model, "runtime": "torch",
                                  "quantized_engine": self.engine, "sample_logits": "logits",
                                  "sample_accuracy_pct": self.sample["accuracy_pct"],
                                  "logit_tolerance": self.sample["logit_tolerance"]}}
        return {name: {"quantized_engine": self.engine, **self.engines[name]}
                for name in FILES if name in self.engines}

    @property
    def preprocess(self) -> Preprocess:
        """How an image becomes this model's input, as the host defined it."""
        return Preprocess.from_input(self.input)

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
            raw = loads_json(data, "manifest", MAX_MANIFEST_BYTES)
        except Untrusted as exc:
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
        missing = sorted(known - set(raw) - {"board_model", "engines"})
        if missing:
            raise BundleError(f"{origin}: manifest lacks {', '.join(missing)} (rebuild the "
                              f"bundle with edge-optimize)")
        files = raw["files"]
        if not isinstance(files, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in files.values()):
            raise BundleError(f"{origin}: manifest files must map names to sha256 entries "
                              f"(rebuild the bundle with edge-optimize)")
        _check_fields(raw, origin)
        return cls(**{k: v for k, v in raw.items() if k in known})

    def board_files(self) -> list[str]:
        """The files a board needs: every engine's model and the labelled sample."""
        names = [self.board_model, *(str(e["file"]) for e in self.engine_entries.values()),
                 str(self.sample["file"]), *([str(self.sample["arrays"])]
                                             if "arrays" in self.sample else [])]
        return list(dict.fromkeys(names))

    def release_files(self) -> list[str]:
        """What a board receives of a signed bundle: manifest, signature, board files."""
        return [MANIFEST, SIGNATURE_FILE, *self.board_files()]

    def verified_path(self, bundle: Path, name: str) -> Path:
        """Path of bundle file `name` after checking its sha256 against the manifest.

        Raises:
            BundleError: not listed, missing, unreadable, or its sha256 differs.
        """
        self.verified_bytes(bundle, name)
        return bundle / name

    def verified_bytes(self, bundle: Path, name: str) -> bytes:
        """The content of bundle file `name`, read once and checked against its sha256.

        Loading from these bytes leaves no window for the file to change after the check.
        """
        path = self._listed(bundle, name)
        size = self.files[name].get("bytes")
        limit = size if isinstance(size, int) and size >= 0 else 1 << 32
        try:  # no more than the manifest says it holds (a file that is larger is not it)
            data = read_regular(path, limit, name)
        except TooLarge:
            raise BundleError(f"{path}: larger than the {limit:,} bytes the manifest lists, so "
                              f"it does not match the manifest's sha256; refusing to load it "
                              f"(copy the bundle again)") from None
        except Untrusted as exc:
            raise BundleError(f"{exc} (copy the bundle again)") from None
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

    def load_sample(self, bundle: Path) -> dict[str, Any]:
        """The verified labelled sample as numpy arrays: uint8 `images`, int64 `labels` and
        `logits`, the host's logits of each engine the bundle carries (by sample_logits key).

        Raises:
            BundleError: unreadable, or its contents are not what the manifest describes
                (keys, dtypes, shapes, label count and range).
        """
        keys = sorted({str(e["sample_logits"]) for e in self.engine_entries.values()})
        legacy = "arrays" not in self.sample
        name = str(self.sample["file" if legacy else "arrays"])
        data = self.verified_bytes(bundle, name)
        path = bundle / name
        try:
            sample = _torch_sample(data) if legacy else _npz_sample(data)
        except Exception as exc:  # sha matched, so this is a host-side bug or a mismatch
            raise BundleError(f"{path}: cannot read the sample ({exc})") from None
        return check_sample(sample, self.input_shape, len(self.classes), keys, str(path))


def _npz_sample(data: bytes) -> dict[str, Any]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _torch_sample(data: bytes) -> dict[str, Any]:
    """A bundle from before sample.npz: its torch.save'd sample (this needs torch)."""
    import torch

    sample = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(sample, dict):
        raise ValueError(f"a dict of tensors expected, got {type(sample).__name__}")
    return {k: v.numpy() for k, v in sample.items() if isinstance(v, torch.Tensor)}
