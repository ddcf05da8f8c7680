"""The host's MQTT side of the fleet: find boards, send commands, wait for their answers.

The request/answer protocol is the agent's (agent/remote_commands.py, agent/telemetry.py): a
command goes to `<prefix>/<id>/cmd/<name>` as JSON with `request_id` first, signed for that
board by the fleet's key (agent/command_auth.py), at QoS 1 and never retained; the answer
comes back on `<prefix>/<id>/cmd_result` with the same id.
Answer topics are subscribed before any command is sent, so no answer can be missed.
"""

from __future__ import annotations

import base64
import json
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.command_auth import sign_command
from agent.config import MqttConfig
from agent.manifest import Manifest
from agent.mqtt import make_client
from agent.telemetry import CMD_SCHEMA, OFFLINE, ONLINE, Topics
from agent.untrusted import loads_json
from deploy.errors import FleetError

FINAL_UPDATE_RESULTS = ("confirmed", "rolled_back", "refused", "failed", "unchanged")


def new_request_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"


def update_args(bundle: Path, force: bool) -> dict[str, Any]:
    """The update_model args for a signed bundle: the manifest, its signature, board files."""
    manifest = Manifest.read(bundle)
    files = {}
    for name in manifest.release_files():
        try:
            files[name] = base64.b64encode((bundle / name).read_bytes()).decode()
        except OSError as exc:
            raise FleetError(f"{bundle / name}: cannot read ({exc.strerror}): is {bundle} a "
                             f"complete, signed bundle?") from None
    return {"files": files, "force": force}


class Fleet:
    """One MQTT connection of edge-deploy to the broker the boards report to."""

    def __init__(self, cfg: MqttConfig, key: Ed25519PrivateKey | None = None) -> None:
        """`key`: the fleet's signing key, which every command is signed with."""
        self.cfg = cfg
        self.key = key
        self.prefix = cfg.topic_prefix.rstrip("/")
        self._messages: queue.SimpleQueue[tuple[str, bytes, bool]] = queue.SimpleQueue()
        self._connected = threading.Event()
        self._refused: str | None = None
        client = make_client(cfg, f"edge-deploy-{secrets.token_hex(4)}")
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        self.client = client

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: Any) -> None:
        self._messages.put((message.topic, message.payload, bool(message.retain)))

    def __enter__(self) -> Fleet:
        where = f"{self.cfg.host}:{self.cfg.port}"
        try:
            self.client.connect(self.cfg.host, self.cfg.port, self.cfg.keepalive)
        except (OSError, ValueError) as exc:
            raise FleetError(f"cannot reach the broker at {where} ({exc}): check mqtt.host and "
                             f"mqtt.port (--set mqtt.host=...)") from None
        self.client.loop_start()
        if not self._connected.wait(10) or self._refused:
            self.client.loop_stop()
            raise FleetError(f"the broker at {where} refused edge-deploy "
                             f"({self._refused or 'no answer'}): check mqtt.username/password")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def topics(self, device: str) -> Topics:
        return Topics.for_device(self.prefix, device)

    def subscribe(self, topics: Iterable[str]) -> None:
        """Subscribe and wait until the broker has granted it."""
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        for topic in topics:
            done.clear()
            self.client.subscribe(topic, qos=1)
            if not done.wait(10):
                raise FleetError(f"the broker did not confirm the subscription to {topic}")

    def listen(self, seconds: float, until: Callable[[str, bytes, bool], bool] | None = None
               ) -> None:
        """Hand messages to `until` for `seconds`, or until it returns True."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                topic, payload, retained = self._messages.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            if until is not None and until(topic, payload, retained):
                return

    def devices(self, listen_s: float = 1.5) -> dict[str, str]:
        """Every device with a retained status, as {id: "online" | "offline"}."""
        found: dict[str, str] = {}

        def collect(topic: str, payload: bytes, retained: bool) -> bool:
            parts = topic.split("/")
            if topic.startswith(self.prefix + "/") and parts[-1] == "status":
                state = payload.decode(errors="replace")
                if state in (ONLINE, OFFLINE):
                    found[parts[-2]] = state
            return False

        self.subscribe([f"{self.prefix}/+/status"])
        self.listen(listen_s, collect)
        return found

    def send(self, device: str, name: str, args: dict[str, Any], rid: str | None = None) -> str:
        """Publish one command (QoS 1, not retained), signed for `device` with the fleet's
        key (agent/command_auth.py); return its request id."""
        if self.key is None:
            raise FleetError("commands are signed with the fleet's key: pass --key")
        rid = rid or new_request_id()
        payload = json.dumps({"request_id": rid, "schema": CMD_SCHEMA, "args": args,
                              "auth": sign_command(self.key, name, device, rid, args)})
        info = self.client.publish(self.topics(device).cmd(name), payload, qos=1)
        info.wait_for_publish(30)
        return rid

    def answers(self, pending: dict[tuple[str, str], str], timeout_s: float,
                final: Callable[[dict[str, Any]], bool],
                progress: Callable[[str, dict[str, Any]], None] | None = None
                ) -> dict[tuple[str, str], dict[str, Any]]:
        """Wait for each (device, request_id)'s final answer; returns those that came.

        `pending` maps (device, request_id) to the command name; `progress` sees every answer.
        """
        done: dict[tuple[str, str], dict[str, Any]] = {}

        def take(topic: str, payload: bytes, retained: bool) -> bool:
            parts = topic.split("/")
            if parts[-1] != "cmd_result":
                return False
            try:
                msg = loads_json(payload, "cmd_result")
            except ValueError:
                return False
            if not isinstance(msg, dict):
                return False
            key = (parts[-2], str(msg.get("request_id")))
            if key in pending and key not in done:
                if progress is not None:
                    progress(key[0], msg)
                if final(msg):
                    done[key] = msg
            return len(done) == len(pending)

        self.listen(timeout_s, take)
        return done

    def wait_info(self, device: str, sha256: str, timeout_s: float,
                  since: float | None = None) -> dict[str, Any] | None:
        """The device's next `info` naming `sha256`, else None after `timeout_s`.

        A retained info (published before this subscription) counts only when `since` is
        given and its `ts` is not older: a birth message from an earlier run proves nothing.
        """
        found: list[dict[str, Any]] = []

        def take(topic: str, payload: bytes, retained: bool) -> bool:
            if topic != self.topics(device).info:
                return False
            try:
                info = loads_json(payload, "info")
            except ValueError:
                return False
            if not isinstance(info, dict) or info.get("model_sha256") != sha256:
                return False
            ts = info.get("ts")
            if retained and (since is None or not isinstance(ts, (int, float)) or ts < since):
                return False
            found.append(info)
            return True

        self.subscribe([self.topics(device).info])
        self.listen(timeout_s, take)
        return found[0] if found else None
