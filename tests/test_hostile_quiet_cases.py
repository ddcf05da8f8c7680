"""Small cases of hostile or odd input, each once wrong without a crash: a class folder's name
with a newline broke the report's table, and an agent stopped while its folder was missing
said it was watching it."""

from __future__ import annotations

from pathlib import Path

import pytest

from optimizer.report import per_class
from tests.support import Agent
from tests.support.broker import Broker


@pytest.mark.unit
def test_class_names_with_a_newline_or_a_pipe_stay_one_table_row_each() -> None:
    report = {"rows": [{"variant": "fp32", "per_class_accuracy_pct": {
        "cat\nsecret": 50.0, "dog|fox": 75.0, "owl": 100.0}}]}
    lines = per_class(report)
    body = [line for line in lines if line.startswith("| ") and "class" not in line]
    assert len(body) == 3 and all("\n" not in line for line in body)
    assert body[0].startswith("| cat\\nsecret | 50.0")
    assert body[1].startswith("| dog\\|fox | 75.0")
    assert all(line.count("|") - line.count("\\|") == 3 for line in body)


@pytest.mark.e2e
def test_an_agent_stopped_while_its_folder_is_missing_never_says_it_watched_it(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    missing = tmp_path / "not-yet"
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=folder",
                  f"source.path={missing}", duration=3)
    assert agent.wait(120) == 0, agent.output()
    out = agent.output()
    assert "is not a directory" in out
    assert "watching" not in out and "inotify unavailable" not in out, out
    assert not missing.exists()
