"""Every board's retained state at subscribe, a page at a time, whatever the broker's limits.

A subscription to `<prefix>/+/info` and `+/summary` makes mosquitto queue every board's two
retained messages for this client at once. It writes them as fast as the socket takes them
and drops QoS 0 ones once `max_queued_messages` (1,000 by default) wait behind a full socket
buffer: of 10,000 boards' summaries a fast reader got 1,535. So the monitor subscribes to the
small `+/status` messages only, learns the boards from them, and asks for the rest per board,
PAGE boards at a time (2 x PAGE retained messages, under the default limit):

    SUBSCRIBE   <prefix>/<id>/info, <prefix>/<id>/summary (and /telemetry for a shard)
    UNSUBSCRIBE <prefix>/<id>/summary

The broker answers in order: the SUBACK, the page's retained messages, then the UNSUBACK, so
the UNSUBACK says the page has arrived and the next one can go. The summary is dropped at
once because it was needed only for the state it brings (live telemetry carries the same
figures after); `info` stays subscribed, so an agent's restart is seen. After a reconnect
(a clean session, nothing kept) every known board is paged again.

The monitor's thread calls `learn` and `step`; paho's thread calls `ended` and `reset`.
What they share is single attribute writes.
"""

from __future__ import annotations

import paho.mqtt.client as mqtt

PAGE = 400  # boards per page: 800 retained messages, under mosquitto's default 1,000


class Pager:
    """The boards whose per-board state is still to be asked for, and the page in flight."""

    def __init__(self, prefix: str, telemetry: bool = False) -> None:
        self.prefix = prefix
        self.telemetry = telemetry  # subscribe each board's telemetry with its page (a shard)
        self._known: set[str] = set()
        self._waiting: list[str] = []
        self._mid: int | None = None  # the UNSUBACK that ends the page in flight
        self._ended: int | None = None  # the last UNSUBACK (paho's thread)
        self._reset = False  # a new connection: page every known board again (paho's thread)

    def learn(self, device: str) -> None:
        """A board seen (its status or telemetry): page it unless it is known."""
        if device not in self._known:
            self._known.add(device)
            self._waiting.append(device)

    def reset(self) -> None:
        """The connection is new; the next `step` pages every known board again."""
        self._reset = True

    def ended(self, mid: int) -> None:
        """An UNSUBACK came (paho's thread)."""
        self._ended = mid

    @property
    def busy(self) -> bool:
        """Boards wait to be paged, or a page has not all arrived."""
        return bool(self._waiting) or (self._mid is not None and self._ended != self._mid)

    def step(self, client: mqtt.Client) -> None:
        """Ask for the next page if the last one has arrived."""
        if self._reset:
            self._reset, self._mid = False, None
            self._waiting = sorted(self._known)
        if not self._waiting or (self._mid is not None and self._ended != self._mid):
            return
        page, self._waiting = self._waiting[:PAGE], self._waiting[PAGE:]
        kinds = ("info", "summary", "telemetry") if self.telemetry else ("info", "summary")
        rc, _ = client.subscribe([(f"{self.prefix}/{d}/{k}", 0) for d in page for k in kinds])
        mid = None
        if rc == mqtt.MQTT_ERR_SUCCESS:
            rc, mid = client.unsubscribe([f"{self.prefix}/{d}/summary" for d in page])
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:  # not connected: again after connect
            self._waiting = page + self._waiting
            return
        self._mid = mid
