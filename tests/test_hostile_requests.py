"""Requests on a board's infer topic as a hostile client sends them, against a real agent and
a real mosquitto: no property of a request can stop the agent, a retained request is answered
once whenever it was published, and the empty message that clears one is not a request."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support import Agent
from tests.support.broker import Broker, Subscriber
from tests.support.media import png_bytes, results, sample_images
from tests.test_hostile_inputs import INFER, answers, serving, stop

pytestmark = pytest.mark.e2e


def v5_publisher(port: int, name: str) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def raw_request(client: mqtt.Client, topic: str, payload: bytes, retain: bool = False,
                **fields: Any) -> None:
    """Publish with properties set on the packet as given, past paho's own checks of what we
    send (a hostile client uses any library, or none)."""
    props = Properties(PacketTypes.PUBLISH)
    for name, value in fields.items():
        setattr(props, name, value)
    client.publish(topic, payload, qos=1, retain=retain, properties=props).wait_for_publish(5)


def by_id(sub: Subscriber) -> dict[str, dict[str, Any]]:
    return {str(r.get("request_id")): r for r in results(sub.on("/result"))}


def test_response_topics_the_client_library_refuses_are_answered_on_result_and_the_agent_lives(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    """Before: a wildcard response topic raised in the publisher thread and the agent exited 1;
    sent retained, it did so again at every start."""
    images, _ = sample_images(bundle)
    image = png_bytes(images[0])
    sub = Subscriber(broker.port, topic="#")
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=mqtt",
                  "source.response_prefix=app/replies/")
    pub = v5_publisher(broker.port, "hostile")
    serving(pub, sub, image)
    bad = {"wild-hash": "app/replies/#", "wild-plus": "app/+/x", "sys": "$SYS/broker/x",
           "outside": "edgeforge/testboard/cmd/update"}  # (NUL: the broker refuses it)
    for rid, topic in bad.items():
        raw_request(pub, f"{INFER}/{rid}", image, ResponseTopic=topic, CorrelationData=b"c")
    raw_request(pub, f"{INFER}/big-corr", image, ResponseTopic="app/replies/1",
                CorrelationData=b"x" * 5000)
    raw_request(pub, f"{INFER}/kept-bad", image, retain=True, ResponseTopic="app/replies/#")
    raw_request(pub, f"{INFER}/good", image, ResponseTopic="app/replies/7",
                CorrelationData=b"corr-7")
    wanted = {*bad, "big-corr", "kept-bad", "good"}
    sub.wait_for(lambda: wanted <= set(by_id(sub)), 60, "an answer to each request")
    sub.wait_for(lambda: bool(sub.on("app/replies/7")), 30, "the good request's reply")
    assert agent.proc.poll() is None, agent.output()
    got = by_id(sub)
    for rid in (*bad, "big-corr", "kept-bad"):
        assert got[rid]["top"] == [] and "request refused" in got[rid]["error"], got[rid]
    assert "wildcard" in got["wild-hash"]["error"]
    assert "response_prefix" in got["outside"]["error"]
    assert got["good"]["top"] and "error" not in got["good"]
    replies = [json.loads(p) for p, _ in sub.on("app/replies/7")]
    assert [r["request_id"] for r in replies] == ["good"]
    assert not [t for t, _, _ in sub.messages if "#" in t or "+" in t or t.startswith("$")]
    stop(agent)
    # The retained bad request was answered once: the next start skips it, and lives.
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=mqtt",
                  "source.response_prefix=app/replies/")
    sub.wait_for(lambda: "already answered" in agent.output(), 60, "the retained copy skipped")
    assert agent.proc.poll() is None
    out = stop(agent)
    assert "publisher thread failed" not in out
    pub.publish(f"{INFER}/kept-bad", b"", qos=1, retain=True).wait_for_publish(5)
    pub.disconnect()
    sub.close()
    assert len([r for r in answers(sub) if r["request_id"] == "kept-bad"]) == 1


def test_a_retained_request_published_while_the_agent_runs_is_not_answered_at_the_next_start(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    """Before: a live delivery carries no retain flag, so its marker was never stored, and the
    broker's retained copy was answered again at the next start."""
    images, _ = sample_images(bundle)
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=mqtt")
    pub = v5_publisher(broker.port, "live-retainer")
    serving(pub, sub, png_bytes(images[0]))
    pub.publish(f"{INFER}/kept-live", png_bytes(images[1]), qos=1,
                retain=True).wait_for_publish(5)
    sub.wait_for(lambda: "kept-live" in by_id(sub), 60, "the retained request's answer")
    stop(agent)
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=mqtt")
    sub.wait_for(lambda: "already answered" in agent.output(), 60, "the retained copy skipped")
    stop(agent)
    pub.publish(f"{INFER}/kept-live", b"", qos=1, retain=True).wait_for_publish(5)
    pub.disconnect()
    sub.close()
    assert [r["request_id"] for r in answers(sub)] == ["kept-live"]


def test_the_empty_retained_message_that_clears_a_request_gets_no_answer(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    images, _ = sample_images(bundle)
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=mqtt")
    pub = v5_publisher(broker.port, "clearer")
    serving(pub, sub, png_bytes(images[0]))
    pub.publish(f"{INFER}/cleared", b"", qos=1, retain=True).wait_for_publish(5)
    pub.publish(f"{INFER}/after", png_bytes(images[1]), qos=1).wait_for_publish(5)
    sub.wait_for(lambda: "after" in by_id(sub), 60, "the next request's answer")
    time.sleep(0.5)  # a result for the cleared topic would come before "after"'s
    stop(agent)
    pub.disconnect()
    sub.close()
    assert [r["request_id"] for r in answers(sub)] == ["after"]
