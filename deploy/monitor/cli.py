"""edge-monitor: every board's latency distribution and health, live, from the agents' MQTT.

    edge-monitor [--sort COL] [--reverse]        live table, refreshed in place (Ctrl-C ends)
    edge-monitor --once [--json] [--listen S]    one snapshot after a short listen
    edge-monitor check                           exit 1 when any alert is active (cron, Nagios)
    edge-monitor record [--share GROUP]          store every telemetry message (monitor.history);
                                                 recorders of one GROUP split the telemetry
    edge-monitor plot --device ID [--since 1h] --out FILE.png
    edge-monitor serve --prometheus [HOST]:PORT [--shard K/N]
                                                 the latest values as Prometheus metrics; N
                                                 instances with --shard 0/N ... N-1/N split
                                                 the boards between them

Every command reads the `mqtt` and `monitor` sections of the config (--config, --set).
Alerts are printed and published, retained per device, on `<prefix>/alerts/<device>`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import queue
import re
import secrets
import signal
import sys
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from agent.config import MqttConfig, default_config_path, load_config, number_argument
from agent.errors import ConfigError, EdgeforgeError
from agent.interrupts import interrupted
from agent.mqtt import make_client
from agent.telemetry import encode
from deploy.monitor.alerts import Alerts
from deploy.monitor.config import SORT_KEYS, MonitorCommandConfig, MonitorConfig
from deploy.monitor.fleet import Fleet
from deploy.monitor.history import History, parse_since, plot
from deploy.monitor.paging import Pager

log = logging.getLogger("edge-monitor")

INBOX = 100_000  # messages between paho's thread and the monitor's, at most
WAKE = ("", b"")  # an inbox item that only wakes the monitor's thread
RETAINED_GAP_S = 0.3  # a one-shot's retained state has all come once none came for this long
STOP_WAIT_S = 2.0  # a recorder's stop waits this long for its telemetry's UNSUBACK, at most
SETTLE_S = 30.0  # how long past --listen a one-shot waits for the rest of it, at most

COLUMNS = (  # (sort key, heading, row field, format)
    ("device", "device", "device", "{}"), ("status", "status", "state", "{}"),
    ("model", "model", "model_sha256", "{:.12}"), ("engine", "engine", "engine", "{}"),
    ("p50", "p50 ms", "latency_p50_ms", "{:.3f}"),
    ("p99", "p99 ms", "latency_p99_ms", "{:.3f}"),
    ("throughput", "img/s", "throughput_ips", "{:,.1f}"),
    ("cpu", "cpu %", "proc_cpu_percent", "{:.0f}"), ("temp", "temp C", "soc_temp_c", "{:.1f}"),
    ("throttled", "thr", "throttling", "{}"), ("rss", "rss MB", "rss_mb", "{:.0f}"),
    ("spool", "spool", "spool_depth", "{}"), ("age", "age s", "seconds_since_telemetry",
                                              "{:.0f}"),
)


class Monitor:
    """One MQTT connection that keeps the fleet's state and its alerts up to date."""

    def __init__(self, mqtt_cfg: MqttConfig, cfg: MonitorConfig, history: History | None = None,
                 quiet: bool = False, share: str | None = None,
                 shard: tuple[int, int] | None = None) -> None:
        self.mqtt_cfg = mqtt_cfg
        self.cfg = cfg
        self.fleet = Fleet(mqtt_cfg.topic_prefix, int(cfg.max_payload_kb * 1000),
                           cfg.history_max_age_s)
        self.alerts = Alerts(cfg)
        self.history = history
        self.quiet = quiet
        self.share = share  # a shared subscription group for the telemetry (record --share)
        # serve --shard K/N: this monitor keeps the boards whose id hashes to K of N, and
        # takes the telemetry of those only (subscribed per board with its page).
        self.shard = shard
        self.prefix = mqtt_cfg.topic_prefix.rstrip("/")
        self.pager = Pager(self.prefix, telemetry=shard is not None)
        self.lock = threading.Lock()  # the fleet and the alerts (the Prometheus thread reads)
        self.broker_up = False
        self.broker_problem: str | None = None
        self._stopping = False
        self.stop_requested = False  # SIGTERM: a long run returns from pump and stops cleanly
        self.events: list[str] = []  # alert lines for the live view
        # One-shot runs only look; long runs own the topic, but not a recorder of a share
        # group: it sees part of each board's windows, and two of them would take turns.
        self.publish_alerts = not quiet and share is None
        self._retained: dict[str, bool] = {}  # device -> a retained alerts message exists
        # Bounded: a monitor that falls behind counts what it could not take (`dropped`, in
        # the log and in Prometheus) instead of growing without limit.
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue(INBOX)
        self._retained_at = 0.0  # when the last retained message came (paho's thread)
        self._unsuback: int | None = None  # the last UNSUBACK's mid (paho's thread)
        self.dropped = 0
        self._dropped_said = 0
        client = make_client(mqtt_cfg, f"edge-monitor-{secrets.token_hex(4)}")
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = lambda c, u: self._down("no answer (connection refused or "
                                                         "timed out)")
        client.on_message = self._on_message
        client.on_unsubscribe = self._on_unsubscribe
        self.client = client

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if reason_code.is_failure:
            self._down(f"the broker refused the connection: {reason_code} (check "
                       f"mqtt.username and mqtt.password)")
            return
        self.broker_up, self.broker_problem = True, None
        # Everything at QoS 0. Mosquitto queues at most max_inflight_messages (20) plus
        # max_queued_messages (1,000) QoS 1 messages for a client and drops the rest of the
        # retained messages a subscribe brings (1,019 of 3,000 boards' info arrived); QoS 0
        # ones are written straight to the socket, and dropped only once 1,000 packets wait
        # behind a full socket buffer (deploy/monitor/paging.py pages past that). For the
        # live telemetry of this clean session QoS 1 would add a PUBACK per message
        # (`record` at 5,000 boards: 16.6 % -> 14.1 % of a core without) and guard against
        # nothing TCP does not: both are lost only when the monitor falls that far behind,
        # and nothing is kept for it while it is away.
        telemetry = self.telemetry_filter()
        if self.share:  # a recorder of a group records; the boards' state is serve's
            client.subscribe(telemetry, 0)
        else:
            topics = [(f"{self.prefix}/+/status", 0)]
            if self.publish_alerts:  # to clear what an earlier run left retained
                topics.append((f"{self.prefix}/alerts/+", 0))
            if self.shard is None:
                topics.append((telemetry, 0))
            client.subscribe(topics)
            self.pager.reset()  # info and summaries per board, a page at a time
        if not self.quiet:
            log.info("connected to %s:%d", self.mqtt_cfg.host, self.mqtt_cfg.port)

    def telemetry_filter(self) -> str:
        """The fleet's telemetry topic filter (a shard subscribes per board instead)."""
        telemetry = f"{self.prefix}/+/telemetry"
        if self.share:  # the broker hands each window to one recorder of the group
            return f"$share/{self.share}/{telemetry}"
        return telemetry

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.retain:
            self._retained_at = time.monotonic()
        try:
            self._inbox.put_nowait((message.topic, bytes(message.payload)))
        except queue.Full:
            self.dropped += 1

    def _on_unsubscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any,
                        properties: Any) -> None:
        self.pager.ended(mid)
        self._unsuback = mid
        with contextlib.suppress(queue.Full):
            self._inbox.put_nowait(WAKE)  # the monitor's thread asks for the next page now

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        if not self._stopping:
            self._down(f"lost the broker ({reason_code})")

    def _down(self, why: str) -> None:
        if self.broker_up or self.broker_problem != why:
            log.warning("mqtt %s:%d: %s; retrying", self.mqtt_cfg.host, self.mqtt_cfg.port, why)
        self.broker_up, self.broker_problem = False, why

    def start(self) -> None:
        self.client.connect_async(self.mqtt_cfg.host, self.mqtt_cfg.port, self.mqtt_cfg.keepalive)
        self.client.loop_start()

    def request_stop(self, *_signal: Any) -> None:
        """Make pump return soon and a long run end (the SIGTERM handler)."""
        self.stop_requested = True

    def stop(self) -> None:
        """Disconnect. A recorder first unsubscribes from the telemetry and waits (up to
        STOP_WAIT_S) for the broker's UNSUBACK: every window the broker sent before it has
        then been read into the inbox (one stream, in order), where `drain` takes it."""
        self._stopping = True
        if self.history is not None and self.broker_up:
            # The broker answers in order: this is the last UNSUBACK to come.
            rc, mid = self.client.unsubscribe(self.telemetry_filter())
            deadline = time.monotonic() + STOP_WAIT_S
            while rc == mqtt.MQTT_ERR_SUCCESS and self._unsuback != mid \
                    and time.monotonic() < deadline and self.broker_up:
                time.sleep(0.01)
        self.client.disconnect()
        self.client.loop_stop()

    def pump(self, seconds: float, settle_s: float = 0.0) -> None:
        """Process messages for `seconds`, then evaluate alerts.

        `settle_s` (the one-shots): go on past `seconds` while the retained state a subscribe
        brings is still coming (pages still to ask for or to arrive, a retained message
        within RETAINED_GAP_S, or messages waiting in the inbox), for at most `settle_s`
        more, so a fleet too big for the listen is still seen whole.
        """
        deadline = time.monotonic() + seconds
        last = deadline + settle_s
        while not self.stop_requested:
            now = time.monotonic()
            left = deadline - now
            self.pager.step(self.client)
            if left <= 0 and (now >= last or (self._inbox.empty() and not self.pager.busy
                                               and now - self._retained_at > RETAINED_GAP_S)):
                break
            try:
                topic, payload = self._inbox.get(timeout=min(left, 0.2) if left > 0 else
                                                 RETAINED_GAP_S)
            except queue.Empty:
                if not self.broker_up and self.broker_problem is None:
                    self.broker_problem = "connecting"
                if self.history is not None and self.history.due():
                    self.history.flush()
                continue
            self._take(topic, payload)
        if self.dropped != self._dropped_said:
            log.warning("%d message(s) dropped so far: the monitor's inbox (%d) was full; "
                        "it cannot keep up (see the README's monitoring section)",
                        self.dropped, INBOX)
            self._dropped_said = self.dropped
        self.evaluate()

    def owns(self, device: str) -> bool:
        """This monitor keeps `device` (always, unless it is one shard of several)."""
        return self.shard is None or zlib.crc32(device.encode()) % self.shard[1] == self.shard[0]

    def _take(self, topic: str, payload: bytes) -> None:
        if not topic:
            return  # WAKE
        alert = topic.startswith(f"{self.prefix}/alerts/")
        # A board is learnt from its status (an agent's retained birth) or its telemetry;
        # its info and summary are then asked for (paging.py). A recorder of a share group
        # takes the telemetry only.
        if self.share is None and (self.shard is not None
                                   or topic.endswith(("/status", "/telemetry"))):
            device = topic.rsplit("/", 2)[-1 if alert else -2]
            if not self.owns(device):
                return  # another shard's board: dropped on its topic, never parsed
            if not alert:
                self.pager.learn(device)
        if alert:
            self._retained[topic.rsplit("/", 1)[-1]] = bool(payload)
            return
        with self.lock:
            good = self.fleet.ingest(topic, payload)
        if good is not None and self.history is not None:
            try:
                self.history.add(good[1])
            except ValueError as exc:  # outside what a column holds: counted, not stored
                with self.lock:
                    self.fleet.refuse(good[0], f"not recorded: {exc}")

    def drain(self) -> None:
        """Take what is left in the inbox (after `stop`: paho's thread has ended)."""
        while True:
            try:
                self._take(*self._inbox.get_nowait())
            except queue.Empty:
                return

    def evaluate(self) -> None:
        if self.share:
            return  # a recorder of a group sees part of each board's windows: no alerts
        now = time.time()
        with self.lock:
            fired, cleared, changed = self.alerts.update(list(self.fleet.devices.values()), now)
            stale = {d for d, kept in self._retained.items()
                     if kept and not self.alerts.active.get(d)}
            messages = {d: self.alerts.message(d, now) for d in changed | stale}
        for alert in fired:
            line = f"ALERT {alert.device} {alert.alert}: {alert.message}"
            self.events.append(f"{time.strftime('%H:%M:%S')} {line}")
            if not self.quiet:
                log.warning("%s", line)
        for alert in cleared:
            line = f"resolved {alert.device} {alert.alert}"
            self.events.append(f"{time.strftime('%H:%M:%S')} {line}")
            if not self.quiet:
                log.info("%s", line)
        self.events = self.events[-8:]
        if self.broker_up and self.publish_alerts:
            for device, msg in messages.items():
                self._retained[device] = msg is not None
                # Retained while active; an empty retained payload deletes it when resolved.
                self.client.publish(f"{self.prefix}/alerts/{device}",
                                    encode(msg) if msg else b"", qos=1, retain=True)

    def rows(self) -> list[dict[str, Any]]:
        with self.lock:
            rows = self.fleet.rows(time.time(), self.cfg.stale_s)
            for row in rows:
                active = self.alerts.active.get(row["device"], {})
                row["alerts"] = sorted(active)
        return rows


def table(rows: list[dict[str, Any]], sort: str, reverse: bool) -> str:
    """The fleet as a fixed-width table sorted by column `sort` (missing values last)."""
    field = next(c[2] for c in COLUMNS if c[0] == sort)
    present = [r for r in rows if r.get(field) is not None]
    missing = [r for r in rows if r.get(field) is None]
    ordered = sorted(present, key=lambda r: r[field], reverse=reverse) + missing
    cells = [[heading for _, heading, _, _ in COLUMNS] + ["alerts / warnings"]]
    for r in ordered:
        line = ["-" if r.get(f) is None else fmt.format(r[f]) for _, _, f, fmt in COLUMNS]
        notes = list(r.get("alerts", []))
        if r["bad_messages"]:
            notes.append(f"{r['bad_messages']} bad message(s): {r['last_problem']}")
        cells.append(line + ["; ".join(notes)])
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))] + [0]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def _common(p: argparse.ArgumentParser, default: Any) -> None:
    """--config and --set, before or after the command (a command's copy keeps the main
    parser's value unless given)."""
    p.add_argument("--config", type=Path, default=default if default is argparse.SUPPRESS
                   else None, help="config file (default: ./config.yaml if present)")
    # After the command, --set goes to its own list: argparse would replace, not extend, the
    # list given before the command.
    p.add_argument("--set", dest="overrides" if default is None else "overrides_after",
                   action="append", default=default if default is argparse.SUPPRESS else [],
                   metavar="SECTION.KEY=VALUE", help="override one config key (repeatable)")
    p.add_argument("--listen", type=number_argument(0), default=default, metavar="S",
                   help="seconds to listen before a snapshot (default monitor.listen_s)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-monitor", description=__doc__.split("\n")[0])
    _common(p, None)
    p.add_argument("--sort", choices=SORT_KEYS, default=None, help="sort the table by COL")
    p.add_argument("--reverse", action="store_true", help="sort descending")
    p.add_argument("--once", action="store_true", help="one snapshot after --listen seconds")
    p.add_argument("--json", action="store_true", help="with --once: JSON instead of a table")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _common(sub.add_parser("check", help="exit 1 when any alert is active, 0 when none"),
            argparse.SUPPRESS)
    s = sub.add_parser("record", help="store every telemetry message in monitor.history")
    _common(s, argparse.SUPPRESS)
    s.add_argument("--share", metavar="GROUP", default=None,
                   help="take the telemetry through the shared subscription $share/GROUP/...: "
                        "the recorders of one group each get a part, every window exactly once")
    s = sub.add_parser("plot", help="draw a device's recorded history as a PNG")
    _common(s, argparse.SUPPRESS)
    s.add_argument("--device", required=True)
    s.add_argument("--since", default="1h", help="how far back: 90s, 15m, 1h, 2d (default 1h)")
    s.add_argument("--out", type=Path, required=True, help="the PNG to write")
    s = sub.add_parser("serve", help="serve the latest values as Prometheus metrics")
    _common(s, argparse.SUPPRESS)
    s.add_argument("--prometheus", required=True, metavar="[HOST]:PORT",
                   help="address to listen on, e.g. :9108")
    s.add_argument("--shard", metavar="K/N", default=None,
                   help="keep only the boards whose id hashes to K of N (0 <= K < N), and "
                        "take only their telemetry: N instances split the fleet, each board "
                        "in exactly one")
    return p


def load(args: argparse.Namespace) -> tuple[MqttConfig, MonitorConfig]:
    overrides = [*args.overrides, *getattr(args, "overrides_after", [])]
    cfg = load_config(args.config or default_config_path(["config.yaml"]), overrides,
                      MonitorCommandConfig)
    return cfg.mqtt, cfg.monitor


def parse_shard(text: str) -> tuple[int, int]:
    """'1/4' -> (1, 4).

    Raises:
        ConfigError: not K/N with 0 <= K < N <= 1024.
    """
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if m is None or not 0 <= int(m.group(1)) < int(m.group(2)) <= 1024:
        raise ConfigError(f"--shard {text!r}: expected K/N with 0 <= K < N <= 1024, e.g. 0/2 "
                          f"and 1/2 for two instances")
    return int(m.group(1)), int(m.group(2))


def listen_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"--prometheus {text!r}: expected [HOST]:PORT, e.g. :9108")
    return host or "0.0.0.0", int(port)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        mqtt_cfg, cfg = load(args)
        if args.command == "plot":
            return cmd_plot(args, cfg)
        quiet = args.once or args.command == "check"
        share = getattr(args, "share", None)
        if share is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", share):
            raise ConfigError(f"--share {share!r}: a group name of letters, digits, '_', '.' "
                              f"or '-' (no '/', '+' or '#')")
        shard = parse_shard(args.shard) if getattr(args, "shard", None) is not None else None
        history = History(Path(cfg.history), cfg.history_max_age_s) \
            if args.command == "record" else None
        monitor = Monitor(mqtt_cfg, cfg, history, quiet=quiet, share=share, shard=shard)
        if args.command == "serve":
            host, port = listen_addr(args.prometheus)
            from deploy.monitor.prometheus import serve

            serve(monitor, host, port)
        # systemd and docker stop with SIGTERM: finish like Ctrl-C, the buffered history rows
        # committed (a handler that only sets a flag: pump returns within 0.2 s).
        signal.signal(signal.SIGTERM, monitor.request_stop)
        monitor.start()
        try:
            if quiet:
                monitor.pump(args.listen or cfg.listen_s, settle_s=SETTLE_S)
                return snapshot(monitor, args, cfg)
            run_forever(monitor, args, cfg)
        finally:
            monitor.stop()
            if history is not None:
                monitor.drain()  # every window that reached this recorder is stored
                history.close()
                log.info("record: %d window(s) stored by this recorder, %d expired deleted; "
                         "slowest flush %.0f ms, slowest clean-up slice %.0f ms",
                         history.stored, history.pruned, history.slowest_flush_s * 1000,
                         history.slowest_prune_s * 1000)
    except EdgeforgeError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return interrupted(0)
    return 0


def snapshot(monitor: Monitor, args: argparse.Namespace, cfg: MonitorConfig) -> int:
    rows = monitor.rows()
    if not monitor.broker_up:
        print(f"edge-monitor: cannot reach the broker at {monitor.mqtt_cfg.host}:"
              f"{monitor.mqtt_cfg.port} ({monitor.broker_problem or 'no answer'})",
              file=sys.stderr)
        return 2
    if args.command == "check":
        active = monitor.alerts.all_active()
        for alert in active:
            print(f"ALERT {alert.device} {alert.alert}: {alert.message}")
        # Never OK about a board it could not judge: known (status or info) but no window
        # heard or retained, and no alert (offline) that already says why.
        unseen = [r for r in rows if r["seconds_since_telemetry"] is None
                  and not r.get("alerts")]
        for r in unseen:
            print(f"NO DATA {r['device']}: status {r['state']}, no window heard or retained "
                  f"(an agent older than the summary topic, or not started yet)")
        ages = [r["seconds_since_telemetry"] for r in rows
                if r["seconds_since_telemetry"] is not None]
        if not active and not unseen:
            print(f"OK: {len(rows)} device(s) judged, no alert"
                  + (f"; their latest windows are {min(ages):.0f} to {max(ages):.0f} s old"
                     if ages else ""))
        return 1 if active or unseen else 0
    if args.json:
        print(json.dumps({"ts": round(time.time(), 3), "devices": rows}, indent=2))
    else:
        print(table(rows, args.sort or cfg.sort, args.reverse))
    return 0


def run_forever(monitor: Monitor, args: argparse.Namespace, cfg: MonitorConfig) -> None:
    """The live view (a terminal), or a log of alerts only (record, serve, a pipe)."""
    live = args.command is None and sys.stdout.isatty()
    while not monitor.stop_requested:
        monitor.pump(cfg.refresh_s)
        if not live:
            continue
        broker = "up" if monitor.broker_up else f"DOWN ({monitor.broker_problem}), retrying"
        head = (f"edge-monitor  {monitor.mqtt_cfg.host}:{monitor.mqtt_cfg.port}  broker "
                f"{broker}  {time.strftime('%H:%M:%S')}  sorted by {args.sort or cfg.sort}")
        body = table(monitor.rows(), args.sort or cfg.sort, args.reverse)
        sys.stdout.write("\x1b[H\x1b[2J" + head + "\n\n" + body + "\n\n"
                         + "\n".join(monitor.events) + "\n")
        sys.stdout.flush()


def cmd_plot(args: argparse.Namespace, cfg: MonitorConfig) -> int:
    since = parse_since(args.since)
    path = Path(cfg.history)
    if not path.is_file():
        raise ConfigError(f"{path}: no history yet (run edge-monitor record first)")
    history = History(path, cfg.history_max_age_s)
    try:
        rows = history.query(args.device, time.time() - since)
        known = history.devices()
    finally:
        history.close()
    if not rows:
        raise ConfigError(f"no telemetry of {args.device!r} in {path} for the last {args.since} "
                          f"(recorded devices: {', '.join(known) or 'none'})")
    plot(rows, args.device, args.out)
    print(f"{args.out}: {len(rows)} windows of {args.device}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
