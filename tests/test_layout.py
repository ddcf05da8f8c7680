"""One package per place code runs: the board package imports only what a board installs, and
the workstation's and the operator's packages import the board's contracts, never each other.
(scripts/check_wheel.sh proves the same on a real install of the agent alone.)"""

from __future__ import annotations

import ast
import sys

from tests.support import ROOT

BOARD_THIRD_PARTY = {"torch", "numpy", "yaml", "psutil", "paho", "cryptography"}


def imported(package: str) -> dict[str, set[str]]:
    """Top-level module names each file of `package` imports."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_the_agent_imports_only_what_a_board_installs() -> None:
    allowed = BOARD_THIRD_PARTY | set(sys.stdlib_module_names) | {"agent", "__future__"}
    strays = {f: sorted(names - allowed) for f, names in imported("agent").items()
              if names - allowed}
    assert strays == {}


def test_optimizer_and_deploy_import_the_agent_and_never_each_other() -> None:
    for package, other in (("optimizer", "deploy"), ("deploy", "optimizer")):
        files = imported(package)
        assert any("agent" in names for names in files.values()), package
        assert {f for f, names in files.items() if other in names} == set(), package
