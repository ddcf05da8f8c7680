"""The user's own images: an ImageFolder tree, read in streams by worker processes.

    data.root/train/<class>/*.jpg|png|...   class names are the folder names
    data.root/val/<class>/...               optional; else a seeded split of train/

Files are listed and every image is decoded once at the start (in workers, with a progress
bar), so a broken file is found before training, not in epoch 7: unreadable ones are skipped,
counted and named in the data record, or refused when more than `data.max_bad_fraction` of
them are. Nothing is kept in memory but the list of paths: training batches come through
torchvision's `ImageFolder` and a `DataLoader`, with torchvision's augmentation; evaluation,
calibration and the bundle's sample go through the board's own `Preprocess` (the decoder
included), so the accuracy measured here is what the board will see.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from agent.errors import EdgeforgeError
from agent.preprocess import Preprocess
from agent.untrusted import Untrusted, read_regular
from optimizer.config import DataConfig
from optimizer.data import Calibration
from optimizer.errors import DataError

# torchvision's ImageFolder suffixes, limited to the formats the board decodes.
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
              ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what torchvision's pretrained weights expect
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_FILE_BYTES = 64 << 20


def _is_image(path: str) -> bool:
    return path.lower().endswith(EXTENSIONS) and not os.path.basename(path).startswith(".")


class _Decode:
    """ImageFolder's loader: a file's bytes through the board's decoder (RGB PIL image)."""

    def __init__(self, prep: Preprocess) -> None:
        self.prep = prep

    def __call__(self, path: str) -> Any:
        return self.prep.decode(read_regular(Path(path), MAX_FILE_BYTES))


class _BoardInput:
    """A decoded image -> uint8 CHW at the input size, exactly as the board resizes it."""

    def __init__(self, prep: Preprocess) -> None:
        self.prep = prep

    def __call__(self, img: Any) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.prep.fit(img).transpose(2, 0, 1)))


class _Check(torch.utils.data.Dataset[tuple[int, "str | None"]]):
    """One file decoded for the start-up check: (index, None) or (index, the reason)."""

    def __init__(self, paths: list[str], prep: Preprocess) -> None:
        self.paths, self.decode = paths, _Decode(prep)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, str | None]:
        try:
            self.decode(self.paths[i])
        except (EdgeforgeError, Untrusted, OSError) as exc:
            return i, str(exc)
        return i, None


def _workers(cfg: DataConfig) -> int:
    return cfg.workers if cfg.workers is not None else min(4, os.cpu_count() or 1)


def _classes(split: Path, what: str) -> list[str]:
    if not split.is_dir():
        raise DataError(f"{split}: no {what} folder (put the images in "
                        f"{split}/<class name>/, one folder per class)")
    classes = sorted(e.name for e in os.scandir(split)
                     if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{split}: no class folders (put each class's images in "
                        f"{split}/<class name>/)")
    return classes


@dataclass(frozen=True)
class FolderData:
    """A checked image folder: the good files of each split, their labels, the recipe."""

    source: str
    description: str
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: tuple[int, int]
    train_files: list[tuple[str, int]]
    test_files: list[tuple[str, int]]
    bad: list[tuple[str, str]]  # (path, reason) of the images skipped
    skipped: list[tuple[str, str]]  # (path, reason): links to what was read, broken links
    workers: int
    split: str  # "val/" or "held out 20 % of train/ (seed 0)"

    # --- building --------------------------------------------------------------------------

    @classmethod
    def scan(cls, cfg: DataConfig, input_shape: list[int]) -> FolderData:
        """List `cfg.root`'s images, decode each once, split them.

        Raises:
            DataError: the root, train/ or the class folders are missing, a class has no
                images, val/ has other classes than train/, there is only one class, a
                class is too small to split, or too many images cannot be read.
        """
        root = Path(cfg.root)
        if not root.is_dir():
            raise DataError(f"data.root {root}: no such folder (point data.root at the folder "
                            f"holding train/<class>/)")
        if input_shape[0] != 3:
            raise DataError(f"train.input_shape {input_shape}: a folder's images are RGB, so "
                            f"the input needs 3 channels (set train.input_shape=[3, H, W])")
        classes = _classes(root / "train", "train/")
        if len(classes) < 2:
            raise DataError(f"{root / 'train'}: one class ({classes[0]}); a classifier needs "
                            f"at least two class folders")
        val = root / "val"
        if val.exists():
            val_classes = _classes(val, "val/")
            if val_classes != classes:
                only_t = sorted(set(classes) - set(val_classes))
                only_v = sorted(set(val_classes) - set(classes))
                raise DataError(f"{val}: its classes differ from train/'s (only in train/: "
                                f"{', '.join(only_t) or '-'}; only in val/: "
                                f"{', '.join(only_v) or '-'}) (give both the same class "
                                f"folders)")
        prep = Preprocess((input_shape[1], input_shape[2]), IMAGENET_MEAN, IMAGENET_STD)

        # Every folder a listing may reach is known before any is read, so a link into
        # another class's folder, a split or the root is seen as one (never walked as if it
        # were this class's own images).
        seen: dict[tuple[int, int], str] = {}
        for folder in (root, root / "train", *(root / "train" / c for c in classes),
                       *((val, *(val / c for c in classes)) if val.exists() else ())):
            st = os.stat(folder)
            seen.setdefault((st.st_dev, st.st_ino), str(folder))
        skipped: list[tuple[str, str]] = []

        def listing(split: Path) -> list[tuple[str, int]]:
            found = []
            for label, name in enumerate(classes):
                images = _images(split / name, seen, skipped)
                if not images:
                    raise DataError(f"{split / name}: no images (put "
                                    f"{', '.join(EXTENSIONS[:3])}... files there, or remove "
                                    f"the folder)")
                found += [(p, label) for p in images]
            return found

        train = listing(root / "train")
        test = listing(val) if val.exists() else []
        if skipped:
            print(f"skipping {len(skipped)} linked or repeated file(s) and folder(s); first: "
                  f"{skipped[0][0]}: {skipped[0][1]}", file=sys.stderr)
        bad = _check(train + test, prep, cfg)
        broken = {p for p, _ in bad}
        train = [s for s in train if s[0] not in broken]
        test = [s for s in test if s[0] not in broken]
        if val.exists():
            split = "val/"
        else:
            train, test = _split(train, classes, cfg.val_fraction, cfg.seed, root)
            split = f"held out {100 * cfg.val_fraction:g} % of train/ per class (seed {cfg.seed})"
        # The test split in a seeded order, so its first images (the bundle's sample) hold
        # every class, not the first class's alone.
        order = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed))
        test = [test[int(i)] for i in order]
        for name, files in (("train", train), ("val", test)):
            counts = np.bincount([t for _, t in files], minlength=len(classes))
            empty = [classes[c] for c in np.flatnonzero(counts == 0)]
            if empty:
                raise DataError(f"{root}: no readable {name} images of class "
                                f"{', '.join(empty)} (add images, or fix the broken ones)")
        notes = "".join(f"; {n} {what} skipped" for n, what in (
            (len(bad), "unreadable image(s)"), (len(skipped), "linked or repeated item(s)")) if n)
        description = f"image folder {root} ({len(classes)} classes; test split: {split}{notes})"
        return cls(source="folder", description=description, classes=classes,
                   mean=IMAGENET_MEAN, std=IMAGENET_STD, size=prep.size, train_files=train,
                   test_files=test, bad=bad, skipped=skipped, workers=_workers(cfg),
                   split=split)

    # --- the Dataset interface (optimizer.data) --------------------------------------------

    @property
    def input_shape(self) -> list[int]:
        return [3, *self.size]

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.size, self.mean, self.std)

    @property
    def test_labels(self) -> torch.Tensor:
        return torch.tensor([t for _, t in self.test_files], dtype=torch.int64)

    @property
    def train_count(self) -> int:
        return len(self.train_files)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "description": self.description,
                "train_images": len(self.train_files), "test_images": len(self.test_files),
                "classes": len(self.classes), "test_split": self.split,
                "unreadable_images": len(self.bad),
                "unreadable": [{"path": p, "reason": r} for p, r in self.bad[:20]],
                "skipped_links": len(self.skipped),
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped[:20]]}

    def train_batches(self, batch_size: int, *, augment: bool,
                      generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torchvision import transforms

        if augment:
            tf = transforms.Compose([
                transforms.RandomResizedCrop(self.size, scale=(0.5, 1.0), antialias=True),
                transforms.RandomHorizontalFlip(),
                transforms.PILToTensor()])
        else:
            tf = _BoardInput(self.preprocess)
        loader = DataLoader(self._dataset(self.train_files, tf), batch_size=batch_size,
                            shuffle=True, generator=generator, num_workers=self.workers,
                            drop_last=False)
        yield from self._normalised(loader)

    def test_batches(self, batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(self._dataset(self.test_files, _BoardInput(self.preprocess)),
                            batch_size=batch_size, num_workers=self.workers)
        yield from self._normalised(loader)

    def test_pixels(self, n: int) -> torch.Tensor:
        return self._pixels(self.test_files[:n])

    def calibration(self, n: int, seed: int) -> Calibration:
        order = torch.randperm(len(self.train_files),
                               generator=torch.Generator().manual_seed(seed))[:n]
        files = [self.train_files[int(i)] for i in order]

        def read(size: int) -> Iterator[torch.Tensor]:
            for pixels in self._pixel_batches(files, size):
                yield self.preprocess.batch(pixels)

        return Calibration(len(files), read)

    # --- reading ---------------------------------------------------------------------------

    def _dataset(self, files: list[tuple[str, int]], transform: Any) -> Any:
        from torchvision.datasets.folder import DatasetFolder

        ds = DatasetFolder.__new__(DatasetFolder)  # the checked list, not a second scan
        ds.loader, ds.transform, ds.target_transform = _Decode(self.preprocess), transform, None
        ds.samples = ds.imgs = list(files)
        ds.targets = [t for _, t in files]
        ds.classes, ds.class_to_idx = list(self.classes), {c: i for i, c in enumerate(self.classes)}
        return ds

    def _pixels(self, files: list[tuple[str, int]]) -> torch.Tensor:
        if not files:
            return torch.zeros(0, 3, *self.size, dtype=torch.uint8)
        return torch.cat(list(self._pixel_batches(files, 256)))

    def _pixel_batches(self, files: list[tuple[str, int]], size: int) -> Iterator[torch.Tensor]:
        """`files` in order as uint8 NCHW batches at the input size, decoded by workers."""
        loader = DataLoader(self._dataset(files, _BoardInput(self.preprocess)), batch_size=size,
                            num_workers=self.workers if len(files) > size else 0)
        for x, _ in loader:
            yield x

    def _normalised(self, loader: DataLoader[Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        prep = self.preprocess
        for pixels, labels in loader:
            yield prep.batch(pixels), labels


def _images(top: Path, seen: dict[tuple[int, int], str],
            skipped: list[tuple[str, str]]) -> list[str]:
    """The image files under `top`, sorted, with links followed once: a folder or file
    already reached (through a link, a hard link or a loop back to a parent) is skipped and
    recorded in `skipped`, as is a broken link."""
    images: list[str] = []
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            skipped.append((str(folder), f"cannot be listed ({exc.strerror or exc})"))
            continue
        for entry in entries:
            if not entry.is_dir() and not _is_image(entry.name):
                continue
            try:
                st = os.stat(entry.path)  # through a link: what it points to
            except OSError:
                skipped.append((entry.path, "a broken link"))
                continue
            ident = (st.st_dev, st.st_ino)
            is_dir = stat.S_ISDIR(st.st_mode)
            if not is_dir and not stat.S_ISREG(st.st_mode):
                skipped.append((entry.path, "not a regular file"))
                continue
            if ident in seen:
                skipped.append((entry.path, f"the same {'folder' if is_dir else 'file'} as "
                                            f"{seen[ident]}, already read"))
                continue
            seen[ident] = entry.path
            if is_dir:
                stack.append(Path(entry.path))
            else:
                images.append(entry.path)
    return sorted(images)


def _check(files: list[tuple[str, int]], prep: Preprocess,
           cfg: DataConfig) -> list[tuple[str, str]]:
    """Decode every file once; the unreadable ones, or DataError past max_bad_fraction."""
    paths = [p for p, _ in files]
    loader: DataLoader[tuple[int, str | None]] = DataLoader(
        _Check(paths, prep), batch_size=32, num_workers=_workers(cfg),
                        collate_fn=lambda items: items)
    bad: list[tuple[str, str]] = []
    with tqdm(total=len(paths), desc="checking images", unit="img", file=sys.stderr,
              disable=None, mininterval=0.5, leave=False) as bar:
        for chunk in loader:
            bad += [(paths[i], reason) for i, reason in chunk if reason is not None]
            bar.update(len(chunk))
    if bad:
        print(f"skipping {len(bad)} unreadable image(s) of {len(paths)}; first: "
              f"{bad[0][0]}: {bad[0][1]}", file=sys.stderr)
    if len(bad) > cfg.max_bad_fraction * len(paths):
        path, reason = bad[0]
        raise DataError(f"{path}: {reason}; {len(bad)} of {len(paths)} images cannot be read, "
                        f"more than data.max_bad_fraction {cfg.max_bad_fraction:g} (fix or "
                        f"remove them, or raise data.max_bad_fraction)")
    return bad


def _split(files: list[tuple[str, int]], classes: list[str], fraction: float, seed: int,
           root: Path) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """A seeded per-class split of train/: (train, held out)."""
    g = torch.Generator().manual_seed(seed)
    train: list[tuple[str, int]] = []
    held: list[tuple[str, int]] = []
    for c, name in enumerate(classes):
        mine = [f for f in files if f[1] == c]
        if len(mine) < 2:
            raise DataError(f"{root / 'train' / name}: {len(mine)} readable image(s), too few "
                            f"to hold some out for testing (add images, or give a val/ "
                            f"folder)")
        k = min(len(mine) - 1, max(1, round(fraction * len(mine))))
        order = torch.randperm(len(mine), generator=g).tolist()
        held += [mine[i] for i in sorted(order[:k])]
        train += [mine[i] for i in sorted(order[k:])]
    return train, held
