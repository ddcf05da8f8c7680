"""The TorchScript engine: torch's quantized engine (qnnpack on ARM) runs the int8 file.

The only agent module that imports torch at the top: a board without torch never loads it.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent.errors import BundleError
from agent.torchwarnings import known_torch_deprecations

ENGINE = "torchscript"


class TorchScriptRunner:
    """A loaded TorchScript module behind the engine interface (agent/engines)."""

    def __init__(self, module: torch.jit.ScriptModule, name: str = ENGINE) -> None:
        self.engine = name  # the bundle's name for the file (agent/engines)
        self.module = module
        self.version = str(torch.__version__)
        self.run_prepared: Callable[[Any], Any] = module  # prepare()'s tensor needs no wrapper

    def __call__(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        # The tensor itself: its .numpy() cost 9 us per pass on the model's output here (3 %
        # of a 300 us pass), and a loop on random inputs never reads the logits at all.
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch)
        return self.module(batch)

    def prepare(self, batch: np.ndarray) -> torch.Tensor:
        # A fresh tensor per pass cost 7-9 % of the module's 300 us pass here (CPU time per
        # image, 21 interleaved rounds in one process), far more than torch.from_numpy's own
        # 1.5 us; a tensor made once and run again does not (README: the engine targets).
        return torch.from_numpy(batch)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        with torch.inference_mode(), known_torch_deprecations():
            yield


def load(data: bytes, path: Path, quantized_engine: str, threads: int,
         name: str = ENGINE) -> TorchScriptRunner:
    """A fresh runner for the verified TorchScript bytes, on `threads` intra-op threads."""
    torch.set_num_threads(threads)
    return TorchScriptRunner(load_scripted(path, quantized_engine, data), name)


def set_engine(engine: str) -> None:
    """Select torch's quantized engine, or raise BundleError naming what this torch has."""
    available = torch.backends.quantized.supported_engines
    if engine not in available:
        raise BundleError(f"quantized engine {engine!r} is not available in this torch "
                          f"{torch.__version__} (it has: {', '.join(available)}); rebuild the "
                          f"bundle with quantize.engine set to one of those")
    torch.backends.quantized.engine = engine


def load_scripted(path: Path, engine: str, data: bytes | None = None) -> torch.jit.ScriptModule:
    """Load a TorchScript file with `engine` selected first (packed weights depend on it).

    Loading TorchScript runs code: callers must have checked the file's sha256 first. With
    `data` (the file's verified content) the model is loaded from those bytes and `path`
    only names it in messages.
    """
    set_engine(engine)
    _consume_quint8_warning()
    try:
        with known_torch_deprecations():
            source = io.BytesIO(data) if data is not None else str(path)
            module = torch.jit.load(source, map_location="cpu")
    except FileNotFoundError:
        raise BundleError(f"{path}: model file missing (copy the whole bundle)") from None
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"{path}: not a loadable TorchScript file ({first})") from None
    module.eval()
    return module


def _consume_quint8_warning() -> None:
    """Raise torch's once-per-process quint8 deprecation here, under the exact filter.

    Inside a TorchScript forward the warning bypasses Python's filters and lands on stderr
    (the board's journal) as a C++ log line; emitted once from Python first, it never repeats.
    """
    with known_torch_deprecations():
        torch.quantize_per_tensor(torch.zeros(1), 1.0, 0, torch.quint8)
