"""The ecosystems' own linters pass on what we ship: ansible-lint on the playbook, shellcheck on
every shell script (promtool checks the metrics in the monitor's tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.e2e

SHELL_SCRIPTS = sorted([ROOT / ".ci/run", *(ROOT / "deploy").rglob("*.sh"),
                        *(ROOT / "scripts").glob("*.sh")])


def test_the_ansible_playbook_passes_ansible_lint() -> None:
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-lint"), "--offline",
                           "flash.yml"], cwd=ROOT / "deploy/ansible", capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_every_shell_script_passes_shellcheck() -> None:
    assert len(SHELL_SCRIPTS) >= 5  # .ci/run, both installers, setup and the wheel check
    proc = subprocess.run(["shellcheck", *map(str, SHELL_SCRIPTS)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout
