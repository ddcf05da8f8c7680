"""Who may command a board: signed, fresh, addressed commands (agent/command_auth.py), with a
real mosquitto and real agent subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml

from deploy.broker import mosquitto_conf
from tests.deploy.test_fleet_update import request, results, send, signed, start_agent
from tests.support import Agent, make_store, run_cli, signed_copy
from tests.support.broker import Broker, Subscriber

pytestmark = pytest.mark.e2e


def restarted(current: Path, broker: Broker, tmp_path: Path, key: Path
              ) -> tuple[Agent, Subscriber]:
    """The agent started again on the same store and spool, once it is subscribed: its
    telemetry is seen (the retained birth message start_agent waits for is the last run's)."""
    agent, sub = start_agent(current, broker, tmp_path, key)
    sub.wait_for(lambda: bool(sub.telemetry()), 60, "the restarted agent's telemetry")
    return agent, sub


def test_unsigned_foreign_forged_misaddressed_stale_and_replayed_commands_are_refused(
        bundle: Path, fleet_key: Path, broker: Broker, tmp_path: Path) -> None:
    """Each bad command gets its own code and changes nothing; telemetry goes on without a
    gap; the same command signed properly is then taken, once."""
    current = make_store(bundle, tmp_path, fleet_key, version=1)
    agent, sub = start_agent(current, broker, tmp_path, fleet_key)
    stranger = tmp_path / "stranger.key"
    assert run_cli("deploy.cli", "keygen", "--key", stranger).returncode == 0
    try:
        sub.wait_for(lambda: bool(sub.seqs()), 60, "the first telemetry")
        before = max(sub.seqs())
        good = signed(request("ok", {"rate_hz": 40}), "set", fleet_key)
        forged = json.loads(good)
        forged["args"]["rate_hz"] = 1  # altered after signing
        forged["request_id"] = "forged"
        cases = {
            "plain": (request("plain", {"rate_hz": 1}), "not_signed"),
            "stranger": (signed(request("stranger", {"rate_hz": 1}), "set", stranger),
                         "untrusted_key"),
            "forged": (json.dumps(forged).encode(), "forged"),
            "other-board": (signed(request("other-board", {"rate_hz": 1}), "set", fleet_key,
                                   device="board-b"), "wrong_device"),
            "stale": (signed(request("stale", {"rate_hz": 1}), "set", fleet_key,
                             now=time.time() - 3600), "expired"),
            "future": (signed(request("future", {"rate_hz": 1}), "set", fleet_key,
                              now=time.time() + 3600), "clock_skew"),
        }
        for payload, _ in cases.values():
            send(broker.port, "set", payload)
        send(broker.port, "set", good)
        sub.wait_for(lambda: len(results(sub)) >= len(cases) + 1, 30, "every answer")
        send(broker.port, "set", good)  # the same bytes again: a replay
        sub.wait_for(lambda: len(results(sub, "ok")) >= 2, 30, "the replay's answer")
        got = {m["request_id"]: m for m in results(sub) if m["request_id"] != "ok"}
        for rid, (_, code) in cases.items():
            assert got[rid]["ok"] is False and got[rid]["code"] == code, got[rid]
        first, again = results(sub, "ok")
        assert first["ok"] is True and first["data"]["rate_hz"] == 40.0, first
        assert again["ok"] is False and again["code"] == "nonce_reused", again
        print("\n".join(f"{rid:12} {m['code']:14} {m['reason'][:90]}" for rid, m in
                        {**got, "ok (again)": again}.items()))
        # Only the good command acted; the agent kept publishing, and not a window was lost.
        sub.wait_for(lambda: max(sub.seqs()) >= before + 4
                     and sub.telemetry()[-1]["throughput_ips"] < 50, 30,
                     "telemetry at 40 Hz after the refusals")
        seqs = sorted(set(sub.seqs()))
        assert seqs == list(range(seqs[0], seqs[-1] + 1))
        assert agent.proc.poll() is None, agent.output()
    finally:
        agent.kill()
        sub.close()

    # The nonce is remembered across a restart: the same signed bytes are refused again.
    agent, sub = restarted(current, broker, tmp_path, fleet_key)
    try:
        send(broker.port, "set", good)
        sub.wait_for(lambda: bool(results(sub, "ok")), 30, "the answer after the restart")
        assert results(sub, "ok")[0]["code"] == "nonce_reused"
    finally:
        agent.kill()
        sub.close()


def test_a_board_without_a_fleet_key_takes_no_command(bundle: Path, fleet_key: Path,
                                                       broker: Broker, tmp_path: Path) -> None:
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path)
    try:
        sub.wait_for(lambda: bool(sub.on("/info")), 60, "the agent's birth message")
        send(broker.port, "diagnostics", request("d1", {}), fleet_key)
        sub.wait_for(lambda: bool(results(sub, "d1")), 30, "an answer")
        answer = results(sub, "d1")[0]
        assert answer["code"] == "no_key" and "update.public_key" in answer["reason"]
    finally:
        agent.kill()
        sub.close()


class Client:
    """A paho MQTT 5 client logged in as one broker identity, recording the broker's answers
    to its publishes (PUBACK reason codes) and subscriptions (SUBACK reason codes)."""

    def __init__(self, port: int, username: str | None, password: str | None) -> None:
        self.pubacks: dict[int, int] = {}
        self.subacks: list[int] = []
        self.messages: list[tuple[str, bytes]] = []
        self.connected: list[int] = []
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"acl-{username}",
                             protocol=mqtt.MQTTv5)
        if username is not None:
            self.c.username_pw_set(username, password)
        self.c.on_connect = lambda c, u, f, rc, p: self.connected.append(rc.value)
        self.c.on_publish = lambda c, u, mid, rc, p: self.pubacks.__setitem__(mid, rc.value)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.extend(r.value for r in rcs)
        self.c.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        deadline = time.monotonic() + 10
        while not self.connected and time.monotonic() < deadline:
            time.sleep(0.02)

    def publish(self, topic: str, payload: bytes) -> int:
        """Publish at QoS 1; the broker's PUBACK reason code (0 accepted, 135 refused)."""
        mid = self.c.publish(topic, payload, qos=1).mid
        deadline = time.monotonic() + 10
        while mid not in self.pubacks and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.pubacks[mid]

    def subscribe(self, topic: str) -> int:
        n = len(self.subacks)
        self.c.subscribe(topic, qos=1)
        deadline = time.monotonic() + 10
        while len(self.subacks) == n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.subacks[-1]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


NOT_AUTHORIZED = 135  # MQTT 5 reason code, PUBACK and SUBACK


def test_a_boards_broker_credential_reaches_only_its_own_topics(
        bundle: Path, fleet_key: Path, tmp_path: Path) -> None:
    """Two real agents on a mosquitto that runs edge-deploy's password_file and acl_file:
    board A's credential cannot command B, speak as B or hear B's commands; the operator's
    commands both; anonymous clients are refused."""
    files = tmp_path / "broker-files"
    creds = {}
    for device in ("board-a", "board-b"):
        out = tmp_path / f"render-{device}"
        proc = run_cli("deploy.cli", "render", "--device-id", device, "--bundle",
                       signed_copy(bundle, tmp_path / f"v-{device}", fleet_key, 1),
                       "--key", fleet_key, "--out", out, "--broker-dir", files)
        assert proc.returncode == 0, proc.stderr
        mqtt_cfg = yaml.safe_load((out / "config.yaml").read_text())["mqtt"]
        assert mqtt_cfg["username"] == device and len(mqtt_cfg["password"]) >= 32
        creds[device] = (mqtt_cfg["username"], mqtt_cfg["password"])
    proc = run_cli("deploy.cli", "broker", "--broker-dir", files)
    assert proc.returncode == 0, proc.stderr
    conf = proc.stdout.split("then: systemctl reload mosquitto):\n", 1)[1]
    assert conf == mosquitto_conf(files)
    for name in ("passwd", "acl", "secrets.json", "operator.yaml"):
        assert (files / name).stat().st_mode & 0o777 == 0o600, name
    op = yaml.safe_load((files / "operator.yaml").read_text())["mqtt"]
    passwd = (files / "passwd").read_text()
    assert all(pw not in passwd for _, pw in creds.values()) and passwd.count(":$7$101$") == 3

    broker = Broker(tmp_path / "mosquitto", listener_conf=conf)
    broker.start()
    agents, a = [], None
    try:
        for device, (user, password) in creds.items():
            (tmp_path / device).mkdir()
            agents.append(Agent(signed_copy(bundle, tmp_path / f"run-{device}", fleet_key, 1),
                                broker.port, tmp_path / device, f"device.id={device}",
                                f"update.public_key={fleet_key}.pub", f"mqtt.username={user}",
                                f"mqtt.password={password}"))
        operator = Client(broker.port, op["username"], op["password"])
        assert operator.connected == [0] and operator.subscribe("edgeforge/#") == 1
        anonymous = Client(broker.port, None, None)
        assert anonymous.connected and anonymous.connected[0] != 0  # refused at connect
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
                any(t == f"edgeforge/{d}/telemetry" for t, _ in operator.messages)
                for d in creds):
            time.sleep(0.1)
        seen = {t for t, _ in operator.messages}
        assert {"edgeforge/board-a/telemetry", "edgeforge/board-b/telemetry"} <= seen, seen

        a = Client(broker.port, *creds["board-a"])
        # A signed command for B (say, one a stolen board captured): the broker refuses A.
        stolen = signed(request("from-a", {"rate_hz": 1}), "set", fleet_key, device="board-b")
        assert a.publish("edgeforge/board-b/cmd/set", stolen) == NOT_AUTHORIZED
        # Telemetry, status and info as B: refused; A's own topic is fine.
        b_telemetry = next(p for t, p in operator.messages if t.endswith("board-b/telemetry"))
        assert a.publish("edgeforge/board-b/telemetry", b_telemetry) == NOT_AUTHORIZED
        assert a.publish("edgeforge/board-b/status", b"offline") == NOT_AUTHORIZED
        assert a.publish("edgeforge/board-b/info", b"{}") == NOT_AUTHORIZED
        assert a.publish("edgeforge/board-a/event", b"{}") == 0
        # B's commands cannot be heard (mosquitto grants the subscription and delivers
        # nothing A may not read: checked below, after the operator's commands).
        a.subscribe("edgeforge/board-b/cmd/#")
        a.subscribe("edgeforge/#")

        # The operator commands both boards through edge-deploy, logged in as itself.
        for device in creds:
            proc = run_cli("deploy.cli", "cmd", device, "set", "rate_hz=30", "--key", fleet_key,
                           "--config", files / "operator.yaml", "--set",
                           f"mqtt.port={broker.port}", "--set", "mqtt.host=127.0.0.1")
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert '"rate_hz": 30.0' in proc.stdout
        assert [t for t, _ in a.messages if t.startswith("edgeforge/board-b/")] == []
        assert any(t == "edgeforge/board-a/cmd/set" for t, _ in a.messages)  # its own: heard
        # B never acted on A's publish: its only answer is the operator's.
        answers = [json.loads(p) for t, p in operator.messages
                   if t == "edgeforge/board-b/cmd_result"]
        assert [m["request_id"] for m in answers if m["request_id"] == "from-a"] == []
        assert all(p != b"offline" for t, p in operator.messages
                   if t == "edgeforge/board-b/status")
        assert all(ag.proc.poll() is None for ag in agents)
        operator.close()
        anonymous.close()

        # Rotating A's credential (render or flash --rotate-credential, then a broker reload):
        # the old password no longer logs in, the new one does, B's is untouched.
        out = tmp_path / "render-board-a"
        proc = run_cli("deploy.cli", "render", "--device-id", "board-a", "--bundle",
                       tmp_path / "v-board-a", "--key", fleet_key, "--out", out,
                       "--broker-dir", files, "--rotate-credential")
        assert proc.returncode == 0, proc.stderr
        rotated = yaml.safe_load((out / "config.yaml").read_text())["mqtt"]["password"]
        assert rotated != creds["board-a"][1]
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGHUP)  # systemctl reload mosquitto
        time.sleep(1.0)
        logins = {name: Client(broker.port, user, pw) for name, (user, pw) in
                  {"old": creds["board-a"], "new": ("board-a", rotated),
                   "b": creds["board-b"]}.items()}
        for c in logins.values():
            c.close()
        assert logins["old"].connected[0] == NOT_AUTHORIZED, logins["old"].connected
        assert logins["new"].connected == [0] and logins["b"].connected == [0]
    finally:
        if a is not None:
            a.close()
        for ag in agents:
            ag.kill()
        broker.stop()


def test_the_fleet_key_rotates_only_by_the_old_key_and_survives_a_restart(
        bundle: Path, bundle_v2: Path, fleet_key: Path, broker: Broker, tmp_path: Path) -> None:
    """edge-deploy rotate-key: a rotation signed by a stranger is refused; one signed by the
    fleet key is taken; from then on only the new key commands and updates the board, and
    a rollback to a version signed by the old key still works, also after a restart."""
    current = make_store(bundle, tmp_path, fleet_key, version=1)
    keys = {}
    for name in ("new", "stranger", "stranger-next"):
        keys[name] = tmp_path / f"{name}.key"
        assert run_cli("deploy.cli", "keygen", "--key", keys[name]).returncode == 0
    agent, sub = start_agent(current, broker, tmp_path, fleet_key)

    def deploy(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return run_cli("deploy.cli", *args, "--set", f"mqtt.port={broker.port}", "--set",
                       "mqtt.host=127.0.0.1", timeout=180)

    try:
        refused = deploy("rotate-key", "--key", keys["stranger"], "--new-key",
                         keys["stranger-next"], "--device", "testboard")
        assert refused.returncode == 1 and "refused" in refused.stdout, refused.stdout
        assert "signed with key" in refused.stdout
        rotated = deploy("rotate-key", "--key", fleet_key, "--new-key", keys["new"],
                         "--device", "testboard")
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        assert "done" in rotated.stdout and "now trusts key" in rotated.stdout
        old_cmd = deploy("cmd", "--key", fleet_key, "testboard", "diagnostics")
        assert old_cmd.returncode == 1 and "signed with key" in old_cmd.stdout
        v2 = signed_copy(bundle_v2, tmp_path / "v2", keys["new"], 2)
        assert deploy("update", "--device", "testboard", v2, "--key", keys["new"]
                      ).returncode == 0
        assert os.readlink(current).startswith("versions/2-")
    finally:
        agent.kill()
        sub.close()
    agent, sub = restarted(current, broker, tmp_path, fleet_key)
    try:
        assert deploy("cmd", "--key", fleet_key, "testboard", "diagnostics").returncode == 1
        back = deploy("cmd", "--key", keys["new"], "testboard", "rollback")
        assert back.returncode == 0 and "rolled_back" in back.stdout, back.stdout
        assert os.readlink(current).startswith("versions/1-")  # signed by the old key
    finally:
        agent.kill()
        sub.close()
