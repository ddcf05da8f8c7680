"""config.yaml: one file for every edgeforge command, one frozen dataclass per section.

Each command builds the sections it reads with `load_config`; unknown sections anywhere and
unknown keys in a section it reads are errors that name them. `--set section.key=value`
overrides are parsed as YAML scalars and checked exactly like the file.

The board sections (`device`, `model`, `loop`, `mqtt`, `spool`) live here; the host steps
(`data`, `train`, `prune`, `quantize`, `export`, `report`) in `optimizer/config.py`.
"""

from __future__ import annotations

import dataclasses
import socket
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from agent.errors import ConfigError

# Every top-level section any edgeforge command knows. A name outside this list is a typo.
SECTIONS = (
    "data", "train", "prune", "quantize", "export", "report",  # host: edge-optimize
    "monitor",  # host: edge-monitor
    "device", "model", "loop", "mqtt", "spool", "update", "homeassistant",  # board: edge-agent
)

T = TypeVar("T")


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


# --- board sections ---------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceConfig:
    id: str | None = None  # default: the hostname

    def __post_init__(self) -> None:
        if self.id is not None:
            require(bool(self.id) and "/" not in self.id and "+" not in self.id
                    and "#" not in self.id, "id", f"must be a non-empty name without "
                    f"'/', '+' or '#' (it becomes an MQTT topic level), got {self.id!r}")

    @property
    def resolved_id(self) -> str:
        """The configured id, or the hostname when none is set."""
        return self.id or socket.gethostname()


@dataclass(frozen=True)
class ModelConfig:
    dir: str = "models"  # the bundle directory holding manifest.json


@dataclass(frozen=True)
class LoopConfig:
    input: str = "random"  # random | sample
    rate_hz: float = 0.0  # 0 = as fast as possible
    batch_size: int = 1
    threads: int = 1
    warmup: int = 20
    window_s: float = 10.0

    def __post_init__(self) -> None:
        require(self.input in ("random", "sample"), "input",
                f"must be 'random' or 'sample', got {self.input!r}")
        require(self.rate_hz >= 0, "rate_hz", f"must be >= 0 (0 = as fast as possible), "
                f"got {self.rate_hz}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")
        require(self.warmup >= 0, "warmup", f"must be >= 0, got {self.warmup}")
        require(self.window_s > 0, "window_s", f"must be > 0, got {self.window_s}")


@dataclass(frozen=True)
class MqttConfig:
    host: str = "localhost"
    port: int = 1883
    topic_prefix: str = "edgeforge"
    qos: int = 1
    keepalive: int = 30
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        require(1 <= self.port <= 65535, "port", f"must be 1-65535, got {self.port}")
        require(self.qos in (0, 1, 2), "qos", f"must be 0, 1 or 2, got {self.qos}")
        require(self.keepalive >= 5, "keepalive", f"must be >= 5 seconds, got {self.keepalive}")
        require(bool(self.topic_prefix) and not any(c in self.topic_prefix for c in "+#"),
                "topic_prefix", f"must be non-empty without '+' or '#', "
                f"got {self.topic_prefix!r}")
        require((self.cert_file is None) == (self.key_file is None), "cert_file",
                "cert_file and key_file go together: set both or neither")


@dataclass(frozen=True)
class SpoolConfig:
    path: str = "spool.sqlite3"
    max_mb: float = 50.0
    max_age_s: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        require(self.max_mb > 0, "max_mb", f"must be > 0, got {self.max_mb}")
        require(self.max_age_s > 0, "max_age_s", f"must be > 0, got {self.max_age_s}")


@dataclass(frozen=True)
class UpdateConfig:
    """Signed model updates over MQTT and remote commands (see agent/commands.py)."""

    public_key: str | None = None  # Ed25519 PEM; null = updates refused, signatures unchecked
    keep: int = 3  # versions kept in the store
    max_payload_mb: float = 16.0  # a bigger command payload is refused unread
    smoke_iters: int = 50  # timed passes of the smoke test
    smoke_max_p99_ms: float = 500.0  # the smoke test's latency budget
    watch_windows: int = 3  # windows watched after a switch before it is confirmed
    max_p99_regression_pct: float = 50.0  # median p99 rise over the old model's that rolls back
    max_accuracy_drop_pct: float = 2.0  # sample accuracy drop (points) that rolls back

    def __post_init__(self) -> None:
        require(self.keep >= 2, "keep", f"must be >= 2 (the current version and one to roll "
                f"back to), got {self.keep}")
        require(self.max_payload_mb > 0, "max_payload_mb", f"must be > 0, "
                f"got {self.max_payload_mb}")
        require(self.smoke_iters >= 1, "smoke_iters", f"must be >= 1, got {self.smoke_iters}")
        require(self.smoke_max_p99_ms > 0, "smoke_max_p99_ms", f"must be > 0, "
                f"got {self.smoke_max_p99_ms}")
        require(self.watch_windows >= 1, "watch_windows", f"must be >= 1, "
                f"got {self.watch_windows}")
        require(self.max_p99_regression_pct > 0, "max_p99_regression_pct", f"must be > 0, "
                f"got {self.max_p99_regression_pct}")
        require(self.max_accuracy_drop_pct >= 0, "max_accuracy_drop_pct", f"must be >= 0, "
                f"got {self.max_accuracy_drop_pct}")


@dataclass(frozen=True)
class HomeAssistantConfig:
    """MQTT discovery for Home Assistant (agent/homeassistant.py)."""

    enabled: bool = False
    discovery_prefix: str = "homeassistant"

    def __post_init__(self) -> None:
        require(bool(self.discovery_prefix) and not any(c in self.discovery_prefix for c in "+#"),
                "discovery_prefix", f"must be non-empty without '+' or '#', "
                f"got {self.discovery_prefix!r}")


BOARD_SECTIONS: dict[str, type] = {
    "device": DeviceConfig,
    "model": ModelConfig,
    "loop": LoopConfig,
    "mqtt": MqttConfig,
    "spool": SpoolConfig,
    "update": UpdateConfig,
    "homeassistant": HomeAssistantConfig,
}


# --- loading ------------------------------------------------------------------------------


def load_config(path: Path | None, overrides: Sequence[str],
                sections: Mapping[str, type]) -> dict[str, Any]:
    """Read `path` (or built-in defaults when None), apply overrides, build `sections`.

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
    for name in raw:
        if name not in SECTIONS:
            raise ConfigError(f"{origin}: unknown section {name!r} "
                              f"(known sections: {', '.join(SECTIONS)})")
    built: dict[str, Any] = {}
    for name, cls in sections.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: {name}: must be a mapping of keys, "
                              f"got {type(values).__name__}")
        built[name] = _build(cls, name, values, origin, overridden)
    return built


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (pass --config with an existing "
                          f"file, or copy config.yaml from the project)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where} "
                          f"({getattr(exc, 'problem', None) or exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of sections, got {type(data).__name__}")
    return data


def _parse_override(item: str) -> tuple[str, str, Any]:
    dotted, sep, text = item.partition("=")
    section, dot, key = dotted.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError(f"--set {item!r}: expected section.key=value, "
                          f"for example --set train.epochs=1")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # not YAML: take the text as a string and let the type check decide
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
            raise Invalid("", f"must be a list, got {value!r}")
        return [_coerce(v, args[0]) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise Invalid("", f"must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise Invalid("", f"must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid("", f"must be a whole number, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid("", f"must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise Invalid("", f"must be a string, got {value!r}")
        return value
    raise TypeError(f"config field type {hint!r} is not supported")  # a bug, not user input


def default_config_path(candidates: Sequence[str]) -> Path | None:
    """The first existing file of `candidates`, or None to use the built-in defaults."""
    for candidate in candidates:
        p = Path(candidate)
        if p.is_file():
            return p
    return None
