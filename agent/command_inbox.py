"""The commands thread's queue: how the other threads talk to it without waiting.

The publisher thread puts each remote command (`command`) and each closed window with its
telemetry (`window`); the inference loop puts a fallback notice (`fell_back`) when a model on
trial failed a forward pass and it went back to the previous one by itself. None of them
blocks. Commands and windows share one bounded queue: a command the full queue refuses gets
a `busy` answer (the publisher publishes it, `busy_result`), a window it refuses is counted in
`unobserved` (diagnostics shows it). A fallback notice is never refused: there is at most one
per trial, so its own queue stays small by construction.
"""

from __future__ import annotations

import queue
import re
from typing import Any

from agent.telemetry import Window

INBOX = 64  # commands and windows waiting for the commands thread
REQUEST_ID = re.compile(rb'"request_id"\s*:\s*"([A-Za-z0-9._:-]{1,64})"')


class CommandInbox:
    """See the module docstring."""

    def __init__(self, size: int = INBOX) -> None:
        self.size = size
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(size)
        self._fallbacks: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self.unobserved = 0  # windows the full queue refused (only the publisher writes it)

    def command(self, name: str, payload: bytes) -> bool:
        """Queue a command (publisher thread); False when the queue is full."""
        try:
            self._queue.put_nowait(("cmd", (name, payload)))
            return True
        except queue.Full:
            return False

    def window(self, window: Window, fields: dict[str, Any]) -> None:
        """Queue a closed window and its telemetry fields (publisher thread)."""
        try:
            self._queue.put_nowait(("window", (window, fields)))
        except queue.Full:
            self.unobserved += 1

    def fell_back(self, failed_sha256: str, reason: str) -> None:
        """The loop went back to the previous model: `failed_sha256` failed (loop thread)."""
        self._fallbacks.put((failed_sha256, reason))

    def get(self, timeout: float) -> tuple[str, Any] | None:
        """The next item for the commands thread, fallbacks first; None after `timeout`."""
        try:
            return "fallback", self._fallbacks.get_nowait()
        except queue.Empty:
            pass
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def busy_result(self, name: str, payload: bytes) -> dict[str, Any]:
        """The cmd_result fields that refuse a command the full queue did not take."""
        head = REQUEST_ID.search(payload[:512])
        return {"request_id": head.group(1).decode() if head else None, "command": name,
                "ok": False, "result": "refused", "code": "busy",
                "reason": f"{self.size} commands are already waiting on this board; retry "
                          f"later", "data": {}}
