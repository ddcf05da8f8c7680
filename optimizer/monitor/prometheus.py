"""`edge-monitor serve --prometheus :PORT`: the latest values per device as Prometheus gauges.

prometheus_client (the maintained client library) serves /metrics from its own thread; a
custom collector reads the monitor's state under its lock at each scrape, so a device that
disappears disappears from the metrics too. Every metric has a `device` label.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from agent.errors import ConfigError

METRICS = (  # (metric name, row field, help)
    ("edgeforge_latency_p50_ms", "latency_p50_ms", "Latency p50 of the last window (ms)"),
    ("edgeforge_latency_p90_ms", "latency_p90_ms", "Latency p90 of the last window (ms)"),
    ("edgeforge_latency_p99_ms", "latency_p99_ms", "Latency p99 of the last window (ms)"),
    ("edgeforge_throughput_ips", "throughput_ips", "Images per second in the last window"),
    ("edgeforge_cpu_percent", "proc_cpu_percent", "Agent CPU use in the last window (%)"),
    ("edgeforge_soc_temp_celsius", "soc_temp_c", "SoC temperature (C)"),
    ("edgeforge_rss_mb", "rss_mb", "Agent resident memory (MB)"),
    ("edgeforge_spool_depth", "spool_depth", "Telemetry messages waiting on the board"),
    ("edgeforge_seconds_since_telemetry", "seconds_since_telemetry",
     "Seconds since the monitor last received telemetry"),
)


def serve(monitor: Any, host: str, port: int) -> None:
    """Start the /metrics endpoint for `monitor` (an optimizer.monitor.cli.Monitor)."""
    try:
        from prometheus_client import start_http_server
        from prometheus_client.core import REGISTRY, GaugeMetricFamily
        from prometheus_client.registry import Collector
    except ImportError:
        raise ConfigError("prometheus_client is not installed: pip install 'edgeforge[host]' "
                          "(or pip install prometheus_client)") from None

    class FleetCollector(Collector):
        def collect(self) -> Iterator[GaugeMetricFamily]:
            rows = monitor.rows()
            for name, field, help_text in METRICS:
                g = GaugeMetricFamily(name, help_text, labels=["device"])
                for r in rows:
                    if r.get(field) is not None:
                        g.add_metric([r["device"]], float(r[field]))
                yield g
            up = GaugeMetricFamily("edgeforge_up", "1 when the device is online and reporting",
                                   labels=["device", "state"])
            throttled = GaugeMetricFamily("edgeforge_throttled",
                                          "1 while the firmware throttles the CPU",
                                          labels=["device"])
            alerts = GaugeMetricFamily("edgeforge_alerts_active", "Active alerts",
                                       labels=["device"])
            bad = GaugeMetricFamily("edgeforge_bad_messages", "Messages refused since start",
                                    labels=["device"])
            for r in rows:
                up.add_metric([r["device"], r["state"]], 1.0 if r["state"] == "online" else 0.0)
                if r.get("throttling") is not None:
                    throttled.add_metric([r["device"]], 1.0 if r["throttling"] else 0.0)
                alerts.add_metric([r["device"]], float(len(r["alerts"])))
                bad.add_metric([r["device"]], float(r["bad_messages"]))
            yield from (up, throttled, alerts, bad)

    REGISTRY.register(FleetCollector())
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        raise ConfigError(f"--prometheus {host}:{port}: cannot listen ({exc.strerror})") from None
