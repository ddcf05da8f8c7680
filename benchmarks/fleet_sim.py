"""A simulated fleet: agent-shaped status, info, summary and telemetry for N boards over MQTT.

    .venv/bin/python benchmarks/fleet_sim.py --boards 5000 [--window-s 10] [--duration 60]
        [--host 127.0.0.1] [--port 1883] [--prefix edgeforge] [--slow 50] [--silent 0]

Each board publishes what an agent publishes (agent/publisher.py): a retained `online` status
and a retained `info` once, then one telemetry message per window (QoS 1) and its retained
summary (QoS 0), the boards' windows spread evenly over the window so the broker sees a
steady rate of boards / window_s messages a second. Messages are built with the agent's own
schema (agent/telemetry.py: TELEMETRY_KEYS, summary_of), so the monitor checks them as it
checks a real agent's. `--slow N` boards report a p99 of 80 ms (the monitor's default alert is
50 ms), `--silent N` more boards announce themselves (status, info) and never send a window.
One MQTT connection carries the whole fleet: the monitor side is what is measured, not the
boards'. The tests (tests/deploy/test_monitor_fleet.py) and the README's monitoring figures
use it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import socket
import struct
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.config import number_argument  # noqa: E402
from agent.telemetry import (  # noqa: E402
    INFO_SCHEMA,
    OFFLINE,
    ONLINE,
    SOURCE_TELEMETRY_KEYS,
    TELEMETRY_SCHEMA,
    encode,
    summary_of,
)

SLOW_P99_MS = 80.0
BACKLOG = 30_000  # QoS 1 messages unacknowledged before _send waits
MODEL_SHA256 = hashlib.sha256(b"simulated fleet model").hexdigest()


def window_message(device: str, seq: int, ts: float, window_s: float = 10.0,
                   slow: bool = False) -> dict[str, Any]:
    """One window of `device`, as agent/publisher.py writes it."""
    p50 = 4.0 + zlib.crc32(device.encode()) % 100 / 100
    p99 = SLOW_P99_MS if slow else p50 * 1.6
    n = int(window_s * 200)
    return {"schema": TELEMETRY_SCHEMA, "device": device, "seq": seq, "ts": round(ts, 3),
            "window_s": window_s, "batch_size": 1, "inferences": n,
            "throughput_ips": round(n / window_s, 1), "latency_p50_ms": p50,
            "latency_p90_ms": round(p50 * 1.2, 3), "latency_p99_ms": p99,
            "latency_max_ms": p99 + 2, "latency_mean_ms": round(p50 * 1.05, 3),
            "proc_cpu_percent": 96.0, "sys_cpu_percent": 27.0, "rss_mb": 88.5,
            "mem_percent": 2.3, "load_1m": 1.1, "soc_temp_c": 52.0, "cpu_freq_mhz": 1800.0,
            "throttled": 0, "under_voltage": False, "freq_capped": False,
            "throttling": False, "spool_depth": 0, "dropped_total": 0,
            "model_sha256": MODEL_SHA256, "engine": "onnxruntime",
            **dict.fromkeys(SOURCE_TELEMETRY_KEYS), "source": "random", "frames_in": 0,
            "frames_dropped": 0, "frames_failed": 0, "results_published": 0}


def _length(n: int) -> bytes:
    """MQTT's remaining length: 7 bits a byte, the high bit set while more follow."""
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


class Wire:
    """The publishing half of an MQTT 3.1.1 client, written straight to a socket.

    A load generator, not a client for the project: through paho, one connection gave the
    broker 2,700 windows a second (two publishes each) where the benchmark asks 5,000, on
    the same two cores as the monitor it measures. Packets are built here and written in
    batches; a reader thread counts the broker's PUBACKs.
    """

    def __init__(self, host: str, port: int, client_id: str) -> None:
        try:
            self.sock = socket.create_connection((host, port), timeout=10)
        except OSError as exc:
            raise SystemExit(f"fleet_sim: no MQTT broker at {host}:{port} ({exc})") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Keep alive 0: no PINGREQ needed while a test holds the simulator idle.
        body = _string("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 0) + _string(client_id)
        self.sock.sendall(b"\x10" + _length(len(body)) + body)
        ack = self.sock.recv(4)
        if len(ack) != 4 or ack[0] != 0x20 or ack[3] != 0:
            raise SystemExit(f"fleet_sim: the broker at {host}:{port} refused the connection "
                             f"({ack!r})")
        self.sock.settimeout(None)
        self._out = bytearray()
        self._mid = 0
        self.sent_qos1 = 0
        self.acked = 0  # the reader thread counts PUBACKs
        self._reader = threading.Thread(target=self._read, name="fleet-sim-acks", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            i = 0
            while len(buf) - i >= 2 and not buf[i + 1] & 0x80:  # a short packet, whole?
                end = i + 2 + buf[i + 1]
                if end > len(buf):
                    break
                if buf[i] == 0x40:  # PUBACK; nothing else comes to a client that only sends
                    self.acked += 1
                i = end
            buf = buf[i:]

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        head = 0x30 | (qos << 1) | int(retain)
        body = _string(topic)
        if qos:
            self._mid = self._mid % 65535 + 1
            body += struct.pack("!H", self._mid)
            self.sent_qos1 += 1
        body += payload
        self._out += bytes([head]) + _length(len(body)) + body
        if len(self._out) >= 1 << 16:
            self.flush()

    def flush(self) -> None:
        """Write what publish() buffered (blocks while the broker reads slower)."""
        if self._out:
            self.sock.sendall(self._out)
            self._out.clear()

    def close(self) -> None:
        self.flush()
        with contextlib.suppress(OSError):
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT: no will, a clean end
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class FleetSim:
    """`boards` simulated agents on one MQTT connection; see the module docstring."""

    def __init__(self, host: str, port: int, boards: int, window_s: float = 10.0,
                 prefix: str = "edgeforge", slow: int = 0, silent: int = 0) -> None:
        self.prefix = prefix.rstrip("/")
        self.window_s = window_s
        self.ids = [f"sim-{i:05d}" for i in range(boards)]
        # Spread over the fleet, not the first N: a sorted table shows them among the rest.
        step = max(1, boards // slow) if slow else 0
        self.slow = set([self.ids[i] for i in range(0, boards, step)][:slow]) if slow else set()
        self.silent = [f"sim-silent-{i:03d}" for i in range(silent)]
        self.seq = dict.fromkeys(self.ids, 0)
        self.published = 0
        self.behind_s = 0.0  # how far run() fell behind its schedule, at most
        self.wire = Wire(host, port, f"fleet-sim-{port}-{boards}")

    def telemetry(self, device: str, seq: int, ts: float) -> dict[str, Any]:
        return window_message(device, seq, ts, self.window_s, device in self.slow)

    def info(self, device: str) -> dict[str, Any]:
        return {"schema": INFO_SCHEMA, "device": device, "ts": round(time.time(), 3),
                "agent_version": "0.1.0", "engine": "onnxruntime", "engine_version": "1.32.0",
                "machine": "aarch64", "model_sha256": MODEL_SHA256, "model_version": 1,
                "window_s": self.window_s, "source": "random", "restart_count": 0}

    def _send(self, topic: str, payload: bytes | str, qos: int, retain: bool = False) -> None:
        # At most BACKLOG QoS 1 messages unacknowledged: MQTT numbers them with 16 bits.
        while self.wire.sent_qos1 - self.wire.acked > BACKLOG:
            self.wire.flush()
            time.sleep(0.001)
        self.wire.publish(topic, payload.encode() if isinstance(payload, str) else payload,
                          qos, retain)
        self.published += 1

    def sync(self, timeout: float = 120.0) -> None:
        """Wait until the broker has taken everything published so far (every QoS 1 message
        acknowledged; it handles one connection's messages in order, QoS 0 ones too)."""
        self._send(f"{self.prefix}/fleet-sim/sync", b"", 1)
        self.wire.flush()
        deadline = time.monotonic() + timeout
        while self.wire.acked < self.wire.sent_qos1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"fleet_sim: the broker took no sync within {timeout:g} s")
            time.sleep(0.005)

    def announce(self, windows_ago: float = 0.5) -> None:
        """Every board's retained status and info, and (but the silent ones) the summary of a
        window that ended `windows_ago` windows ago; returns once the broker has them all."""
        now = time.time()
        for device in [*self.ids, *self.silent]:
            base = f"{self.prefix}/{device}"
            self._send(f"{base}/status", ONLINE, 1, retain=True)
            self._send(f"{base}/info", encode(self.info(device)), 1, retain=True)
        for device in self.ids:
            self.seq[device] += 1
            msg = self.telemetry(device, self.seq[device], now - windows_ago * self.window_s)
            self._send(f"{self.prefix}/{device}/summary", encode(summary_of(msg)), 0,
                       retain=True)
        self.sync()

    def run(self, duration_s: float) -> None:
        """Each board's window every window_s, spread evenly, for `duration_s`."""
        start = time.monotonic()
        gap = self.window_s / max(1, len(self.ids))
        i = 0
        while (elapsed := time.monotonic() - start) < duration_s:
            due = int(elapsed / gap)
            self.behind_s = max(self.behind_s, (due - i) * gap)
            while i <= due:
                device = self.ids[i % len(self.ids)]
                self.seq[device] += 1
                msg = self.telemetry(device, self.seq[device], time.time())
                base = f"{self.prefix}/{device}"
                self._send(f"{base}/telemetry", encode(msg), 1)
                self._send(f"{base}/summary", encode(summary_of(msg)), 0, retain=True)
                i += 1
            self.wire.flush()
            time.sleep(min(0.01, gap))
        self.sync()

    def offline(self, devices: list[str]) -> None:
        for device in devices:
            self._send(f"{self.prefix}/{device}/status", OFFLINE, 1, retain=True)
        self.sync()

    def close(self) -> None:
        self.wire.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--boards", type=int, required=True)
    p.add_argument("--window-s", type=number_argument(0), default=10.0)
    p.add_argument("--duration", type=number_argument(0), default=60.0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--prefix", default="edgeforge")
    p.add_argument("--slow", type=int, default=0)
    p.add_argument("--silent", type=int, default=0)
    args = p.parse_args()
    if args.boards < 1 or args.window_s <= 0:
        p.error("--boards must be at least 1 and --window-s above 0")
    sim = FleetSim(args.host, args.port, args.boards, args.window_s, args.prefix, args.slow,
                   args.silent)
    try:
        t0 = time.monotonic()
        sim.announce()
        print(f"fleet_sim: {args.boards} boards announced in {time.monotonic() - t0:.1f} s; "
              f"{args.boards / args.window_s:,.0f} windows/s for {args.duration:g} s",
              file=sys.stderr, flush=True)
        sim.run(args.duration)
        print(f"fleet_sim: {sim.published:,} messages published", file=sys.stderr)
    finally:
        sim.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
