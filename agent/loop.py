"""The timed inference loop: forward passes, windows, pacing and the systemd watchdog.

Runs on the main thread. Per iteration it does one forward pass between two perf_counter
reads and appends the latency to an array; everything else (stats, JSON, SQLite, MQTT)
happens on the publisher thread, which gets each closed window through a non-blocking
queue. The watchdog is pinged from here, so a forward pass that hangs stops the pings and
systemd restarts the service.
"""

from __future__ import annotations

import math
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass

import torch

from agent.config import LoopConfig
from agent.publisher import Window
from agent.sdnotify import Notifier
from agent.torchwarnings import known_torch_deprecations


@dataclass(frozen=True)
class Inputs:
    """Pre-built input batches the loop cycles through, with labels for `sample`."""

    batches: list[torch.Tensor]
    labels: list[torch.Tensor] | None

    @classmethod
    def random(cls, batch_size: int, shape: list[int], count: int = 8,
               seed: int = 0) -> Inputs:
        g = torch.Generator().manual_seed(seed)
        return cls([torch.randn(batch_size, *shape, generator=g) for _ in range(count)], None)

    @classmethod
    def sample(cls, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> Inputs:
        """Batches that walk the labelled sample, wrapping around, each image equally often."""
        n = int(labels.shape[0])
        count = n // math.gcd(n, batch_size)
        batches, targets = [], []
        for k in range(count):
            idx = torch.arange(k * batch_size, (k + 1) * batch_size) % n
            batches.append(images[idx].contiguous())
            targets.append(labels[idx].contiguous())
        return cls(batches, targets)


class InferenceLoop:
    """Runs `module` on `inputs` until stopped, handing a Window to `emit` every window_s."""

    def __init__(self, module: torch.jit.ScriptModule, inputs: Inputs, cfg: LoopConfig,
                 emit: Callable[[Window], None], notifier: Notifier,
                 healthy: Callable[[], bool] = lambda: True) -> None:
        self.module = module
        self.inputs = inputs
        self.cfg = cfg
        self.emit = emit
        self.notifier = notifier
        self.healthy = healthy
        self.windows = 0
        # A plain flag, not an Event: a signal handler may set it at any point of the loop.
        self._stopping = False

    def stop(self) -> None:
        """Finish the current forward pass, close the window and return (signal-safe)."""
        self._stopping = True

    def warm_up(self) -> float:
        """Run cfg.warmup forward passes outside the stats; return the first one's seconds."""
        first = 0.0
        with torch.inference_mode(), known_torch_deprecations():
            for i in range(max(1, self.cfg.warmup)):
                t0 = time.perf_counter()
                self.module(self.inputs.batches[i % len(self.inputs.batches)])
                if i == 0:
                    first = time.perf_counter() - t0
        return first

    def run(self, duration_s: float | None = None) -> None:
        """Loop until stop() or `duration_s`; the last, partial window is emitted too."""
        cfg = self.cfg
        batches, labels = self.inputs.batches, self.inputs.labels
        n = len(batches)
        period = 1.0 / cfg.rate_hz if cfg.rate_hz > 0 else 0.0
        ping_every = self.notifier.watchdog_s / 3 if self.notifier.watchdog_s else math.inf
        perf = time.perf_counter
        start = perf()
        end = start + duration_s if duration_s is not None else math.inf
        window_start, window_end = start, start + cfg.window_s
        next_ping = start + ping_every if ping_every != math.inf else math.inf
        next_event = min(window_end, next_ping, end)
        next_tick = start
        lat = array("d")
        correct, i = 0, 0
        with torch.inference_mode(), known_torch_deprecations():
            while not self._stopping:
                k = i % n
                t0 = perf()
                out = self.module(batches[k])
                t1 = perf()
                lat.append(t1 - t0)
                if labels is not None:
                    correct += int((out.argmax(1) == labels[k]).sum())
                i += 1
                if period:
                    next_tick = max(next_tick + period, t1)
                    self._sleep_until(next_tick, next_event)
                    t1 = perf()
                if t1 < next_event:
                    continue
                if t1 >= next_ping:
                    self.notifier.watchdog()
                    next_ping = t1 + ping_every
                if t1 >= window_end or t1 >= end:
                    self._close(lat, window_start, t1, correct if labels is not None else None)
                    lat, correct = array("d"), 0
                    window_start, window_end = t1, t1 + cfg.window_s
                    if t1 >= end or not self.healthy():
                        break
                next_event = min(window_end, next_ping, end)
            else:
                self._close(lat, window_start, perf(), correct if labels is not None else None)

    def _sleep_until(self, tick: float, next_event: float) -> None:
        """Sleep until `tick` for a fixed rate, waking for windows, pings and stop()."""
        while True:
            now = time.perf_counter()
            if now >= tick or self._stopping:
                return
            # Wake at the next event too, so windows close and the watchdog is fed on time,
            # and at least every 50 ms to notice stop().
            time.sleep(min(tick, max(next_event, now + 0.001), now + 0.05) - now)
            if time.perf_counter() >= next_event:
                return

    def _close(self, lat: array, start: float, end: float, correct: int | None) -> None:
        self.windows += 1
        labelled = len(lat) * self.cfg.batch_size if correct is not None else 0
        self.emit(Window(self.windows, time.time(), end - start, self.cfg.batch_size, lat,
                         correct, labelled))
