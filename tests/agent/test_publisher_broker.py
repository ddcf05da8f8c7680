"""The publisher thread in-process against a real mosquitto: a request's MQTT 5 properties
are checked as the broker delivers them, and a retained request keeps its retain flag on a
live delivery (MQTT 5's retain-as-published), so it is marked to be answered once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import MqttConfig
from agent.publisher import Publisher
from agent.sources import Frame, FrameQueue
from agent.spool import Spool
from agent.stats import ResourceStats
from tests.support.broker import Broker

pytestmark = pytest.mark.broker
INFER = "edgeforge/b1/infer"


@pytest.fixture
def serving(broker: Broker, tmp_path: Path) -> Iterator[tuple[Publisher, FrameQueue]]:
    spool = Spool(tmp_path / "spool.db", 10_000_000, 3600.0)
    requests = FrameQueue(16, "refuse")
    pub = Publisher(MqttConfig(host="127.0.0.1", port=broker.port), "b1", spool,
                    ResourceStats(), {}, "ab" * 32, requests=requests,
                    response_prefix="app/")
    pub.start()
    assert pub.first_attempt() and pub.connected
    try:
        yield pub, requests
    finally:
        pub.close(5.0)
        spool.close()


def send(port: int, topic: str, payload: bytes, retain: bool = False, **fields: Any) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="app", protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    props = Properties(PacketTypes.PUBLISH)
    for name, value in fields.items():
        setattr(props, name, value)
    c.publish(topic, payload, qos=1, retain=retain, properties=props).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


def take(requests: FrameQueue, count: int, timeout_s: float = 10.0) -> list[Frame]:
    """Up to `count` frames the publisher queued, waiting at most `timeout_s`."""
    frames: list[Frame] = []
    for _ in range(int(timeout_s / 0.25)):
        frames += requests.take(count - len(frames), 0.25)
        if len(frames) >= count:
            break
    return frames


def test_response_topics_are_checked_as_the_broker_delivers_them(
        broker: Broker, serving: tuple[Publisher, FrameQueue]) -> None:
    pub, requests = serving
    frames: list[Frame] = []
    for attempt in range(20):  # the subscription is in place once a first request arrives
        send(broker.port, f"{INFER}/probe-{attempt}", b"x")
        frames = take(requests, 1, timeout_s=0.5)
        if frames:
            break
    assert frames, "the publisher never subscribed"
    send(broker.port, f"{INFER}/wild", b"png", ResponseTopic="app/#")
    send(broker.port, f"{INFER}/outside", b"png", ResponseTopic="other/replies")
    send(broker.port, f"{INFER}/good", b"png", ResponseTopic="app/r/1",
         CorrelationData=b"c-1")
    got = {f.source_id: f for f in take(requests, 3)}
    assert "wildcard" in str(got["wild"].error) and got["wild"].data is None
    assert "response_prefix" in str(got["outside"].error)
    assert got["good"].error is None and got["good"].reply is not None
    assert (got["good"].reply.response_topic, got["good"].reply.correlation) == \
        ("app/r/1", b"c-1")
    assert pub.requests_refused == 2 and pub.is_alive()


def test_a_request_published_retained_while_served_is_marked_to_be_answered_once(
        broker: Broker, serving: tuple[Publisher, FrameQueue]) -> None:
    pub, requests = serving
    for attempt in range(20):
        send(broker.port, f"{INFER}/probe-{attempt}", b"x")
        if take(requests, 1, timeout_s=0.5):
            break
    send(broker.port, f"{INFER}/kept", b"png", retain=True)
    send(broker.port, f"{INFER}/live", b"png")
    got = {f.source_id: f for f in take(requests, 2)}
    assert got["kept"].marker is not None and got["live"].marker is None
    send(broker.port, f"{INFER}/kept", b"", retain=True)  # cleared: no request, no answer
    assert take(requests, 1, timeout_s=1.0) == []
