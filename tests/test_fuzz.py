"""Fuzzing a running agent and a running monitor with generated malformed inputs: 2,000
images (valid encodings cut, flipped, spliced and given lying headers) as MQTT requests, and
2,000 JSON messages (random nesting, types, sizes and encodings) as commands to the agent and
as telemetry to the monitor. Both must live, answer or count every input, and keep their
memory bounded. The generators are seeded: a failure names the seed and the case."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import psutil
import pytest

from tests.deploy.test_monitor import background, metrics, stop, wait
from tests.support import Agent
from tests.support.broker import Broker, Subscriber, free_port
from tests.support.hostile import encode, nested_json, until_answered
from tests.support.media import sample_images
from tests.test_bad_input_sweep import good_telemetry

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
        wait(lambda: metrics(port) != "", 30, "the metrics endpoint")
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()

        def ours(topic: str) -> list[dict[str, Any]]:
            """Answers on `topic` to the fuzz inputs, not to the probes."""
            return [m for m in (json.loads(p) for p, _ in sub.on(topic))
                    if not str(m.get("request_id")).startswith("probe-")]

        def answers() -> int:
            return len(ours("/result"))

        # every subscription in place first: the agent's requests and commands, the monitor's
        probe = json.dumps(good_telemetry("probe-board")).encode()
        until_answered(lambda n: pub.publish("edgeforge/probe-board/telemetry", probe, qos=1)
                       .wait_for_publish(10),
                       lambda: 'edgeforge_monitor_windows_total{device="probe-board"' in
                       metrics(port))
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
