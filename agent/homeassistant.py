"""Home Assistant MQTT discovery: the agent announces its telemetry as HA sensors.

With `homeassistant.enabled`, the agent publishes one retained config message per metric to
`<discovery_prefix>/sensor/<device>/<metric>/config` on every connect, and again whenever
Home Assistant's birth message (`<discovery_prefix>/status` = "online") says it restarted.
Each sensor reads the agent's own telemetry topic through a `value_template`, and its
availability follows the agent's retained `status` (the last will included), so nothing
extra is published per window.
"""

from __future__ import annotations

from typing import Any

import agent
from agent.telemetry import OFFLINE, ONLINE, Topics, encode

# (metric key in telemetry, name, unit, device_class)
SENSORS = (
    ("latency_p50_ms", "Latency p50", "ms", "duration"),
    ("latency_p99_ms", "Latency p99", "ms", "duration"),
    ("throughput_ips", "Throughput", "img/s", None),
    ("proc_cpu_percent", "CPU", "%", None),
    ("soc_temp_c", "SoC temperature", "°C", "temperature"),
    ("rss_mb", "Memory (RSS)", "MB", None),
)


def discovery_messages(discovery_prefix: str, device: str, topics: Topics
                       ) -> list[tuple[str, bytes]]:
    """(topic, retained payload) of every sensor's discovery config."""
    node = "".join(c if c.isalnum() or c in "_-" else "_" for c in device)
    slug = "".join(c if c.isascii() and c.isalnum() else "_" for c in device.lower())
    dev = {"identifiers": [f"edgeforge_{node}"], "name": f"edgeforge {device}",
           "manufacturer": "edgeforge", "model": "edge-agent", "sw_version": agent.__version__}
    out = []
    for key, name, unit, device_class in SENSORS:
        config: dict[str, Any] = {
            "name": name, "unique_id": f"edgeforge_{node}_{key}",
            # Home Assistant 2025.10 replaced object_id with default_entity_id (an entity id:
            # domain.lowercase_slug) and drops object_id in 2026.4; older releases ignore it.
            "default_entity_id": f"sensor.edgeforge_{slug}_{key}",
            "state_topic": topics.telemetry,
            "value_template": f"{{{{ value_json.{key} }}}}", "unit_of_measurement": unit,
            "state_class": "measurement", "availability_topic": topics.status,
            "payload_available": ONLINE, "payload_not_available": OFFLINE, "device": dev,
        }
        if device_class:
            config["device_class"] = device_class
        out.append((f"{discovery_prefix.rstrip('/')}/sensor/{node}/{key}/config", encode(config)))
    return out
