"""Fuzzing a running agent and a running monitor with generated malformed inputs: 2,000
images (valid encodings cut, flipped, spliced and given lying headers) as MQTT requests, and
2,000 JSON messages (random nesting, types, sizes and encodings) as commands to the agent and
as telemetry to the monitor. Both must live, answer or count every input, and keep their
memory bounded. The generators are seeded: a failure names the seed and the case."""

from __future__ import annotations

import json
import random
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import psutil
import pytest

from tests.deploy.test_monitor import background, metrics, monitor, stop, wait
from tests.support import Agent
from tests.support.broker import Broker, Subscriber, free_port
from tests.support.hostile import encode, nested_json, until_answered
from tests.support.media import sample_images
from tests.test_bad_input_sweep import good_telemetry

pytestmark = pytest.mark.e2e

SEED = 20261202
IMAGES = 2000
MESSAGES = 2000
RSS_GROWTH_MB = 50


def malformed_images(rgb: np.ndarray, count: int, rng: random.Random) -> list[bytes]:
    """`count` images damaged at random: the valid encodings of `rgb` in every format, cut,
    with bytes flipped, inserted or spliced from another format, or given header sizes."""
    from PIL import Image

    img = Image.fromarray(rgb, "RGB")
    bases = [encode(img, f) for f in ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")]
    bases += [encode(img.convert(m), "PNG") for m in ("L", "P", "RGBA", "1")]
    out = []
    for _ in range(count):
        data = bytearray(rng.choice(bases))
        for _ in range(rng.randint(1, 3)):
            how = rng.randrange(5)
            if how == 0 and len(data) > 1:
                data = data[: rng.randrange(1, len(data))]
            elif how == 1:
                for _ in range(rng.randint(1, 24)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
            elif how == 2:
                at = rng.randrange(len(data))
                data[at:at] = rng.randbytes(rng.randint(1, 512))
            elif how == 3:
                other = rng.choice(bases)
                data = data[: rng.randrange(len(data))] + other[rng.randrange(len(other)):]
            elif len(data) > 32:  # a size field somewhere in the first 32 bytes
                at = rng.randrange(8, 28)
                data[at:at + 4] = struct.pack(">I", rng.choice((0, 1, 65535, 2**31 - 1,
                                                                rng.randrange(2**32))))
        out.append(bytes(data))
    return out


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 6 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice((True, False))
    if kind == 2:
        return rng.choice((0, -1, 2**63, 10**400 // 10**390, rng.randrange(-10**6, 10**6)))
    if kind == 3:
        return rng.choice((0.5, -1e308, 1e-320, rng.uniform(-1e6, 1e6)))
    if kind in (4, 5):
        return "".join(chr(rng.randrange(0x20, 0x2FF)) for _ in range(rng.randint(0, 40)))
    if kind in (6, 7):
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {random_value(rng, 9) if rng.random() < 0.1 else f"k{rng.randrange(99)}":
            random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def malformed_json(count: int, rng: random.Random) -> list[bytes]:
    """`count` payloads: telemetry with values of the wrong type, random documents, deep
    nesting (to 100,000 levels), large ones, cut ones and bytes that are not UTF-8."""
    good = good_telemetry("x")
    out = []
    for _ in range(count):
        how = rng.randrange(7)
        if how == 0:
            msg = dict(good)
            for key in rng.sample(sorted(msg), rng.randint(1, 4)):
                msg[key] = random_value(rng)
            data = json.dumps(msg).encode()
        elif how == 1:
            data = json.dumps(random_value(rng)).encode()
        elif how == 2:
            data = nested_json(rng.choice((65, 500, 5_000, 100_000)),
                               json.dumps(good).encode() if rng.random() < 0.5 else b"1")
        elif how == 3:
            data = b'{"schema":"edgeforge.telemetry/1","pad":"' + b"x" * rng.choice(
                (10_000, 300_000)) + b'"}'
        elif how == 4:
            data = json.dumps(good).encode()
            data = data[: rng.randrange(len(data))]
        elif how == 5:
            data = rng.randbytes(rng.randint(1, 2000))
        else:
            data = json.dumps({**good, "device": "x\udcff"}, ensure_ascii=False).encode(
                "utf-8", "surrogateescape")
        out.append(data)
    return out


def monitor_listens(pub: mqtt.Client, port: int) -> None:
    """Publish a good window until `serve` on metrics `port` counts it: its subscription is
    in place."""
    wait(lambda: metrics(port) != "", 30, "the metrics endpoint")
    probe = json.dumps(good_telemetry("probe-board")).encode()
    until_answered(lambda n: pub.publish("edgeforge/probe-board/telemetry", probe, qos=1)
                   .wait_for_publish(10),
                   lambda: 'edgeforge_monitor_windows_total{device="probe-board"' in
                   metrics(port))


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 1e6


@pytest.mark.slow
def test_a_running_agent_and_monitor_live_through_generated_malformed_inputs(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    images, _ = sample_images(bundle)
    pictures = malformed_images(images[3].permute(1, 2, 0).contiguous().numpy(), IMAGES, rng)
    documents = malformed_json(MESSAGES, rng)
    port = free_port()
    serve = background(broker.port, tmp_path, "serve", "--prometheus", f"127.0.0.1:{port}")
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=mqtt", "source.queue=64",
                  "loop.window_s=2")
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fuzzer")
    try:
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()

        def ours(topic: str) -> list[dict[str, Any]]:
            """Answers on `topic` to the fuzz inputs, not to the probes."""
            return [m for m in (json.loads(p) for p, _ in sub.on(topic))
                    if not str(m.get("request_id")).startswith("probe-")]

        def answers() -> int:
            return len(ours("/result"))

        # every subscription in place first: the agent's requests and commands, the monitor's
        monitor_listens(pub, port)
        until_answered(lambda n: pub.publish(f"edgeforge/testboard/infer/probe-{n}",
                                             pictures[0], qos=1).wait_for_publish(10),
                       lambda: len(sub.on("/result")) > 0)
        until_answered(lambda n: pub.publish("edgeforge/testboard/cmd/set",
                                             b'{"request_id": "probe-%d"}' % n, qos=1)
                       .wait_for_publish(10), lambda: len(sub.on("/cmd_result")) > 0)

        def send_images(part: list[bytes], first: int) -> None:
            for i, data in enumerate(part, first):
                pub.publish(f"edgeforge/testboard/infer/fz{i}", data, qos=1) \
                    .wait_for_publish(10)
                if i % 50 == 49:  # keep within the request queue, as a client would
                    sub.wait_for(lambda i=i: answers() >= i + 1 - 32, 60, f"answers to {i}")

        send_images(pictures[:200], 0)  # warm: every decoder loaded, caches filled
        sub.wait_for(lambda: answers() >= 200, 60, "the first 200 answers")
        agent_before, serve_before = rss_mb(agent.proc.pid), rss_mb(serve.pid)
        send_images(pictures[200:], 200)
        for i, data in enumerate(documents):
            pub.publish(f"edgeforge/fuzz-{i % 40}/telemetry", data, qos=1).wait_for_publish(10)
            pub.publish("edgeforge/testboard/cmd/set", data, qos=1).wait_for_publish(10)
            if i % 50 == 49:  # the command inbox is small: let it answer
                sub.wait_for(lambda i=i: len(ours("/cmd_result")) >= i + 1 - 8, 60,
                             f"command answers to {i}")
        sub.wait_for(lambda: answers() >= IMAGES, 120, "an answer per image")
        sub.wait_for(lambda: len(ours("/cmd_result")) >= MESSAGES, 120,
                     "an answer per command")

        def counted() -> float:
            text = metrics(port)
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith(("edgeforge_bad_messages_total{",
                                           "edgeforge_monitor_windows_total{"))
                       and 'device="fuzz-' in line)

        wait(lambda: counted() >= MESSAGES, 60, "every telemetry message counted")
        agent_growth = rss_mb(agent.proc.pid) - agent_before
        serve_growth = rss_mb(serve.pid) - serve_before
        assert agent.proc.poll() is None and serve.poll() is None
    finally:
        pub.disconnect()
        pub.loop_stop()
        agent.kill()
        stop(serve)
        sub.close()
    got = ours("/result")
    ids = [r["request_id"] for r in got]
    assert sorted(ids) == sorted(f"fz{i}" for i in range(IMAGES))  # each exactly once
    errors = sum("error" in r for r in got)
    commands = ours("/cmd_result")
    assert len(commands) == MESSAGES and not any(c["ok"] for c in commands)
    out = agent.output()
    assert "Traceback" not in out and " ERROR " not in out, out[-3000:]
    for log in tmp_path.glob("monitor-*.log"):
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    codes = ", ".join(sorted({c["code"] for c in commands}))
    print(f"fuzz seed {SEED}: {IMAGES} images, {errors} refused with a reason, "
          f"{IMAGES - errors} classified; {MESSAGES} JSON messages, every one counted by the "
          f"monitor and refused by the agent ({codes}); RSS growth agent "
          f"{agent_growth:+.1f} MB, monitor {serve_growth:+.1f} MB")
    assert agent_growth < RSS_GROWTH_MB and serve_growth < RSS_GROWTH_MB


REQUESTS = 2000
TELEMETRY = 10_000
DEVICES = 2000
# Response topics a reply may go to (MQTT 5 publish topics the broker and paho take), and
# ones it must not: wildcards, the broker's own, empty after the level, too long.
GOOD_TOPICS = ("app/replies/{i}", "app/{u}", "r/{i}/x", "{u}")
BAD_TOPICS = ("app/#", "#", "+", "a/+/b", "$SYS/x{i}", "$share/g/{i}", "{long}")
# Text for user properties: printable, without the C1 controls (mosquitto disconnects a
# client whose strings hold a control character: the request never reaches the agent).
TEXT = [chr(c) for c in (*range(0x20, 0x7F), *range(0xA0, 0x300))]


def random_request(rng: random.Random, i: int, picture: bytes) -> tuple[str, bytes, dict[str,
                                                                                       Any], bool]:
    """(topic, payload, MQTT 5 properties, whether a reply must go to the response topic)."""
    props: dict[str, Any] = {}
    reply = False
    if rng.random() < 0.7:
        good = rng.random() < 0.5
        pattern = rng.choice(GOOD_TOPICS if good else BAD_TOPICS)
        props["ResponseTopic"] = pattern.format(
            i=i, u="é" * rng.randint(1, 300), long="t" * rng.randint(1025, 5000))
        reply = good
    if rng.random() < 0.5:
        size = rng.choice((1, 16, 1024, 1025, 5000))
        props["CorrelationData"] = rng.randbytes(size)
        if size > 1024:
            reply = False  # refused: answered on result alone
    if rng.random() < 0.4:
        props["UserProperty"] = [(rng.choice(("x", "request_id", "é", "k" * 50)),
                                  "".join(rng.choice(TEXT) for _ in range(rng.randint(0, 40))))
                                 for _ in range(rng.randint(1, 4))]
    payload = picture if rng.random() < 0.5 else rng.randbytes(rng.randint(1, 3000))
    return f"edgeforge/testboard/infer/rq{i}", payload, props, reply


@pytest.mark.slow
def test_a_running_agent_answers_or_counts_requests_with_random_mqtt5_properties(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    """2,000 requests with random response topics, correlation data and user properties: each
    gets one answer on <id>/result, a reply goes only where one may, and the agent lives."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from tests.support.media import png_bytes

    rng = random.Random(SEED)
    images, _ = sample_images(bundle)
    picture = png_bytes(images[0])
    sub = Subscriber(broker.port, topic="#")
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=mqtt", "source.queue=64",
                  "loop.window_s=2")
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="req-fuzzer",
                      protocol=mqtt.MQTTv5)
    replies_due = 0
    try:
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()

        def answers() -> list[dict[str, Any]]:
            return [m for m in (json.loads(p) for p, _ in sub.on("/result"))
                    if str(m.get("request_id")).startswith("rq")]

        until_answered(lambda n: pub.publish(f"edgeforge/testboard/infer/probe-{n}", picture,
                                             qos=1).wait_for_publish(10),
                       lambda: len(sub.on("/result")) > 0)
        for i in range(REQUESTS):
            topic, payload, fields, reply = random_request(rng, i, picture)
            props = Properties(PacketTypes.PUBLISH)
            for name, value in fields.items():
                setattr(props, name, value)
            pub.publish(topic, payload, qos=1, properties=props).wait_for_publish(10)
            replies_due += reply
            if i % 50 == 49:
                sub.wait_for(lambda i=i: len(answers()) >= i + 1 - 32, 60, f"answers to {i}")
        sub.wait_for(lambda: len(answers()) >= REQUESTS, 120, "an answer per request")
        assert agent.proc.poll() is None, agent.output()[-3000:]
    finally:
        pub.disconnect()
        pub.loop_stop()
        agent.kill()
        sub.close()
    got = answers()
    assert sorted(r["request_id"] for r in got) == sorted(f"rq{i}" for i in range(REQUESTS))
    refused = sum("request refused" in str(r.get("error")) for r in got)
    replies = [t for t, p, _ in sub.messages if not t.startswith("edgeforge/")
               and str(json.loads(p).get("request_id")).startswith("rq")]
    assert len(replies) == replies_due
    out = agent.output()
    assert "Traceback" not in out and "publisher thread failed" not in out, out[-3000:]
    print(f"request fuzz seed {SEED}: {REQUESTS} requests, {refused} refused for their "
          f"properties, {len(replies)} replies to response topics, every one answered once")


def random_telemetry(rng: random.Random, device: str, i: int, now: float) -> bytes:
    """A telemetry message from `device`, with one to four values from the edges of what
    JSON and the schema allow (or a key missing, or the wrong type)."""
    msg = {**good_telemetry(device), "seq": i, "ts": now - 30 + i * 0.001}
    keys = [k for k in msg if k not in ("schema", "device", "ts")]
    for _ in range(rng.randint(1, 4)):
        key = rng.choice(keys)
        msg[key] = rng.choice((2**63, 2**63 - 1, 2**64 + 7, 10**30, -(10**30), 1e300, -1e300,
                               1.7e308, 5e-324, -1, 0, 1e7, 1e15, "12", None, True, [1],
                               {"a": 1}))
    if rng.random() < 0.05:
        msg.pop(rng.choice(keys))
    return json.dumps(msg).encode()


@pytest.mark.slow
def test_record_serve_and_once_live_through_random_telemetry_from_2000_devices(
        broker: Broker, tmp_path: Path) -> None:
    """10,000 messages from 2,000 device ids, each numeric field sometimes far outside what a
    board sends: record, serve and --once stay up, and every message is counted."""
    from agent.telemetry import summary_of
    from deploy.monitor.history import History

    rng = random.Random(SEED)
    port = free_port()
    history = tmp_path / "history.sqlite3"
    serve = background(broker.port, tmp_path, "serve", "--prometheus", f"127.0.0.1:{port}")
    record = background(broker.port, tmp_path, "--set", f"monitor.history={history}",
                        "record")
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="telemetry-fuzzer")
    try:
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        monitor_listens(pub, port)
        wait(lambda: history.exists(), 30, "the history file")
        now = time.time()
        for i in range(TELEMETRY):
            device = f"fz{rng.randrange(DEVICES)}"
            pub.publish(f"edgeforge/{device}/telemetry", random_telemetry(rng, device, i, now),
                        qos=1).wait_for_publish(10)
            if i % 50 == 0:  # retained summaries (other ids), for --once to start from
                board = f"sm{i // 50}"
                summary = json.loads(random_telemetry(rng, board, i, now))
                pub.publish(f"edgeforge/{board}/summary",
                            json.dumps(summary_of(summary)).encode(), qos=1,
                            retain=True).wait_for_publish(10)

        def counted() -> float:
            return sum(float(line.rsplit(" ", 1)[1]) for line in metrics(port).splitlines()
                       if line.startswith(("edgeforge_bad_messages_total{",
                                           "edgeforge_monitor_windows_total{"))
                       and 'device="fz' in line)

        wait(lambda: counted() >= TELEMETRY, 120, "every message counted")
        once = monitor(broker.port, "--once", "--json", "--listen", "2", timeout=120)
        assert once.returncode == 0 and "Traceback" not in once.stderr, once.stderr[-2000:]
        assert serve.poll() is None and record.poll() is None
    finally:
        pub.disconnect()
        pub.loop_stop()
        stop(serve)
        stop(record)
    for log in tmp_path.glob("monitor-*.log"):
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    h = History(history, 86_400)
    stored = h.total()
    h.close()
    assert 0 < stored < TELEMETRY
    print(f"telemetry fuzz seed {SEED}: {TELEMETRY} messages from {DEVICES} device ids, "
          f"{stored} recorded, the rest refused and counted; record, serve and --once up")
