"""Benchmark: the agent serving real inputs, its targets measured in one run on this machine.

    .venv/bin/python benchmarks/serving_targets.py [--bundle models] [--images 200]
                                                   [--video-s 60] [--rounds 3]

Uses the bundle in --bundle (built with `edge-optimize run --data synthetic` when missing),
a real mosquitto on a free loopback port and `edge-agent run` as a subprocess, and measures:
  1. folder: per-image end to end (the result's total_ms: file read, decode, resize,
     normalise, infer, hand-over to the publisher) p50 <= 1.5 x (bare forward pass p50 +
     decode-and-preprocess p50 measured alone in this process on the same files). The files
     are 640x480 JPEGs (a camera's picture, resized to the model's 32x32 by the manifest's
     recipe), dropped one at a time every 50 ms so none waits behind another. The alone
     figures are measured before and after the agent's run, in --rounds interleaved rounds,
     and their medians used.
  2. video: a 30 fps 640x480 H.264 file played at its own rate (source.realtime, repeated)
     for --video-s: frames_dropped summed over every window = 0, and results received by a
     subscriber within 50 ms of capture (receive time - captured_ts) at p99.
  3. memory: the agent's RSS (its telemetry, largest window) on that video <= its RSS on
     `random` + 60 MB.
Prints a table, writes build/bench-serving/results.json and serving.png (the latency
distributions), exits 1 if a target is missed. The machine is shared: figures move with
other jobs' load, the ratios less than the absolute numbers.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.bundle import Bundle  # noqa: E402
from agent.config import number_argument  # noqa: E402
from agent.telemetry import percentile  # noqa: E402
from agent.timing import time_passes  # noqa: E402
from tests.support.broker import Broker  # noqa: E402  (the tests' real-mosquitto helper)

OUT = ROOT / "build/bench-serving"


class Listener:
    """Records every result and telemetry message with its arrival time."""

    def __init__(self, port: int) -> None:
        self.results: list[tuple[float, dict[str, Any]]] = []
        self.telemetry: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-serving")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("edgeforge/#", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: ready.set()

        def on_message(c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
            now = time.time()
            if msg.topic.endswith("/result"):
                with self.lock:
                    self.results.append((now, json.loads(msg.payload)))
            elif msg.topic.endswith("/telemetry"):
                with self.lock:
                    self.telemetry.append(json.loads(msg.payload))

        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        ready.wait(10)

    def clear(self) -> None:
        with self.lock:
            self.results.clear()
            self.telemetry.clear()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# The agent and the forward pass measured alone run the same engine (agent/engines).
ENGINE = "onnxruntime"


def agent(bundle: Path, port: int, work: Path, *overrides: str) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "agent", "run", "--set", f"model.dir={bundle}",
            "--set", f"model.engine={ENGINE}",
            "--set", f"mqtt.port={port}", "--set", "mqtt.host=127.0.0.1",
            "--set", "device.id=bench", "--set", f"spool.path={work / 'spool.db'}",
            "--set", "loop.window_s=2"]
    for item in overrides:
        args += ["--set", item]
    log = (work / f"agent-{time.monotonic_ns()}.log").open("wb")
    return subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(30)


def camera_jpegs(bundle: Bundle, count: int) -> list[bytes]:
    """640x480 JPEGs: the sample's images scaled up, as a camera would hand them over."""
    images = bundle.sample()["images"]
    out = []
    for i in range(count):
        img = Image.fromarray(images[i % images.shape[0]].permute(1, 2, 0).numpy(), "RGB")
        noise = np.random.default_rng(i).integers(0, 8, (480, 640, 3), np.uint8)
        big = np.asarray(img.resize((640, 480), Image.Resampling.BILINEAR)) + noise
        buf = io.BytesIO()
        Image.fromarray(big, "RGB").save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def alone(bundle: Bundle, jpegs: list[bytes]) -> tuple[float, float]:
    """(forward p50, decode+preprocess p50) in seconds, measured in this process."""
    prep = bundle.manifest.preprocess
    runner = bundle.load(ENGINE, 1)
    decode = []
    arrays = []
    for data in jpegs:
        t0 = time.perf_counter()
        arrays.append(prep.encoded(data)[None])
        decode.append(time.perf_counter() - t0)
    forward = time_passes(runner, arrays[:50], 500)
    return statistics.median(forward), statistics.median(decode)


def folder_round(bundle_dir: Path, port: int, work: Path, listener: Listener,
                 jpegs: list[bytes]) -> list[float]:
    inbox = work / f"inbox-{time.monotonic_ns()}"
    inbox.mkdir()
    listener.clear()
    proc = agent(bundle_dir, port, work, "source.kind=folder", f"source.path={inbox}",
                 "source.after=delete", "source.poll_s=0.05")
    try:
        deadline = time.monotonic() + 120
        while not listener.telemetry and time.monotonic() < deadline:
            time.sleep(0.1)
        for i, data in enumerate(jpegs):
            tmp = inbox / f".f{i:04d}.jpg"
            tmp.write_bytes(data)
            tmp.rename(inbox / f"f{i:04d}.jpg")
            time.sleep(0.05)
        while len(listener.results) < len(jpegs) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop(proc)
    return [r["total_ms"] / 1000 for _, r in listener.results]


def video_file(work: Path, seconds: int) -> Path:
    path = work / "camera.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-f",
                    "lavfi", "-i", f"testsrc2=size=640x480:rate=30:duration={seconds}",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "30", str(path)],
                   check=True)
    return path


def run_source(bundle_dir: Path, port: int, work: Path, listener: Listener, seconds: float,
               *overrides: str) -> tuple[list[tuple[float, dict[str, Any]]],
                                         list[dict[str, Any]]]:
    listener.clear()
    proc = agent(bundle_dir, port, work, *overrides)
    try:
        deadline = time.monotonic() + 120
        while not listener.telemetry and time.monotonic() < deadline:
            time.sleep(0.1)
        listener.clear()  # from the first window on: start-up is not serving
        time.sleep(seconds)
    finally:
        stop(proc)
    return list(listener.results), list(listener.telemetry)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=ROOT / "models")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--video-s", type=number_argument(0), default=60.0)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if not (args.bundle / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "optimizer", "run", "--data", "synthetic",
                        "--out", str(args.bundle)], cwd=ROOT, check=True)
    bundle = Bundle.open(args.bundle)
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    broker = Broker(work / "broker")
    broker.start()
    listener = Listener(broker.port)
    jpegs = camera_jpegs(bundle, args.images)
    try:
        forward, decode, e2e = [], [], []
        for r in range(args.rounds):  # alone, agent, alone, agent, ...: interleaved
            f, d = alone(bundle, jpegs)
            forward.append(f)
            decode.append(d)
            e2e.extend(folder_round(args.bundle, broker.port, work, listener, jpegs))
            print(f"round {r + 1}: forward {f * 1e3:.3f} ms, decode {d * 1e3:.3f} ms, "
                  f"{len(e2e)} folder results so far", flush=True)
        f, d = alone(bundle, jpegs)
        forward.append(f)
        decode.append(d)
        bare = statistics.median(forward) + statistics.median(decode)
        e2e_p50 = statistics.median(e2e) if e2e else float("inf")
        video = video_file(work, 10)
        print(f"video: {args.video_s:g} s at 30 fps", flush=True)
        results, windows = run_source(args.bundle, broker.port, work, listener, args.video_s,
                                      "source.kind=video", f"source.path={video}",
                                      "source.repeat=true")
        delays = sorted(max(0.0, t - r["captured_ts"]) for t, r in results)
        dropped = sum(w["frames_dropped"] or 0 for w in windows)
        frames = sum(w["frames_in"] or 0 for w in windows)
        video_rss = max((w["rss_mb"] for w in windows), default=float("nan"))
        _, random_windows = run_source(args.bundle, broker.port, work, listener, 20,
                                       "source.kind=random", "loop.rate_hz=30")
        random_rss = max((w["rss_mb"] for w in random_windows), default=float("nan"))
    finally:
        listener.close()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    p99 = percentile(delays, 99) if delays else float("inf")
    rows = [
        ("folder e2e p50 / (forward + decode alone)", e2e_p50 / bare, 1.5,
         f"{e2e_p50 * 1e3:.2f} ms / ({statistics.median(forward) * 1e3:.3f} + "
         f"{statistics.median(decode) * 1e3:.3f} ms), {len(e2e)} images"),
        ("video frames dropped", dropped, 0, f"of {frames} frames in {len(windows)} windows"),
        ("video capture -> received p99 (ms)", p99 * 1e3, 50.0,
         f"p50 {percentile(delays, 50) * 1e3:.1f} ms, {len(delays)} results"
         if delays else "no results"),
        ("RSS video - random (MB)", video_rss - random_rss, 60.0,
         f"{video_rss:.0f} MB on video, {random_rss:.0f} MB on random"),
    ]
    ok = True
    print(f"\n{'target':<44} {'measured':>10} {'limit':>7}  result  detail")
    for name, value, limit, detail in rows:
        passed = value <= limit
        ok &= passed
        print(f"{name:<44} {value:>10.3f} {limit:>7g}  {'PASS' if passed else 'FAIL':<6}  "
              f"{detail}")
    (OUT / "results.json").write_text(json.dumps(
        {"rows": [{"target": n, "measured": v, "limit": lim, "detail": d}
                  for n, v, lim, d in rows],
         "folder_e2e_ms": [x * 1e3 for x in e2e], "video_delay_ms": [x * 1e3 for x in delays]},
        indent=2) + "\n")
    plot(e2e, delays, bare)
    print(f"wrote {OUT / 'results.json'} and {OUT / 'serving.png'}")
    return 0 if ok else 1


def plot(e2e: list[float], delays: list[float], bare: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].hist([x * 1e3 for x in e2e], bins=40)
    axes[0].axvline(bare * 1e3, color="k", linestyle="--", label="forward + decode alone")
    axes[0].axvline(bare * 1.5e3, color="r", linestyle=":", label="target: 1.5x")
    axes[0].set(title="folder: per-image end to end", xlabel="ms", ylabel="images")
    axes[0].legend()
    axes[1].hist([x * 1e3 for x in delays], bins=40)
    axes[1].axvline(50, color="r", linestyle=":", label="target p99: 50 ms")
    axes[1].set(title="video 30 fps: capture to received", xlabel="ms", ylabel="frames")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(OUT / "serving.png", dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
