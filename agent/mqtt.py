"""How every edgeforge program connects to the broker: one place builds the MQTT client.

The agent, `edge-deploy` and `edge-monitor` all call `make_client`, so credentials, TLS and
the last will are set the same way everywhere (Frigate's comms/mqtt.py is the model).
"""

from __future__ import annotations

import ssl

import paho.mqtt.client as mqtt

from agent.config import MqttConfig
from agent.errors import ConfigError


def make_client(cfg: MqttConfig, client_id: str, will_topic: str | None = None,
                will_payload: str = "offline", v5: bool = False) -> mqtt.Client:
    """A paho 2.x client with the mqtt section's credentials and TLS, and a retained QoS 1
    last will on `will_topic` when one is given. Callbacks are the caller's to set.

    With `v5` it speaks MQTT 5 (the agent does, for request/response with response topics and
    correlation data); a session then ends with the connection, as clean_session did.

    Raises:
        ConfigError: TLS files missing, unreadable or not matching.
    """
    if v5:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5)
    else:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             clean_session=True)
    if will_topic is not None:
        client.will_set(will_topic, will_payload, qos=1, retain=True)
    if cfg.username is not None:
        client.username_pw_set(cfg.username, cfg.password)
    if cfg.tls:
        try:
            client.tls_set(ca_certs=cfg.ca_file, certfile=cfg.cert_file,
                           keyfile=cfg.key_file, cert_reqs=ssl.CERT_REQUIRED)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"mqtt.tls: cannot use ca_file={cfg.ca_file!r}, cert_file="
                              f"{cfg.cert_file!r}, key_file={cfg.key_file!r} ({exc}): check "
                              f"those paths and that the key matches the certificate") from None
    return client
