"""config.yaml loading: sections as frozen dataclasses, unknown keys named, overrides checked."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from agent.config import SECTIONS, AgentConfig, load_config
from agent.errors import ConfigError
from deploy.cli import DeployConfig
from deploy.monitor.config import MonitorCommandConfig
from optimizer.config import OptimizerConfig
from tests.support import ROOT

pytestmark = pytest.mark.unit

ROOTS = (OptimizerConfig, AgentConfig, MonitorCommandConfig, DeployConfig)



def test_shipped_config_yaml_equals_the_built_in_defaults() -> None:
    """Every key in config.yaml is present with exactly the default value, for every command
    family's root."""
    for root in ROOTS:
        assert load_config(ROOT / "config.yaml", [], root) == load_config(None, [], root)
    # ... and lists every key (a key left out would take its default unseen).
    shipped = yaml.safe_load((ROOT / "config.yaml").read_text())
    for root in ROOTS:
        for name, cls in typing.get_type_hints(root).items():
            assert set(shipped[name]) == {f.name for f in dataclasses.fields(cls)}, name


def test_the_section_list_is_exactly_the_sections_the_roots_read() -> None:
    """SECTIONS, the one list of names, neither misses a root's section nor names a dead one."""
    read = {f.name for root in ROOTS for f in dataclasses.fields(root)}
    assert read == set(SECTIONS)


def test_unknown_key_is_named_with_the_known_ones(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("mqtt:\n  prot: 1883\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: mqtt\.prot: unknown key .*port"):
        load_config(path, [], AgentConfig)


def test_unknown_section_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  epochs: 1\n")
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        load_config(path, [], OptimizerConfig)


def test_invalid_value_names_file_key_and_range(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("mqtt:\n  port: 0\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: mqtt\.port: must be 1-65535, got 0"):
        load_config(path, [], AgentConfig)


def test_set_overrides_are_typed_and_checked_like_the_file() -> None:
    cfg = load_config(None, ["train.epochs=1", "quantize.engine=x86",
                             "train.input_shape=[3, 32, 32]"], OptimizerConfig)
    assert cfg.train.epochs == 1 and cfg.quantize.engine == "x86"
    with pytest.raises(ConfigError, match=r"--set train\.epochs: must be a whole number"):
        load_config(None, ["train.epochs=many"], OptimizerConfig)
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["epochs"], OptimizerConfig)


def test_yaml_syntax_error_gives_the_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(path, [], OptimizerConfig)


def test_missing_config_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml", [], OptimizerConfig)


def test_board_commands_tolerate_host_sections_but_not_typos(tmp_path: Path) -> None:
    """One file serves every command: the agent accepts `train:` but still rejects `mqt:`."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 1\nmqtt:\n  port: 1884\n")
    assert load_config(path, [], AgentConfig).mqtt.port == 1884
    path.write_text("mqt:\n  port: 1884\n")
    with pytest.raises(ConfigError, match="unknown section 'mqt'"):
        load_config(path, [], AgentConfig)
