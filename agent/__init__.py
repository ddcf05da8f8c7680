"""edgeforge board agent: loads a verified bundle, runs inference, reports over MQTT.

Runs on the board. Imports only torch, psutil, paho-mqtt, pyyaml and the standard library;
never `optimizer`.
"""

__version__ = "0.1.0"
