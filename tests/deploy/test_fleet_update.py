"""Signed model updates and remote commands over MQTT: a real mosquitto, a real agent
subprocess with a versioned store, real bundles, and edge-deploy as a real subprocess."""

from __future__ import annotations

import base64
import json
import os
import signal
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.command_auth import sign_command
from deploy.keys import load_private_key
from deploy.remote import update_args
from tests.support import (
    Agent,
    edit_manifest,
    make_store,
    model_sha,
    run_cli,
    sign_unchecked,
    signed_copy,
    tree,
    wrong_logits_copy,
)
from tests.support.broker import Broker, Subscriber
from tests.support.media import png_bytes, sample_images

pytestmark = pytest.mark.e2e

# Windows of 0.5 s at full rate: a trial of 3 windows takes 1.5 s. The p99 limit is loose so
# a busy CI machine does not roll back a good update; the slow model is far beyond it.
TRIAL = ("update.watch_windows=3", "update.max_p99_regression_pct=200")


def start_agent(current: Path, broker: Broker, tmp_path: Path, key: Path,
                *overrides: str) -> tuple[Agent, Subscriber]:
    sub = Subscriber(broker.port)
    agent = Agent(current, broker.port, tmp_path, f"update.public_key={key}.pub", *TRIAL,
                  *overrides)
    sub.wait_for(lambda: any(json.loads(p).get("model_sha256") for p, _ in sub.on("/info")),
                 60, "the agent's birth message")
    return agent, sub


def deploy(*args: str | Path, port: int) -> Any:
    return run_cli("deploy.cli", *args, "--set", f"mqtt.port={port}",
                   "--set", "mqtt.host=127.0.0.1", timeout=180)


def results(sub: Subscriber, rid: str | None = None) -> list[dict[str, Any]]:
    found = [json.loads(p) for p, _ in sub.on("/cmd_result")]
    return [m for m in found if rid is None or m["request_id"] == rid]


def signed(payload: bytes, name: str, key: Path, device: str = "testboard",
           now: float | None = None) -> bytes:
    """`payload` with the `auth` edge-deploy adds (agent/command_auth.py), signed by `key`
    for `device`; a payload that is not a JSON object with a request id stays as it is."""
    try:
        msg = json.loads(payload)
    except ValueError:
        return payload
    if not isinstance(msg, dict) or not isinstance(msg.get("request_id"), str):
        return payload
    msg["auth"] = sign_command(load_private_key(key), name, device, msg["request_id"],
                               msg.get("args", {}), now)
    return json.dumps(msg).encode()


def send(port: int, name: str, payload: bytes, key: Path | None = None,
         device: str = "testboard") -> None:
    """Publish a raw command payload, as a misbehaving or malicious sender would; signed by
    `key` when one is given."""
    if key is not None:
        payload = signed(payload, name, key, device)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"raw-{name}")
    c.connect("127.0.0.1", port)
    c.loop_start()
    c.publish(f"edgeforge/{device}/cmd/{name}", payload, qos=1).wait_for_publish(10)
    c.disconnect()
    c.loop_stop()


def request(rid: str, args: dict[str, Any]) -> bytes:
    return json.dumps({"request_id": rid, "schema": "edgeforge.cmd/1", "args": args}).encode()


def info_sha(sub: Subscriber) -> str:
    return str(json.loads(sub.on("/info")[-1][0])["model_sha256"])


def test_a_signed_update_is_applied_watched_confirmed_and_reported(
        bundle: Path, bundle_v2: Path, fleet_key: Path, broker: Broker, tmp_path: Path,
        cpu_hog: None) -> None:
    """A model of the same speed is confirmed while both cores are busy with other work."""
    current = make_store(bundle, tmp_path, fleet_key, version=1)
    agent, sub = start_agent(current, broker, tmp_path, fleet_key)
    try:
        new = signed_copy(bundle_v2, tmp_path / "v2", fleet_key, 2)
        proc = deploy("update", "--device", "testboard", new, "--key", fleet_key,
                      "--timeout", "90", port=broker.port)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        new_sha = model_sha(bundle_v2)
        vid = f"2-{new_sha[:12]}"
        row = proc.stdout.splitlines()[1].split()
        assert row[:4] == ["testboard", f"1-{model_sha(bundle)[:12]}", vid, "confirmed"]
        # edge-deploy saw the confirmation; this subscriber's copy may still be on its way
        sub.wait_for(lambda: len(results(sub)) >= 2, 15, "the confirmation")
        assert [m["result"] for m in results(sub)] == ["applied", "confirmed"]
        assert os.readlink(current) == f"versions/{vid}"
        sub.wait_for(lambda: info_sha(sub) == new_sha, 10, "info naming the new model")
        sub.wait_for(lambda: sub.telemetry()[-1]["model_sha256"] == new_sha, 10,
                     "telemetry from the new model")
        assert agent.proc.poll() is None, agent.output()
    finally:
        agent.kill()
        sub.close()


def test_refuses_every_bad_update_and_leaves_model_and_files_as_they_were(
        bundle: Path, fleet_key: Path, broker: Broker, tmp_path: Path) -> None:
    current = make_store(bundle, tmp_path, fleet_key, version=5)
    agent, sub = start_agent(current, broker, tmp_path, fleet_key, "update.max_payload_mb=2")
    before, sha = tree(current.parent), model_sha(bundle)
    other_key = tmp_path / "other.key"
    assert run_cli("deploy.cli", "keygen", "--key", other_key).returncode == 0
    try:
        good = update_args(signed_copy(bundle, tmp_path / "v6", fleet_key, 6), False)
        files = good["files"]

        def with_files(**changes: str | None) -> dict[str, Any]:
            f = {k: v for k, v in {**files, **changes}.items() if v is not None}
            return {"files": f, "force": False}

        def resigned(name: str, **manifest: Any) -> dict[str, str]:
            b = signed_copy(bundle, tmp_path / name, fleet_key, 7)
            edit_manifest(b, **manifest)
            sign_unchecked(b, fleet_key, 7)  # edge-deploy sign would refuse it
            return dict(update_args(b, False)["files"])

        model = base64.b64decode(files["quantized_cnn_scripted.pt"])
        tampered = bytearray(model)
        tampered[len(tampered) // 2] ^= 0xFF
        edited = json.loads(base64.b64decode(files["manifest.json"]))
        edited["metrics"] = {"accuracy_pct": 99.9}
        shape = json.loads(base64.b64decode(files["manifest.json"]))["input"]
        cases = {
            "unsigned": (with_files(**{"signature.json": None}), "unsigned"),
            "wrong-key": (update_args(signed_copy(bundle, tmp_path / "ok", other_key, 8),
                                      False), "bad_signature"),
            "sha": (with_files(**{"quantized_cnn_scripted.pt":
                                  base64.b64encode(bytes(tampered)).decode()}), "sha256"),
            "edited": (with_files(**{"manifest.json":
                                     base64.b64encode(json.dumps(edited).encode()).decode()}),
                       "bad_signature"),
            "engine": ({"files": resigned("x86", engine="x86"), "force": False}, "engine"),
            "shape": ({"files": resigned("big", input={**shape, "shape": [3, 64, 64]}),
                       "force": False}, "input_shape"),
            "replay": (update_args(tmp_path / "v5", False),  # the version the store holds
                       "replay"),
        }
        for rid, (args, _) in cases.items():
            send(broker.port, "update_model", request(rid, args), fleet_key)
        whole = signed(request("big", good), "update_model", fleet_key)
        send(broker.port, "update_model", whole + b" " * 2 * 10**6)  # over max_payload_mb=2
        send(broker.port, "update_model", whole[: len(whole) // 2])  # truncated
        send(broker.port, "update_model", json.dumps({"args": good}).encode())  # no request id
        expected = {rid: code for rid, (_, code) in cases.items()}
        sub.wait_for(lambda: len(results(sub)) >= len(expected) + 3, 60, "every refusal")
        got = {m["request_id"]: m for m in results(sub)}
        for rid, code in expected.items():
            assert got[rid]["result"] == "refused" and got[rid]["code"] == code, got[rid]
        # The oversized and the truncated payload are answered under the id read off their head.
        big = [m for m in results(sub, "big")]
        assert sorted(str(m["code"]) for m in big) == ["malformed", "too_large"], big
        assert any(m["request_id"] is None and m["code"] == "malformed" for m in results(sub))
        assert "differs from the signed manifest" in got["sha"]["reason"]
        assert "changed after signing" in got["edited"]["reason"]
        assert tree(current.parent) == before
        assert info_sha(sub) == sha and sub.telemetry()[-1]["model_sha256"] == sha
        assert agent.proc.poll() is None, agent.output()
    finally:
        agent.kill()
        sub.close()


def test_a_smoke_test_failure_keeps_the_old_model(bundle: Path, fleet_key: Path,
                                                  broker: Broker, tmp_path: Path) -> None:
    current = make_store(bundle, tmp_path, fleet_key, version=1)
    agent, sub = start_agent(current, broker, tmp_path, fleet_key)
    before = tree(current.parent)
    try:
        bad = wrong_logits_copy(bundle, tmp_path / "bad", fleet_key, 2)
        proc = deploy("update", "--device", "testboard", bad, "--key", fleet_key, "--timeout",
                      "60", port=broker.port)
        assert proc.returncode == 1
        (answer,) = results(sub)
        assert answer["code"] == "smoke_failed" and "logits differ" in answer["reason"]
        assert "refused" in proc.stdout and "smoke test" in proc.stdout
        assert tree(current.parent) == before  # the staged copy is gone again
        assert agent.proc.poll() is None
    finally:
        agent.kill()
        sub.close()


def test_a_latency_regression_rolls_back_by_itself(bundle: Path, slow_bundle: Path,
                                                   fleet_key: Path, broker: Broker,
                                                   tmp_path: Path, cpu_hog: None) -> None:
    """Judged on the old and new model's paired passes, so it holds on a busy board. Run on
    the TorchScript engine (model.engine forces it): the other update tests run auto's
    choice, ONNX Runtime on this machine, so updates and rollback are proven on both."""
    current = make_store(bundle, tmp_path, fleet_key, version=1)
    agent, sub = start_agent(current, broker, tmp_path, fleet_key, "model.engine=torchscript")
    old = os.readlink(current)
    try:
        sub.wait_for(lambda: len(sub.telemetry()) >= 4, 30, "a baseline of old windows")
        slow = signed_copy(slow_bundle, tmp_path / "slow", fleet_key, 2)
        proc = deploy("update", "--device", "testboard", slow, "--key", fleet_key,
                      "--timeout", "90", port=broker.port)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        print(proc.stdout)  # the table the README shows (pytest -s)
        applied, rolled = results(sub)
        assert applied["result"] == "applied" and applied["data"]["engine"] == "torchscript"
        assert rolled["result"] == "rolled_back" and "median latency" in rolled["reason"]
        assert rolled["data"]["new_p50_ms"] > 2 * rolled["data"]["old_p50_ms"]
        assert rolled["data"]["mann_whitney_p"] < 0.01
        row = proc.stdout.splitlines()[1].split()
        assert row[:4] == ["testboard", old.split("/")[-1], f"2-{model_sha(slow_bundle)[:12]}",
                           "rolled_back"]
        assert os.readlink(current) == old
        state = json.loads((current.parent / "state.json").read_text())
        assert state["rejected"][-1]["id"].startswith("2-")
        sub.wait_for(lambda: sub.telemetry()[-1]["model_sha256"] == model_sha(bundle), 10,
                     "telemetry from the old model again")
        assert {m["engine"] for m in sub.telemetry()} == {"torchscript"}
    finally:
        agent.kill()
        sub.close()


def test_an_agent_that_dies_during_a_trial_rolls_back_at_its_next_start(
        bundle: Path, bundle_v2: Path, fleet_key: Path, broker: Broker, tmp_path: Path) -> None:
    current = make_store(bundle, tmp_path, fleet_key, version=1)
    agent, sub = start_agent(current, broker, tmp_path, fleet_key, "update.watch_windows=1000")
    try:
        new = signed_copy(bundle_v2, tmp_path / "v2", fleet_key, 2)
        proc = deploy("update", "--device", "testboard", new, "--key", fleet_key, "--no-watch",
                      "--timeout", "60", port=broker.port)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert os.readlink(current).startswith("versions/2-")
        agent.proc.send_signal(signal.SIGKILL)  # a crash in the middle of the trial
        agent.wait()
        again = Agent(current, broker.port, tmp_path, f"update.public_key={fleet_key}.pub",
                      duration=2)
        assert again.wait() == 0, again.output()
        assert os.readlink(current).startswith("versions/1-")
        assert "on trial" in again.output()
        events = [json.loads(p) for p, _ in sub.on("/event")]
        assert any(e["event"] == "rollback" for e in events)
    finally:
        agent.kill()
        sub.close()


def test_remote_commands_answer_with_their_request_id(bundle: Path, bundle_v2: Path,
                                                      fleet_key: Path, broker: Broker,
                                                      tmp_path: Path) -> None:
    current = make_store(bundle, tmp_path, fleet_key, version=1)
    agent, sub = start_agent(current, broker, tmp_path, fleet_key)
    try:
        proc = deploy("cmd", "--key", fleet_key, "testboard", "set", "rate_hz=50", "window_s=1",
                      port=broker.port)
        assert proc.returncode == 0, proc.stderr
        assert '"rate_hz": 50.0' in proc.stdout
        sub.wait_for(lambda: abs(sub.telemetry()[-1]["window_s"] - 1.0) < 0.2
                     and sub.telemetry()[-1]["throughput_ips"] < 60, 20, "windows at 50 Hz")

        proc = deploy("cmd", "--key", fleet_key, "testboard", "benchmark", "iters=30",
                      "batch_sizes=[1,4]", port=broker.port)
        assert proc.returncode == 0, proc.stderr
        # done, the head, a proof line per engine, the columns, 3 engines x 2 batch sizes,
        # and the engine the board runs
        lines = proc.stdout.splitlines()
        assert "p99 ms" in proc.stdout and len(lines) == 13 and lines[-1].startswith("runs: ")

        proc = deploy("cmd", "--key", fleet_key, "testboard", "diagnostics", port=broker.port)
        assert proc.returncode == 0, proc.stderr
        diag = json.loads(proc.stdout.split("\n", 1)[1])
        assert diag["versions"]["current"] == os.readlink(current).split("/")[-1]
        assert len(diag["config_sha256"]) == 64 and isinstance(diag["spool_depth"], int)
        assert diag["loop"]["rate_hz"] == 50.0

        proc = deploy("cmd", "--key", fleet_key, "testboard", "rollback", port=broker.port)
        assert proc.returncode == 1 and "no earlier version" in proc.stdout

        new = signed_copy(bundle_v2, tmp_path / "v2", fleet_key, 2)
        assert deploy("update", "--device", "testboard", new, "--key", fleet_key,
                      port=broker.port).returncode == 0
        proc = deploy("cmd", "--key", fleet_key, "testboard", "rollback", port=broker.port)
        assert proc.returncode == 0 and "rolled_back" in proc.stdout
        assert os.readlink(current).startswith("versions/1-")
        sub.wait_for(lambda: info_sha(sub) == model_sha(bundle), 10, "info after rollback")

        # Refused on the host before anything is sent (the board refuses them too: the sweep).
        proc = deploy("cmd", "--key", fleet_key, "testboard", "selfdestruct", port=broker.port)
        assert proc.returncode == 2 and "unknown command 'selfdestruct'" in proc.stderr
        proc = deploy("cmd", "--key", fleet_key, "testboard", "set", "rate_hz=-1", port=broker.port)
        assert proc.returncode == 2 and "rate_hz" in proc.stderr
        send(broker.port, "set", b'{"request_id": "r1", "args": {"rate_hz": ')
        sub.wait_for(lambda: bool(results(sub, "r1")), 10, "an answer to a malformed command")
        assert results(sub, "r1")[0]["code"] == "malformed"
        assert agent.proc.poll() is None, agent.output()
        count = len(sub.telemetry())
        sub.wait_for(lambda: len(sub.telemetry()) > count + 1, 10, "telemetry going on")
    finally:
        agent.kill()
        sub.close()



def test_edge_deploy_refuses_a_broken_bundle_locally_and_says_at_once_a_board_is_offline(
        bundle: Path, fleet_key: Path, broker: Broker, tmp_path: Path) -> None:
    sub = Subscriber(broker.port)
    try:
        changed = signed_copy(bundle, tmp_path / "changed", fleet_key, 3)
        data = bytearray((changed / "quantized_cnn_scripted.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (changed / "quantized_cnn_scripted.pt").write_bytes(bytes(data))
        proc = deploy("update", "--device", "testboard", changed, "--key", fleet_key,
                      port=broker.port)
        assert proc.returncode == 2 and "changed after the bundle was built" in proc.stderr
        assert "nothing was sent" in proc.stderr and "Traceback" not in proc.stderr
        good = signed_copy(bundle, tmp_path / "good", fleet_key, 4)
        proc = deploy("update", "--device", "ghost", good, "--key", fleet_key,
                      "--timeout", "120", port=broker.port)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "ghost" in proc.stdout and "the board is unknown" in proc.stdout
        proc = deploy("cmd", "--key", fleet_key, "ghost", "diagnostics", "--timeout", "120",
                      port=broker.port)
        assert proc.returncode == 1 and "ghost is unknown" in proc.stderr
        assert not sub.on("/cmd/update_model") and not sub.on("/cmd/diagnostics")
    finally:
        sub.close()


def test_an_idle_serving_board_still_judges_and_confirms_an_update(
        bundle: Path, bundle_v2: Path, fleet_key: Path, broker: Broker, tmp_path: Path) -> None:
    """With source.kind mqtt and no request arriving, the trial borrows the bundle's inputs
    for its paired passes: the update is confirmed, and requests are served by the new model."""
    current = make_store(bundle, tmp_path, fleet_key, version=1)
    agent, sub = start_agent(current, broker, tmp_path, fleet_key, "source.kind=mqtt")
    try:
        new = signed_copy(bundle_v2, tmp_path / "v2", fleet_key, 2)
        proc = deploy("update", "--device", "testboard", new, "--key", fleet_key,
                      "--timeout", "90", port=broker.port)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # edge-deploy saw the confirmation; this subscriber's copy may still be on its way
        sub.wait_for(lambda: len(results(sub)) >= 2, 15, "the confirmation")
        assert [m["result"] for m in results(sub)] == ["applied", "confirmed"]
        send_image = png_bytes(sample_images(tmp_path / "v2")[0][0])
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="app")
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        c.publish("edgeforge/testboard/infer/after-update", send_image, qos=1) \
            .wait_for_publish(10)
        c.disconnect()
        c.loop_stop()
        sub.wait_for(lambda: bool(sub.on("/result")), 30, "the request's result")
        answer = json.loads(sub.on("/result")[-1][0])
        assert answer["request_id"] == "after-update"
        assert answer["model_sha256"] == model_sha(bundle_v2) and answer["top"]
        assert agent.proc.poll() is None, agent.output()
    finally:
        agent.kill()
        sub.close()


def test_a_staged_rollout_stops_at_its_canary_when_the_canary_model_is_bad(
        bundle: Path, fleet_key: Path, broker: Broker, tmp_path: Path) -> None:
    """Two boards, `--all --canary-pct 50`: the dry run prints the two waves and sends
    nothing; the real rollout sends the bad model to the canary alone, which refuses it, and
    stops there: the other board is never sent it and keeps its version."""
    agents, stores = [], {}
    sub = Subscriber(broker.port, client_id="rollout")
    try:
        for device in ("board-a", "board-b"):
            work = tmp_path / device
            work.mkdir()
            stores[device] = make_store(bundle, work, fleet_key, version=1)
            agents.append(Agent(stores[device], broker.port, work,
                                f"update.public_key={fleet_key}.pub", *TRIAL,
                                f"device.id={device}"))
        sub.wait_for(lambda: {json.loads(p)["device"] for p, _ in sub.on("/info")}
                     >= {"board-a", "board-b"}, 90, "both boards' birth messages")
        before = {d: tree(s.parent) for d, s in stores.items()}
        bad = wrong_logits_copy(bundle, tmp_path / "bad", fleet_key, 2)

        dry = deploy("update", "--all", bad, "--key", fleet_key, "--canary-pct", "50",
                     "--dry-run", port=broker.port)
        assert dry.returncode == 0, dry.stderr
        assert "wave 1: 1 board(s): board-a" in dry.stderr
        assert "wave 2: 1 board(s): board-b" in dry.stderr
        assert "nothing was sent" in dry.stdout and results(sub) == []

        proc = deploy("update", "--all", bad, "--key", fleet_key, "--canary-pct", "50",
                      "--timeout", "60", port=broker.port)
        assert proc.returncode == 1
        answers = results(sub)
        assert [m["code"] for m in answers] == ["smoke_failed"]
        assert not sub.on("board-b/cmd_result")  # board-b was never asked
        assert "the rollout stopped after wave 1: 1 of 1 failed" in proc.stderr
        row_b = next(line for line in proc.stdout.splitlines() if line.startswith("board-b"))
        assert "not sent" in row_b and "still on its old version" in row_b
        assert {d: tree(s.parent) for d, s in stores.items()} == before
        assert all(a.proc.poll() is None for a in agents)
    finally:
        for a in agents:
            a.kill()
        sub.close()
