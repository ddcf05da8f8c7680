"""The systemd side: the unit file passes systemd's own checks, sd_notify, memory W^X."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import AgentConfig, load_config
from agent.spool import spool_path
from tests.support import ROOT, Agent

UNIT = ROOT / "deploy" / "edge-agent.service"


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    assert path, "systemd-analyze is missing: apt-get install systemd (scripts/setup.sh does)"
    return path


@pytest.mark.e2e
def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point it at this checkout's edge-agent, nothing else
    # changes.
    agent_bin = Path(sys.executable).parent / "edge-agent"
    assert agent_bin.exists()
    unit = tmp_path / "edge-agent.service"
    unit.write_text(UNIT.read_text().replace("/opt/edgeforge/venv/bin/edge-agent",
                                             str(agent_bin)))
    proc = subprocess.run([systemd_analyze(), "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@pytest.mark.e2e
def test_unit_file_rates_2_5_or_better_in_systemd_analyze_security() -> None:
    proc = subprocess.run([systemd_analyze(), "security", "--offline=yes", str(UNIT)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"Overall exposure level for edge-agent\.service: ([0-9.]+)", proc.stdout)
    assert match, proc.stdout[-2000:]
    assert float(match.group(1)) <= 2.5


@pytest.mark.unit
def test_unit_file_is_the_notify_watchdog_service_the_agent_implements() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "Restart=on-failure", "StateDirectory=edgeforge",
                 "ConfigurationDirectory=edgeforge", "User=edgeforge", "StartLimitBurst=",
                 "WatchdogSec=", "MemoryDenyWriteExecute=yes"):
        assert line in text, line
    assert "edge-agent check --config /etc/edgeforge/config.yaml" in text


@pytest.mark.e2e
def test_agent_sends_ready_watchdog_and_stopping_over_notify_socket(
        bundle: Path, tmp_path: Path) -> None:
    """READY=1 after warm-up, WATCHDOG=1 from the loop at a third of WatchdogSec, STOPPING=1."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    agent = Agent(bundle, 1, tmp_path, duration=3,
                  env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "600000"})
    datagrams = []
    try:
        while True:
            data = sock.recv(4096).decode()
            datagrams.append(data)
            if "STOPPING=1" in data:
                break
        assert agent.wait() == 0, agent.output()
    finally:
        agent.kill()
        sock.close()
    assert datagrams[0].startswith("READY=1\nSTATUS=running testboard")
    pings = sum(d == "WATCHDOG=1" for d in datagrams)
    assert 6 <= pings <= 20, datagrams  # every 0.2 s for 3 s


@pytest.mark.e2e
def test_agent_runs_with_write_execute_memory_refused(bundle: Path, tmp_path: Path) -> None:
    """The unit's MemoryDenyWriteExecute=yes: torch must not need W+X pages (PR_SET_MDWE)."""
    code = ("import ctypes, sys\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "assert libc.prctl(65, 1, 0, 0, 0) == 0, 'PR_SET_MDWE unsupported'\n"
            "from agent.cli import main\n"
            "raise SystemExit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, "run", "--set", f"model.dir={bundle}",
                           "--set", "mqtt.port=1", "--set", f"spool.path={tmp_path}/s.db",
                           "--set", "loop.window_s=0.5", "--duration", "1.5"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert " seq 3:" in proc.stderr


@pytest.mark.unit
def test_the_board_config_the_installer_ships_is_valid() -> None:
    cfg = load_config(ROOT / "deploy" / "config.yaml", [], AgentConfig)
    assert cfg.model.dir == "/var/lib/edgeforge/models/current"
    assert spool_path(cfg.spool.path, {"STATE_DIRECTORY": "/var/lib/edgeforge"}, False) \
        == Path("/var/lib/edgeforge/spool.sqlite3")
    assert spool_path("/abs/s.db", {"STATE_DIRECTORY": "/x"}, False) == Path("/abs/s.db")


@pytest.mark.unit
def test_a_relative_spool_path_never_depends_on_the_working_directory() -> None:
    """systemd's StateDirectory, else /var/lib/edgeforge for root, else XDG state."""
    assert spool_path("s.db", {}, True) == Path("/var/lib/edgeforge/s.db")
    assert spool_path("s.db", {"XDG_STATE_HOME": "/home/u/.st"}, False) \
        == Path("/home/u/.st/edgeforge/s.db")
    assert spool_path("s.db", {}, False) == Path.home() / ".local/state/edgeforge/s.db"
