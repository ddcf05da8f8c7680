"""The publisher thread survives what one message can raise: a message whose handling fails
is counted (`message_errors`, in diagnostics) and skipped, and the next one is handled."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import MqttConfig
from agent.publisher import Publisher
from agent.sources import FrameQueue
from agent.spool import Spool
from agent.stats import ResourceStats

pytestmark = pytest.mark.unit


class ExplodingMessage:
    """A received message whose payload cannot be read (a named fake: no broker sends one;
    it stands for any bug a message's handling can meet)."""

    topic = "edgeforge/b1/infer/x"
    retain = False
    properties = None

    @property
    def payload(self) -> bytes:
        raise RuntimeError("cannot read the payload")


class Message:
    def __init__(self, topic: str, payload: bytes) -> None:
        self.topic, self.payload, self.retain, self.properties = topic, payload, False, None


def test_a_message_that_raises_is_counted_and_the_next_is_taken(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", 10_000_000, 3600.0)
    requests = FrameQueue(4, "refuse")
    pub = Publisher(MqttConfig(), "b1", spool, ResourceStats(), {}, "ab" * 32,
                    requests=requests)
    try:
        pub._on_message(pub.client, None, ExplodingMessage())
        pub._on_message(pub.client, None, ExplodingMessage())
        assert pub.message_errors == 2
        pub._on_message(pub.client, None, Message("edgeforge/b1/infer/ok", b"\x89PNG"))
        frames = requests.take(4, 1.0)
        assert [f.source_id for f in frames] == ["ok"]
    finally:
        spool.close()
