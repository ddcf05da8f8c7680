"""edge-monitor: the fleet's latency and health, live, alerted on, recorded and exported."""
