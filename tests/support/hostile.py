"""Hostile inputs made by the tests: images whose headers lie, images of every pixel format,
deeply nested JSON, and a small real filesystem that fills up."""

from __future__ import annotations

import io
import struct
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
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


def png_raw(width: int, height: int, bit_depth: int, colour: int, rows: bytes) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit colour): IHDR, one IDAT, IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b""))


def image_cases(rgb: np.ndarray) -> dict[str, tuple[bytes, str | None]]:
    """Inputs an image source must answer, from one uint8 HxWx3 image: name -> (bytes, what
    the answer must be): "ok" (a prediction), a text its error contains, or None (either:
    a damaged file a decoder may or may not read, but it is answered)."""
    img = Image.fromarray(rgb, "RGB")
    h, w = rgb.shape[:2]
    cases: dict[str, tuple[bytes, str | None]] = {}
    for fmt in ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM"):
        data = encode(img, fmt)
        cases[f"{fmt.lower()} valid"] = (data, "ok")
        for cut in (0.1, 0.5, 0.9):
            cases[f"{fmt.lower()} cut at {cut:.0%}"] = (data[: int(len(data) * cut)], None)
        flipped = bytearray(data)
        for i in range(len(flipped) // 3, len(flipped), max(1, len(flipped) // 7)):
            flipped[i] ^= 0x5A
        cases[f"{fmt.lower()} bytes flipped"] = (bytes(flipped), None)
    for mode in ("L", "1", "LA", "RGBA", "P"):
        cases[f"mode {mode} png"] = (encode(img.convert(mode), "PNG"), "ok")
    for mode in ("L", "1", "LA", "RGBA", "P", "CMYK", "YCbCr"):
        cases[f"mode {mode} tiff"] = (encode(img.convert(mode), "TIFF"), "ok")
    pal = img.convert("P")
    pal.info["transparency"] = 0
    cases["palette with transparency"] = (encode(pal, "PNG"), "ok")
    cases["cmyk jpeg"] = (encode(img.convert("CMYK"), "JPEG"), "ok")
    grey = np.asarray(img.convert("L"))
    cases["16-bit grey png"] = (grey16_png(grey), "ok")
    cases["16-bit grey tiff"] = (encode(Image.fromarray(grey.astype(np.uint16) * 257), "TIFF"),
                                 "ok")
    rows16 = b"".join(b"\0" + (rgb[y].astype(">u2") * 257).tobytes() for y in range(h))
    cases["16-bit rgb png"] = (png_raw(w, h, 16, 2, rows16), "ok")
    cases["32-bit integer tiff in 16-bit range"] = (encode(Image.new("I", (w, h), 40000),
                                                           "TIFF"), "ok")
    cases["32-bit integer tiff beyond 16 bits"] = (encode(Image.new("I", (w, h), 10**6),
                                                          "TIFF"), "32-bit integer")
    cases["32-bit float tiff"] = (encode(Image.new("F", (w, h), 0.5), "TIFF"), "floating-point")
    cases["cielab tiff"] = (encode(img.convert("LAB"), "TIFF"), "no RGB conversion")
    frames = [img, img.rotate(90)]
    cases["animated gif"] = (encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
                             "ok")
    cases["animated png"] = (encode(frames[0], "PNG", save_all=True, append_images=frames[1:]),
                             "ok")
    cases["multi-page tiff"] = (encode(frames[0], "TIFF", save_all=True,
                                       append_images=frames[1:]), "ok")
    cases["1x1"] = (encode(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"), "ok")
    cases["1x100000 strip"] = (encode(Image.new("RGB", (1, 100_000), (9, 99, 199)), "PNG"), "ok")
    cases["100000x1 strip"] = (encode(Image.new("RGB", (100_000, 1), (9, 99, 199)), "PNG"), "ok")
    cases["png 0x0 header"] = (png_raw(0, 0, 8, 2, b""), None)
    cases["png 100000x100000 header"] = (bomb_png(), "pixels")
    cases["png 9000x9000 header"] = (bomb_png(9000, 9000), "pixels")
    gif = bytearray(encode(img, "GIF"))
    gif[6:10] = struct.pack("<HH", 65535, 65535)
    cases["gif 65535x65535 header"] = (bytes(gif), "pixels")
    bmp = bytearray(encode(img, "BMP"))
    bmp[18:26] = struct.pack("<ii", 60000, 60000)
    cases["bmp 60000x60000 header"] = (bytes(bmp), "pixels")
    jpeg = bytearray(encode(img, "JPEG"))
    sof = jpeg.find(b"\xff\xc0")
    jpeg[sof + 5: sof + 9] = struct.pack(">HH", 65000, 65000)
    cases["jpeg 65000x65000 header"] = (bytes(jpeg), "pixels")
    cases["webp 16383x16383"] = (_webp_header(16383, 16383), None)
    for name, data in (("empty", b""), ("one byte", b"\x89"), ("text", b"hello, board\n" * 9),
                       ("eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"),
                       ("svg", b"<svg xmlns='http://www.w3.org/2000/svg' width='9'/>"),
                       ("pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"),
                       ("zip", b"PK\x03\x04" + bytes(60)),
                       ("html", b"<!doctype html><title>x</title>"),
                       ("png signature only", b"\x89PNG\r\n\x1a\n"),
                       ("jpeg markers only", b"\xff\xd8\xff\xd9"),
                       ("random bytes", np.random.default_rng(3).bytes(4096))):
        cases[name] = (data, "empty" if not data else "not an image")
    return cases


def _webp_header(width: int, height: int) -> bytes:
    """A lossless WebP header claiming `width` x `height`, with no image data after it."""
    bits = (width - 1) | ((height - 1) << 14)
    vp8l = b"\x2f" + struct.pack("<I", bits)
    return b"RIFF" + struct.pack("<I", 4 + 8 + len(vp8l)) + b"WEBPVP8L" + \
        struct.pack("<I", len(vp8l)) + vp8l



def until_answered(send: Callable[[int], object], answered: Callable[[], bool],
                   timeout_s: float = 60.0) -> None:
    """Call send(1), send(2), ... every half second until `answered()`: the agent's
    subscription is in place (a message sent before the broker has it reaches no one)."""
    deadline = time.monotonic() + timeout_s
    n = 0
    while time.monotonic() < deadline:
        n += 1
        send(n)
        until = time.monotonic() + 0.5
        while time.monotonic() < until:
            if answered():
                return
            time.sleep(0.05)
    raise AssertionError(f"no answer to {n} probe(s) in {timeout_s:g} s")
