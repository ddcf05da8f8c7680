"""Real inputs for the source tests: PNG files of the stand-in test images (known labels), a
lossless video made from them with Debian's ffmpeg, an HTTP stream served by ffmpeg, and the
host's own predictions for the same images to compare the board's with."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from PIL import Image

from agent.bundle import Bundle
from agent.config import SourceConfig
from agent.predictions import Predictor, softmax
from tests.support.broker import free_port


def sample_images(bundle: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The bundle's labelled stand-in test images: uint8 NCHW and int64 labels."""
    sample = torch.load(bundle / "sample.pt", weights_only=True)
    return sample["images"], sample["labels"]


def png_bytes(image: torch.Tensor) -> bytes:
    """A CHW uint8 tensor as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy(), "RGB").save(buf, "PNG")
    return buf.getvalue()


def write_pngs(bundle: Path, folder: Path, count: int, prefix: str = "img") -> list[str]:
    """`count` sample images as PNG files (written under a hidden name, then renamed, as a
    careful producer does); returns their names in order."""
    images, _ = sample_images(bundle)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        name = f"{prefix}{i:03d}.png"
        tmp = folder / f".{name}.part"
        tmp.write_bytes(png_bytes(images[i % images.shape[0]]))
        tmp.rename(folder / name)
        names.append(name)
    return names


def host_top(bundle: Path, encoded: list[bytes], k: int = 3
             ) -> dict[str, list[list[dict[str, Any]]]]:
    """What the host computes for each encoded image, per engine of the bundle: the
    manifest's preprocessing, the engine's board file at batch 1 (agent/engines), and the
    agent's own softmax and top-k (agent/predictions.py). Results name their engine."""
    b = Bundle.open(bundle)
    prep = b.manifest.preprocess
    predictor = Predictor(SourceConfig(kind="folder", path="-", top_k=k))
    out = {}
    for engine in b.engines:
        runner = b.load(engine)
        with runner.session():
            out[engine] = [predictor.top(softmax(runner(prep.encoded(data)[None]))[0],
                                         tuple(b.manifest.classes)) for data in encoded]
    return out


def make_video(bundle: Path, path: Path, count: int, fps: int = 30) -> list[bytes]:
    """A lossless FFV1 video of `count` sample images (RGB kept exactly: each decoded frame
    is the PNG's pixels); returns the frames as PNG bytes, in order, for host_top."""
    images, _ = sample_images(bundle)
    frames_dir = path.parent / f"{path.stem}-frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    frames = [png_bytes(images[i % images.shape[0]]) for i in range(count)]
    for i, data in enumerate(frames):
        (frames_dir / f"f{i:05d}.png").write_bytes(data)
    subprocess.run([ffmpeg(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-framerate",
                    str(fps), "-i", str(frames_dir / "f%05d.png"), "-c:v", "ffv1",
                    "-pix_fmt", "bgr0", str(path)], check=True, timeout=120)
    return frames


def ffmpeg() -> str:
    path = shutil.which("ffmpeg")
    if path is None:
        raise RuntimeError("ffmpeg is not installed: bash scripts/setup.sh installs it")
    return path


class HttpStream:
    """`ffmpeg -re ... -listen 1 http://127.0.0.1:PORT/`: a live stream one client can read,
    looping a video at its own rate; stop() and start() drop and bring it back."""

    def __init__(self, video: Path, log: Path) -> None:
        self.video = video
        self.log = log
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/live.mkv"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [ffmpeg(), "-nostdin", "-hide_banner", "-loglevel", "error", "-re",
                 "-stream_loop", "-1",
                 "-i", str(self.video), "-c", "copy", "-f", "matroska", "-listen", "1",
                 self.url], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        # A probe connection would be the one client ffmpeg serves: watch for its socket.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ffmpeg stream exited: {self.log.read_text()}")
            conns = psutil.Process(self.proc.pid).net_connections("tcp")
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port for c in conns):
                return
            time.sleep(0.05)
        raise RuntimeError(f"ffmpeg did not listen on port {self.port} within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def results(messages: list[tuple[bytes, bool]]) -> list[dict[str, Any]]:
    """Decoded result payloads."""
    return [json.loads(p) for p, _ in messages]
