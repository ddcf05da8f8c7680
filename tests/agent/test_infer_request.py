"""A request's MQTT 5 properties are checked where they enter: what paho or the broker would
refuse (a wildcard, an empty or a $ topic, NUL, too long, outside source.response_prefix)
is refused with its reason, and nothing unchecked reaches a publish call."""

from __future__ import annotations

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.infer_request import MAX_REQUEST_ID, check_request, response_topic_problem

pytestmark = pytest.mark.unit


def props(response: object = None, correlation: object = None,
          user: list[tuple[str, str]] | None = None) -> Properties:
    p = Properties(PacketTypes.PUBLISH)
    if response is not None:
        p.ResponseTopic = response
    if correlation is not None:
        p.CorrelationData = correlation
    if user:
        p.UserProperty = user
    return p


def paho_refuses(topic: str) -> bool:
    """Whether paho's publish raises on `topic` (what killed the agent's thread)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    try:
        client.publish(topic, b"x", qos=1)
    except ValueError:
        return True
    return False


@pytest.mark.parametrize("topic, reason", [
    ("app/replies/#", "wildcard"), ("app/+/reply", "wildcard"), ("", "empty"),
    ("$SYS/broker/x", "broker's own"), ("a\0b", "control character"),
    ("a\x85b", "control character"), ("t" * 5000, "over the limit"),
])
def test_a_response_topic_paho_or_the_broker_would_refuse_is_refused(topic: str,
                                                                     reason: str) -> None:
    problem = response_topic_problem(topic, None)
    assert problem is not None and reason in problem
    assert len(problem) < 200


def test_the_topics_paho_refuses_are_all_refused_here() -> None:
    for topic in ("a/#", "+", "a/+/b", "t" * 70_000):
        assert paho_refuses(topic)
        assert response_topic_problem(topic, None) is not None


def test_a_response_prefix_keeps_replies_under_it() -> None:
    assert response_topic_problem("app/replies/42", "app/replies/") is None
    assert "response_prefix" in (response_topic_problem("edgeforge/other/cmd/x",
                                                        "app/replies/") or "")


def test_a_request_with_a_bad_response_topic_keeps_its_id_and_loses_the_reply() -> None:
    checked = check_request("", props("a/#", b"corr-7"), None)
    assert checked.response_topic is None and checked.correlation is None
    assert checked.problem is not None and "wildcard" in checked.problem
    assert checked.request_id == "corr-7"


def test_good_properties_pass_and_name_the_request() -> None:
    checked = check_request("", props("app/r", b"\x00\x01", [("request_id", "job 9")]), None)
    assert (checked.response_topic, checked.correlation, checked.problem) == \
        ("app/r", b"\x00\x01", None)
    assert checked.request_id == "job 9"
    assert check_request("", props(correlation=b"\xff\x00"), None).request_id == "ff00"
    assert check_request("mine", None, None).request_id == "mine"


def test_oversized_correlation_and_unprintable_ids_are_bounded() -> None:
    checked = check_request("", props("app/r", b"x" * 5000), None)
    assert checked.problem is not None and "correlation data" in checked.problem
    rid = check_request("", props(user=[("request_id", "a\nb" * 1000)]), None).request_id
    assert len(rid) == MAX_REQUEST_ID and "\n" not in rid
