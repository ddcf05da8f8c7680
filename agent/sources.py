"""Where the agent's real work comes from: frames, files and requests, handed to the loop.

    kind     thread           hands over                           when the loop is slower
    folder   FolderSource     each new JPEG/PNG file, read whole   waits (nothing is skipped)
    video    VideoSource      decoded RGB frames (PyAV / FFmpeg)   keeps the newest, counts drops
    camera   VideoSource      V4L2 frames, or Picamera2's          keeps the newest, counts drops
    mqtt     (the publisher)  request payloads from <id>/infer     refuses with a busy result

Every source puts `Frame`s into one bounded `FrameQueue`; the inference loop takes them in
batches of up to loop.batch_size. A source thread never dies: anything that goes wrong is
one log line and, for live sources, a reopen with exponential backoff (1 s doubling to
source.reopen_max_s), logged once per step. `random` and `sample` have no source thread:
they are the benchmark and the canary (agent/loop.py's `Inputs`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.config import LIVE_KINDS, SourceConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reply:
    """Where the answer to an MQTT request goes besides <id>/result: MQTT 5's response topic
    and correlation data, when the request carried them."""

    request_id: str
    response_topic: str | None = None
    correlation: bytes | None = None


@dataclass
class Frame:
    """One input on its way to the model, with what its result must say about it."""

    source_id: str  # file name, frame number or request id
    captured: float  # perf_counter when capture (read, receive or decode) began
    ts: float  # wall clock at capture
    capture_s: float = 0.0  # reading the file, decoding the video frame
    image: Any = None  # a decoded RGB image (PIL image or uint8 HWC array) ...
    data: bytes | None = None  # ... or encoded bytes, decoded in the loop's preprocess stage
    reply: Reply | None = None
    error: str | None = None  # why the source could not read it (counted as failed)
    # folder: called with (ok, why) once the result is durable (True) or the input failed
    # (False), or with None when its result could not be spooled (the input is taken again)
    done: Callable[[bool | None, str], None] | None = field(default=None, repr=False)
    # which input this is, durably: spooled with its result, so it is answered once
    marker: str | None = None


class FrameQueue:
    """The bounded hand-over between a source and the loop.

    `policy` says what a full queue does with one more frame: "newest" drops the oldest
    waiting frame (live video: the loop always gets the latest picture), "wait" blocks the
    producer (files: none is skipped), "refuse" returns False at once (requests: the caller
    answers busy). Every frame dropped or refused is counted in `dropped`.
    """

    def __init__(self, size: int, policy: str) -> None:
        self.size = size
        self.policy = policy
        self._frames: deque[Frame] = deque()
        self._cond = threading.Condition()
        self.accepted = 0  # frames put in, including those later dropped as stale
        self.dropped = 0
        self.closed = False

    def put(self, frame: Frame, timeout_s: float | None = None) -> bool:
        """Hand over `frame`; False if it was refused (or the queue closed while waiting)."""
        with self._cond:
            if len(self._frames) >= self.size:
                if self.policy == "newest":
                    self._frames.popleft()
                    self.dropped += 1
                elif self.policy == "refuse":
                    self.dropped += 1
                    return False
                elif not self._cond.wait_for(
                        lambda: len(self._frames) < self.size or self.closed, timeout_s):
                    return False
            if self.closed:
                return False
            self._frames.append(frame)
            self.accepted += 1
            self._cond.notify_all()
            return True

    def take(self, most: int, timeout_s: float) -> list[Frame]:
        """Up to `most` frames, waiting at most `timeout_s` for the first."""
        with self._cond:
            if not self._frames:
                self._cond.wait(timeout_s)
            out: list[Frame] = []
            while self._frames and len(out) < most:
                out.append(self._frames.popleft())
            if out:
                self._cond.notify_all()
            return out

    def counts(self) -> tuple[int, int]:
        """(accepted, dropped) so far."""
        with self._cond:
            return self.accepted, self.dropped

    def close(self) -> None:
        """Wake and refuse every waiting producer."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class Backoff:
    """Reopen delays: 1 s doubling to `ceiling_s`; `reset` after a success."""

    def __init__(self, ceiling_s: float) -> None:
        self.ceiling_s = ceiling_s
        self.delay_s = 1.0

    def next(self) -> float:
        delay, self.delay_s = self.delay_s, min(self.ceiling_s, self.delay_s * 2)
        return delay

    def reset(self) -> None:
        self.delay_s = 1.0


class SourceThread(threading.Thread):
    """A source's thread: `produce` runs until stop(); an exception in it is a bug, logged
    and kept in `error`, which the runner's supervisor turns into a restart."""

    def __init__(self, name: str, cfg: SourceConfig, frames: FrameQueue) -> None:
        super().__init__(name=name, daemon=True)
        self.cfg = cfg
        self.frames = frames
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.status = "starting"  # what the source is doing, for diagnostics and info

    def run(self) -> None:
        try:
            self.produce()
        except BaseException as exc:
            self.error = exc
            log.exception("%s source failed", self.cfg.kind)

    def produce(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Ask the thread to finish; it returns within a second or so."""
        self.stopping.set()
        self.frames.close()

    def wait_to_retry(self, backoff: Backoff, why: str, again: str = "reopening") -> None:
        """Say once why the source is not producing, then wait the next backoff delay (or
        until stop())."""
        delay = backoff.next()
        self.status = f"waiting: {why}"
        log.warning("%s source: %s; %s in %.0f s", self.cfg.kind, why, again, delay)
        self.stopping.wait(delay)

    def stalled_s(self) -> float:
        """Sources wait on devices and networks by design: never reported as stalled."""
        return 0.0


def queue_for(cfg: SourceConfig) -> FrameQueue:
    """The hand-over queue a source kind needs (see FrameQueue)."""
    policy = "newest" if cfg.kind in LIVE_KINDS else "refuse" if cfg.kind == "mqtt" else "wait"
    return FrameQueue(cfg.queue_size, policy)


def start_source(cfg: SourceConfig, frames: FrameQueue,
                 answered: frozenset[str] = frozenset()) -> SourceThread | None:
    """The thread feeding `frames` for cfg.kind (None for random, sample and mqtt, whose
    inputs come from the bundle or the publisher), not yet started; `answered`: the spool's
    markers of files already answered (agent/folder_source.py)."""
    if cfg.kind == "folder":
        from agent.folder_source import FolderSource
        return FolderSource(cfg, frames, answered)
    if cfg.kind in LIVE_KINDS:
        from agent.video_source import VideoSource
        return VideoSource(cfg, frames)
    return None


def now_pair() -> tuple[float, float]:
    """(perf_counter, wall clock) at the same moment: a frame's capture time."""
    return time.perf_counter(), time.time()
