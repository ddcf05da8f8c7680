"""Image folders in torchvision's ImageFolder layout, written as real PNG and JPEG files.

Each class is a colour with a stripe direction, drawn with noise at a few sizes and aspect
ratios, so a small model learns it in an epoch or two and the board's resize is exercised.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

CLASSES = ("cat", "dog", "fox", "owl")
_COLOURS = ((200, 60, 40), (40, 160, 70), (50, 80, 200), (190, 170, 40))


def image(label: int, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """One RGB uint8 HxWx3 image of class `label`."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = np.sin((xx if label % 2 else yy) * (0.5 + 0.1 * label)) * 0.5 + 0.5
    base = np.asarray(_COLOURS[label % len(_COLOURS)], np.float32)
    img = base[None, None, :] * (0.6 + 0.4 * stripes[..., None])
    img += rng.normal(0, 25, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(rgb: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write(root: Path, per_class: int, *, classes: tuple[str, ...] = CLASSES,
          split: str = "train", seed: int = 0, sizes: tuple[tuple[int, int], ...] = (
              (40, 40), (36, 48), (56, 44))) -> list[Path]:
    """`per_class` images of each class under root/split/<class>/, half PNG, half JPEG."""
    rng = np.random.default_rng(seed)
    paths = []
    for label, name in enumerate(classes):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            fmt, ext = ("PNG", "png") if i % 2 == 0 else ("JPEG", "jpg")
            path = folder / f"{name}_{i:04d}.{ext}"
            path.write_bytes(encode(image(label, rng, sizes[i % len(sizes)]), fmt))
            paths.append(path)
    return paths
