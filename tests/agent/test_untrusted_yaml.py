"""Config files read strictly but correctly: everything `yaml.safe_load` reads reads the same,
an alias bomb or an alias that contains itself is refused in the parse, and a message quotes
only a short prefix of a value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agent.config import AgentConfig, load_config
from agent.errors import ConfigError
from agent.untrusted import Untrusted, loads_json, loads_yaml, shown

pytestmark = pytest.mark.unit

MERGES = """\
defaults: &defaults {host: broker.local, port: 1883, qos: 1}
board: &board
  <<: *defaults
  port: 8883
list_merge:
  <<: [*defaults, {keepalive: 30}]
  qos: 0
anchors: [&one 1, *one, *one]
"""


def bomb(levels: int = 9, width: int = 9, key: str = "model") -> str:
    """The billion laughs: `width ** levels` strings in a few hundred bytes."""
    lines = ['l0: &l0 [' + ", ".join(['"lol"'] * width) + "]"]
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + f"\n{key}: {{engine: *l{levels}}}\n"


def test_anchors_aliases_and_merge_keys_read_as_yaml_safe_load_reads_them() -> None:
    assert loads_yaml(MERGES) == yaml.safe_load(MERGES)
    assert loads_yaml(MERGES)["board"] == {"host": "broker.local", "port": 8883, "qos": 1}


def test_a_config_with_merge_keys_loads(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("mqtt:\n  <<: {host: 10.0.0.2, port: 1884}\n  port: 1885\n")
    cfg = load_config(path, [], AgentConfig)
    assert (cfg.mqtt.host, cfg.mqtt.port) == ("10.0.0.2", 1885)


@pytest.mark.parametrize("key", ["model", "mqtt", "source"])
def test_an_alias_bomb_inside_a_known_key_is_refused_in_the_parse(tmp_path: Path,
                                                                  key: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(bomb(key=key))
    with pytest.raises(ConfigError) as err:
        load_config(path, [], AgentConfig)
    message = str(err.value)
    assert "alias" in message and "100,000" in message, message
    assert len(message) < 300, message  # never the expanded value


def test_an_alias_inside_itself_is_refused() -> None:
    with pytest.raises(Untrusted, match="contains it"):
        loads_yaml("a: &a [1, *a]\n")
    with pytest.raises(Untrusted, match="contains it"):
        loads_yaml("a: &a {b: *a}\n")


def test_a_small_shared_alias_within_the_limit_is_read() -> None:
    text = bomb(levels=3, width=9)  # 9**3 = 729 strings
    assert len(loads_yaml(text)["model"]["engine"]) == 9


def test_a_key_given_twice_is_still_refused_but_a_merged_key_may_be_overridden() -> None:
    with pytest.raises(Untrusted, match="given twice, at lines 1 and 2"):
        loads_yaml("a: 1\na: 2\n")
    assert loads_yaml("m: &m {a: 1}\nb:\n  <<: *m\n  a: 2\n")["b"] == {"a": 2}


def test_a_value_too_long_is_quoted_by_a_short_prefix(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  engine: " + "x" * 200_000 + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, [], AgentConfig)
    assert len(str(err.value)) < 400 and "model.engine" in str(err.value)


def test_an_integer_of_thousands_of_digits_is_one_line_in_yaml_and_json(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("mqtt:\n  port: " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match="integer too long"):
        load_config(path, [], AgentConfig)
    with pytest.raises(ConfigError, match="integer too long|whole number"):
        load_config(None, ["mqtt.port=" + "9" * 5000], AgentConfig)
    with pytest.raises(Untrusted, match="5,000 digits"):
        loads_json(b'{"version": ' + b"9" * 5000 + b"}", "manifest")
    assert loads_json(b'{"v": -12345678901234567890}') == {"v": -12345678901234567890}


def test_shown_cuts_huge_and_deep_values() -> None:
    assert len(shown("x" * 1_000_000)) <= 100
    assert len(shown([[list(range(1000))] * 1000] * 1000)) <= 100
    assert shown("port") == "'port'"
