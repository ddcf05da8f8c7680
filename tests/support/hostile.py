"""Hostile inputs made by the tests: images whose headers lie, images of every pixel format,
deeply nested JSON, and a small real filesystem that fills up."""

from __future__ import annotations

import io
import struct
import subprocess
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A small PNG (a few KB) whose header claims `width` x `height` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(bytes(4_000_000)))
            + png_chunk(b"IEND", b""))


def encode(img: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def grey16_png(grey8: np.ndarray) -> bytes:
    """A 16-bit greyscale PNG of the uint8 HxW `grey8` (each value v as v * 257)."""
    return encode(Image.fromarray(grey8.astype(np.uint16) * 257))


def nested_json(depth: int, inner: bytes = b"1") -> bytes:
    """`depth` levels of arrays around `inner`: [[[...1...]]]."""
    return b"[" * depth + inner + b"]" * depth


@contextmanager
def small_filesystem(path: Path, size_kb: int) -> Iterator[Path]:
    """A real tmpfs of `size_kb` mounted at `path` (root only), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                   check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def can_mount() -> bool:
    """Whether this process may mount a tmpfs (root with CAP_SYS_ADMIN)."""
    import os
    import tempfile
    if os.geteuid() != 0:
        return False
    with tempfile.TemporaryDirectory() as d:
        try:
            with small_filesystem(Path(d) / "m", 64):
                return True
        except subprocess.CalledProcessError:
            return False
