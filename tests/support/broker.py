"""A real mosquitto on a free loopback port, and a real paho subscriber that records messages."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(proc: subprocess.Popen[bytes], port: int, name: str, log: Path) -> None:
    """Return once `proc` accepts connections on 127.0.0.1:`port` (10 s at most)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}: "
                                   f"{log.read_text()}") from None
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on port {port} within 10 s")


def mosquitto_binary() -> str:
    path = shutil.which("mosquitto") or ("/usr/sbin/mosquitto"
                                         if Path("/usr/sbin/mosquitto").exists() else None)
    if path is None:
        raise RuntimeError("mosquitto is not installed: apt-get install mosquitto "
                           "(bash .ci/run does this)")
    return path


class Broker:
    """mosquitto bound to 127.0.0.1:<port>, persistent sessions kept across restarts.

    `listener_conf` replaces the default anonymous plain-TCP settings of the listener (TLS,
    password files: see test_agent_tls.py).
    """

    def __init__(self, workdir: Path, listener_conf: str = "allow_anonymous true\n") -> None:
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        # `user root`: started as root, mosquitto would switch to its own user, which cannot
        # read pytest's 0700 temporary folders. Ignored when not started as root.
        self.conf.write_text(f"user root\nper_listener_settings true\n"
                             f"listener {self.port} 127.0.0.1\n{listener_conf}persistence true\n"
                             f"persistence_location {workdir}/\n"
                             f"log_dest file {workdir}/mosquitto.log\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.workdir / "stderr.log").open("ab") as err:
            self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)],
                                         stdout=err, stderr=err)
        wait_listening(self.proc, self.port, "mosquitto", self.workdir / "stderr.log")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


class Subscriber:
    """A paho client with a persistent session (QoS 1) that records every message it gets."""

    def __init__(self, port: int, topic: str = "edgeforge/#", client_id: str = "test-sub") -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=False)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.topic = topic

        def on_connect(c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
            if not rc.is_failure:
                c.subscribe(topic, qos=1)

        def on_subscribe(c: mqtt.Client, u: Any, mid: int, rcs: Any, p: Any) -> None:
            self.subscribed.set()

        def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
            with self._lock:
                self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError("test subscriber could not subscribe")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def on(self, suffix: str) -> list[tuple[bytes, bool]]:
        """Payloads (and retain flags) of messages whose topic ends with `suffix`."""
        with self._lock:
            return [(p, r) for t, p, r in self.messages if t.endswith(suffix)]

    def status(self) -> str | None:
        """The last status message seen (online / offline), or None."""
        seen = self.on("/status")
        return seen[-1][0].decode() if seen else None

    def telemetry(self) -> list[dict[str, Any]]:
        return [json.loads(p) for p, _ in self.on("/telemetry")]

    def seqs(self) -> list[int]:
        return [m["seq"] for m in self.telemetry()]

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; got "
                             f"{[(t, p[:80]) for t, p, _ in self.messages][-10:]}")


class SlowRelay:
    """A TCP relay on a free loopback port in front of a real broker that holds each new
    connection for `delay_s` before passing bytes both ways: a broker slow to answer (network
    latency, a loaded host), not a fake of MQTT."""

    def __init__(self, port: int, delay_s: float) -> None:
        self.target = port
        self.delay_s = delay_s
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self._stop = threading.Event()
        self._accepter = threading.Thread(target=self._accept, name="relay", daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        self.server.settimeout(0.1)
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        time.sleep(self.delay_s)
        upstream = socket.create_connection(("127.0.0.1", self.target))

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

        back = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
        back.start()
        pipe(client, upstream)
        back.join(5)
        client.close()
        upstream.close()

    def close(self) -> None:
        self._stop.set()
        self.server.close()
        self._accepter.join(5)
