"""How an image becomes the model's input: defined once, recorded in the manifest, run by both.

The optimizer writes a `Preprocess` into the bundle manifest (`input.preprocess`, beside
`input.shape` and `input.normalization`) and evaluates its models through `Preprocess.batch`;
the board builds the same object from the manifest and runs `Preprocess.image` on every
file, frame and request. Both end in `normalize`, so a PNG of a test image gives the board
bit for bit the tensor the host measured accuracy on.

    decode     encoded bytes -> RGB uint8 (Pillow; EXIF orientation applied, alpha dropped;
               the first frame of an animation; 16-bit samples scaled to 8 bits, palette,
               grey, CMYK and YCbCr converted; 32-bit float and CIELab pixels refused)
    resize     "shorter": scale so the shorter side fits the input, keeping the aspect ratio,
               then crop the centre; "stretch": scale to the input size exactly
    normalize  uint8 / 255, minus mean, over std, per channel

Pillow is imported only where an image is decoded or resized: a board on `random` or
`sample` does not need it. Everything here is numpy: a board without torch runs it, and the
host's `batch` turns the result into a tensor.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.errors import ImageError

if TYPE_CHECKING:  # torch only on the host (batch); Pillow where an image is decoded
    import torch
    from PIL import Image as PILImage

RESIZE_POLICIES = ("shorter", "stretch")
MAX_PIXELS = 50_000_000  # a larger image is refused before it is decoded (a 50 MP photo)
# The formats a camera, phone or application sends (JPEG includes phones' MPO). Pillow reads
# many more (EPS even runs Ghostscript); an input from the network gets only these decoders.
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
# A resize larger than this (a 1x100000 strip scaled to a 32-pixel short side) resizes only
# the part the crop keeps.
MAX_FIT_PIXELS = 16_000_000
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 NCHW images -> float32, scaled to [0, 1] then standardised per channel.

    Host and board both call this, so the board's input is bit-for-bit the host's: three
    float32 operations, each correctly rounded by IEEE 754 whatever the CPU.
    """
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    out = images.astype(np.float32)
    out /= np.float32(255.0)
    out -= m
    out /= s
    return out


def pillow() -> Any:
    """The PIL.Image module, or ImageError saying how to install it."""
    try:
        from PIL import Image
    except ImportError:
        raise ImageError("decoding images needs Pillow: pip install 'edgeforge[images]' "
                         "(on Raspberry Pi OS: apt install python3-pil)") from None
    return Image


def to_rgb(img: PILImage.Image) -> PILImage.Image:
    """A decoded image of any Pillow mode -> 8-bit RGB with the same look.

    16-bit grey (PNG, TIFF, PGM) keeps its top 8 bits, as 16-bit colour already does when
    Pillow reads it; 32-bit integer grey is read as 16-bit or 8-bit data when its values fit;
    transparency (alpha, or a palette's transparent index) is dropped.

    Raises:
        ImageError: 32-bit float or integer pixels out of the 16-bit range, CIELab pixels.
    """
    mode = img.mode
    if mode in ("RGB", "L", "1", "CMYK", "YCbCr", "RGBX", "RGBA", "LA"):
        return img.convert("RGB")
    if mode in ("P", "PA", "La", "RGBa"):  # a palette with a transparent index, or
        return img.convert("RGBA").convert("RGB")  # premultiplied alpha: through RGBA
    if mode in _SIXTEEN_BIT or mode == "I":
        grey = np.asarray(img).astype(np.int64)
        low, high = (int(grey.min()), int(grey.max())) if grey.size else (0, 0)
        if low < 0 or high > 65535:
            raise ImageError(f"32-bit integer pixels from {low} to {high} (save the image "
                             f"as 8- or 16-bit)")
        if mode in _SIXTEEN_BIT or high > 255:
            grey >>= 8
        return pillow().fromarray(grey.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        raise ImageError("32-bit floating-point pixels (save the image as 8- or 16-bit)")
    raise ImageError(f"pixel format {mode} has no RGB conversion here (save the image as "
                     f"RGB)")


@dataclass(frozen=True)
class Preprocess:
    """The recipe from an RGB image to the model's input tensor (see the module docstring)."""

    size: tuple[int, int]  # height, width of the model's input
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "shorter"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_POLICIES)}, "
                             f"got {self.resize!r}")

    @classmethod
    def from_input(cls, spec: dict[str, Any]) -> Preprocess:
        """Build from a manifest's `input` record (older bundles: the default policy)."""
        shape, norm = spec["shape"], spec["normalization"]
        policy = (spec.get("preprocess") or {}).get("resize", "shorter")
        return cls((int(shape[1]), int(shape[2])), tuple(norm["mean"]), tuple(norm["std"]),
                   str(policy))

    def describe(self) -> dict[str, Any]:
        """The manifest's `input.preprocess` record."""
        return {"decode": "RGB (Pillow, EXIF orientation applied, alpha dropped)",
                "resize": self.resize, "interpolation": "bilinear",
                "crop": "center" if self.resize == "shorter" else "none",
                "size": list(self.size), "scale": "uint8 / 255",
                "then": "(x - mean) / std per channel"}

    # --- one image (the board) ------------------------------------------------------------

    def decode(self, data: bytes, max_pixels: int = MAX_PIXELS) -> PILImage.Image:
        """Encoded bytes (JPEG, PNG, BMP, GIF, TIFF, WebP, PPM) -> an RGB image.

        The size in the header is checked against `max_pixels` before any pixel is decoded.

        Raises:
            ImageError: not an image of those formats, truncated or corrupt, larger than
                `max_pixels`, or of a pixel format that has no faithful RGB (see `to_rgb`).
        """
        image_mod = pillow()
        from PIL import ImageOps, UnidentifiedImageError

        if not data:
            raise ImageError("empty: 0 bytes")
        try:
            with warnings.catch_warnings():
                # Our own limit (below) decides; Pillow's would warn between its two limits.
                warnings.simplefilter("ignore", image_mod.DecompressionBombWarning)
                img = image_mod.open(io.BytesIO(data), formats=FORMATS)
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(f"{width}x{height} is larger than {max_pixels:,} pixels "
                                 f"(source.max_image_pixels)")
            img.load()
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # noqa: BLE001 -- a broken EXIF block: keep the orientation
                pass
            return to_rgb(img)
        except ImageError:
            raise
        except image_mod.DecompressionBombError as exc:  # the header claims a huge image
            raise ImageError(f"larger than {max_pixels:,} pixels, source.max_image_pixels "
                             f"({exc})") from None
        except UnidentifiedImageError:
            raise ImageError(f"not an image of a format read here ({', '.join(FORMATS)}; "
                             f"{len(data):,} bytes starting {data[:8]!r})") from None
        except MemoryError:
            raise ImageError("too large to decode in the memory left") from None
        except Exception as exc:  # noqa: BLE001 -- a decoder fed hostile bytes can raise
            # anything (OSError for truncation, but also ValueError, struct.error,
            # IndexError, ZeroDivisionError...): each is this input's fault, not the agent's.
            raise ImageError(f"corrupt or truncated image ({type(exc).__name__}: "
                             f"{str(exc)[:200]})") from None

    def fit(self, img: PILImage.Image) -> np.ndarray:
        """Resize (and crop) an RGB image to the input size: uint8 HWC."""
        height, width = self.size
        if img.size != (width, height):
            image_mod = pillow()
            if self.resize == "stretch":
                img = img.resize((width, height), image_mod.Resampling.BILINEAR)
            else:
                scale = max(width / img.width, height / img.height)
                w = max(width, round(img.width * scale))
                h = max(height, round(img.height * scale))
                left, top = (w - width) // 2, (h - height) // 2
                if w * h <= MAX_FIT_PIXELS:
                    img = img.resize((w, h), image_mod.Resampling.BILINEAR)
                    img = img.crop((left, top, left + width, top + height))
                else:  # an extreme aspect ratio: resize only the centre, never the whole strip
                    img = img.resize((width, height), image_mod.Resampling.BILINEAR,
                                     box=(left / scale, top / scale, (left + width) / scale,
                                          (top + height) / scale))
        return np.array(img, dtype=np.uint8)

    def image(self, rgb: PILImage.Image | np.ndarray) -> np.ndarray:
        """One RGB image (PIL, or uint8 HWC array) -> the model's float32 CHW input."""
        if isinstance(rgb, np.ndarray):
            if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
                raise ImageError(f"expected an RGB uint8 HxWx3 array, got {rgb.dtype} "
                                 f"{list(rgb.shape)}")
            if rgb.shape[:2] != self.size:
                rgb = self.fit(pillow().fromarray(rgb, "RGB"))
        else:
            rgb = self.fit(rgb)
        chw = np.ascontiguousarray(np.asarray(rgb).transpose(2, 0, 1))[None]
        return normalize(chw, self.mean, self.std)[0]

    def encoded(self, data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
        """Encoded image bytes -> the model's float CHW input (decode, fit, normalize).

        Raises:
            ImageError: see `decode`.
        """
        return self.image(self.decode(data, max_pixels))

    def warm_up(self) -> None:
        """Import and exercise Pillow once, so the first real input is not the one that
        pays for loading it (about 40 ms).

        Raises:
            ImageError: Pillow is not installed.
        """
        image_mod = pillow()
        buf = io.BytesIO()
        image_mod.new("RGB", (self.size[1] + 3, self.size[0] + 1)).save(buf, "PNG")
        self.encoded(buf.getvalue())

    # --- many images (the host) -----------------------------------------------------------

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW images -> the model's float NCHW input, each through the board's steps.

        Images already at the input size (a dataset's) skip the resize, as `fit` does.
        """
        import torch

        if list(images.shape[2:]) == list(self.size):
            return torch.from_numpy(normalize(images.numpy(), self.mean, self.std))
        image_mod = pillow()
        return torch.from_numpy(np.stack([self.image(image_mod.fromarray(
            images[i].permute(1, 2, 0).contiguous().numpy(), "RGB"))
            for i in range(images.shape[0])]))
