"""`edge-monitor serve --prometheus :PORT`: the latest values per device as Prometheus metrics.

prometheus_client (the maintained client library) serves /metrics from its own thread; a
custom collector reads the monitor's state under its lock at each scrape, so a device that
disappears disappears from the metrics too. Every metric has a `device` label.

A board that is not online (offline, stale or never heard) exports no measured values: its
last latency would read as current. `edgeforge_up{device}` keeps one series per device and
changes its value (1 online, 0 not); `edgeforge_state{device,state}` is a state set with one
series per possible state, 1 for the current one, so each series' identity never changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from agent.errors import ConfigError

# (metric name, row field, scale to the base unit, help). Prometheus wants base units
# (seconds, bytes, ratios) and `_total` for counters; `promtool check metrics` is run on
# this endpoint by the tests.
METRICS = (
    ("edgeforge_latency_p50_seconds", "latency_p50_ms", 1e-3,
     "Latency p50 of the last window"),
    ("edgeforge_latency_p90_seconds", "latency_p90_ms", 1e-3,
     "Latency p90 of the last window"),
    ("edgeforge_latency_p99_seconds", "latency_p99_ms", 1e-3,
     "Latency p99 of the last window"),
    ("edgeforge_end_to_end_p50_seconds", "total_p50_ms", 1e-3,
     "Capture to result latency p50 of the last window (a real source: folder, video, "
     "camera, mqtt)"),
    ("edgeforge_end_to_end_p99_seconds", "total_p99_ms", 1e-3,
     "Capture to result latency p99 of the last window (a real source)"),
    ("edgeforge_throughput_images_per_second", "throughput_ips", 1.0,
     "Images classified per second in the last window"),
    ("edgeforge_process_cpu_ratio", "proc_cpu_percent", 1e-2,
     "Agent CPU use in the last window, 1 = one core busy"),
    ("edgeforge_soc_temperature_celsius", "soc_temp_c", 1.0, "SoC temperature"),
    ("edgeforge_resident_memory_bytes", "rss_mb", 1e6, "Agent resident memory"),
    ("edgeforge_spool_messages", "spool_depth", 1.0,
     "Telemetry messages waiting in the board's spool"),
)
COUNTERS = (  # (metric name without _total, row field, help): counts since the agent started
    ("edgeforge_dropped", "dropped_total",
     "Messages the board's spool or inbox dropped (full or too old)"),
)
STATES = ("online", "stale", "offline", "unknown")


def serve(monitor: Any, host: str, port: int) -> None:
    """Start the /metrics endpoint for `monitor` (an deploy.monitor.cli.Monitor)."""
    try:
        from prometheus_client import start_http_server
        from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
        from prometheus_client.registry import Collector
    except ImportError:
        raise ConfigError("prometheus_client is not installed: pip install 'edgeforge[host]' "
                          "(or pip install prometheus_client)") from None

    class FleetCollector(Collector):
        def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
            rows = monitor.rows()
            live = [r for r in rows if r["state"] == "online"]
            for name, field, scale, help_text in METRICS:
                g = GaugeMetricFamily(name, help_text, labels=["device"])
                for r in live:
                    if r.get(field) is not None:
                        g.add_metric([r["device"]], float(r[field]) * scale)
                yield g
            for name, field, help_text in COUNTERS:
                c = CounterMetricFamily(name, help_text, labels=["device"])
                for r in live:
                    if r.get(field) is not None:
                        c.add_metric([r["device"]], float(r[field]))
                yield c
            age = GaugeMetricFamily("edgeforge_seconds_since_telemetry",
                                    "Seconds since the monitor last received telemetry",
                                    labels=["device"])
            up = GaugeMetricFamily("edgeforge_up", "1 when the device is online and reporting, "
                                   "else 0", labels=["device"])
            state = GaugeMetricFamily("edgeforge_state", "1 for the device's current state "
                                      "(online, stale, offline, unknown), 0 for the others",
                                      labels=["device", "state"])
            throttled = GaugeMetricFamily("edgeforge_throttled",
                                          "1 while the firmware throttles the CPU",
                                          labels=["device"])
            alerts = GaugeMetricFamily("edgeforge_alerts_active", "Active alerts",
                                       labels=["device"])
            bad = CounterMetricFamily("edgeforge_bad_messages", "Messages from the device "
                                      "the monitor refused since it started", labels=["device"])
            for r in rows:
                up.add_metric([r["device"]], 1.0 if r["state"] == "online" else 0.0)
                for name in STATES:
                    state.add_metric([r["device"], name], 1.0 if r["state"] == name else 0.0)
                if r.get("seconds_since_telemetry") is not None:
                    age.add_metric([r["device"]], float(r["seconds_since_telemetry"]))
                if r["state"] == "online" and r.get("throttling") is not None:
                    throttled.add_metric([r["device"]], 1.0 if r["throttling"] else 0.0)
                alerts.add_metric([r["device"]], float(len(r["alerts"])))
                bad.add_metric([r["device"]], float(r["bad_messages"]))
            dropped = CounterMetricFamily("edgeforge_monitor_dropped_messages", "Messages "
                                          "this monitor could not take: its inbox was full")
            dropped.add_metric([], float(monitor.dropped))
            yield from (age, up, state, throttled, alerts, bad, dropped)

    REGISTRY.register(FleetCollector())
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        raise ConfigError(f"--prometheus {host}:{port}: cannot listen ({exc.strerror})") from None
