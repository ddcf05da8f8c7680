"""edge-monitor: every board's latency distribution and health, live, from the agents' MQTT.

    edge-monitor [--sort COL] [--reverse]        live table, refreshed in place (Ctrl-C ends)
    edge-monitor --once [--json] [--listen S]    one snapshot after a short listen
    edge-monitor check                           exit 1 when any alert is active (cron, Nagios)
    edge-monitor record [--share GROUP]          store every telemetry message (monitor.history);
                                                 recorders of one GROUP split the telemetry
    edge-monitor plot --device ID [--since 1h] --out FILE.png
    edge-monitor serve --prometheus [HOST]:PORT  the latest values as Prometheus metrics

Every command reads the `mqtt` and `monitor` sections of the config (--config, --set).
Alerts are printed and published, retained per device, on `<prefix>/alerts/<device>`.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import re
import secrets
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from agent.config import MqttConfig, default_config_path, load_config
from agent.errors import ConfigError, EdgeforgeError
from agent.mqtt import make_client
from agent.telemetry import encode
from deploy.monitor.alerts import Alerts
from deploy.monitor.config import SORT_KEYS, MonitorCommandConfig, MonitorConfig
from deploy.monitor.fleet import Fleet
from deploy.monitor.history import History, parse_since, plot

log = logging.getLogger("edge-monitor")

INBOX = 100_000  # messages between paho's thread and the monitor's, at most
SUMMARY_LISTEN_S = 10.0  # a long run's time for the retained summaries after each connect

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
                 quiet: bool = False, share: str | None = None) -> None:
        self.mqtt_cfg = mqtt_cfg
        self.cfg = cfg
        self.fleet = Fleet(mqtt_cfg.topic_prefix, int(cfg.max_payload_kb * 1000),
                           cfg.history_max_age_s)
        self.alerts = Alerts(cfg)
        self.history = history
        self.quiet = quiet
        self.share = share  # a shared subscription group for the telemetry (record --share)
        self._summaries_until: float | None = None  # when a long run unsubscribes from them
        self.lock = threading.Lock()  # the fleet and the alerts (the Prometheus thread reads)
        self.broker_up = False
        self.broker_problem: str | None = None
        self._stopping = False
        self.events: list[str] = []  # alert lines for the live view
        self.publish_alerts = not quiet  # one-shot runs only look; long runs own the topic
        self._retained: dict[str, bool] = {}  # device -> a retained alerts message exists
        # Bounded: a monitor that falls behind counts what it could not take (`dropped`, in
        # the log and in Prometheus) instead of growing without limit.
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue(INBOX)
        self.dropped = 0
        self._dropped_said = 0
        client = make_client(mqtt_cfg, f"edge-monitor-{secrets.token_hex(4)}")
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = lambda c, u: self._down("no answer (connection refused or "
                                                         "timed out)")
        client.on_message = self._on_message
        self.client = client
        self.prefix = mqtt_cfg.topic_prefix.rstrip("/")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if reason_code.is_failure:
            self._down(f"the broker refused the connection: {reason_code} (check "
                       f"mqtt.username and mqtt.password)")
            return
        self.broker_up, self.broker_problem = True, None
        # Retained state at QoS 0: mosquitto queues at most max_inflight_messages (20) plus
        # max_queued_messages (1,000) QoS 1 messages for a client and drops the rest of the
        # retained messages a subscribe brings (1,019 of 3,000 boards' info arrived); QoS 0
        # ones are written straight to the socket. Live telemetry stays QoS 1: `record`
        # keeps every window.
        state = [(f"{self.prefix}/+/{kind}", 0) for kind in ("status", "info", "summary")]
        if self.publish_alerts:  # to clear what an earlier run left retained
            state.append((f"{self.prefix}/alerts/+", 0))
        telemetry = f"{self.prefix}/+/telemetry"
        if self.share:  # the broker hands each message to one member of the group
            telemetry = f"$share/{self.share}/{telemetry}"
        client.subscribe([*state, (telemetry, 1)])
        # A long run needs the summaries only for the state they bring at subscribe; live
        # telemetry carries the same figures after, so they are dropped once those arrived
        # (half the messages of a fleet, at 40 us each here).
        self._summaries_until = None if self.quiet else time.monotonic() + SUMMARY_LISTEN_S
        if not self.quiet:
            log.info("connected to %s:%d", self.mqtt_cfg.host, self.mqtt_cfg.port)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self._inbox.put_nowait((message.topic, bytes(message.payload)))
        except queue.Full:
            self.dropped += 1

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

    def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()

    def pump(self, seconds: float) -> None:
        """Process messages for `seconds`, then evaluate alerts."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                topic, payload = self._inbox.get(timeout=min(left, 0.2))
            except queue.Empty:
                if not self.broker_up and self.broker_problem is None:
                    self.broker_problem = "connecting"
                if self.history is not None and self.history.due():
                    self.history.flush()
                continue
            if topic.startswith(f"{self.prefix}/alerts/"):
                self._retained[topic.rsplit("/", 1)[-1]] = bool(payload)
                continue
            with self.lock:
                good = self.fleet.ingest(topic, payload)
            if good is not None and self.history is not None:
                self.history.add(good[1])
        if self._summaries_until is not None and time.monotonic() > self._summaries_until:
            self._summaries_until = None
            self.client.unsubscribe(f"{self.prefix}/+/summary")
        if self.dropped != self._dropped_said:
            log.warning("%d message(s) dropped so far: the monitor's inbox (%d) was full; "
                        "it cannot keep up (see the README's monitoring section)",
                        self.dropped, INBOX)
            self._dropped_said = self.dropped
        self.evaluate()

    def evaluate(self) -> None:
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
    p.add_argument("--listen", type=float, default=default, metavar="S",
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
    return p


def load(args: argparse.Namespace) -> tuple[MqttConfig, MonitorConfig]:
    overrides = [*args.overrides, *getattr(args, "overrides_after", [])]
    cfg = load_config(args.config or default_config_path(["config.yaml"]), overrides,
                      MonitorCommandConfig)
    return cfg.mqtt, cfg.monitor


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
        history = History(Path(cfg.history), cfg.history_max_age_s) \
            if args.command == "record" else None
        quiet = args.once or args.command == "check"
        share = getattr(args, "share", None)
        if share is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", share):
            raise ConfigError(f"--share {share!r}: a group name of letters, digits, '_', '.' "
                              f"or '-' (no '/', '+' or '#')")
        monitor = Monitor(mqtt_cfg, cfg, history, quiet=quiet, share=share)
        if args.command == "serve":
            host, port = listen_addr(args.prometheus)
            from deploy.monitor.prometheus import serve

            serve(monitor, host, port)
        monitor.start()
        try:
            if quiet:
                monitor.pump(args.listen or cfg.listen_s)
                return snapshot(monitor, args, cfg)
            run_forever(monitor, args, cfg)
        finally:
            monitor.stop()
            if history is not None:
                history.close()
                log.info("record: %d window(s) stored by this recorder", history.stored)
    except EdgeforgeError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 0
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
    while True:
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
