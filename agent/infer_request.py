"""What an image request on <id>/infer[/<request_id>] carries, checked where it enters.

Anyone allowed to publish on a board's infer topic chooses the request's MQTT 5 properties,
and the answer goes back out through them: the response topic is published to, the
correlation data is sent back, a `request_id` user property names the result. Each is
checked here, before the request is accepted, against what paho and the broker take:

    response topic    UTF-8 without control characters (mosquitto disconnects a client
                      that publishes one), 1 to MAX_TOPIC_BYTES bytes, no `+` or `#` (a
                      publish topic has no wildcards), not a `$` topic (the broker's own),
                      and under `source.response_prefix` when one is set
    correlation data  bytes, at most MAX_CORRELATION_BYTES
    request_id        printable text, cut to MAX_REQUEST_ID characters

A request whose properties fail is still answered, on the board's own result topic only,
with the reason as its error; nothing a request carries reaches a publish call unchecked.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from agent.untrusted import shown

MAX_TOPIC_BYTES = 1024  # MQTT allows 65,535; no real reply topic is longer than this
MAX_CORRELATION_BYTES = 1024
MAX_REQUEST_ID = 128
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # NUL and the C0 and C1 control characters


@dataclass(frozen=True)
class Checked:
    """A request's properties after the checks: what may be used, and what was refused."""

    request_id: str  # "" when the request named none
    response_topic: str | None
    correlation: bytes | None
    problem: str | None  # why the properties were refused (the result's error), or None


def response_topic_problem(topic: Any, prefix: str | None) -> str | None:
    """Why `topic` cannot be published to as a reply, or None when it can."""
    if not isinstance(topic, str):
        return f"response topic must be text, got {type(topic).__name__}"
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return f"response topic {shown(topic)} is not valid UTF-8"
    if size == 0:
        return "response topic is empty"
    if size > MAX_TOPIC_BYTES:
        return f"response topic of {size:,} bytes is over the limit of {MAX_TOPIC_BYTES:,}"
    if "+" in topic or "#" in topic:
        return f"response topic {shown(topic)} has a wildcard (+ or #): name one topic"
    if CONTROL.search(topic):
        return (f"response topic {shown(topic)} holds a control character (brokers "
                f"disconnect a client that publishes to it)")
    if topic.startswith("$"):
        return f"response topic {shown(topic)} is one of the broker's own ($) topics"
    if prefix and not topic.startswith(prefix):
        return (f"response topic {shown(topic)} is outside source.response_prefix "
                f"{shown(prefix)}")
    return None


def check_request(suffix: str, properties: Any, prefix: str | None) -> Checked:
    """Check a request's MQTT 5 properties (`properties` may be None: MQTT 3.1.1), with
    `suffix` the topic level after <id>/infer ("" when none)."""
    response = getattr(properties, "ResponseTopic", None) if properties else None
    correlation = getattr(properties, "CorrelationData", None) if properties else None
    problem = None if response is None else response_topic_problem(response, prefix)
    if correlation is not None:
        if not isinstance(correlation, (bytes, bytearray)):
            problem = problem or (f"correlation data must be bytes, got "
                                  f"{type(correlation).__name__}")
            correlation = None
        elif len(correlation) > MAX_CORRELATION_BYTES:
            problem = problem or (f"correlation data of {len(correlation):,} bytes is over "
                                  f"the limit of {MAX_CORRELATION_BYTES:,}")
            correlation = None
        else:
            correlation = bytes(correlation)
    rid = suffix
    if not rid:
        for item in getattr(properties, "UserProperty", None) or []:
            if isinstance(item, tuple) and len(item) == 2 and item[0] == "request_id":
                rid = str(item[1])
    if not rid and correlation:
        text = correlation.decode("ascii", "replace")
        rid = text if correlation.isascii() and text.isprintable() else correlation.hex()
    rid = "".join(c if c.isprintable() else "?" for c in rid[:MAX_REQUEST_ID])
    if problem is not None:
        return Checked(rid, None, None, f"request refused: {problem}")
    return Checked(rid, response, correlation, None)


def marker(topic: str, payload: bytes) -> str:
    """The durable mark of a request (topic and payload digest): a retained request whose
    mark is stored has been answered."""
    return "request:" + hashlib.sha256(topic.encode() + b"\0" + payload).hexdigest()
