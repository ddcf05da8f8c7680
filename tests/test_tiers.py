"""The tiers stay true: a test without a tier marker stops the run at collection, and a
`unit` test that starts a process or connects a socket fails (tests/tiers.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.e2e


def pytest_run(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    """pytest with the tier hooks alone, on one test file written to `tmp_path`."""
    (tmp_path / "test_sample.py").write_text(source)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "tests.tiers",
                           "--rootdir", str(tmp_path), "-c", "/dev/null",
                           str(tmp_path / "test_sample.py")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_a_test_without_a_tier_marker_stops_the_run_at_collection(tmp_path: Path) -> None:
    proc = pytest_run(tmp_path, "import pytest\n\n"
                                "@pytest.mark.unit\ndef test_marked():\n    pass\n\n"
                                "def test_forgotten():\n    pass\n\n"
                                "@pytest.mark.unit\n@pytest.mark.e2e\ndef test_twice():\n"
                                "    pass\n")
    assert proc.returncode == 4, proc.stdout + proc.stderr  # a usage error: nothing ran
    said = proc.stdout + proc.stderr
    assert "2 test(s) without exactly one tier marker" in said
    assert "test_forgotten (none)" in said and "test_twice (unit, e2e)" in said
    assert "test_marked" not in said.split("tier marker")[1]


def test_a_unit_test_that_starts_a_process_or_connects_fails(tmp_path: Path) -> None:
    proc = pytest_run(tmp_path, "import socket, subprocess, threading\nimport pytest\n\n"
                                "@pytest.mark.unit\ndef test_process():\n"
                                "    subprocess.run(['true'])\n\n"
                                "@pytest.mark.unit\ndef test_socket_in_a_thread():\n"
                                "    def dial():\n        try:\n"
                                "            socket.create_connection(('127.0.0.1', 9))\n"
                                "        except OSError:\n            pass\n"
                                "    t = threading.Thread(target=dial)\n    t.start()\n"
                                "    t.join()\n\n"
                                "@pytest.mark.unit\ndef test_in_process():\n"
                                "    assert sum(range(4)) == 6\n")
    said = proc.stdout + proc.stderr
    assert proc.returncode == 1, said
    assert "started a process" in said and "connected to ('127.0.0.1', 9)" in said
    bad = {line.split("::")[-1].split()[0] for line in said.splitlines()
           if line.startswith(("FAILED ", "ERROR "))}
    assert bad == {"test_process", "test_socket_in_a_thread"}, said
