"""`source.kind: video` and `camera`: decoded RGB frames from FFmpeg (PyAV) or Picamera2.

One frame-source interface (`Capture`: open, next frame, close) with three implementations,
so the loop does not care where a picture came from:

    video file    PyAV demuxes and decodes; at the file's own rate (source.realtime) or as
                  fast as it decodes; at the end, stop or start again (source.repeat)
    stream URL    rtsp://, http(s)://, udp://, ... through PyAV; frames arrive at their rate
    camera        a V4L2 device (/dev/video0, a USB webcam) through PyAV's v4l2 input, or
                  `picamera2` for the Raspberry Pi camera through Raspberry Pi OS's
                  python3-picamera2 (BGR888 there is R, G, B in memory)

A source that cannot be opened, or that drops, is reopened with backoff (1 s doubling to
source.reopen_max_s); each attempt is one log line. PyAV wraps FFmpeg's own libraries: the
decoding, demuxing and network code every video tool relies on, which we would not write.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from agent.errors import SourceError
from agent.sources import Backoff, Frame, FrameQueue, SourceThread, now_pair

log = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 10.0  # opening a stream or device
READ_TIMEOUT_S = 5.0  # no packet from a stream for this long: it dropped


class End(Exception):
    """A video file reached its end."""


class PyAVCapture:
    """Frames from a file, stream or V4L2 device through PyAV (FFmpeg)."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.path = str(cfg.path)
        self.is_file = "://" not in self.path and cfg.kind == "video"
        self.container: Any = None
        self._frames: Any = None
        self._start = 0.0
        self.index = 0
        self.expected: int | None = None  # frames the file's header announces

    def open(self) -> str:
        try:
            import av
        except ImportError:
            raise SourceError("video and camera sources need PyAV: pip install "
                              "'edgeforge[video]'") from None
        options: dict[str, str] = {}
        fmt = None
        if self.cfg.kind == "camera":
            fmt = "v4l2"
            if not Path(self.path).exists():
                raise SourceError(f"camera {self.path}: no such device (plug it in, or set "
                                  f"source.path to an existing /dev/video*)")
            if self.cfg.width and self.cfg.height:
                options["video_size"] = f"{self.cfg.width}x{self.cfg.height}"
            if self.cfg.fps:
                options["framerate"] = f"{self.cfg.fps:g}"
        elif self.is_file and not Path(self.path).is_file():
            raise SourceError(f"video {self.path}: no such file (set source.path to a video "
                              f"file or a stream URL)")
        try:
            self.container = av.open(self.path, format=fmt, options=options,
                                     timeout=(OPEN_TIMEOUT_S, READ_TIMEOUT_S))
            stream = self.container.streams.video[0]
        except IndexError:
            self.close()
            raise SourceError(f"{self.path}: has no video stream") from None
        except (av.error.FFmpegError, OSError) as exc:
            self.close()
            raise SourceError(f"{self.path}: cannot open ({_first_line(exc)})") from None
        stream.thread_type = "AUTO"
        self.expected = None
        if self.is_file and self.container.duration and stream.average_rate:
            # What the header promises: a file that ends well short of it was cut off.
            self.expected = round(self.container.duration / 1e6 * float(stream.average_rate))
        self._frames = self.container.decode(stream)
        self._start = time.perf_counter()
        self.index = 0
        rate = stream.average_rate
        return (f"{stream.codec_context.name} {stream.codec_context.width}x"
                f"{stream.codec_context.height}" + (f" at {float(rate):.3g} fps" if rate else ""))

    def read(self) -> tuple[str, float, float, Any]:
        """(frame id, perf time it was in hand, seconds to convert it, RGB uint8 array).

        Raises:
            End: the file ended. SourceError: the stream dropped or the data is corrupt.
        """
        import av

        try:
            frame = next(self._frames)
        except StopIteration:
            raise End() from None
        except (av.error.FFmpegError, OSError) as exc:
            raise SourceError(f"{self.path}: {_first_line(exc)}") from None
        if self.is_file and self.cfg.realtime and frame.time is not None:
            delay = self._start + frame.time - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        t0 = time.perf_counter()
        rgb = frame.to_ndarray(format="rgb24")
        index, self.index = self.index, self.index + 1
        return str(index), t0, time.perf_counter() - t0, rgb

    def close(self) -> None:
        if self.container is not None:
            try:
                self.container.close()
            except Exception:  # closing a broken stream: nothing left to save
                pass
        self.container = None


class Picamera2Capture:
    """Frames from the Raspberry Pi camera through Picamera2 (source.path: picamera2).

    Not exercised by the tests (no camera or libcamera here); it uses Picamera2's documented
    calls only: create_video_configuration, start, capture_array, stop, close.
    """

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.cam: Any = None
        self.index = 0

    def open(self) -> str:
        try:
            from picamera2 import Picamera2
        except ImportError:
            raise SourceError("source.path picamera2 needs Raspberry Pi OS's python3-picamera2 "
                              "(apt install python3-picamera2, and a venv made with "
                              "--system-site-packages)") from None
        try:
            self.cam = Picamera2()
            main: dict[str, Any] = {"format": "BGR888"}  # R, G, B bytes in memory
            if self.cfg.width and self.cfg.height:
                main["size"] = (self.cfg.width, self.cfg.height)
            controls = {"FrameRate": self.cfg.fps} if self.cfg.fps else {}
            self.cam.configure(self.cam.create_video_configuration(main=main,
                                                                   controls=controls))
            self.cam.start()
        except Exception as exc:  # libcamera raises many kinds: no camera, camera busy
            self.close()
            raise SourceError(f"picamera2: cannot open the camera ({_first_line(exc)})") \
                from None
        self.index = 0
        return "Raspberry Pi camera (Picamera2)"

    def read(self) -> tuple[str, float, float, Any]:
        t0 = time.perf_counter()
        try:
            rgb = self.cam.capture_array("main")
        except Exception as exc:
            raise SourceError(f"picamera2: {_first_line(exc)}") from None
        index, self.index = self.index, self.index + 1
        return str(index), t0, time.perf_counter() - t0, rgb[:, :, :3]

    def close(self) -> None:
        if self.cam is not None:
            try:
                self.cam.stop()
                self.cam.close()
            except Exception:
                pass
        self.cam = None


class VideoSource(SourceThread):
    """Feeds decoded frames to the loop, keeping only the newest (see the module docstring)."""

    def __init__(self, cfg: Any, frames: FrameQueue) -> None:
        super().__init__(f"source-{cfg.kind}", cfg, frames)
        self.capture: PyAVCapture | Picamera2Capture = (
            Picamera2Capture(cfg) if cfg.kind == "camera" and cfg.path == "picamera2"
            else PyAVCapture(cfg))
        self.reopens = 0

    def produce(self) -> None:
        backoff = Backoff(self.cfg.reopen_max_s)
        what = f"{self.cfg.kind} {self.cfg.path}"
        while not self.stopping.is_set():
            try:
                described = self.capture.open()
            except SourceError as exc:
                self.wait_to_retry(backoff, f"{exc}")
                continue
            self.status = f"reading {what}: {described}"
            log.info("%s source: %s", self.cfg.kind, self.status)
            try:
                self._pump(backoff)
            except End:
                self.capture.close()
                if isinstance(self.capture, PyAVCapture) and not self.capture.is_file:
                    self.reopens += 1  # a live stream or device that ends has dropped
                    self.wait_to_retry(backoff, "dropped (the stream ended)")
                    continue
                if self.cfg.repeat:
                    continue
                self.status = f"finished {what}"
                expected = getattr(self.capture, "expected", None)
                if expected and self.capture.index < expected - 1:
                    log.warning("%s source: %s ended after %d frame(s) of the %d its header "
                                "announces: the file is truncated", self.cfg.kind,
                                self.cfg.path, self.capture.index, expected)
                else:
                    log.info("%s source: %s ended after %d frame(s) (set source.repeat: true "
                             "to loop it)", self.cfg.kind, self.cfg.path, self.capture.index)
                self.stopping.wait()
                return
            except SourceError as exc:
                self.capture.close()
                if isinstance(self.capture, PyAVCapture) and self.capture.is_file:
                    # A file does not heal by reopening: what it has was served, say so once.
                    self.status = f"stopped: {exc}"
                    log.warning("%s source: %s is corrupt or truncated after frame %d (%s); "
                                "no more frames from it", self.cfg.kind, self.cfg.path,
                                self.capture.index, exc)
                    if self.cfg.repeat:
                        self.wait_to_retry(backoff, "reading it again")
                        continue
                    self.stopping.wait()
                    return
                self.reopens += 1
                self.wait_to_retry(backoff, f"dropped ({exc})")
        self.capture.close()

    def _pump(self, backoff: Backoff) -> None:
        while not self.stopping.is_set():
            frame_id, t0, convert_s, rgb = self.capture.read()
            backoff.reset()
            _, ts = now_pair()
            self.frames.put(Frame(frame_id, t0, ts, convert_s, image=rgb))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
