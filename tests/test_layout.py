"""One package per place code runs: the board package imports only what a board installs, and
the workstation's and the operator's packages import the board's contracts, never each other.
(scripts/check_wheel.sh proves the same on a real install of the agent alone.)"""

from __future__ import annotations

import ast
import sys

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.unit

BOARD_THIRD_PARTY = {"numpy", "yaml", "psutil", "paho", "cryptography"}
# The engines' runtimes (the board's profile: torch, onnx or both): each only in its engine's
# module; torch also, inside the function, where a bundle from before sample.npz is read and
# in the host's Preprocess.batch.
LAZY_TORCH = {"agent/manifest.py": {"torch"}, "agent/preprocess.py": {"torch"}}
RUNTIMES = {"agent/engines/torchscript.py": {"torch"}, "agent/engines/onnxrt.py": {"onnxruntime"},
            "agent/engines/executorch.py": {"torch"}, **LAZY_TORCH}
# The board's optional input libraries (extras images and video, and Raspberry Pi OS's
# Picamera2): each only in the module of its source, and imported where it is used.
OPTIONAL = {"agent/preprocess.py": {"PIL"}, "agent/folder_source.py": {"watchdog"},
            "agent/video_source.py": {"av", "picamera2"}}


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
    def extra(f: str) -> set[str]:
        return OPTIONAL.get(f, set()) | RUNTIMES.get(f, set())

    strays = {f: sorted(names - allowed - extra(f)) for f, names in imported("agent").items()
              if names - allowed - extra(f)}
    assert strays == {}


def test_the_optional_input_libraries_are_imported_only_where_used() -> None:
    """A board on random or sample, or serving requests without PyAV, imports the agent;
    a board of the onnx profile never imports torch (the legacy sample reader imports it
    inside its function)."""
    lazily = {**OPTIONAL, "agent/preprocess.py": {"PIL", "torch"},
              "agent/manifest.py": {"torch"}}
    for name, libraries in lazily.items():
        tree = ast.parse((ROOT / name).read_text())
        top = {a.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import)
               for a in node.names}
        top |= {node.module.split(".")[0] for node in tree.body
                if isinstance(node, ast.ImportFrom) and node.module}
        assert not top & libraries, f"{name} imports {top & libraries} at module level"


def test_optimizer_and_deploy_import_the_agent_and_never_each_other() -> None:
    for package, other in (("optimizer", "deploy"), ("deploy", "optimizer")):
        files = imported(package)
        assert any("agent" in names for names in files.values()), package
        assert {f for f, names in files.items() if other in names} == set(), package
