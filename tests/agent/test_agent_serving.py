"""The agent serving real work: a real mosquitto, a real agent subprocess, real PNG files, a
lossless video and an HTTP stream made with Debian's ffmpeg, and MQTT 3.1.1 and MQTT 5
clients. Every prediction is compared with what the host computes for the same image."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.telemetry import RESULT_SCHEMA
from tests.support import Agent
from tests.support.broker import Broker, SlowRelay, Subscriber
from tests.support.media import (
    HttpStream,
    host_top,
    make_video,
    png_bytes,
    results,
    sample_images,
    write_pngs,
)

pytestmark = pytest.mark.e2e


def stop(agent: Agent) -> None:
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.wait(15) == 0, agent.output()
    assert "Traceback" not in agent.output(), agent.output()


def served(sub: Subscriber) -> dict[str, int]:
    """The source counters summed over every telemetry window."""
    keys = ("frames_in", "frames_dropped", "frames_failed", "results_published", "inferences")
    return {k: sum(m[k] or 0 for m in sub.telemetry()) for k in keys}


def test_folder_source_classifies_each_image_once_as_the_host_does_and_moves_it(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    first = write_pngs(bundle, inbox, 6)
    (inbox / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG any more")
    (inbox / "notes.txt").write_text("not an image: left alone")
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=folder", f"source.path={inbox}",
                  "source.poll_s=0.2")
    sub.wait_for(lambda: len(sub.on("/result")) >= 6, 60, "the first six results")
    later = write_pngs(bundle, inbox, 4, prefix="late")  # arriving while it runs
    sub.wait_for(lambda: len(sub.on("/result")) >= 10, 30, "the late files' results")
    sub.wait_for(lambda: served(sub)["frames_failed"] >= 1, 10, "the broken file counted")
    time.sleep(1.0)  # nothing is classified twice
    stop(agent)
    sub.close()
    got = results(sub.on("/result"))
    names = first + later
    assert sorted(r["source_id"] for r in got) == sorted(names)
    assert [r["seq"] for r in got] == list(range(got[0]["seq"], got[0]["seq"] + 10))
    images, _ = sample_images(bundle)
    host = host_top(bundle, [png_bytes(images[i]) for i in range(6)]
                    + [png_bytes(images[i]) for i in range(4)])
    for r in got:
        assert r["schema"] == RESULT_SCHEMA and r["source"] == "folder"
        expected = dict(zip(names, host[r["engine"]], strict=True))
        assert r["top"] == expected[r["source_id"]], r["source_id"]  # labels and scores
        assert r["total_ms"] >= r["infer_ms"] > 0 and r["preprocess_ms"] > 0
    assert sorted(p.name for p in (inbox / "done").iterdir()) == sorted(names)
    assert sorted(p.name for p in (inbox / "failed").iterdir()) == ["broken.jpg",
                                                                    "broken.jpg.reason.txt"]
    assert "corrupt or truncated" in (inbox / "failed" / "broken.jpg.reason.txt").read_text()
    assert (inbox / "notes.txt").exists()
    out = agent.output()
    assert sum("broken.jpg" in line for line in out.splitlines()) == 1, out
    counts = served(sub)
    assert counts["frames_in"] == 11 and counts["frames_failed"] == 1
    assert counts["results_published"] == counts["inferences"] == 10
    windows = sub.telemetry()
    assert all(m["source"] == "folder" for m in windows)
    assert any(m["total_p99_ms"] is not None for m in windows)


def test_video_file_frames_get_the_hosts_prediction_frame_by_frame(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    video = tmp_path / "clip.mkv"
    frames = make_video(bundle, video, 24)
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=video", f"source.path={video}",
                  "source.queue=64")
    sub.wait_for(lambda: len(sub.on("/result")) >= 24, 60, "a result per frame")
    time.sleep(1.0)
    stop(agent)
    sub.close()
    got = results(sub.on("/result"))
    assert [r["source_id"] for r in got] == [str(i) for i in range(24)]
    expected = host_top(bundle, frames)
    for r in got:
        assert r["top"] == expected[r["engine"]][int(r["source_id"])], r["source_id"]
    assert "ended after 24 frame(s)" in agent.output()
    assert served(sub)["frames_dropped"] == 0


def test_a_videos_first_frames_wait_for_a_broker_slow_to_answer(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    """Before: the source started with the agent, and a short video was over before the
    broker's CONNACK came, so its results met no connection and were dropped."""
    video = tmp_path / "clip.mkv"
    make_video(bundle, video, 12)
    relay = SlowRelay(broker.port, 1.5)
    sub = Subscriber(broker.port)
    try:
        agent = Agent(bundle, relay.port, tmp_path, "source.kind=video", f"source.path={video}",
                      "source.queue=64", "source.realtime=false", "loop.window_s=1")
        sub.wait_for(lambda: "ended after 12 frame(s)" in agent.output(), 60, "the video's end")
        sub.wait_for(lambda: served(sub)["frames_in"] == 12, 30, "the video's telemetry")
        stop(agent)
    finally:
        sub.close()
        relay.close()
    got = results(sub.on("/result"))
    assert [r["source_id"] for r in got] == [str(i) for i in range(12)], agent.output()
    assert served(sub)["results_published"] == 12
    assert [r["seq"] for r in got] == list(range(1, 13))


def test_a_truncated_video_is_one_line_and_the_agent_keeps_running(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    video = tmp_path / "cut.mkv"
    make_video(bundle, video, 60)
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 2])
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=video", f"source.path={video}",
                  "source.queue=64", "source.realtime=false", duration=4)
    assert agent.wait(60) == 0, agent.output()
    sub.close()
    got = results(sub.on("/result"))
    assert 0 < len(got) < 60
    out = agent.output()
    assert "Traceback" not in out
    ending = [line for line in out.splitlines() if "ended after" in line]
    assert len(ending) == 1 and "truncated" in ending[0], out
    assert len(sub.telemetry()) >= 4  # windows went on after the video stopped


def test_a_stream_that_drops_is_reopened_with_backoff_and_serving_resumes(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    video = tmp_path / "loop.mkv"
    make_video(bundle, video, 30)
    stream = HttpStream(video, tmp_path / "ffmpeg.log")
    stream.start()
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=video",
                  f"source.path={stream.url}", "source.reopen_max_s=2")
    try:
        sub.wait_for(lambda: len(sub.on("/result")) >= 15, 60, "results from the stream")
        stream.stop()
        deadline = time.monotonic() + 20
        while "reopening in" not in agent.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "reopening in" in agent.output(), agent.output()
        before = len(sub.on("/result"))
        stream.start()
        sub.wait_for(lambda: len(sub.on("/result")) >= before + 15, 60,
                     "results after the stream came back")
    finally:
        stream.stop()
    stop(agent)
    sub.close()
    got = results(sub.on("/result"))
    assert [r["seq"] for r in got] == list(range(got[0]["seq"], got[0]["seq"] + len(got)))
    drops = [line for line in agent.output().splitlines() if "reopening in" in line]
    assert drops and all("video" in line for line in drops)


class V5Client:
    """An MQTT 5 application: sends a request with a response topic and correlation data."""

    def __init__(self, port: int, reply_topic: str) -> None:
        self.replies: list[tuple[bytes, bytes | None]] = []
        self.ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="app-v5",
                                  protocol=mqtt.MQTTv5)

        def on_connect(c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
            c.subscribe(reply_topic, qos=1)

        def on_subscribe(c: mqtt.Client, u: Any, mid: int, rcs: Any, p: Any) -> None:
            self.ready.set()

        def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
            self.replies.append((msg.payload, getattr(msg.properties, "CorrelationData", None)))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.ready.wait(10)

    def request(self, topic: str, payload: bytes, reply_topic: str, correlation: bytes) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        props.CorrelationData = correlation
        self.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_mqtt_requests_from_3_1_1_and_5_clients_get_their_results_and_garbage_an_error(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    images, _ = sample_images(bundle)
    pngs = [png_bytes(images[i]) for i in range(3)]
    expected = host_top(bundle, pngs)
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=mqtt", "source.max_image_mb=0.05")
    sub.wait_for(lambda: sub.status() == "online", 60, "online")
    app = V5Client(broker.port, "app/replies/7")
    time.sleep(0.5)  # the agent subscribes to infer right after its birth message
    infer = "edgeforge/testboard/infer"
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="app-v311")
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    try:
        pub.publish(f"{infer}/r-1", pngs[0], qos=1).wait_for_publish(5)
        app.request(infer, pngs[1], "app/replies/7", b"corr-7")
        pub.publish(f"{infer}/junk", b"\x00garbage bytes, not an image", qos=1) \
            .wait_for_publish(5)
        pub.publish(f"{infer}/big", b"\x89PNG" + bytes(60_000), qos=1).wait_for_publish(5)
        pub.publish(f"{infer}/r-2", pngs[2], qos=1).wait_for_publish(5)
        sub.wait_for(lambda: len(sub.on("/result")) >= 5, 30, "five results")
        deadline = time.monotonic() + 10
        while not app.replies and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        pub.loop_stop()
        pub.disconnect()
        app.close()
    stop(agent)
    sub.close()
    by_id = {r["request_id"]: r for r in results(sub.on("/result"))}
    engine = by_id["r-1"]["engine"]
    assert engine in expected and "engine" not in by_id["junk"]  # junk never ran
    expected = expected[engine]  # type: ignore[assignment]
    assert by_id["r-1"]["top"] == expected[0] and by_id["r-2"]["top"] == expected[2]
    assert by_id["junk"]["top"] == [] and "not an image" in by_id["junk"]["error"]
    assert by_id["big"]["top"] == [] and "over source.max_image_mb" in by_id["big"]["error"]
    v5 = [r for r in by_id.values() if r["request_id"] not in ("r-1", "r-2", "junk", "big")]
    assert len(v5) == 1 and v5[0]["top"] == expected[1]
    # The MQTT 5 client got the same result on its response topic, with its correlation data.
    assert len(app.replies) == 1
    payload, correlation = app.replies[0]
    assert correlation == b"corr-7" and json.loads(payload)["top"] == expected[1]


def test_a_missing_camera_is_one_line_per_retry_and_telemetry_goes_on(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=camera",
                  "source.path=/dev/video-missing-77", "source.reopen_max_s=1", duration=4)
    assert agent.wait(60) == 0, agent.output()
    sub.close()
    out = agent.output()
    lines = [line for line in out.splitlines() if "/dev/video-missing-77" in line
             and "no such device" in line]
    assert 2 <= len(lines) <= 6, out  # one per attempt, about one a second
    assert "Traceback" not in out
    windows = sub.telemetry()
    assert len(windows) >= 4 and all(m["source"] == "camera" and m["frames_in"] == 0
                                     for m in windows)


def test_a_source_faster_than_inference_drops_stale_frames_and_counts_every_one(
        slow_bundle: Path, broker: Broker, tmp_path: Path) -> None:
    video = tmp_path / "fast.mkv"
    make_video(slow_bundle, video, 200)
    sub = Subscriber(broker.port)
    agent = Agent(slow_bundle, broker.port, tmp_path, "source.kind=video",
                  f"source.path={video}", "source.realtime=false", "loop.window_s=1")
    sub.wait_for(lambda: "ended after 200 frame(s)" in agent.output(), 90, "the video's end")
    time.sleep(2.0)
    stop(agent)
    sub.close()
    counts = served(sub)
    got = results(sub.on("/result"))
    assert counts["frames_in"] == 200
    assert counts["frames_dropped"] > 0
    # Every frame is either inferred or counted as dropped (at most one left in the queue).
    assert 199 <= counts["inferences"] + counts["frames_dropped"] <= 200
    assert len(got) == counts["results_published"] == counts["inferences"], (
        [r["seq"] for r in got], sub.telemetry(), agent.output()[-4000:],
        (broker.workdir / "mosquitto.log").read_text()[-3000:])
    assert [r["seq"] for r in got] == list(range(got[0]["seq"], got[0]["seq"] + len(got)))
