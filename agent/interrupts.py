"""Ctrl-C before the agent's own signal handlers run: held where it cannot be taken safely,
and turned into the exit code the command promises.

The CLIs catch KeyboardInterrupt in `main()`; the running agent replaces Python's SIGINT
handler with its own (agent/runner.py), which stops the loop cleanly.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


def interrupted(exit_code: int = 130) -> int:
    """The exit code for a Ctrl-C a CLI caught, after making sure Python keeps that code.

    CPython 3.11 (and earlier) marks a KeyboardInterrupt raised inside code run by `exec` or
    `eval` of a string (dataclasses and namedtuple build their methods that way, so any import
    may) as unhandled even when the program catches it, and then ends the process by SIGINT
    instead of with the program's exit code. Running any string resets that mark.
    """
    exec("pass")  # noqa: S102 - a constant string: resets CPython's unhandled-Ctrl-C mark
    return exit_code


@contextlib.contextmanager
def ctrl_c_held() -> Iterator[None]:
    """Hold a Ctrl-C that arrives inside the block and raise it when the block ends.

    For imports of native extensions (torch, onnxruntime, numpy): a KeyboardInterrupt raised
    while pybind11 initialises a module aborts the process (std::terminate, SIGABRT) or leaves
    "ImportError: initialization failed". Only Python's own handler is replaced, and only in
    the main thread (the only one a signal handler can be set from); a handler the program
    installed itself already does not raise.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt
