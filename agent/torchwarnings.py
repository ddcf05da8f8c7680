"""Exact filters for the deprecation warnings torch 2.13 raises on APIs we rely on.

torch 2.13 deprecates eager-mode quantization (`torch.ao.quantization`) and TorchScript
(`torch.jit`), yet both still work and TorchScript is what the board loads. We filter those
messages, and only those, around the calls that raise them; everything else stays visible.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

# (message regex, category) -- each matched against the start of the warning text.
_KNOWN = (
    (r"torch\.ao\.quantization is deprecated", DeprecationWarning),
    (r"`torch\.jit\.(script|trace|freeze|save|load)` is deprecated", DeprecationWarning),
    # convert() builds quint8/qint8 tensors; the warning announces their future removal.
    (r"torch\.quantize_per_tensor, torch\.quantize_per_channel", UserWarning),
    # torch.load of quantized tensors goes through TypedStorage internally.
    (r"TypedStorage is deprecated", UserWarning),
    # Dynamic int8 Linear always asks for reduce_range, which qnnpack ignores (harmless).
    (r"Currently, qnnpack incorrectly ignores reduce_range", UserWarning),
    # Scripting an FX-converted model (torchvision's MobileNet) meets an empty container
    # annotated in __init__; TorchScript infers its type from the class instead (harmless).
    (r"The TorchScript type system doesn't support instance-level annotations on empty "
     r"non-base types", UserWarning),
)


@contextlib.contextmanager
def known_torch_deprecations() -> Iterator[None]:
    """Silence exactly the torch deprecations listed in this module, inside the block."""
    with warnings.catch_warnings():
        for message, category in _KNOWN:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield
