"""edge-deploy flash and the Ansible playbook through a real OpenSSH server (tests/sshd.py)
into a scratch prefix, with a real mosquitto for the boards' birth messages.

systemd does not run as PID 1 here, so the agent is restarted by a named fake: a
--restart-command that kills the previous agent and starts `edge-agent run` in the
background, as `systemctl restart edge-agent` would. Everything else is the real thing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.support import ROOT, model_sha, run_cli, signed_copy, tree, wrong_logits_copy
from tests.support.broker import Broker, Subscriber, free_port
from tests.support.sshd import Sshd

pytestmark = pytest.mark.e2e


def fake_systemctl_restart(prefix: Path) -> str:
    """The fake of `systemctl restart edge-agent`: stop the last agent, start one detached."""
    return (f"if [ -f {prefix}/agent.pid ]; then kill $(cat {prefix}/agent.pid) 2>/dev/null "
            f"|| true; sleep 1; fi; setsid nohup {prefix}/opt/edgeforge/venv/bin/edge-agent run "
            f"--config {prefix}/etc/edgeforge/config.yaml >>{prefix}/agent.log 2>&1 "
            f"</dev/null & echo $! > {prefix}/agent.pid")


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    s = Sshd(tmp_path / "sshd")
    s.start()
    yield s
    s.stop()


def managed(prefix: Path) -> dict[str, str]:
    """What flash manages on the board, by sha256 (links by target), and the agent's pid."""
    return tree(prefix, ("etc", "opt/edgeforge/.stamp", "var/lib/edgeforge/models",
                         "agent.pid"))


def test_flash_installs_through_ssh_then_changes_nothing_and_ansible_rolls_out_an_update(
        bundle: Path, bundle_v2: Path, fleet_key: Path, broker: Broker, sshd: Sshd,
        tmp_path: Path) -> None:
    prefix = tmp_path / "board"
    v1 = signed_copy(bundle, tmp_path / "v1", fleet_key, 1)
    mqtt = ["--set", f"mqtt.port={broker.port}", "--set", "mqtt.host=127.0.0.1",
            "--set", "loop.window_s=1"]
    flash = ["deploy.cli", "flash", sshd.target, "--bundle", v1, "--key", fleet_key,
             "--prefix", prefix, "--torch", f"torch=={torch.__version__.split('+')[0]}",
             "--profile", "onnx", "--identity", sshd.identity,
             *[a for o in sshd.options for a in ("--ssh-option", o)],
             "--device-id", "board1", "--restart-command", fake_systemctl_restart(prefix),
             "--timeout", "90", "--broker-dir", tmp_path / "broker-files", *mqtt]
    sub = Subscriber(broker.port)
    try:
        first = run_cli(*flash, timeout=900)
        assert first.returncode == 0, first.stdout + first.stderr
        vid = f"1-{model_sha(bundle)[:12]}"
        assert f"board1 (root@127.0.0.1:{sshd.port}): running {vid}" in first.stdout
        assert os.readlink(prefix / "var/lib/edgeforge/models/current") == f"versions/{vid}"
        config = (prefix / "etc/edgeforge/config.yaml").read_text()
        assert "id: board1" in config and f"{prefix}/etc/edgeforge/signing.pub" in config
        # Its own broker identity, readable by the agent alone (deploy/broker.py).
        secrets = json.loads((tmp_path / "broker-files/secrets.json").read_text())
        password = secrets["boards"]["board1"]["password"]
        assert "username: board1" in config and f"password: {password}" in config
        assert (prefix / "etc/edgeforge/config.yaml").stat().st_mode & 0o777 == 0o600
        unit = (prefix / "etc/systemd/system/edge-agent.service").read_text()
        assert f"ExecStart={prefix}/opt/edgeforge/venv/bin/edge-agent run" in unit
        assert (prefix / "etc/systemd/system/multi-user.target.wants/edge-agent.service"
                ).is_symlink()
        info = json.loads(sub.on("board1/info")[-1][0])
        assert info["model_sha256"] == model_sha(bundle) and info["model_version"] == 1
        # The onnx profile: a board without torch, serving from the ONNX model.
        venv_python = prefix / "opt/edgeforge/venv/bin/python"
        assert subprocess.run([venv_python, "-c", "import torch"],
                              capture_output=True).returncode != 0
        assert info["engine"] == "onnxruntime" and info["runtimes"]["torchscript"] is None
        state = json.loads((prefix / "var/lib/edgeforge/models/state.json").read_text())
        assert state["pending"] is None  # confirmed after the birth message

        before = managed(prefix)
        second = run_cli(*flash, timeout=300)
        assert second.returncode == 0, second.stderr
        assert "unchanged" in second.stdout and "installing" not in second.stderr
        assert managed(prefix) == before  # same files, same links, same agent process

        # A bundle that fails the on-board check is never made current.
        bad = wrong_logits_copy(bundle, tmp_path / "bad", fleet_key, 3)
        failed = run_cli(*[str(bad) if a == v1 else a for a in flash], timeout=300)
        assert failed.returncode == 1
        assert "activating the bundle failed" in failed.stderr
        assert "logits differ from the host's" in failed.stderr
        assert managed(prefix) == before

        # The Ansible playbook rolls the next version out to the same board.
        v2 = signed_copy(bundle_v2, tmp_path / "v2", fleet_key, 2)
        inventory = tmp_path / "inventory.json"
        inventory.write_text(json.dumps({"boards": {"hosts": {"board1": {
            "ansible_host": "127.0.0.1", "ansible_port": sshd.port, "ansible_user": sshd.user,
            "ansible_ssh_private_key_file": str(sshd.identity),
            "ansible_ssh_common_args": " ".join(f"-o {o}" for o in sshd.options),
            "ansible_python_interpreter": sys.executable,
            "edgeforge_prefix": str(prefix), "edgeforge_bundle": str(v2),
            "edgeforge_key": str(fleet_key), "edgeforge_device_id": "board1",
            "edgeforge_broker_dir": str(tmp_path / "broker-files"),
            "edgeforge_torch": f"torch=={torch.__version__.split('+')[0]}",
            "edgeforge_profile": "both",
            "edgeforge_set": [f"mqtt.port={broker.port}", "mqtt.host=127.0.0.1",
                              "loop.window_s=1"],
            "edgeforge_restart_command": fake_systemctl_restart(prefix),
            "edgeforge_health_timeout": 90}}}}))
        play = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i",
                               str(inventory), str(ROOT / "deploy/ansible/flash.yml")],
                              capture_output=True, text=True, timeout=600, cwd=ROOT,
                              env={**os.environ, "ANSIBLE_HOST_KEY_CHECKING": "True"})
        assert play.returncode == 0, play.stdout[-3000:] + play.stderr[-2000:]
        assert "failed=0" in play.stdout and "rescued=0" in play.stdout
        vid2 = f"2-{model_sha(bundle_v2)[:12]}"
        assert os.readlink(prefix / "var/lib/edgeforge/models/current") == f"versions/{vid2}"
        sub.wait_for(lambda: json.loads(sub.on("board1/info")[-1][0])["model_sha256"]
                     == model_sha(bundle_v2), 10, "board1 running the Ansible release")
        # profile both: torch joined onnxruntime, and the agent proved and timed both
        choice = json.loads(sub.on("board1/info")[-1][0])["engine_choice"]
        status = {e["engine"]: e["status"] for e in choice["engines"]}
        assert status["torchscript"] == status["onnxruntime"] == "proven", status
    finally:
        sub.close()
        pid = prefix / "agent.pid"
        if pid.is_file():
            try:
                os.kill(int(pid.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def test_flash_says_in_one_line_when_a_board_cannot_be_reached(fleet_key: Path, bundle: Path,
                                                               tmp_path: Path) -> None:
    v1 = signed_copy(bundle, tmp_path / "v1", fleet_key, 1)
    port = free_port()  # nothing listens there
    proc = run_cli("deploy.cli", "flash", f"pi@127.0.0.1:{port}", "--bundle", v1,
                   "--key", fleet_key, "--prefix", tmp_path / "board", "--torch", "torch")
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("flash: ")]
    assert len(errors) == 1 and errors[0].startswith("FleetError: cannot reach pi@127.0.0.1")
    assert not (tmp_path / "board").exists()


@pytest.mark.parametrize("target, message", [
    ("board1", "expected USER@HOST"), ("pi@board1:ssh", "expected USER@HOST"),
    ("pi@board1:70000", "port must be 1-65535")])
def test_flash_rejects_a_bad_target_with_exit_2(target: str, message: str, fleet_key: Path,
                                                bundle: Path) -> None:
    proc = run_cli("deploy.cli", "flash", target, "--bundle", bundle, "--key",
                   fleet_key)
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_ansible_playbook_passes_syntax_check() -> None:
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"),
                           "--syntax-check", "-i", "deploy/ansible/inventory.example.ini",
                           "deploy/ansible/flash.yml"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
