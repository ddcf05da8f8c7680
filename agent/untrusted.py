"""Reading what arrives from outside: bounded file reads and bounded JSON.

Everything a board or a monitor reads from the network, the disk or the filesystem (MQTT
payloads, manifests, config files, key files, watched images) goes through one of these, so
a hostile input costs a refusal, never a hang, a crash or unbounded memory:

    read_regular   a regular file only (a FIFO, device, socket or a link to one is refused
                   before it is opened; then opened non-blocking and checked again with
                   fstat, in case it was replaced), at most `limit` bytes
    loads_json     at most `max_bytes`, nested at most `max_depth` deep (checked by a scan
                   that does not recurse, before the parser runs: the parser itself recurses
                   once per level and a deep enough document exhausts the stack), no integer
                   longer than MAX_JSON_DIGITS digits (refused before it is converted)
    loads_yaml     what `yaml.safe_load` reads (anchors, aliases, merge keys), with a key
                   given twice in one mapping refused, and the document's size with every
                   alias expanded counted on the composed graph before anything is built: an
                   alias bomb (a few lines that expand to billions of values) or an alias that
                   contains itself is refused in the parse
    shown          a value quoted for an error message: at most a short prefix of it

Both raise `Untrusted` (a ValueError; `TooLarge` for a file over its limit) with a message
that says what is wrong; callers put it into their own error (ConfigError, BundleError, a
counted bad message).
"""

from __future__ import annotations

import json
import os
import re
import reprlib
import stat
from pathlib import Path
from typing import Any

import yaml

MAX_JSON_DEPTH = 64  # no edgeforge message or manifest nests more than 6 deep
MAX_JSON_BYTES = 4_000_000
MAX_JSON_DIGITS = 40  # longer than any 128-bit integer; Python converts 4,300 at most
MAX_YAML_NODES = 100_000  # values with aliases expanded; config.yaml has a few hundred
SHOWN_CHARS = 80

# Strings (skipped whole, so brackets inside them do not count) and brackets.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


class Untrusted(ValueError):
    """An input refused before it is used: not a regular file, too large, too deep."""


class TooLarge(Untrusted):
    """A file larger than its limit."""


class NotYAML(Untrusted):
    """Text that does not parse as YAML at all."""


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
        return json.loads(raw, parse_int=_bounded_int)
    except _LongInt as exc:
        raise Untrusted(f"{what} holds an integer of {exc.digits:,} digits, over the limit of "
                        f"{MAX_JSON_DIGITS} (send a number a real value can take)") from None
    except UnicodeDecodeError as exc:
        raise Untrusted(f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise Untrusted(f"{what} is not JSON ({exc})") from None


class _LongInt(Exception):
    def __init__(self, digits: int) -> None:
        super().__init__(digits)
        self.digits = digits


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_JSON_DIGITS:
        raise _LongInt(digits)
    return int(text)


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = SHOWN_CHARS
_SHOWN.maxother = SHOWN_CHARS
_SHOWN.maxlong = 40
_SHOWN.maxlevel = 3
for _name in ("maxlist", "maxtuple", "maxdict", "maxset", "maxfrozenset"):
    setattr(_SHOWN, _name, 6)


def shown(value: Any) -> str:
    """`repr(value)` cut to a short prefix, for an error message (never the whole of a huge
    or deeply nested value: its repr could take minutes and gigabytes)."""
    text = _SHOWN.repr(value)
    return text if len(text) <= SHOWN_CHARS + 20 else text[:SHOWN_CHARS] + "..."


_MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last
    in silence), naming both lines. Merge keys (`<<`) are not keys of the mapping: a key
    written beside one overrides the merged value, as YAML says."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            try:
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{shown(key)} is given twice, at lines {first[key]} and "
                        f"{line} (keep one)", key_node.start_mark)
                first[key] = line
            except TypeError:
                pass  # an unhashable key: the base class names it
        return super().construct_mapping(node, deep)  # type: ignore[no-any-return]


def expanded_size(root: yaml.Node, limit: int) -> int:
    """How many values `root` holds with every alias expanded, counted on the composed graph
    (each shared node once, its count reused), stopping past `limit`.

    Raises:
        Untrusted: past `limit`, or a collection that contains itself through an alias.
    """
    sizes: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # post-order without recursion
        node, done = stack.pop()
        key = id(node)
        if done:
            open_.discard(key)
            children = _children(node)
            total = 1 + sum(sizes[id(c)] for c in children)
            if total > limit:
                raise Untrusted(f"its aliases expand to more than {limit:,} values (an "
                                f"alias bomb?); write the values out")
            sizes[key] = total
            continue
        if key in sizes:
            continue
        open_.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in open_:
                raise Untrusted(f"an alias at line {child.start_mark.line + 1} refers to a "
                                f"collection that contains it; write the values out")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def loads_yaml(text: str, what: str = "YAML", max_nodes: int = MAX_YAML_NODES) -> Any:
    """Read `text` as `yaml.safe_load` does, refusing a key given twice and aliases that
    expand past `max_nodes` values (checked on the composed graph, before construction).

    Raises:
        NotYAML: not valid YAML (with its line).
        Untrusted: a key given twice, an alias bomb, a collection that contains itself, or
            nested too deeply to compose.
    """
    loader = StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded_size(node, max_nodes)
        return loader.construct_document(node)
    except Untrusted as exc:
        raise Untrusted(f"{what}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise NotYAML(f"{what}: not valid YAML{where} ({problem[:200]})") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise Untrusted(f"{what}: nested too deeply to be a config file") from None
    except ValueError as exc:  # an integer past Python's 4,300-digit conversion limit
        reason = "an integer too long to convert" if "digits" in str(exc) else str(exc)[:120]
        raise Untrusted(f"{what}: a value YAML cannot convert ({reason}; write a number a "
                        f"setting can take)") from None
    finally:
        loader.dispose()
