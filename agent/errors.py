"""Exceptions of the board agent, and the base every edgeforge package builds on.

    EdgeforgeError            base: a CLI prints "<ClassName>: <message>" and exits `exit_code`
    +-- ConfigError           a config file, key or --set override is wrong
    +-- BundleError           a model bundle is missing, tampered with or unusable here
    |   +-- Refused           a remote command the agent will not carry out: `code` is a
    |                         stable short name for scripts; `request_id` and `vid` say which
    |                         command and which version, when they are known
    +-- RuntimeMismatch       the installed torch is known to crash on this board's CPU
    +-- ImageError            an input is not a usable image (undecodable, truncated, too
    |                         large), or the library to decode it is not installed
    +-- SourceError           an input source (folder, video, stream, camera) cannot be
                              opened or read; live sources retry with backoff

The optimizer adds its own subclasses in `optimizer/errors.py`, the operator tools theirs in
`deploy/errors.py`. Context goes into the constructor, never onto an instance afterwards.
"""

from __future__ import annotations


class EdgeforgeError(Exception):
    """Base class: a problem the user can fix, reported in one line."""

    exit_code = 2


class ConfigError(EdgeforgeError):
    """A config file, key or override is missing or invalid."""


class BundleError(EdgeforgeError):
    """A bundle (manifest, model file, sample) is missing, mismatched or unusable."""


class Refused(BundleError):
    """A command or update the board will not take, with a stable `code`."""

    def __init__(self, code: str, message: str, request_id: str | None = None,
                 vid: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id
        self.vid = vid


class RuntimeMismatch(EdgeforgeError):
    """The installed torch is known to crash on this board's CPU."""


class ImageError(EdgeforgeError):
    """An input that is not a usable image: not decodable, truncated, empty or too large."""


class SourceError(EdgeforgeError):
    """An input source cannot be opened or read (a missing folder, device or stream)."""
