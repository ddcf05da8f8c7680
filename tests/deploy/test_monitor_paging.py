"""The monitor's paging through retained state (deploy/monitor/paging.py), against a fake of
paho's client that records what would be sent (the broker side is in test_monitor_fleet.py:
10,000 boards through a real mosquitto)."""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as mqtt
import pytest

from deploy.monitor.paging import PAGE, Pager

pytestmark = pytest.mark.unit


class FakeClient:
    """A fake paho client: records SUBSCRIBE and UNSUBSCRIBE packets, numbers them as paho
    does, and can be 'disconnected'."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any], int]] = []
        self.connected = True
        self._mid = 0

    def _packet(self, kind: str, topics: list[Any]) -> tuple[mqtt.MQTTErrorCode, int | None]:
        if not self.connected:
            return mqtt.MQTT_ERR_NO_CONN, None
        self._mid += 1
        self.sent.append((kind, topics, self._mid))
        return mqtt.MQTT_ERR_SUCCESS, self._mid

    def subscribe(self, topics: list[Any]) -> tuple[mqtt.MQTTErrorCode, int | None]:
        return self._packet("sub", topics)

    def unsubscribe(self, topics: list[str]) -> tuple[mqtt.MQTTErrorCode, int | None]:
        return self._packet("unsub", topics)


def boards(n: int) -> list[str]:
    return [f"b{i:05d}" for i in range(n)]


def test_one_page_at_a_time_each_after_the_last_pages_unsuback() -> None:
    """1,000 boards go in pages of PAGE: the info and summary of each board of a page, then
    the UNSUBSCRIBE of its summaries; the next page only after that UNSUBACK."""
    pager, client = Pager("edgeforge"), FakeClient()
    for b in boards(1000):
        pager.learn(b)
    pager.learn("b00000")  # known: not paged twice
    pager.step(client)  # type: ignore[arg-type]
    assert [k for k, _, _ in client.sent] == ["sub", "unsub"]
    sub, unsub = client.sent[0][1], client.sent[1][1]
    assert len(sub) == 2 * PAGE and sub[:2] == [("edgeforge/b00000/info", 0),
                                                ("edgeforge/b00000/summary", 0)]
    assert unsub == [f"edgeforge/{b}/summary" for b in boards(PAGE)]
    pager.step(client)  # type: ignore[arg-type]
    assert len(client.sent) == 2 and pager.busy  # the page has not all arrived
    pager.ended(client.sent[-1][2] - 1)  # another UNSUBACK is not this page's end
    pager.step(client)  # type: ignore[arg-type]
    assert len(client.sent) == 2
    for _ in range(2):  # 1,000 boards: pages of 400, 400 and 200
        pager.ended(client.sent[-1][2])
        pager.step(client)  # type: ignore[arg-type]
    paged = [t for k, topics, _ in client.sent if k == "sub" for t, _ in topics]
    assert paged == [f"edgeforge/{b}/{kind}" for b in boards(1000)
                     for kind in ("info", "summary")]
    assert pager.busy  # the last page's UNSUBACK is still to come
    pager.ended(client.sent[-1][2])
    assert not pager.busy


def test_a_new_connection_pages_every_known_board_again_and_a_shard_takes_telemetry() -> None:
    """Disconnected, a page is kept for later; after reset (a new, clean session) every known
    board is paged again. A shard's pages subscribe each board's telemetry too."""
    pager, client = Pager("p", telemetry=True), FakeClient()
    for b in boards(3):
        pager.learn(b)
    client.connected = False
    pager.step(client)  # type: ignore[arg-type]
    assert client.sent == [] and pager.busy
    client.connected = True
    pager.step(client)  # type: ignore[arg-type]
    assert client.sent[0][1] == [(f"p/{b}/{k}", 0) for b in boards(3)
                                 for k in ("info", "summary", "telemetry")]
    pager.reset()  # before this page's UNSUBACK: the old connection's pages are void
    pager.step(client)  # type: ignore[arg-type]
    assert len(client.sent) == 4 and client.sent[2][1] == client.sent[0][1]
