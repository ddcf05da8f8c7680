"""The publisher thread: owns the spool and the MQTT connection, so the loop never waits.

The inference loop hands each closed window to `submit` (a non-blocking queue put) and goes
on. This thread samples resource stats, builds the telemetry message, commits it to the spool
and only then hands it to paho; a row leaves the spool when the broker acknowledges it. The
window's summary (agent/telemetry.py, SUMMARY_KEYS) goes out retained at QoS 0 on
`<id>/summary` at once, and again on every connect, so any monitor that subscribes later
reads every board's latest window straight away.

One thread owns everything here: it calls paho's `loop()` itself, so paho's callbacks run on
this thread too, and they only set fields (nothing blocks in them). At most `INFLIGHT`
spooled messages are with paho at a time, so a long outage costs disk, not memory. Messages
handed to paho before a disconnect are re-sent by paho on reconnect (same client, QoS >= 1);
the rest are replayed from the spool in id order, so a subscriber sees seq in order.

Reconnects back off exponentially with jitter (1 s doubling to 60 s, each delay drawn from
[d/2, d]), and each failed attempt is logged once, whatever the number of messages waiting.

The inbox is bounded (`INBOX`). A window or result that finds it full is not queued: its
seq is burnt and `dropped_total` counts it (`Spool.skip`), so a subscriber sees the gap.
`beat` is the monotonic time of this thread's last pass through its loop; the runner's
supervisor takes a thread that stopped beating for `STALL_S` as dead.

Predictions (agent/predictions.py): a durable one (folder, mqtt) waits for room in the inbox,
goes through the spool like telemetry, and only then is its file moved (`done`); a request
that named an MQTT 5 response topic also gets the same message there, with its correlation
data, while connected. A live one (video, camera) is published at QoS 0 while connected;
otherwise, or when paho refuses it, its seq is burnt and it counts in `dropped_total`
(folded in once a window and at the stop). The live seq is kept in memory and saved on a
clean stop.
A message the spool cannot store (the disk is full, an I/O error) is lost, not the agent:
one line says so with SQLite's reason, its seq is skipped and it counts in `dropped_total`
(agent/spool.py), and a watched file whose result it was stays to be taken again.
With source.kind mqtt this thread also receives the requests on <id>/infer and
<id>/infer/<request_id> and puts them on the loop's queue without waiting; a request that
finds it full gets a `busy` error result.
"""

from __future__ import annotations

import logging
import queue
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent import infer_request
from agent.command_inbox import CommandInbox
from agent.config import MqttConfig
from agent.mqtt import make_client
from agent.predictions import Prediction, result
from agent.sources import Frame, FrameQueue, Reply, now_pair
from agent.spool import Spool
from agent.stats import ResourceStats
from agent.telemetry import (
    CMD_RESULT_SCHEMA,
    EVENT_SCHEMA,
    OFFLINE,
    ONLINE,
    RESULT_SCHEMA,
    TELEMETRY_SCHEMA,
    Topics,
    Window,
    encode,
    summary_of,
    telemetry_fields,
)

log = logging.getLogger(__name__)

INFLIGHT = 20
INBOX = 256  # windows and results waiting for the publisher thread
STALL_S = 20.0  # no pass through the publisher's loop for this long: it is stuck
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 60.0
CONNECT_TIMEOUT_S = 3.0
# The agent's own windows, results and changes that fail in a row before the thread gives up
# (the runner then exits 1 for systemd to restart it): one that fails is counted and skipped,
# but a path that fails every time would lose every window in silence. What arrives from
# outside (requests, commands) is only ever counted and skipped.
OWN_FAILURES_MAX = 3


@dataclass(frozen=True)
class CommandResult:
    """An answer to a command, published on cmd_result through the spool (QoS 1).

    With `publisher_state`, this thread adds what only it knows to `fields["data"]`: the
    spool's depth and dropped count and whether MQTT is connected (diagnostics).
    """

    fields: dict[str, Any]
    publisher_state: bool = False


@dataclass(frozen=True)
class ModelChange:
    """The agent switched models: a new retained `info` and the sha telemetry reports."""

    sha256: str
    info: dict[str, Any]


class Publisher(threading.Thread):
    """Spools every window's telemetry and publishes it over MQTT; see the module docstring."""

    def __init__(self, cfg: MqttConfig, device: str, spool: Spool, stats: ResourceStats,
                 info: dict[str, Any], model_sha256: str, commands: CommandInbox | None = None,
                 startup_events: Sequence[tuple[str, str]] = (),
                 discovery: tuple[str, list[tuple[str, bytes]]] | None = None,
                 requests: FrameQueue | None = None, max_request_bytes: int = 8_000_000,
                 prompt: bool = False, response_prefix: str | None = None) -> None:
        """`commands` gets each message on <prefix>/<id>/cmd/<name> and each closed window
        (None: commands are not subscribed to); `startup_events` are (kind, detail) events
        sent once on start; `discovery` is Home Assistant's status topic and the retained
        config messages to send on every connect and whenever Home Assistant restarts;
        `requests` is the loop's queue for images sent to <id>/infer (None: not served);
        `prompt`: results wait at most 5 ms for this thread, not 50 (a real source serves);
        `response_prefix`: a request's response topic must start with it (None: any topic
        the broker takes)."""
        super().__init__(name="publisher", daemon=True)
        self.cfg = cfg
        self.device = device
        self.topics = Topics.for_device(cfg.topic_prefix, device)
        self.spool = spool
        self.stats = stats
        self.info = info
        self.model_sha256 = model_sha256
        self._inbox: queue.Queue[Window | CommandResult | ModelChange | Prediction] = \
            queue.Queue(INBOX)
        self._closing = threading.Event()
        self._lost_lock = threading.Lock()
        self._unqueued: dict[str, int] = {}  # seq counter -> messages the full inbox refused
        self.beat = time.monotonic()
        self.commands = commands
        self.startup_events = tuple(startup_events)
        self.discovery = discovery
        self.requests = requests
        # paho's loop() waits in select() for the socket; what the loop submits meanwhile
        # waits too. 5 ms costs about 200 idle wake-ups a second, so only a serving agent
        # pays it.
        self._net_wait_s = 0.005 if prompt else 0.05
        self.max_request_bytes = max_request_bytes
        self.response_prefix = response_prefix
        self._request_count = 0
        self.requests_refused = 0  # requests whose properties failed their checks
        self.message_errors = 0  # messages whose handling raised (a bug): counted, skipped
        self._own_failures = 0  # the agent's own queued items failed in a row
        self._live_seq = int(spool.get("seq.result", 1) or 1)
        self.live_unsent = 0  # live results not sent: no broker at the time
        self._spool_down = False  # the last write to the spool failed (said once)
        self._spool_lost = 0  # messages lost since then
        self._deadline: float | None = None  # monotonic time by which to be gone
        self.connected = False
        self._summary: bytes | None = None  # the last window's, retained on <id>/summary
        self._handed: dict[int, int] = {}  # paho mid -> spool row id
        self._last_handed = 0  # highest spool row id ever given to this client
        self._acked: list[int] = []
        self._attempt = 0
        self._next_attempt = 0.0
        self._socket_open = False
        self._first_attempt = threading.Event()  # set once the broker answered or failed
        self.error: BaseException | None = None
        self.client = self._make_client(f"edgeforge-{device}")

    # --- the API the loop uses (any thread) ------------------------------------------------

    def submit(self, item: Window | CommandResult | ModelChange | Prediction) -> bool:
        """Queue a closed window or a command's result without blocking; False when the inbox
        is full (the loss is counted). A model change or a durable prediction is never
        dropped: it waits for room while this thread lives (a stuck thread ends the agent
        through the supervisor)."""
        if isinstance(item, ModelChange) or (isinstance(item, Prediction) and item.durable):
            while True:
                try:
                    self._inbox.put(item, timeout=1.0)
                    return True
                except queue.Full:
                    if not self.is_alive():
                        return False
        try:
            self._inbox.put_nowait(item)
            return True
        except queue.Full:
            counter = "telemetry" if isinstance(item, Window) else \
                "live_result" if isinstance(item, Prediction) else "cmd_result"
            with self._lost_lock:
                self._unqueued[counter] = self._unqueued.get(counter, 0) + 1
            log.error("publisher inbox full (%d): %s not queued; counted in dropped_total",
                      INBOX, type(item).__name__)
            return False

    def first_attempt(self, timeout_s: float = CONNECT_TIMEOUT_S + 1.0) -> bool:
        """Wait until the first connection attempt connected, was refused or failed (at most
        `timeout_s`: a connect's own timeout and a second); True if it has. The runner starts
        a source after it, so a video's first frames do not meet a broker that is up but not
        yet connected."""
        return self._first_attempt.wait(timeout_s)

    def stalled_s(self) -> float:
        """Seconds since this thread last went round its loop."""
        return time.monotonic() - self.beat

    def close(self, timeout_s: float) -> None:
        """Ask the thread to flush, publish offline and disconnect within `timeout_s`; join."""
        self._deadline = time.monotonic() + timeout_s
        self._closing.set()
        self.join(timeout_s + 1.0)

    # --- the thread ------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # a bug: the loop sees it through .error and exits 1
            self.error = exc
            log.exception("publisher thread failed")

    def _run(self) -> None:
        self.stats.start()
        self.client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive)
        if self.spool.reset_reason:
            self._event("spool_reset", self.spool.reset_reason)
        for kind, detail in self.startup_events:
            self._event(kind, detail)
        while True:
            self.beat = time.monotonic()
            self._drain_inbox(block=not self._socket_open)
            self._count_losses()
            if self._closing.is_set():
                self._drain_inbox(block=False)  # what was queued before close() is spooled
                self._count_losses()
                self._shutdown()
                return
            if self._socket_open:
                rc = self.client.loop(timeout=self._net_wait_s)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    self._lost(mqtt.error_string(rc))
            elif time.monotonic() >= self._next_attempt:
                self._connect()
            self._flush_acks()
            self._hand_over()

    def _drain_inbox(self, block: bool) -> None:
        """Spool every queued window and result (at most INBOX, so a stop stays prompt; the
        rest wait for the next pass)."""
        for n in range(INBOX):
            try:
                item = self._inbox.get(timeout=0.05) if block and n == 0 else \
                    self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                self._take(item)
                self._own_failures = 0
            except Exception:  # one message never stops the thread; a run of them does
                self._own_failures += 1
                if self._own_failures >= OWN_FAILURES_MAX:
                    raise  # the agent's own path fails every time: a bug, exit 1 and restart
                self._message_failed(f"a queued {type(item).__name__}")

    def _message_failed(self, what: str) -> None:
        """Count a message whose handling raised (a bug), say so (the first time with its
        traceback), and go on with the next."""
        self.message_errors += 1
        if self.message_errors == 1:
            log.exception("publisher: handling %s failed; skipped, and counted (further "
                          "failures are one line each)", what)
        else:
            log.error("publisher: handling %s failed (%d so far); skipped", what,
                      self.message_errors)

    def _take(self, item: Window | CommandResult | ModelChange | Prediction) -> None:
        if isinstance(item, Window):
            self._record(item)
        elif isinstance(item, CommandResult):
            fields = item.fields
            if item.publisher_state:
                fields = {**fields, "data": {
                    **fields.get("data", {}), "spool_depth": self.spool.depth,
                    "dropped_total": self.spool.dropped_total,
                    "mqtt_connected": self.connected, "message_errors": self.message_errors,
                    "requests_refused": self.requests_refused}}
            self._result(fields)
        elif isinstance(item, Prediction):
            self._prediction(item)
        else:
            self._model_change(item)

    def _count_losses(self) -> None:
        """Burn the seqs of what the full inbox refused, so the gap shows and is counted."""
        with self._lost_lock:
            lost, self._unqueued = self._unqueued, {}
        for counter, count in lost.items():
            if counter == "live_result":
                self._live_seq += count  # the gap shows; dropped_total counts them below
            self.spool.skip(counter, count)  # held in memory while the spool cannot write

    def _record(self, window: Window) -> None:
        fields = telemetry_fields(window)
        if not fields["inferences"] and (window.source is None or window.duration_s < 0.25):
            return  # a window cut short before its first inference says nothing; a real
            # source's idle window does: the board is up and had nothing to do
        fields.update(self.stats.sample())
        self._count_unsent()
        if self.commands is not None:
            self.commands.window(window, fields)
        depth, dropped = self.spool.depth, self.spool.dropped_total

        made: list[dict[str, Any]] = []

        def payload(seq: int) -> bytes:
            msg = {"schema": TELEMETRY_SCHEMA, "device": self.device, "seq": seq,
                   "ts": round(window.end_ts, 3), **fields, "spool_depth": depth,
                   "dropped_total": dropped,
                   "model_sha256": window.model_sha256 or self.model_sha256,
                   "engine": window.engine or None}
            made.append(msg)
            return encode(msg)

        seq = self._spool(f"window {window.index}", self.topics.telemetry, payload, "telemetry",
                          self.cfg.qos)
        if seq is None:
            log.info("%s", console_line(window.index, made[-1]["seq"] if made else 0, fields,
                                        self.connected, self.spool, "lost"))
            return
        # The latest window's summary, retained, not spooled: state, not a record (only the
        # newest matters; one written while offline goes out on the next connect).
        self._summary = encode(summary_of(made[-1]))
        if self.connected:
            self.client.publish(self.topics.summary, self._summary, qos=0, retain=True)
        log.info("%s", console_line(window.index, seq, fields, self.connected, self.spool))

    def _spool(self, what: str, topic: str, make: Callable[[int], bytes], counter: str,
               qos: int, marker: str | None = None) -> int | None:
        """Append to the spool; its seq, or None when the write failed (disk full, I/O
        error: this message is lost, not the agent, since a restart would not help). A
        failure is said once, with SQLite's reason, until a write works again."""
        try:
            _, seq = self.spool.append(topic, make, counter, qos, marker=marker)
        except sqlite3.Error as exc:
            self._spool_lost += 1
            if not self._spool_down:
                self._spool_down = True
                log.error("spool %s: cannot write (%s): %s and every message until it can "
                          "write again is lost, its seq skipped and counted in dropped_total; "
                          "serving goes on (free space on %s)", self.spool.path, exc, what,
                          self.spool.path.parent)
            return None
        if self._spool_down:
            self._spool_down = False
            log.warning("spool %s: writing again; %d message(s) were lost while it could not",
                        self.spool.path, self._spool_lost)
            self._spool_lost = 0
        return seq

    def _count_unsent(self) -> None:
        """Add the live results that met no broker (or that paho refused) to dropped_total:
        once a window and at the stop, not one SQLite commit per frame during an outage."""
        if not self.live_unsent:
            return
        unsent, self.live_unsent = self.live_unsent, 0
        self.spool.skip("live_result", unsent)  # held in memory while the spool cannot write

    def _event(self, kind: str, detail: str) -> None:
        log.warning("event %s: %s", kind, detail)

        def payload(seq: int) -> bytes:
            return encode({"schema": EVENT_SCHEMA, "device": self.device, "seq": seq,
                           "ts": round(time.time(), 3), "event": kind, "detail": detail})

        self._spool(f"event {kind}", self.topics.event, payload, "event", 1)

    def _result(self, fields: dict[str, Any]) -> None:
        def payload(seq: int) -> bytes:
            return encode({"schema": CMD_RESULT_SCHEMA, "device": self.device, "seq": seq,
                           "ts": round(time.time(), 3), **fields})

        self._spool(f"the result of command {fields.get('request_id')}", self.topics.cmd_result,
                    payload, "cmd_result", 1)

    def _prediction(self, item: Prediction) -> None:
        def payload(seq: int) -> bytes:
            return encode({"schema": RESULT_SCHEMA, "device": self.device, "seq": seq,
                           "ts": round(time.time(), 3), **item.fields})

        if not item.durable:
            seq, self._live_seq = self._live_seq, self._live_seq + 1
            if not self.connected or self.client.publish(
                    self.topics.result, payload(seq), qos=0).rc != mqtt.MQTT_ERR_SUCCESS:
                self.live_unsent += 1  # its seq is burnt: the gap shows
            return
        sent: list[bytes] = []

        def keep(seq: int) -> bytes:
            sent.append(payload(seq))
            return sent[-1]

        if self._spool(f"the result for {item.fields.get('source_id')}", self.topics.result,
                       keep, "result", self.cfg.qos, item.marker) is None:
            if item.done is not None:
                item.done(None, "its result could not be spooled")  # taken again later
            return
        if item.done is not None:
            item.done(True, "")
        reply = item.reply
        if reply is not None and reply.response_topic and self.connected and sent:
            props = Properties(PacketTypes.PUBLISH)
            if reply.correlation is not None:
                props.CorrelationData = reply.correlation
            try:
                self.client.publish(reply.response_topic, sent[-1], qos=1, properties=props)
            except ValueError as exc:  # checked on entry; what paho still refuses is said
                log.warning("mqtt: cannot send the reply for %s to its response topic (%s); "
                            "it is on %s", reply.request_id, exc, self.topics.result)

    def request(self, topic: str, payload: bytes, properties: Any, retained: bool = False
                ) -> None:
        """An image on <id>/infer[/<request_id>]: onto the loop's queue, or a busy answer.

        A retained request is answered once: its marker (topic and payload digest) is
        spooled with its result, and the broker's retained copy of one already answered (at
        any later connect) is skipped. The MQTT 5 subscription keeps the retain flag as
        published, so a request published retained while the agent runs is marked too;
        over MQTT 3.1.1 a live delivery loses the flag, so every request is marked. An empty
        payload is the MQTT way to clear a retained request: it is not a request and gets no
        answer. The request's properties are checked first (agent/infer_request.py): one
        that fails is answered on <id>/result alone, its error naming the reason.
        """
        assert self.requests is not None
        if not payload:
            log.debug("mqtt: empty message on %s (a retained request cleared): no answer",
                      topic)
            return
        mark = infer_request.marker(topic, payload)
        if retained:
            try:
                done = self.spool.answered(mark)
            except sqlite3.Error:  # unreadable now: answer it (a duplicate, never a loss)
                done = False
            if done:
                log.info("mqtt: retained request on %s already answered; skipped (clear it "
                         "with an empty retained message)", topic)
                return
        captured, ts = now_pair()
        suffix = topic[len(self.topics.infer) + 1:] if topic != self.topics.infer else ""
        checked = infer_request.check_request(suffix, properties, self.response_prefix)
        self._request_count += 1
        rid = checked.request_id or f"req-{self._request_count}"
        keep_mark = retained or self.cfg.protocol != 5
        frame = Frame(rid, captured, ts, 0.0, data=bytes(payload),
                      reply=Reply(rid, checked.response_topic, checked.correlation),
                      marker=mark if keep_mark else None)
        if checked.problem is not None:
            self.requests_refused += 1
            frame.error = checked.problem
            frame.data = None
        elif len(payload) > self.max_request_bytes:
            frame.error = (f"request of {len(payload):,} bytes is over source.max_image_mb "
                           f"({self.max_request_bytes:,} bytes)")
            frame.data = None
        if not self.requests.put(frame):
            # This runs on the publisher's own thread (paho's callbacks do): spool it here,
            # as waiting for room in our own inbox would wait forever.
            self._prediction(result("mqtt", frame, [], {}, self.model_sha256, True,
                                    f"busy: {self.requests.size} request(s) already waiting; "
                                    f"send again later"))

    def _model_change(self, change: ModelChange) -> None:
        self.model_sha256 = change.sha256
        self.info = change.info
        if self.connected:
            self.client.publish(self.topics.info,
                                encode({**self.info, "ts": round(time.time(), 3)}),
                                qos=1, retain=True)

    # --- connection ------------------------------------------------------------------------

    def _make_client(self, client_id: str) -> mqtt.Client:
        cfg = self.cfg
        client = make_client(cfg, client_id, will_topic=self.topics.status, will_payload=OFFLINE,
                             v5=cfg.protocol == 5)
        client.connect_timeout = CONNECT_TIMEOUT_S
        client.max_inflight_messages_set(INFLIGHT)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _connect(self) -> None:
        try:
            self.client.reconnect()
            self._socket_open = True
        except (OSError, ValueError) as exc:  # refused, unreachable, timeout, TLS
            self._lost(str(exc) or type(exc).__name__)

    def _lost(self, why: str) -> None:
        """The connection failed or dropped: schedule the next attempt and say so once."""
        was_connected = self.connected
        self.connected = False
        self._socket_open = False
        self._attempt += 1
        ceiling = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** (self._attempt - 1))
        delay = random.uniform(ceiling / 2, ceiling)
        self._next_attempt = time.monotonic() + delay
        log.warning("mqtt: %s %s:%d (%s); retrying in %.1f s, spooling meanwhile (%d waiting)",
                    "lost the broker at" if was_connected else "cannot reach broker",
                    self.cfg.host, self.cfg.port, why, delay, self.spool.depth)
        self._first_attempt.set()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                    reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("mqtt: broker %s:%d refused the connection: %s (check mqtt.username, "
                        "mqtt.password and the broker's ACL)", self.cfg.host, self.cfg.port,
                        reason_code)
            self._first_attempt.set()
            return
        self.connected = True
        self._first_attempt.set()
        self._attempt = 0
        client.publish(self.topics.status, ONLINE, qos=1, retain=True)
        client.publish(self.topics.info, encode({**self.info, "ts": round(time.time(), 3)}),
                       qos=1, retain=True)
        if self._summary is not None:
            client.publish(self.topics.summary, self._summary, qos=0, retain=True)
        if self.commands is not None:
            client.subscribe(self.topics.cmd("+"), qos=1)
        if self.discovery is not None:
            client.subscribe(self.discovery[0], qos=1)
            self._announce()
        if self.requests is not None:
            if self.cfg.protocol == 5:  # a live delivery keeps the retain flag it was sent with
                opts = SubscribeOptions(qos=1, retainAsPublished=True)
                client.subscribe([(self.topics.infer, opts), (f"{self.topics.infer}/+", opts)])
            else:
                client.subscribe([(self.topics.infer, 1), (f"{self.topics.infer}/+", 1)])
        log.info("mqtt: connected to %s:%d; %d spooled message(s) to send", self.cfg.host,
                 self.cfg.port, self.spool.depth)

    def _announce(self) -> None:
        """Publish the Home Assistant discovery configs (retained)."""
        assert self.discovery is not None
        for topic, payload in self.discovery[1]:
            self.client.publish(topic, payload, qos=1, retain=True)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: Any) -> None:
        try:
            self._message(message)
        except Exception:  # noqa: BLE001 -- paho would raise it out of loop(): the thread
            self._message_failed(f"a message on {message.topic[:200]}")

    def _message(self, message: Any) -> None:
        if self.discovery is not None and message.topic == self.discovery[0]:
            if message.payload == b"online":  # Home Assistant (re)started: announce again
                self._announce()
            return
        if self.requests is not None and (message.topic == self.topics.infer
                                          or message.topic.startswith(self.topics.infer + "/")):
            self.request(message.topic, message.payload, getattr(message, "properties", None),
                         bool(message.retain))
            return
        if self.commands is None or not message.topic.startswith(self.topics.cmd_prefix):
            return
        if message.retain:  # would run again on every reconnect: commands are one-shot
            log.warning("mqtt: ignoring retained command on %s (publish commands without "
                        "retain; clear it with an empty retained message)", message.topic)
            return
        name = message.topic[len(self.topics.cmd_prefix):]
        if not self.commands.command(name, message.payload):
            self.submit(CommandResult(self.commands.busy_result(name, message.payload)))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                       reason_code: Any, properties: Any) -> None:
        self.connected = False

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any,
                    properties: Any) -> None:
        row = self._handed.pop(mid, None)
        if row is not None:
            self._acked.append(row)

    def _flush_acks(self) -> None:
        if self._acked:
            try:
                self.spool.ack(self._acked)
            except sqlite3.Error as exc:
                # The rows stay and are sent again after a restart: a duplicate, not a loss.
                log.error("spool %s: cannot record acknowledgements (%s)", self.spool.path, exc)
            self._acked.clear()

    def _hand_over(self) -> None:
        """Give paho the next spooled rows, oldest first, up to INFLIGHT outstanding."""
        if not self.connected or len(self._handed) >= INFLIGHT:
            return
        for entry in self.spool.pending(self._last_handed, INFLIGHT - len(self._handed)):
            info = self.client.publish(entry.topic, entry.payload, entry.qos, entry.retain)
            self._last_handed = entry.id
            if entry.qos == 0:
                self._acked.append(entry.id)  # QoS 0 has no acknowledgement to wait for
            else:
                self._handed[info.mid] = entry.id

    def _shutdown(self) -> None:
        """Send what can be sent before the deadline, then publish offline and disconnect."""
        deadline = self._deadline or time.monotonic()
        while self._socket_open and self.connected and time.monotonic() < deadline - 0.5:
            self._hand_over()
            if not self._handed and not self.spool.pending(self._last_handed, 1):
                break
            if self.client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                break
            self._flush_acks()
        self._flush_acks()
        if self._socket_open and self.connected:
            info = self.client.publish(self.topics.status, OFFLINE, qos=1, retain=True)
            while not info.is_published() and time.monotonic() < deadline:
                if self.client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                    break
            self.client.disconnect()
            self.client.loop(timeout=0.05)
        self._count_unsent()
        self.spool.set("seq.result", max(self._live_seq,
                                          int(self.spool.get("seq.result", 1) or 1)))
        left = self.spool.depth
        if left:
            log.info("mqtt: %d message(s) stay spooled for the next start", left)
        if self.spool.trouble:
            log.warning("spool %s: stopping with %d message(s) lost and not yet counted in the "
                        "file (%s)", self.spool.path, self.spool.dropped_total
                        - int(self.spool.get("dropped_total", 0) or 0), self.spool.trouble)


def console_line(index: int, seq: int, f: dict[str, Any], connected: bool, spool: Spool,
                 lost: str = "") -> str:
    """One readable line per window, as journald shows it (`lost`: the window was not
    spooled)."""
    def num(value: Any, fmt: str, unit: str = "") -> str:
        return "n/a" if value is None else f"{value:{fmt}}{unit}"

    acc = f" acc {num(f['accuracy_pct'], '.1f', '%')}" if "accuracy_pct" in f else ""
    if f.get("frames_in") is not None:
        acc += (f" | {f['source']}: {f['frames_in']} in, {f['frames_dropped']} dropped, "
                f"{f['frames_failed']} failed, {f['results_published']} results, end to end "
                f"ms p50 {num(f['total_p50_ms'], '.1f')} p99 {num(f['total_p99_ms'], '.1f')}")
    return (f"window {index} seq {seq}: {num(f['throughput_ips'], ',.1f')} img/s, "
            f"{f['inferences']:,} in {f['window_s']:.1f} s | latency ms p50 "
            f"{num(f['latency_p50_ms'], '.3f')} p90 {num(f['latency_p90_ms'], '.3f')} p99 "
            f"{num(f['latency_p99_ms'], '.3f')} max {num(f['latency_max_ms'], '.3f')}{acc} | "
            f"cpu {num(f['proc_cpu_percent'], '.0f', '%')} rss {num(f['rss_mb'], '.0f', ' MB')} "
            f"temp {num(f['soc_temp_c'], '.1f', ' C')} | mqtt "
            f"{'up' if connected else 'down'}, spool {spool.depth}, dropped {spool.dropped_total}"
            + (f" | this window {lost}: the spool cannot write" if lost else ""))
