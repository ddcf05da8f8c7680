"""config.yaml: one file for every edgeforge command, one frozen dataclass per section.

Each command family has one root dataclass whose fields are the sections it reads
(`AgentConfig` here, `OptimizerConfig` in optimizer/config.py, the operator tools' in
deploy/); `load_config` builds it. Unknown sections anywhere (SECTIONS is the one list of
names) and unknown keys in a section it reads are errors that name them. `--set section.key=value`
overrides are parsed as YAML scalars and checked exactly like the file.

The board sections (`device`, `model`, `source`, `loop`, `mqtt`, `spool`, `update`,
`homeassistant`) live here; the host steps
(`data`, `train`, `prune`, `quantize`, `export`, `report`) in `optimizer/config.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import re
import socket
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import ConfigError
from agent.untrusted import NotYAML, Untrusted, loads_yaml, read_regular, shown

MAX_CONFIG_BYTES = 1_000_000  # config.yaml is a few kB; anything larger is not a config

# Every top-level section any edgeforge command knows. A name outside this list is a typo.
SECTIONS = (
    "data", "train", "prune", "quantize", "export", "report",  # host: edge-optimize
    "monitor",  # host: edge-monitor
    "device", "model", "source", "loop", "mqtt", "spool", "update", "homeassistant",  # board
)
# Keys that moved: (old section, old key) -> (new section, new key). A config that still uses
# the old place is read as if it used the new one, with a warning, so a board upgraded in
# place keeps running; setting both is an error.
MOVED = {("loop", "input"): ("source", "kind")}

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")  # a command family's root config
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 1e5, 2.5E-3


class Invalid(ValueError):
    """Raised by a section's __post_init__; the loader adds file and section to the message."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def require(ok: bool, key: str, problem: str) -> None:
    """Raise Invalid(key, problem) unless `ok`."""
    if not ok:
        raise Invalid(key, problem)


def in_range(value: float, key: str, lo: float, hi: float, unit: str = "") -> None:
    """Raise Invalid unless lo <= value <= hi (NaN is never in range).

    Every number a config file, `--set` or a remote `set` can change is checked with this,
    in its section's __post_init__, so the three paths share one set of bounds.
    """
    def show(v: float) -> str:
        return f"{int(v):,}" if float(v).is_integer() else f"{v:g}"

    require(isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and lo <= value <= hi, key,
            f"must be {show(lo)}-{show(hi)}{unit}, got {shown(value)}")


def number_argument(lo: float = -math.inf) -> typing.Callable[[str], float]:
    """An argparse `type`: a finite number >= `lo` (argparse's float takes nan and inf)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {shown(text)}") from None
        if not math.isfinite(value) or value < lo:
            raise argparse.ArgumentTypeError(
                f"must be a finite number{f' >= {lo:g}' if math.isfinite(lo) else ''}, got "
                f"{text}")
        return value
    return parse


# --- board sections ---------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceConfig:
    id: str | None = None  # default: the hostname

    def __post_init__(self) -> None:
        if self.id is not None:
            require(bool(self.id) and "/" not in self.id and "+" not in self.id
                    and "#" not in self.id, "id", f"must be a non-empty name without "
                    f"'/', '+' or '#' (it becomes an MQTT topic level), got {shown(self.id)}")

    @property
    def resolved_id(self) -> str:
        """The configured id, or the hostname when none is set."""
        return self.id or socket.gethostname()


ENGINE_CHOICES = ("auto", "torchscript", "onnxruntime", "executorch",  # agent/engines FILES
                  "onnxruntime-fp32", "executorch-fp32")


@dataclass(frozen=True)
class ModelConfig:
    dir: str = "models"  # the bundle directory holding manifest.json
    engine: str = "auto"  # auto: the fastest engine that passes its proof on this board

    def __post_init__(self) -> None:
        require(self.engine in ENGINE_CHOICES, "engine",
                f"must be one of {', '.join(ENGINE_CHOICES)}, got {shown(self.engine)}")


SOURCE_KINDS = ("random", "sample", "folder", "video", "camera", "mqtt")
SYNTHETIC_KINDS = ("random", "sample")  # benchmark and canary: no results, only telemetry
LIVE_KINDS = ("video", "camera")  # frames come at the source's rate; the newest one wins
PUBLISH_POLICIES = ("every", "change", "rate")
AFTER_ACTIONS = ("move", "delete", "keep")
QUEUE_DEFAULTS = {"folder": 4, "video": 1, "camera": 1, "mqtt": 32}


@dataclass(frozen=True)
class SourceConfig:
    """What the agent runs the model on (agent/sources.py); see config.yaml for each key."""

    kind: str = "random"  # random | sample | folder | video | camera | mqtt
    path: str | None = None  # folder, video file or stream URL, camera device or "picamera2"
    after: str = "move"  # folder: move | delete | keep each classified file
    done_dir: str | None = None  # folder: default <path>/done
    failed_dir: str | None = None  # folder: unreadable images go here; default <path>/failed
    poll_s: float = 1.0  # folder: rescan period (inotify wakes it sooner where available)
    realtime: bool = True  # video file: at its own frame rate; false = as fast as decoded
    repeat: bool = False  # video file: start again at the end
    reopen_max_s: float = 30.0  # streams and cameras: reopen backoff ceiling
    width: int | None = None  # camera: capture size and rate; null = the device's default
    height: int | None = None
    fps: float | None = None
    queue: int | None = None  # frames waiting for inference; null: 1 live, 4 folder, 32 mqtt
    top_k: int = 3  # labels per result, best first
    min_score: float = 0.0  # labels below this softmax score are left out of `top`
    publish: str = "every"  # live sources: every | change (top label changed) | rate
    max_per_s: float = 2.0  # publish: rate -> at most this many live results per second
    max_image_mb: float = 8.0  # folder and mqtt: a larger file or request is refused unread
    max_image_pixels: int = 50_000_000  # a larger image is refused from its header, undecoded
    settle_s: float = 5.0  # folder: a file unchanged this long is complete (and a truncated
    # one that stays unchanged this long is failed)
    response_prefix: str | None = None  # mqtt: a request's MQTT 5 response topic must start
    # with this; null = any topic the broker takes (never a wildcard or a $ topic)

    def __post_init__(self) -> None:
        require(self.kind in SOURCE_KINDS, "kind",
                f"must be one of {', '.join(SOURCE_KINDS)}, got {shown(self.kind)}")
        needs_path = self.kind in ("folder", "video", "camera")
        require(not needs_path or bool(self.path), "path",
                f"source.kind {self.kind} needs source.path (the "
                + {"folder": "folder to watch", "video": "video file or stream URL",
                   "camera": "device, for example /dev/video0, or picamera2"}.get(self.kind, "")
                + ")")
        require(self.after in AFTER_ACTIONS, "after",
                f"must be one of {', '.join(AFTER_ACTIONS)}, got {shown(self.after)}")
        in_range(self.poll_s, "poll_s", 0.05, 3600, " seconds")
        in_range(self.reopen_max_s, "reopen_max_s", 1, 3600, " seconds")
        for key in ("width", "height"):
            value = getattr(self, key)
            if value is not None:
                in_range(value, key, 1, 16384, " pixels")
        if self.fps is not None:
            in_range(self.fps, "fps", 0.1, 1000, " frames per second")
        if self.queue is not None:
            in_range(self.queue, "queue", 1, 1024, " frames")
        in_range(self.top_k, "top_k", 1, 1000)
        in_range(self.min_score, "min_score", 0, 1)
        require(self.publish in PUBLISH_POLICIES, "publish",
                f"must be one of {', '.join(PUBLISH_POLICIES)}, got {shown(self.publish)}")
        in_range(self.max_per_s, "max_per_s", 0.01, 1000, " results per second")
        in_range(self.max_image_mb, "max_image_mb", 0.001, 256, " MB")
        # The top is Pillow's own decompression-bomb limit, which refuses larger images first.
        in_range(self.max_image_pixels, "max_image_pixels", 1, 178_956_970, " pixels")
        in_range(self.settle_s, "settle_s", 0.1, 3600, " s")
        if self.response_prefix is not None:
            require(bool(self.response_prefix) and not set("+#\0") & set(self.response_prefix),
                    "response_prefix", f"must be a topic prefix without + or #, got "
                    f"{shown(self.response_prefix)} (or null for any topic)")

    @property
    def queue_size(self) -> int:
        """Frames between the source and inference (the kind's default when unset)."""
        return self.queue or QUEUE_DEFAULTS.get(self.kind, 1)

    @property
    def serving(self) -> bool:
        """Real inputs whose predictions are published (not a benchmark or canary)."""
        return self.kind not in SYNTHETIC_KINDS


@dataclass(frozen=True)
class LoopConfig:
    rate_hz: float = 0.0  # 0 = as fast as possible; 0-10000
    batch_size: int = 1  # 1-1024
    threads: int = 1  # 1-256
    warmup: int = 20  # 0-100000
    window_s: float = 10.0  # 0.5 s - 1 h

    def __post_init__(self) -> None:
        in_range(self.rate_hz, "rate_hz", 0, 10_000, " per second (0 = as fast as possible)")
        in_range(self.batch_size, "batch_size", 1, 1024)
        in_range(self.threads, "threads", 1, 256)
        in_range(self.warmup, "warmup", 0, 100_000)
        in_range(self.window_s, "window_s", 0.5, 3600, " seconds")


SETTABLE = ("rate_hz", "window_s")  # what a remote `set` may change, until a restart


def loop_changes(args: Mapping[str, Any]) -> dict[str, float]:
    """The loop settings a `set` command carries, as numbers (ranges: LoopConfig's).

    Raises:
        ValueError: an unknown key, no key at all, or a value that is not a number.
    """
    unknown = sorted(set(args) - set(SETTABLE))
    if unknown or not args:
        raise ValueError(f"set takes {' and/or '.join(SETTABLE)}, got "
                         f"{', '.join(unknown) or 'nothing'}")
    for key, value in args.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {shown(value)}")
    return {key: float(value) for key, value in args.items()}


@dataclass(frozen=True)
class MqttConfig:
    host: str = "localhost"
    port: int = 1883
    topic_prefix: str = "edgeforge"
    qos: int = 1
    keepalive: int = 30
    protocol: int = 5  # the agent's MQTT version: 5, or 3 for 3.1.1 (no response topics)
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        require(1 <= self.port <= 65535, "port", f"must be 1-65535, got {self.port}")
        require(self.qos in (0, 1, 2), "qos", f"must be 0, 1 or 2, got {self.qos}")
        require(self.protocol in (3, 5), "protocol",
                f"must be 5 (MQTT 5) or 3 (MQTT 3.1.1), got {self.protocol}")
        in_range(self.keepalive, "keepalive", 5, 65535, " seconds")
        require(bool(self.topic_prefix) and not any(c in self.topic_prefix for c in "+#"),
                "topic_prefix", f"must be non-empty without '+' or '#', "
                f"got {shown(self.topic_prefix)}")
        require((self.cert_file is None) == (self.key_file is None), "cert_file",
                "cert_file and key_file go together: set both or neither")


@dataclass(frozen=True)
class SpoolConfig:
    path: str = "spool.sqlite3"
    max_mb: float = 50.0
    max_age_s: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        in_range(self.max_mb, "max_mb", 0.001, 100_000, " MB")
        in_range(self.max_age_s, "max_age_s", 1, 10 * 365 * 86400, " seconds")


@dataclass(frozen=True)
class UpdateConfig:
    """Signed model updates over MQTT and remote commands (see agent/remote_commands.py)."""

    public_key: str | None = None  # Ed25519 PEM; null = updates refused, signatures unchecked
    keep: int = 3  # versions kept in the store
    max_payload_mb: float = 16.0  # a bigger command payload is refused unread
    smoke_iters: int = 50  # timed passes of the smoke test
    smoke_max_p99_ms: float = 500.0  # the smoke test's latency budget
    watch_windows: int = 3  # windows watched after a switch before it is confirmed
    # Latency regressions are judged on paired passes of the new and the old model run side
    # by side during the trial (agent/regression.py): a significant rise of the median by
    # more than this rolls back; p99 is the second signal, with its own, looser limit.
    max_p50_regression_pct: float = 25.0
    max_p99_regression_pct: float = 50.0
    max_accuracy_drop_pct: float = 2.0  # sample accuracy drop (points) that rolls back
    # A signed command older than this is refused (agent/command_auth.py); its nonce is
    # remembered this long, beside the spool.
    command_max_age_s: float = 300.0

    def __post_init__(self) -> None:
        in_range(self.command_max_age_s, "command_max_age_s", 1, 86400, " s")
        in_range(self.keep, "keep", 2, 100, " (the current version and ones to roll back to)")
        in_range(self.max_payload_mb, "max_payload_mb", 0.001, 256, " MB")
        in_range(self.smoke_iters, "smoke_iters", 1, 100_000)
        in_range(self.smoke_max_p99_ms, "smoke_max_p99_ms", 0.001, 60_000, " ms")
        in_range(self.watch_windows, "watch_windows", 1, 10_000)
        in_range(self.max_p50_regression_pct, "max_p50_regression_pct", 1, 10_000, " %")
        in_range(self.max_p99_regression_pct, "max_p99_regression_pct", 1, 10_000, " %")
        in_range(self.max_accuracy_drop_pct, "max_accuracy_drop_pct", 0, 100, " points")


@dataclass(frozen=True)
class HomeAssistantConfig:
    """MQTT discovery for Home Assistant (agent/homeassistant.py)."""

    enabled: bool = False
    discovery_prefix: str = "homeassistant"

    def __post_init__(self) -> None:
        require(bool(self.discovery_prefix) and not any(c in self.discovery_prefix for c in "+#"),
                "discovery_prefix", f"must be non-empty without '+' or '#', "
                f"got {shown(self.discovery_prefix)}")


@dataclass(frozen=True)
class AgentConfig:
    """What edge-agent reads: the board sections of config.yaml."""

    device: DeviceConfig = field(default_factory=DeviceConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    homeassistant: HomeAssistantConfig = field(default_factory=HomeAssistantConfig)


# --- loading ------------------------------------------------------------------------------


def load_config(path: Path | None, overrides: Sequence[str], root: type[R]) -> R:
    """Read `path` (or built-in defaults when None), apply overrides, build `root`.

    `root` is a command family's frozen dataclass (AgentConfig, OptimizerConfig, ...) whose
    fields are the sections it reads; sections it does not read are only checked by name.

    Raises:
        ConfigError: unreadable file, bad YAML, unknown section or key, wrong type or value.
    """
    origin = str(path) if path is not None else "built-in defaults"
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(path)
    overridden: set[tuple[str, str]] = set()
    for item in overrides:
        section, key, value = _parse_override(item)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raw[section] = {}
        raw[section][key] = value
        overridden.add((section, key))
    _migrate(raw, origin)
    for name in raw:
        if name not in SECTIONS:
            raise ConfigError(f"{origin}: unknown section {shown(name)} "
                              f"(known sections: {', '.join(SECTIONS)})")
    built: dict[str, Any] = {}
    for name, cls in typing.get_type_hints(root).items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: {name}: must be a mapping of keys, "
                              f"got {type(values).__name__}")
        built[name] = _build(cls, name, values, origin, overridden)
    return root(**built)


def _migrate(raw: dict[str, Any], origin: str) -> None:
    """Move keys that moved (MOVED) to their new place, saying so once each.

    Raises:
        ConfigError: both the old and the new key are set.
    """
    for (section, key), (new_section, new_key) in MOVED.items():
        old = raw.get(section)
        if not isinstance(old, dict) or key not in old:
            continue
        value = old.pop(key)
        new = raw.setdefault(new_section, {})
        if not isinstance(new, dict):
            continue  # the section's own check names the problem
        if new_key in new:
            raise ConfigError(f"{origin}: {section}.{key} moved to {new_section}.{new_key}, "
                              f"which is set too: remove {section}.{key}")
        new[new_key] = value
        log.warning("%s: %s.%s is now %s.%s (read as %s.%s: %s; rename it)", origin, section,
                    key, new_section, new_key, new_section, new_key, value)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = read_regular(path, MAX_CONFIG_BYTES, "config file").decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (pass --config with an existing "
                          f"file, or copy config.yaml from the project)") from None
    except Untrusted as exc:
        raise ConfigError(str(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    try:
        data = loads_yaml(text, str(path))
    except Untrusted as exc:
        raise ConfigError(str(exc)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of sections, got {type(data).__name__}")
    return data


def _parse_override(item: str) -> tuple[str, str, Any]:
    dotted, sep, text = item.partition("=")
    section, dot, key = dotted.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError(f"--set {shown(item)}: expected section.key=value, "
                          f"for example --set train.epochs=1")
    if text.strip() in ("null", "Null", "NULL", "~"):
        return section, key, None
    if not text.strip():
        raise ConfigError(f"--set {shown(item)}: no value (write {dotted.strip()}=null for "
                          f"none, or quote an empty string: {dotted.strip()}='\"\"')")
    try:
        value = loads_yaml(text, f"--set {shown(item)}")
    except NotYAML:
        value = text  # not YAML: take the text as a string and let the type check decide
    except Untrusted as exc:
        raise ConfigError(str(exc)) from None
    if "#" in text and not (isinstance(value, str) and "#" in value):
        # YAML starts a comment at "#": what follows it would be dropped without a word
        read = "nothing" if value is None else repr(value)
        raise ConfigError(f"--set {shown(item)}: YAML reads {shown(text.strip())} as {read} "
                          f"(a '#' starts a comment): quote the value, e.g. "
                          f"{dotted.strip()}='\"{text.strip()}\"'")
    if value is None:
        raise ConfigError(f"--set {shown(item)}: YAML reads {shown(text.strip())} as null: "
                          f"write null if that is meant, or quote the value")
    return section, key, value


def _build(cls: type[T], section: str, values: dict[str, Any], origin: str,
           overridden: set[tuple[str, str]]) -> T:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    def where(key: str) -> str:
        return f"--set {section}.{key}" if (section, key) in overridden else \
            f"{origin}: {section}.{key}"

    for key in values:
        if key not in names:
            raise ConfigError(f"{where(key)}: unknown key (known keys of {section}: "
                              f"{', '.join(names)})")
    kwargs = {}
    for key, value in values.items():
        try:
            kwargs[key] = _coerce(value, hints[key])
        except Invalid as exc:
            raise ConfigError(f"{where(key)}: {exc.problem}") from None
    try:
        return cls(**kwargs)
    except Invalid as exc:
        raise ConfigError(f"{where(exc.key)}: {exc.problem}") from None


def _coerce(value: Any, hint: Any) -> Any:
    """Check `value` against a field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0])
    if origin is list:
        if not isinstance(value, list):
            raise Invalid("", f"must be a list, got {shown(value)}")
        return [_coerce(v, args[0]) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise Invalid("", f"must be a mapping, got {shown(value)}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise Invalid("", f"must be true or false, got {shown(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid("", f"must be a whole number, got {shown(value)}")
        return value
    if hint is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e5 (no dot) as a string; it is a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid("", f"must be a number, got {shown(value)}")
        if not math.isfinite(value):
            raise Invalid("", f"must be a finite number, got {shown(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise Invalid("", f"must be a string, got {shown(value)}")
        return value
    raise TypeError(f"config field type {hint!r} is not supported")  # a bug, not user input


def default_config_path(candidates: Sequence[str]) -> Path | None:
    """The first existing file of `candidates`, or None to use the built-in defaults."""
    for candidate in candidates:
        p = Path(candidate)
        if p.is_file():
            return p
    return None
