"""Reading what arrives from outside: bounded file reads and bounded JSON.

Everything a board or a monitor reads from the network, the disk or the filesystem (MQTT
payloads, manifests, config files, key files, watched images) goes through one of these, so
a hostile input costs a refusal, never a hang, a crash or unbounded memory:

    read_regular   a regular file only (a FIFO, device, socket or a link to one is refused
                   before it is opened; then opened non-blocking and checked again with
                   fstat, in case it was replaced), at most `limit` bytes
    loads_json     at most `max_bytes`, nested at most `max_depth` deep (checked by a scan
                   that does not recurse, before the parser runs: the parser itself recurses
                   once per level and a deep enough document exhausts the stack)

Both raise `Untrusted` (a ValueError; `TooLarge` for a file over its limit) with a message
that says what is wrong; callers put it into their own error (ConfigError, BundleError, a
counted bad message).
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

MAX_JSON_DEPTH = 64  # no edgeforge message or manifest nests more than 6 deep
MAX_JSON_BYTES = 4_000_000

# Strings (skipped whole, so brackets inside them do not count) and brackets.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


class Untrusted(ValueError):
    """An input refused before it is used: not a regular file, too large, too deep."""


class TooLarge(Untrusted):
    """A file larger than its limit."""


def read_regular(path: Path | str, limit: int, what: str = "file") -> bytes:
    """The bytes of regular file `path` (symlinks followed), refused if larger than `limit`.

    Raises:
        Untrusted: not a regular file, or larger than `limit` bytes.
        OSError: the file cannot be opened or read (FileNotFoundError included).
    """
    _regular(path, os.stat(path).st_mode, what)  # never opened otherwise (a device's
    # open can act: a tape rewinds, a serial line raises DTR)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        _regular(path, st.st_mode, what)  # and it is still one (replaced since the stat?)
        if st.st_size > limit:
            raise TooLarge(f"{path} is {st.st_size:,} bytes, over the {what} limit of "
                            f"{limit:,} bytes")
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while True:  # a file that grows while read is still bounded
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise TooLarge(f"{path} grew past the {what} limit of {limit:,} bytes "
                                f"while it was read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _regular(path: Path | str, mode: int, what: str) -> None:
    if not stat.S_ISREG(mode):
        raise Untrusted(f"{path} is {_kind(mode)}, not a regular file (point the {what} at a "
                        f"regular file)")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def json_depth(data: bytes) -> int:
    """How deep arrays and objects nest in `data` (0 for a scalar), without recursion."""
    depth = deepest = 0
    for match in _TOKENS.finditer(data):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


def loads_json(data: bytes | str, what: str = "payload", max_bytes: int = MAX_JSON_BYTES,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON that came from outside (NaN and Infinity are read as floats, as Python's
    json does: callers that take numbers check them, and name the key).

    Raises:
        Untrusted: over `max_bytes`, nested deeper than `max_depth`, not UTF-8 or not JSON.
    """
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise Untrusted(f"{what} of {len(raw):,} bytes is over the limit of {max_bytes:,}")
    # Fewer brackets than the limit cannot nest past it: most messages skip the scan.
    depth = 0 if raw.count(b"[") + raw.count(b"{") <= max_depth else json_depth(raw)
    if depth > max_depth:
        raise Untrusted(f"{what} nests {depth} levels deep, over the limit of {max_depth}")
    try:
        return json.loads(raw)
    except UnicodeDecodeError as exc:
        raise Untrusted(f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise Untrusted(f"{what} is not JSON ({exc})") from None

