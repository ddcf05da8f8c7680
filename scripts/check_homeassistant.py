"""Check the agent's Home Assistant discovery configs against Home Assistant's own schema.

Home Assistant is too large for the project's venv, so this runs in its own:

    python3 -m venv /tmp/havenv && /tmp/havenv/bin/pip install homeassistant
    /tmp/havenv/bin/python scripts/check_homeassistant.py

Every config must pass `homeassistant.components.mqtt.sensor.DISCOVERY_SCHEMA` of the
installed release; keys that release does not know are listed (it drops them). Exit 1 when
one is refused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from homeassistant.components.mqtt.sensor import DISCOVERY_SCHEMA  # noqa: E402
from homeassistant.const import __version__  # noqa: E402

from agent.homeassistant import discovery_messages  # noqa: E402
from agent.telemetry import Topics  # noqa: E402


def main() -> int:
    device = "Pi-Kitchen 1"  # a name with a capital, a dash and a space
    msgs = discovery_messages("homeassistant", device, Topics.for_device("edgeforge", device))
    for topic, payload in msgs:
        config = json.loads(payload)
        try:
            accepted = DISCOVERY_SCHEMA(config)
        except Exception as exc:  # voluptuous.Invalid and its kin: the release refuses it
            print(f"{topic}: REFUSED by Home Assistant {__version__}: {exc}")
            return 1
        print(f"{topic}: ok (this release drops: {sorted(set(config) - set(accepted))})")
    print(f"Home Assistant {__version__}: all {len(msgs)} discovery configs pass "
          f"mqtt.sensor.DISCOVERY_SCHEMA")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
