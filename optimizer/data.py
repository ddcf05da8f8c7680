"""Image data for the optimizer: CIFAR-10 from the official archive, an offline stand-in, or
a folder of the user's own images (optimizer/folder.py).

Every dataset offers the same reading methods (`Dataset`), so the steps never hold a whole
split in memory: training batches, test batches in order, the first test images as pixels
(the bundle's sample) and calibration inputs. CIFAR-10 and the stand-in are small and kept as
uint8 NCHW tensors; `batches` turns them into normalised float batches (with random-crop and
flip augmentation for training) using the board's own `normalize`.
"""

from __future__ import annotations

import hashlib
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from agent.preprocess import Preprocess, normalize
from optimizer.config import DataConfig
from optimizer.errors import DataError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # published with the archive
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST = "test_batch"
# Per-channel mean and std of the CIFAR-10 training set (the values in common use).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

SYNTHETIC_NOTE = ("generated stand-in dataset (10 classes of 3x32x32 patterns), not CIFAR-10: "
                  "accuracy figures say nothing about CIFAR-10")


Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


class Dataset(Protocol):
    """What the optimizer's steps read from a dataset (ImageData, folder.FolderData)."""

    @property
    def source(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def classes(self) -> list[str]: ...
    @property
    def mean(self) -> tuple[float, ...]: ...
    @property
    def std(self) -> tuple[float, ...]: ...
    @property
    def input_shape(self) -> list[int]: ...
    @property
    def preprocess(self) -> Preprocess: ...
    @property
    def test_labels(self) -> torch.Tensor: ...
    @property
    def train_count(self) -> int: ...
    def describe(self) -> dict[str, Any]: ...

    def train_batches(self, batch_size: int, *, augment: bool,
                      generator: torch.Generator) -> Batches:
        """Shuffled, normalised training batches (augmented if asked)."""
        ...

    def test_batches(self, batch_size: int = 256) -> Batches:
        """The test split in order, through the board's preprocessing."""
        ...

    def test_pixels(self, n: int) -> torch.Tensor:
        """The first `n` test images as uint8 NCHW at the input size (the bundle's sample)."""
        ...

    def calibration(self, n: int, seed: int) -> Calibration:
        """`n` training images chosen by `seed`, through the board's preprocessing."""
        ...


@dataclass(frozen=True)
class Calibration:
    """Calibration inputs, read a batch at a time each time they are iterated, so they are
    never held whole (512 images at 224x224 are 300 MB of floats)."""

    count: int
    read: Callable[[int], Iterator[torch.Tensor]]  # batch size -> normalised NCHW batches

    def batches(self, batch_size: int = 64) -> Iterator[torch.Tensor]:
        return self.read(batch_size)

    @classmethod
    def of(cls, inputs: torch.Tensor) -> Calibration:
        """Normalised inputs already in memory."""
        return cls(int(inputs.shape[0]),
                   lambda size: (inputs[i:i + size] for i in range(0, inputs.shape[0], size)))


@dataclass(frozen=True)
class ImageData:
    """A labelled train/test split with everything a report needs to describe it."""

    source: str  # "cifar10" | "synthetic"
    description: str
    train_images: torch.Tensor  # uint8 [N, C, H, W]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def input_shape(self) -> list[int]:
        return list(self.train_images.shape[1:])

    @property
    def preprocess(self) -> Preprocess:
        """How an image becomes this model's input: recorded in the manifest, run by the
        board on every file, frame and request, and by the host when it evaluates."""
        _, h, w = self.input_shape
        return Preprocess((h, w), self.mean, self.std)

    @property
    def train_count(self) -> int:
        return int(self.train_images.shape[0])

    def describe(self) -> dict[str, Any]:
        """The data record that goes into reports and the manifest."""
        return {"source": self.source, "description": self.description,
                "train_images": int(self.train_images.shape[0]),
                "test_images": int(self.test_images.shape[0])}

    def train_batches(self, batch_size: int, *, augment: bool,
                      generator: torch.Generator) -> Batches:
        return batches(self.train_images, self.train_labels, batch_size, self.mean, self.std,
                       shuffle=True, augment=augment, generator=generator)

    def test_batches(self, batch_size: int = 256) -> Batches:
        prep = self.preprocess
        for i in range(0, self.test_images.shape[0], batch_size):
            yield prep.batch(self.test_images[i:i + batch_size]), \
                self.test_labels[i:i + batch_size]

    def test_pixels(self, n: int) -> torch.Tensor:
        return self.test_images[:n].clone()

    def calibration(self, n: int, seed: int) -> Calibration:
        n = min(n, self.train_count)
        idx = torch.randperm(self.train_count, generator=torch.Generator().manual_seed(seed))[:n]

        def read(size: int) -> Iterator[torch.Tensor]:
            for x, _ in batches(self.train_images[idx], self.train_labels[idx], size,
                                self.mean, self.std):
                yield x

        return Calibration(n, read)


def load(cfg: DataConfig, input_shape: list[int]) -> Dataset:
    """Load the dataset `cfg.source` names; a folder's images are read at `input_shape`.

    Raises:
        DataError: CIFAR-10 is missing and cannot be downloaded, or is corrupt; the folder
            is missing, empty or holds too many unreadable images.
    """
    if cfg.source == "folder":
        from optimizer.folder import FolderData

        return FolderData.scan(cfg, input_shape)
    if cfg.source == "synthetic":
        return synthetic(cfg.synthetic_train, cfg.synthetic_test, cfg.seed)
    return cifar10(Path(cfg.root), download=cfg.download)


# --- CIFAR-10 ---------------------------------------------------------------------------


def cifar10(root: Path, *, download: bool = True, url: str = CIFAR10_URL,
            md5: str = CIFAR10_MD5) -> ImageData:
    """CIFAR-10 from `root/cifar-10-batches-py`, fetched and checked first if missing."""
    folder = root / CIFAR10_DIR
    if not folder.is_dir():
        if not download:
            raise DataError(f"CIFAR-10 not found in {folder} and data.download is false "
                            f"(put the python archive's {CIFAR10_DIR} folder there, set "
                            f"data.download=true, or use --data synthetic)")
        fetch_cifar10(root, url=url, md5=md5)
    train = [_read_batch(folder / name) for name in CIFAR10_TRAIN]
    test_images, test_labels = _read_batch(folder / CIFAR10_TEST)
    meta = _unpickle(folder / "batches.meta")
    names = meta.get(b"label_names") or meta.get("label_names")
    if not isinstance(names, list) or len(names) != 10:
        raise DataError(f"{folder / 'batches.meta'}: no list of 10 label_names "
                        f"(the folder is not CIFAR-10's python version; delete it to re-fetch)")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return ImageData(
        source="cifar10", description="CIFAR-10 (official python version)",
        train_images=torch.cat([b[0] for b in train]),
        train_labels=torch.cat([b[1] for b in train]),
        test_images=test_images, test_labels=test_labels, classes=classes,
        mean=CIFAR10_MEAN, std=CIFAR10_STD)


def fetch_cifar10(root: Path, *, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5) -> None:
    """Download (unless already there) the archive into `root`, check its MD5, extract it."""
    root.mkdir(parents=True, exist_ok=True)
    archive = root / url.rsplit("/", 1)[-1]
    if not archive.is_file():
        print(f"downloading {url} -> {archive}", file=sys.stderr)
        partial = Path(tempfile.mkstemp(dir=root, prefix=".cifar-download-")[1])
        try:
            with urllib.request.urlopen(url, timeout=30) as response, partial.open("wb") as f:
                shutil.copyfileobj(response, f)
            partial.replace(archive)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            partial.unlink(missing_ok=True)  # never leave half an archive behind
            if isinstance(exc, urllib.error.HTTPError):
                exc.close()  # it holds the open response
            reason = getattr(exc, "reason", exc)
            raise DataError(f"CIFAR-10 is not in {root / CIFAR10_DIR} and the download from "
                            f"{url} failed ({reason}) (copy cifar-10-python.tar.gz into "
                            f"{root}, or use --data synthetic offline)") from None
    digest = _md5(archive)
    if digest != md5:
        raise DataError(f"{archive}: checksum mismatch, md5 {digest}, expected {md5} "
                        f"(the file is corrupt or not the official archive: delete it and "
                        f"run again to re-download)")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(root, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{archive}: cannot extract ({exc}) (delete it and run again)") from None


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10's batch files, refusing any class but numpy's array machinery."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in (("numpy.core.multiarray", "_reconstruct"),
                              ("numpy._core.multiarray", "_reconstruct")):
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):  # protocol-2 bytes written by Python 3
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path) -> dict[Any, Any]:
    try:
        with path.open("rb") as f:
            data = _CifarUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: missing from the CIFAR-10 folder (delete "
                        f"{path.parent} and run again to re-extract)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, OSError) as exc:
        raise DataError(f"{path}: not a CIFAR-10 batch file ({exc}) (delete {path.parent} "
                        f"and run again to re-extract)") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a CIFAR-10 batch file (delete {path.parent} and rerun)")
    return data


def _read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _unpickle(path)
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 \
            or labels is None or len(labels) != data.shape[0]:
        raise DataError(f"{path}: expected 'data' of shape [N, 3072] and N 'labels' "
                        f"(delete {path.parent} and run again to re-extract)")
    images = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8)).view(-1, 3, 32, 32)
    return images, torch.as_tensor(list(labels), dtype=torch.int64)


# --- the offline stand-in ----------------------------------------------------------------


def synthetic(n_train: int, n_test: int, seed: int = 0) -> ImageData:
    """A learnable 10-class 3x32x32 dataset, the same for the same seed on every machine.

    Each class is a smooth colour pattern (a sum of random 2-D waves); each image is its
    class pattern shifted, rescaled in contrast and brightness, blended with another class's
    pattern and covered in noise, so a small CNN learns it well but not perfectly.
    """
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    protos = torch.zeros(10, 3, 32, 32)
    for c in range(10):
        for _ in range(3):
            freq = 1.0 + 3.0 * torch.rand(2, generator=g)
            phase = 2 * torch.pi * torch.rand(1, generator=g)
            wave = torch.sin(2 * torch.pi * (freq[0] * xx + freq[1] * yy) / 32.0 + phase)
            protos[c] += torch.randn(3, 1, 1, generator=g) * wave
    protos = protos / protos.abs().amax(dim=(1, 2, 3), keepdim=True)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 10, (n,), generator=g)
        other = torch.randint(0, 10, (n,), generator=g)
        mix = 0.55 * torch.rand(n, 1, 1, 1, generator=g)
        img = (1 - mix) * protos[labels] + mix * protos[other]
        shifts = torch.randint(-4, 5, (n, 2), generator=g)
        for i in range(n):
            img[i] = torch.roll(img[i], (int(shifts[i, 0]), int(shifts[i, 1])), dims=(1, 2))
        img = img * (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g))
        img = img + 0.3 * torch.randn(n, 3, 1, 1, generator=g)
        img = img + 1.0 * torch.randn(img.shape, generator=g)
        pixels = ((img * 0.25 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return pixels, labels

    train_images, train_labels = make(n_train)
    test_images, test_labels = make(n_test)
    as_float = train_images.float() / 255.0
    mean = tuple(round(float(v), 4) for v in as_float.mean(dim=(0, 2, 3)))
    std = tuple(round(float(v), 4) for v in as_float.std(dim=(0, 2, 3)))
    return ImageData(source="synthetic", description=SYNTHETIC_NOTE,
                     train_images=train_images, train_labels=train_labels,
                     test_images=test_images, test_labels=test_labels,
                     classes=[f"pattern_{c}" for c in range(10)], mean=mean, std=std)


# --- batching ----------------------------------------------------------------------------


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
            mean: tuple[float, ...], std: tuple[float, ...], *, shuffle: bool = False,
            augment: bool = False, generator: torch.Generator | None = None,
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalised float batches; with `augment`, random crop (pad 4) and h-flip."""
    n = images.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        x = images[idx]
        if augment:
            x = _augment(x, generator)
        yield torch.from_numpy(normalize(x.numpy(), mean, std)), labels[idx]


def _augment(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    oy = torch.randint(0, 9, (b,), generator=generator)
    ox = torch.randint(0, 9, (b,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
                 rows, cols]
    flip = torch.rand(b, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out
