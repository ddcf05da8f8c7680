"""edge-deploy: signing keys, flashing boards over SSH, updates and commands over MQTT."""
