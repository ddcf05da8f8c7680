"""The ExecuTorch engine: the int8 program lowered to XNNPACK, run by ExecuTorch's runtime.

The program (`quantized_cnn.pte`) is exported for one image at a time (static shape
[1, C, H, W]); a batch is run image by image and the logits stacked. ExecuTorch's Python
runtime takes torch tensors and links against the torch it was built with, so this engine
needs both packages, at versions made for each other. The program carries no metadata of
ours: its input and output shapes (the runtime's MethodMeta) are checked against the
manifest before the first run.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from agent.engines import no_session
from agent.errors import BundleError

ENGINE = "executorch"
METHOD = "forward"
# The runtime's compiled bindings, newest name first. They are imported directly, after torch
# (whose libraries they link against): the package's Python wrapper (executorch.runtime)
# imports its exporter too, 3-7 s of start-up and a dozen deprecation warnings on this host.
BINDINGS = ("executorch.extension.pybindings._C",
            "executorch.extension.pybindings._portable_lib")
# The runtime's C++ log line ("[program.cpp:114] File size is too small...", or its backends'
# "E 00:00:00.002606 executorch:XNNPACKBackend.cpp:47] ..."): written to the process's stderr
# at every level, CPU probing included, with no switch to turn it off.
RUNTIME_LOG = re.compile(r"^(?:\[[\w.]+:\d+\]|[DIWEF] [\d:.]+ executorch:[\w.]+:\d+\]) ")

RAW_LOG_ENV = "EDGEFORGE_RUNTIME_LOG_RAW"  # set: the runtime's lines stay on stderr
IDENTIFIER = re.compile(rb"ET\d\d")  # the flatbuffer's file identifier, at byte 4
EXTENDED_MAGIC = b"eh00"  # the extended header, at byte 8: sizes of the program and segments

log = logging.getLogger(__name__)
_stderr_lock = threading.Lock()


@contextlib.contextmanager
def runtime_log() -> Iterator[list[str]]:
    """Around a runtime call that logs (loading a program, the thread pool): the runtime's
    lines are taken off stderr and collected (the caller may name one in an error; each goes
    to the debug log), and anything else written to stderr meanwhile is passed on unchanged.
    """
    lines: list[str] = []
    if os.environ.get(RAW_LOG_ENV):  # a child proving a file: if the runtime aborts, its
        yield lines  # lines must already be on stderr for the parent to read
        return
    with _stderr_lock, tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                if RUNTIME_LOG.match(line):
                    lines.append(RUNTIME_LOG.sub("", line))
                    log.debug("executorch runtime: %s", line)
                else:
                    print(line, file=sys.stderr)

def bindings() -> Any:
    """ExecuTorch's compiled runtime module.

    Raises:
        BundleError: the package is there but its runtime does not load (a torch it was not
            built for).
    """
    import torch  # noqa: F401  # loads libtorch, which the bindings link against

    problems = []
    for name in BINDINGS:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            problems.append(str(exc).splitlines()[0] if str(exc) else name)
    raise BundleError(f"executorch's runtime does not load ({'; '.join(problems)}) (install "
                      f"the executorch release made for this board's torch)")


_pool_threads: int | None = None  # what this process set the runtime's one thread pool to


def _size_pool(lib: Any, threads: int) -> None:
    """The runtime's thread pool (one per process) at `threads`, set only when it is not
    already: resetting it under a running method is unsafe. Older runtimes (1.0) cannot say
    its size, so what this process set is remembered."""
    global _pool_threads
    count = getattr(lib, "_threadpool_get_thread_count", None)
    current = count() if count is not None else _pool_threads
    if current != threads and hasattr(lib, "_unsafe_reset_threadpool"):
        lib._unsafe_reset_threadpool(threads)
        _pool_threads = threads


class ExecuTorchRunner:
    """A loaded ExecuTorch method behind the engine interface (agent/engines)."""

    def __init__(self, buffer: bytes, program: Any, method: Any, version: str,
                 name: str = ENGINE) -> None:
        import torch

        self.engine = name  # the bundle's name for the file (agent/engines)

        self._torch = torch
        # The runtime does not copy the program: the bytes, the program and the method live
        # exactly as long as this runner (freeing the bytes early crashed the process).
        self._buffer, self._program = buffer, program
        self._execute = method
        self.version = version
        self.run_prepared: Callable[[Any], Any] = self._run_images

    def __call__(self, batch: Any) -> np.ndarray:
        if isinstance(batch, np.ndarray):
            batch = self.prepare(batch)
        return self._run_images(batch)

    def prepare(self, batch: np.ndarray) -> list[Any]:
        """The batch as one [1, C, H, W] tensor per image, sharing the batch's memory."""
        x = self._torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        return [x[i:i + 1] for i in range(x.shape[0])]

    def _run_images(self, images: list[Any]) -> np.ndarray:
        try:
            out = [self._execute([image])[0] for image in images]
        except Exception as exc:  # the runtime raises RuntimeError, its bindings others
            raise RuntimeError(f"executorch: {exc}") from None
        return self._torch.cat(out).numpy()

    def session(self) -> contextlib.AbstractContextManager[None]:
        return no_session()


def load(data: bytes, path: Path, version: str, threads: int,
         expect: dict[str, Any] | None, name: str = ENGINE) -> ExecuTorchRunner:
    """The verified .pte bytes loaded on `threads` XNNPACK threads, their input and output
    checked against `expect` (input_shape, classes; None: not checked) before any run.

    Raises:
        BundleError: not a program this runtime loads, no XNNPACK in this runtime, or a
            program that disagrees with the manifest.
    """
    check_header(data, path)
    try:
        return _load(bindings(), data, path, version, threads, expect, name)
    except AttributeError as exc:  # a runtime release whose bindings differ from those known
        raise BundleError(f"{path}: executorch {version}'s runtime lacks {exc.name or exc} "
                          f"(install a release the runtime matrix lists: python -m "
                          f"agent.torch_matrix recommend --runtime executorch)") from None


def check_header(data: bytes, path: Path) -> None:
    """The program's flatbuffer identifier and its extended header's sizes, checked against
    the file before the runtime reads it (the runtime trusts them, and aborts the process on
    some files that lie).

    Raises:
        BundleError: not an ExecuTorch program, or sizes that point past the file's end.
    """
    size = len(data)
    fix = ("(copy the bundle again, or rebuild it with edge-optimize; the runtime was not "
           "given it)")
    if size < 8 or not IDENTIFIER.fullmatch(data[4:8]):
        raise BundleError(f"{path}: not an ExecuTorch program (no ETnn file identifier at "
                          f"byte 4) {fix}")
    program_size = size
    if data[8:12] == EXTENDED_MAGIC:
        if size < 32:
            raise BundleError(f"{path}: its extended header is cut short ({size} bytes) {fix}")
        length, program_size, base = struct.unpack_from("<IQQ", data, 12)
        segments = struct.unpack_from("<Q", data, 32)[0] if length >= 32 and size >= 40 else 0
        if length < 24 or program_size > size or base > size or base + segments > size \
                or (segments and base < program_size):
            raise BundleError(f"{path}: its header says a program of {program_size:,} bytes "
                              f"and segments at {base:,} (+{segments:,}), past the file's "
                              f"{size:,} bytes {fix}")
    root = struct.unpack_from("<I", data, 0)[0]
    if root < 8 or root >= program_size:
        raise BundleError(f"{path}: its flatbuffer root at byte {root:,} is outside the "
                          f"program's {program_size:,} bytes {fix}")


def _verified_program(lib: Any, buffer: bytes) -> Any:
    """The program, with the runtime's own flatbuffer verification where it has one."""
    verification = getattr(getattr(lib, "Verification", None), "InternalConsistency", None)
    if verification is None:
        return lib._load_program_from_buffer(buffer)
    return lib._load_program_from_buffer(buffer, program_verification=verification)


def _load(lib: Any, data: bytes, path: Path, version: str, threads: int,
          expect: dict[str, Any] | None, name: str = ENGINE) -> ExecuTorchRunner:
    buffer = bytes(data)  # the program reads from it for as long as it lives: keep it
    with runtime_log() as said:
        _size_pool(lib, threads)
        xnnpack = lib._is_available("XnnpackBackend")
        try:
            program = _verified_program(lib, buffer) if xnnpack else None
            method = program.load_method(METHOD) if program is not None else None
            problem = None
        except Exception as exc:  # the bindings raise RuntimeError or ValueError
            problem = str(exc).strip().splitlines()[0] if str(exc).strip() else \
                type(exc).__name__
    if not xnnpack:
        raise BundleError(f"{path}: this executorch runtime has no XNNPACK backend (install "
                          f"the executorch wheel from PyPI, which carries it)")
    if problem is not None or method is None:
        reason = said[-1] if said else problem
        raise BundleError(f"{path}: not a loadable ExecuTorch program ({reason}) (copy the "
                          f"bundle again, or rebuild it with an edge-optimize whose executorch "
                          f"matches this board's)")
    if expect is not None:
        agrees(method.method_meta(), path, expect)
    return ExecuTorchRunner(buffer, program, method, version, name)


def agrees(meta: Any, path: Path, expect: dict[str, Any]) -> None:
    """One float input of [1, *input_shape] and one output of [1, len(classes)]."""
    shape, classes = list(expect["input_shape"]), len(expect["classes"])
    inputs = [list(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]
    outputs = [list(meta.output_tensor_meta(i).sizes()) for i in range(meta.num_outputs())]
    if inputs != [[1, *shape]]:
        raise BundleError(f"{path}: the program takes {inputs}, the manifest says one input "
                          f"[1, {', '.join(map(str, shape))}] (rebuild the bundle; the model "
                          f"was not run)")
    if outputs != [[1, classes]]:
        raise BundleError(f"{path}: the program gives {outputs}, the manifest's {classes} "
                          f"classes need one output [1, {classes}] (rebuild the bundle; the "
                          f"model was not run)")
