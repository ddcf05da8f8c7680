"""edge-monitor against a real mosquitto and two real agent subprocesses (device ids b1, b2)."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.telemetry import SUMMARY_KEYS, decode_summary
from deploy.monitor.history import History
from tests.support import ROOT, Agent, run_cli
from tests.support.broker import Broker, Subscriber, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def fleet(bundle: Path, broker: Broker, tmp_path: Path) -> Iterator[dict[str, Agent]]:
    agents = {}
    for device in ("b1", "b2"):
        work = tmp_path / device
        work.mkdir()
        agents[device] = Agent(bundle, broker.port, work, f"device.id={device}",
                               "loop.rate_hz=200")
    sub = Subscriber(broker.port, client_id="fleet-wait")
    sub.wait_for(lambda: all(any(f"{d}/telemetry" in t for t, _, _ in sub.messages)
                             for d in agents), 60, "telemetry from both agents")
    sub.close()
    yield agents
    for a in agents.values():
        if a.proc.poll() is None:
            a.proc.send_signal(signal.SIGCONT)
        a.kill()


def monitor(port: int, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_cli("deploy.monitor.cli", "--set", f"mqtt.port={port}",
                   "--set", "mqtt.host=127.0.0.1", *args, timeout=timeout)


def background(port: int, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    with (tmp_path / f"monitor-{time.monotonic_ns()}.log").open("w") as log:
        return subprocess.Popen([sys.executable, "-m", "deploy.monitor.cli", "--set",
                                 f"mqtt.port={port}", "--set", "mqtt.host=127.0.0.1", *args],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    proc.wait(15)


def metrics(port: int) -> str:
    """The /metrics page, or "" while the endpoint is not up yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())
    except (urllib.error.URLError, ConnectionError):
        return ""


def metric(text: str, name: str, device: str) -> float | None:
    m = re.search(rf'^{name}{{device="{device}"[^}}]*}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_once_json_lists_both_boards_with_the_values_they_published(
        fleet: dict[str, Agent], broker: Broker) -> None:
    sub = Subscriber(broker.port, client_id="once")
    try:
        proc = monitor(broker.port, "--once", "--json", "--listen", "2")
        assert proc.returncode == 0, proc.stderr
        rows = {r["device"]: r for r in json.loads(proc.stdout)["devices"]}
        assert set(rows) == {"b1", "b2"}
        for device, row in rows.items():
            sent = {m["seq"]: m for m in sub.telemetry() if m["device"] == device}
            published = sent[row["seq"]]
            for key in ("latency_p50_ms", "latency_p99_ms", "throughput_ips", "rss_mb",
                        "spool_depth", "model_sha256"):
                assert row[key] == published[key], (device, key)
            assert row["state"] == "online" and row["bad_messages"] == 0
        table = monitor(broker.port, "--once", "--listen", "1.5", "--sort", "p99")
        assert table.returncode == 0
        assert table.stdout.splitlines()[0].split()[:6] == ["device", "status", "model",
                                                            "engine", "p50", "ms"]
        assert {line.split()[0] for line in table.stdout.splitlines()[1:]} == {"b1", "b2"}
        # Each agent keeps its last window retained as a summary: a subscriber that arrives
        # later gets one per board, with the figures of a window `sub` heard as telemetry.
        late = Subscriber(broker.port, "edgeforge/+/summary", client_id="late")
        late.wait_for(lambda: len(late.on("/summary")) >= 2, 10, "both retained summaries")
        summaries = [(decode_summary(p), retained) for p, retained in late.on("/summary")[:2]]
        late.close()
        assert {s["device"] for s, _ in summaries} == set(fleet)
        for summary, retained in summaries:
            assert retained and summary["schema"] == "edgeforge.summary/1"
            key = (summary["device"], summary["seq"])
            # The summary leaves at once, its telemetry through the spool just after.
            sub.wait_for(lambda k=key: k in {(m["device"], m["seq"]) for m in sub.telemetry()},
                         10, f"the telemetry of {key}")
            window = next(m for m in sub.telemetry() if (m["device"], m["seq"]) == key)
            for name in SUMMARY_KEYS[1:]:
                assert summary[name] == window.get(name), name
    finally:
        sub.close()


def test_a_killed_board_is_offline_a_silent_one_stale_and_alerts_fire_and_clear(
        fleet: dict[str, Agent], broker: Broker, tmp_path: Path) -> None:
    port = free_port()
    serve = background(broker.port, tmp_path, "--set", "monitor.stale_s=1.5",
                       "--set", "monitor.alert_offline_s=1", "--set", "monitor.alert_p99_ms=1000",
                       "serve", "--prometheus", f"127.0.0.1:{port}")
    alerts = Subscriber(broker.port, topic="edgeforge/alerts/#", client_id="alerts")
    try:
        wait(lambda: metric(metrics(port), "edgeforge_latency_p99_seconds", "b2") is not None, 20,
             "metrics of b2")
        fleet["b1"].proc.send_signal(signal.SIGKILL)  # the broker sends its last will
        fleet["b2"].proc.send_signal(signal.SIGSTOP)  # connected, but silent
        def state_is(text: str, device: str, state: str) -> bool:
            return f'edgeforge_state{{device="{device}",state="{state}"}} 1.0' in text

        wait(lambda: state_is(metrics(port), "b1", "offline")
             and state_is(metrics(port), "b2", "stale"), 20, "b1 offline and b2 stale")
        text = metrics(port)
        # One series per device whose value changes; a dead board's last values are gone.
        assert metric(text, "edgeforge_up", "b1") == 0.0 and metric(text, "edgeforge_up",
                                                                   "b2") == 0.0
        assert text.count('edgeforge_up{device="b1"') == 1
        for device in ("b1", "b2"):
            assert metric(text, "edgeforge_latency_p99_seconds", device) is None
            assert metric(text, "edgeforge_throughput_images_per_second", device) is None
        # Its age stays, for PromQL (b2's telemetry was seen before it went silent).
        assert (metric(text, "edgeforge_seconds_since_telemetry", "b2") or 0) > 1.0
        alerts.wait_for(lambda: len(alerts.on("alerts/b2")) >= 1, 20, "b2's alert")
        payload, retained = alerts.on("alerts/b2")[-1]
        msg = json.loads(payload)
        assert msg["device"] == "b2" and msg["alerts"][0]["alert"] == "offline"
        assert "stale" in msg["alerts"][0]["message"]
        once = monitor(broker.port, "--once", "--json", "--listen", "1")
        rows = {r["device"]: r for r in json.loads(once.stdout)["devices"]}
        assert rows["b1"]["state"] == "offline"  # the retained last will, seen by a new client
        fleet["b2"].proc.send_signal(signal.SIGCONT)
        alerts.wait_for(lambda: alerts.on("alerts/b2")[-1][0] == b"", 20, "b2's alert cleared")
        wait(lambda: metric(metrics(port), "edgeforge_alerts_active", "b2") == 0.0, 10,
             "no active alert on b2")
        check = monitor(broker.port, "check", "--set", "monitor.alert_p99_ms=0.001",
                        "--listen", "2")
        assert check.returncode == 1 and "ALERT b2 p99_high" in check.stdout
    finally:
        alerts.close()
        stop(serve)


def test_prometheus_serves_the_latest_values_per_device(fleet: dict[str, Agent],
                                                        broker: Broker, tmp_path: Path) -> None:
    port = free_port()
    sub = Subscriber(broker.port, client_id="prom")
    serve = background(broker.port, tmp_path, "serve", "--prometheus", f"127.0.0.1:{port}")
    try:
        def mismatches(text: str) -> list[str]:
            """What the scrape shows that no telemetry message of that board carried."""
            wrong = []
            for device in ("b1", "b2"):
                sent = [m for m in sub.telemetry() if m["device"] == device]
                for name, key, scale in (
                        ("edgeforge_latency_p99_seconds", "latency_p99_ms", 1e-3),
                        ("edgeforge_resident_memory_bytes", "rss_mb", 1e6),
                        ("edgeforge_dropped_total", "dropped_total", 1.0)):
                    value = metric(text, name, device)
                    if value not in [pytest.approx(m[key] * scale) for m in sent]:
                        wrong.append(f"{device} {name}={value}")
                if metric(text, "edgeforge_up", device) != 1.0:
                    wrong.append(f"{device} not up")
            return wrong

        # Both boards publish every 0.5 s: the scrape and this subscriber agree once each
        # has seen a window of both (the scrape may be a message ahead; then look again).
        deadline = time.monotonic() + 30
        text = metrics(port)
        while mismatches(text) and time.monotonic() < deadline:
            time.sleep(0.2)
            text = metrics(port)
        assert mismatches(text) == []
        for device in ("b1", "b2"):  # which engine and model each board runs, as labels
            # (no model_version: these agents run a bundle folder, not a versioned store)
            info = re.search(rf'^edgeforge_model_info{{device="{device}",engine="(\w+)",'
                             rf'model_version="",model_sha256="([0-9a-f]{{64}})"}} 1.0$',
                             text, re.M)
            sent = [m for m in sub.telemetry() if m["device"] == device][-1]
            assert info is not None and info.groups() == (sent["engine"],
                                                          sent["model_sha256"]), text[-2000:]
        # Prometheus's own linter: base units, _total on counters, no abbreviated units.
        lint = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                              capture_output=True, timeout=60)
        assert lint.returncode == 0, lint.stdout + lint.stderr
    finally:
        stop(serve)
        sub.close()


def test_record_keeps_history_through_a_broker_outage_and_plot_writes_a_png(
        fleet: dict[str, Agent], broker: Broker, tmp_path: Path) -> None:
    history = tmp_path / "history.sqlite3"
    broker.stop()
    rec = background(broker.port, tmp_path, "--set", f"monitor.history={history}", "record")
    time.sleep(2)
    broker.start()  # the monitor retries and the agents replay their spools
    try:
        # Each agent reconnects on its own back-off (up to a few seconds), then replays.
        wait(lambda: history.is_file() and min(count(history, "b1"), count(history, "b2")) >= 5,
             90, "recorded windows of both boards")
    finally:
        stop(rec)
    out = tmp_path / "b1.png"
    proc = monitor(broker.port, "--set", f"monitor.history={history}", "plot", "--device", "b1",
                   "--since", "1h", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(out).shape[:2] == (1000, 1000)
    missing = monitor(broker.port, "--set", f"monitor.history={history}", "plot", "--device",
                      "nope", "--out", str(tmp_path / "x.png"))
    assert missing.returncode == 2 and "recorded devices: b1, b2" in missing.stderr


def count(history: Path, device: str) -> int:
    h = History(history, 3600)
    try:
        return h.count(device)
    finally:
        h.close()


def test_bad_telemetry_is_counted_per_device_never_crashes_or_reaches_history(
        broker: Broker, tmp_path: Path) -> None:
    good = {"schema": "edgeforge.telemetry/1", "device": "x", "seq": 1, "ts": time.time(),
            **{k: 1.0 for k in ("window_s", "throughput_ips", "latency_p50_ms",
                                "latency_p90_ms", "latency_p99_ms", "latency_max_ms",
                                "latency_mean_ms", "proc_cpu_percent", "sys_cpu_percent",
                                "rss_mb", "mem_percent", "load_1m")},
            "batch_size": 1, "inferences": 10, "soc_temp_c": None, "cpu_freq_mhz": None,
            "throttled": None,
            "under_voltage": None, "freq_capped": None, "throttling": None, "spool_depth": 0,
            "dropped_total": 0, "model_sha256": "ab" * 32}
    cases = {
        "notjson": (b"{not json", "not JSON"),
        "schema": (json.dumps({**good, "schema": "edgeforge.telemetry/9"}).encode(), "schema"),
        "missing": (json.dumps({k: v for k, v in good.items() if k != "rss_mb"}).encode(),
                    "lacks rss_mb"),
        "nan": (json.dumps({**good, "latency_p99_ms": math.nan}).encode(), "nan"),
        "negative": (json.dumps({**good, "latency_p50_ms": -3.0}).encode(), "negative"),
        # good telemetry of device x, sent under another board's id: not believed
        "impostor": (json.dumps(good).encode(), "names device 'x' on edgeforge/impostor/"),
    }
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bad-sender")
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    for device, (payload, _) in cases.items():
        c.publish(f"edgeforge/{device}/telemetry", payload, qos=1, retain=True).wait_for_publish()
    c.publish("edgeforge/ok/telemetry", json.dumps({**good, "device": "ok"}), qos=1,
              retain=True).wait_for_publish()
    c.disconnect()
    c.loop_stop()
    history = tmp_path / "h.sqlite3"
    proc = monitor(broker.port, "--once", "--json", "--listen", "1.5")
    assert proc.returncode == 0, proc.stderr
    rows = {r["device"]: r for r in json.loads(proc.stdout)["devices"]}
    for device, (_, problem) in cases.items():
        assert rows[device]["bad_messages"] == 1, rows[device]
        assert problem in rows[device]["last_problem"], rows[device]
        assert rows[device]["latency_p99_ms"] is None
    assert rows["ok"]["bad_messages"] == 0 and rows["ok"]["latency_p99_ms"] == 1.0
    rec = background(broker.port, tmp_path, "--set", f"monitor.history={history}", "record")
    wait(lambda: history.is_file() and count(history, "ok") == 1, 20, "the good message")
    stop(rec)
    for device in cases:
        assert count(history, device) == 0
    table = monitor(broker.port, "--once", "--listen", "1.5")
    assert "1 bad message(s): telemetry latency_p50_ms is negative" in table.stdout


def test_a_broker_that_is_down_is_named_in_one_line(tmp_path: Path) -> None:
    proc = monitor(free_port(), "--once", "--listen", "1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "edge-monitor: cannot reach the broker at 127.0.0.1:")
    assert "Traceback" not in proc.stderr


def test_home_assistant_discovery_is_announced_and_sent_again_after_ha_restarts(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    sub = Subscriber(broker.port, topic="homeassistant/#", client_id="ha")
    agent = Agent(bundle, broker.port, tmp_path, "device.id=pi-1",
                  "homeassistant.enabled=true")
    try:
        sub.wait_for(lambda: len(sub.on("/config")) >= 6, 60, "six discovery configs")
        configs = {t.split("/")[3]: json.loads(p) for t, p, _ in sub.messages
                   if t.endswith("/config")}
        assert set(configs) == {"latency_p50_ms", "latency_p99_ms", "throughput_ips",
                                "proc_cpu_percent", "soc_temp_c", "rss_mb"}
        for key, cfg in configs.items():
            for required in ("unique_id", "device", "state_class", "unit_of_measurement",
                             "value_template", "availability_topic", "state_topic"):
                assert required in cfg, (key, required)
            assert cfg["availability_topic"] == "edgeforge/pi-1/status"
            assert cfg["state_topic"] == "edgeforge/pi-1/telemetry"
            assert key in cfg["value_template"]
            # object_id is gone from Home Assistant 2026.4; default_entity_id is domain.id.
            assert "object_id" not in cfg
            assert cfg["default_entity_id"] == f"sensor.edgeforge_pi_1_{key}"
        assert configs["soc_temp_c"]["device_class"] == "temperature"
        late = Subscriber(broker.port, topic="homeassistant/#", client_id="ha-late")
        late.wait_for(lambda: len(late.on("/config")) >= 6, 10, "retained configs")
        assert all(retained for _, retained in late.on("/config"))
        late.close()
        before = len(sub.on("/config"))
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="home-assistant")
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        c.publish("homeassistant/status", "online", qos=1).wait_for_publish()
        c.disconnect()
        c.loop_stop()
        sub.wait_for(lambda: len(sub.on("/config")) >= before + 6, 20, "configs sent again")
    finally:
        agent.kill()
        sub.close()

