"""The timed inference loop: forward passes, windows, pacing and the systemd watchdog.

Runs on the main thread. Per iteration it does one forward pass between two perf_counter
reads and appends the latency to an array; everything else (stats, JSON, SQLite, MQTT)
happens on the publisher thread, which gets each closed window through a non-blocking
queue. The watchdog is pinged from here, so a forward pass that hangs stops the pings and
systemd restarts the service.

About once a second (`CHECK_S`, or a third of WatchdogSec if shorter) the loop asks
`healthy()` whether every other thread is alive and making progress. The watchdog is fed
only when it is; otherwise the loop closes its window and stops with `failure` set, and the
runner exits non-zero so systemd restarts the agent: no thread dies while the process lives.

During an update's trial the model carries a `shadow` (the old module): the loop runs both on
every input, alternating which goes first, so the two latency samples are taken under the
same conditions however busy the board is (agent/regression.py compares them). It also
carries a `fallback` (the old model): a forward pass of the new one that raises makes the
loop go back to it at once, by itself, and tell the commands thread (`fell_back`), which
rolls the store back and answers. The loop never waits on another thread's lock.

Other threads talk to the loop only through its `LoopControl`: a model, a config or a stop
handed over there is taken before the next forward pass.

With a real source (`Feed`: folder, video, camera, mqtt) the loop serves instead of cycling
through pre-built batches: it takes up to batch_size frames from the source's queue (waiting
at most until its next window, ping or stop), preprocesses each with the bundle's recipe,
runs one forward pass, and hands one Prediction per frame to the publisher. Each window then
also carries what the source did (`Served`): frames in, dropped and failed, results
published, and the capture, preprocess and end-to-end latency of every input. rate_hz does
not apply: the source sets the pace. While an update is on trial, an idle source lends the
trial the bundle's inputs (see `_serve`), so a quiet board still judges its update.
"""

from __future__ import annotations

import contextlib
import math
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.bundle import Bundle
from agent.config import LoopConfig
from agent.engines import Runner
from agent.errors import ImageError
from agent.predictions import Prediction, Predictor, softmax
from agent.preprocess import Preprocess, normalize
from agent.sdnotify import Notifier
from agent.sources import Frame, FrameQueue
from agent.telemetry import Served, Window
from agent.timing import time_passes

CHECK_S = 1.0  # how often the loop asks whether the other threads are healthy
TRIAL_IDLE_S = 0.01  # an idle real source on trial: one pair of passes per this wait


@dataclass(frozen=True)
class Inputs:
    """Pre-built input batches the loop cycles through, with labels for `sample`."""

    batches: list[np.ndarray]
    labels: list[np.ndarray] | None

    @classmethod
    def random(cls, batch_size: int, shape: list[int], count: int = 8,
               seed: int = 0) -> Inputs:
        g = np.random.default_rng(seed)
        return cls([g.standard_normal((batch_size, *shape), dtype=np.float32)
                    for _ in range(count)], None)

    @classmethod
    def sample(cls, images: np.ndarray, labels: np.ndarray, batch_size: int) -> Inputs:
        """Batches that walk the labelled sample, wrapping around, each image equally often."""
        n = int(labels.shape[0])
        count = n // math.gcd(n, batch_size)
        batches, targets = [], []
        for k in range(count):
            idx = np.arange(k * batch_size, (k + 1) * batch_size) % n
            batches.append(np.ascontiguousarray(images[idx]))
            targets.append(np.ascontiguousarray(labels[idx]))
        return cls(batches, targets)

    @classmethod
    def for_bundle(cls, bundle: Bundle, kind: str, batch_size: int) -> Inputs:
        """The bundle's labelled sample, normalised, for `sample`; random tensors at the
        manifest's shape otherwise (the benchmark, and the warm-up of a real source)."""
        m = bundle.manifest
        if kind != "sample":
            return cls.random(batch_size, m.input_shape)
        sample = bundle.sample()
        return cls.sample(normalize(sample["images"], m.mean, m.std), sample["labels"],
                          batch_size)


@dataclass(frozen=True)
class Model:
    """What the loop runs: a warmed-up engine runner, its inputs, and the model's sha256."""

    runner: Runner
    inputs: Inputs
    sha256: str
    shadow: Runner | None = None  # the old model, timed beside it on trial
    fallback: Model | None = None  # on trial: what to run if this one's forward pass fails
    classes: tuple[str, ...] = ()  # the manifest's labels, for results
    preprocess: Preprocess | None = None  # the manifest's recipe, for real inputs

    @classmethod
    def of(cls, bundle: Bundle, runner: Runner, kind: str, batch_size: int) -> Model:
        """`runner` (loaded from `bundle`) with its inputs, labels and preprocessing."""
        m = bundle.manifest
        return cls(runner, Inputs.for_bundle(bundle, kind, batch_size), bundle.sha256,
                   classes=tuple(m.classes), preprocess=m.preprocess)


@dataclass(frozen=True)
class Feed:
    """A real source as the loop sees it: the queue its frames arrive on, and what turns
    model outputs into results."""

    frames: FrameQueue
    predictor: Predictor
    max_pixels: int = 50_000_000  # source.max_image_pixels


def warm_up(model: Model, count: int) -> float:
    """Run `count` (at least one) forward passes outside any stats; return the first's
    seconds. A fresh TorchScript module profiles and optimises itself on its first runs."""
    return time_passes(model.runner, model.inputs.batches, max(1, count))[0]


def sessions_of(runner: Runner | None) -> contextlib.AbstractContextManager[None]:
    """`runner`'s session (the shadow of a trial may run on another engine), or nothing."""
    return runner.session() if runner is not None else contextlib.nullcontext()


class LoopControl:
    """The inference loop's mailbox: what other threads and signal handlers hand it.

    Plain attributes, not Events or locks: a signal handler may set them at any point, and
    each hand-over is one reference assignment. `wake` is the one flag the hot loop reads.
    """

    def __init__(self) -> None:
        self.wake = False
        self.stopping = False
        self.next_model: Model | None = None
        self.next_cfg: LoopConfig | None = None

    def swap(self, model: Model) -> None:
        """Run `model` from the next forward pass on (any thread)."""
        self.next_model = model
        self.wake = True

    def configure(self, cfg: LoopConfig) -> None:
        """Run with `cfg` (a checked LoopConfig) from the next forward pass on (any thread)."""
        self.next_cfg = cfg
        self.wake = True

    def stop(self) -> None:
        """Finish the current forward pass, close the window and return (signal-safe)."""
        self.stopping = True
        self.wake = True


class InferenceLoop:
    """Runs `model` until stopped, handing a Window to `emit` every window_s.

    Another thread may hand `control` a new model or config: the loop closes the current
    window and takes them before its next forward pass. A forward pass that raises ends the
    run, unless the model has a `fallback`: then the loop runs that and calls `fell_back`
    (the failed model's sha256, why). `healthy` returns None, or what is wrong with the
    agent's other threads (then the run ends with `failure` set).
    """

    def __init__(self, model: Model, cfg: LoopConfig, control: LoopControl,
                 emit: Callable[[Window | Prediction], object], notifier: Notifier,
                 healthy: Callable[[], str | None] = lambda: None,
                 fell_back: Callable[[str, str], None] = lambda sha, reason: None,
                 feed: Feed | None = None) -> None:
        self.model = model
        self.feed = feed
        self.cfg = cfg
        self.control = control
        self.emit = emit
        self.notifier = notifier
        self.healthy = healthy
        self.fell_back = fell_back
        self.windows = 0
        self.failure: str | None = None  # why healthy() ended the run
        self.failed: set[str] = set()  # models whose forward pass failed in this run
        self._next_ping = math.inf

    def stop(self) -> None:
        """Finish the current forward pass, close the window and return (signal-safe)."""
        self.control.stop()

    def run(self, duration_s: float | None = None) -> None:
        """Loop until stop() or `duration_s`; the last, partial window is emitted too."""
        perf = time.perf_counter
        start = perf()
        end = start + duration_s if duration_s is not None else math.inf
        ping_every = min(CHECK_S, self.notifier.watchdog_s / 3) if self.notifier.watchdog_s \
            else CHECK_S
        self._next_ping = start + ping_every
        window_start: float | None = start
        step = self._serve_until_change if self.feed is not None else self._run_until_change
        while window_start is not None:
            window_start = step(window_start, end, ping_every)

    def _take_changes(self) -> None:
        control = self.control
        # Cleared before reading: a change handed over from here on sets it again.
        control.wake = control.stopping
        model, control.next_model = control.next_model, None
        if model is not None and model.sha256 not in self.failed:
            self.model = model  # a model that failed in this run is not taken back
        cfg, control.next_cfg = control.next_cfg, None
        if cfg is not None:
            self.cfg = cfg

    def _run_until_change(self, window_start: float, end: float,
                          ping_every: float) -> float | None:
        """The hot loop with one model and one config; returns when another thread hands
        over a change (the time the next window starts), or None when the run is over."""
        self._take_changes()
        cfg, model = self.cfg, self.model
        module, labels = model.runner, model.inputs.labels
        run = module.run_prepared
        shadow = model.shadow
        # Each engine's own form of the pre-built batches, made once per model (agent/engines:
        # a TorchScript tensor made afresh for every pass costs it 7-9 %).
        batches = [module.prepare(b) for b in model.inputs.batches]
        shadow_batches = [shadow.prepare(b) for b in model.inputs.batches] \
            if shadow is not None else batches
        n = len(batches)
        period = 1.0 / cfg.rate_hz if cfg.rate_hz > 0 else 0.0
        perf = time.perf_counter
        window_end = window_start + cfg.window_s
        next_ping = self._next_ping
        next_event = min(window_end, next_ping, end)
        next_tick = perf()
        lat = array("d")
        old = array("d") if shadow is not None else None
        correct, i = 0, 0
        out: Any = None
        control = self.control
        with module.session(), sessions_of(shadow):
            while not control.wake:
                k = i % n
                if shadow is not None and i & 1:  # odd passes: the old model goes first
                    shadow = self._shadow(shadow, shadow_batches[k], old)
                t0 = perf()
                try:
                    out = run(batches[k])
                except RuntimeError as exc:
                    if model.fallback is None:
                        raise
                    self._fall_back(model, exc)
                    break
                t1 = perf()
                lat.append(t1 - t0)
                if shadow is not None and not i & 1:
                    shadow = self._shadow(shadow, shadow_batches[k], old)
                    t1 = perf()
                if labels is not None:
                    correct += int((np.asarray(out).argmax(1) == labels[k]).sum())
                # Let go of the logits before the next pass: a TorchScript pass while the last
                # one's output is still held ran 3-4 % slower here (CPU per image, 101
                # interleaved rounds of 0.1 s against the same loop letting go; README).
                out = None
                i += 1
                if period:
                    next_tick = max(next_tick + period, t1)
                    self._sleep_until(next_tick, next_event)
                    t1 = perf()
                if t1 < next_event:
                    continue
                if t1 >= next_ping:
                    if not self._ping(t1, ping_every):
                        break  # no ping: the window is closed below and the run ends
                    next_ping = self._next_ping
                if t1 >= window_end or t1 >= end:
                    self._close(lat, window_start, t1, correct if labels is not None else None,
                                old)
                    lat, correct = array("d"), 0
                    old = array("d") if shadow is not None else None
                    window_start, window_end = t1, t1 + cfg.window_s
                    if t1 >= end:
                        return None
                next_event = min(window_end, next_ping, end)
            now = perf()
            self._close(lat, window_start, now, correct if labels is not None else None, old)
            # Stopped or failed, else a change was handed over: go on from now.
            return None if control.stopping or self.failure is not None else now

    def _serve_until_change(self, window_start: float, end: float,
                            ping_every: float) -> float | None:
        """`_run_until_change` for a real source: frames from the feed instead of pre-built
        batches, one Prediction per frame, and the window's Served record."""
        self._take_changes()
        cfg, model = self.cfg, self.model
        feed = self.feed
        assert feed is not None
        perf = time.perf_counter
        window_end = window_start + cfg.window_s
        next_ping = self._next_ping
        lat = array("d")
        old = array("d") if model.shadow is not None else None
        served = Served(feed.predictor.cfg.kind)
        counted = feed.frames.counts()
        control = self.control
        shadow_first = False
        wait = TRIAL_IDLE_S if model.shadow is not None else 0.05  # for the first frame
        with model.runner.session(), sessions_of(model.shadow):
            while not control.wake:
                now = perf()
                next_event = min(window_end, next_ping, end)
                frames = feed.frames.take(cfg.batch_size, max(0.0, min(next_event - now, wait)))
                if frames or model.shadow is not None:
                    shadow_first = not shadow_first
                    if not self._serve(model, frames, served, lat, old, shadow_first):
                        break  # the model on trial failed: the fallback runs from now on
                t1 = perf()
                if t1 < next_event:
                    continue
                if t1 >= next_ping:
                    if not self._ping(t1, ping_every):
                        break
                    next_ping = self._next_ping
                if t1 >= window_end or t1 >= end:
                    counted = self._count(served, counted)
                    self._close(lat, window_start, t1, None, old, served)
                    lat = array("d")
                    old = array("d") if model.shadow is not None else None
                    served = Served(served.kind)
                    window_start, window_end = t1, t1 + cfg.window_s
                    if t1 >= end:
                        return None
            now = perf()
            self._count(served, counted)
            self._close(lat, window_start, now, None, old, served)
            return None if control.stopping or self.failure is not None else now

    def _count(self, served: Served, before: tuple[int, int]) -> tuple[int, int]:
        """Add the queue's accepted and dropped counts since `before`; return the new ones."""
        assert self.feed is not None
        now = self.feed.frames.counts()
        served.frames_in += now[0] - before[0]
        served.frames_dropped += now[1] - before[1]
        return now

    def _serve(self, model: Model, frames: list[Frame], served: Served, lat: array,
               old: array | None, shadow_first: bool) -> bool:
        """Preprocess, infer and hand over the results of `frames`; False if the model on
        trial failed (the loop then falls back)."""
        assert self.feed is not None and model.preprocess is not None
        predictor, prep, perf = self.feed.predictor, model.preprocess, time.perf_counter
        tensors, kept, pre = [], [], []
        for frame in frames:
            served.capture_s.append(frame.capture_s)
            t0 = perf()
            try:
                if frame.error is not None:
                    raise ImageError(frame.error)
                tensors.append(prep.encoded(frame.data, self.feed.max_pixels)
                               if frame.data is not None
                               else prep.image(frame.image))
            except ImageError as exc:
                served.frames_failed += 1
                self._failed(frame, str(exc), model.sha256, served)
                continue
            pre.append(perf() - t0)
            kept.append(frame)
        if frames and not tensors:
            return True
        # An update on trial needs paired passes of the new and the old model even when no
        # input arrives: an idle source lends them the bundle's inputs, at most one pair per
        # TRIAL_IDLE_S, so a quiet board still confirms or rolls back its update.
        batch = np.stack(tensors) if tensors else \
            model.inputs.batches[len(lat) % len(model.inputs.batches)]
        shadow = model.shadow
        if shadow is not None and shadow_first:
            self._shadow(shadow, batch, old)
        t0 = perf()
        try:
            out = model.runner(batch)
        except RuntimeError as exc:
            if model.fallback is None:
                raise
            self._fall_back(model, exc)
            return False
        infer_s = perf() - t0
        lat.append(infer_s)
        if shadow is not None and not shadow_first:
            self._shadow(shadow, batch, old)
        served.inferred += int(batch.shape[0])
        if not kept:
            return True  # the trial's borrowed passes: timed, nothing to answer
        probs = softmax(out)
        for frame, row, pre_s in zip(kept, probs, pre, strict=True):
            top = predictor.top(row, model.classes)
            now = perf()
            total_s = now - frame.captured
            served.preprocess_s.append(pre_s)
            served.total_s.append(total_s)
            if not predictor.wanted(top, now):
                continue
            result = predictor.result(frame, top, {
                "capture": frame.capture_s, "preprocess": pre_s, "infer": infer_s,
                "total": total_s}, model.sha256, engine=model.runner.engine)
            if self.emit(result) is not False:
                served.results_published += 1
        return True

    def _failed(self, frame: Frame, why: str, sha256: str, served: Served) -> None:
        """An input that is not a usable image: a file is moved aside (folder), a request
        gets an error result (mqtt); a live frame is only counted."""
        assert self.feed is not None
        predictor = self.feed.predictor
        if frame.done is not None:
            frame.done(False, why)
        if frame.reply is not None:
            result = predictor.result(frame, [], {"capture": frame.capture_s}, sha256, why)
            if self.emit(result) is not False:
                served.results_published += 1

    def _ping(self, now: float, ping_every: float) -> bool:
        """Feed the watchdog if every other thread is healthy; else set `failure`, False."""
        self.failure = self.healthy()
        if self.failure is not None:
            return False
        self.notifier.watchdog()
        self._next_ping = now + ping_every
        return True

    def _fall_back(self, model: Model, exc: RuntimeError) -> None:
        """The model on trial failed: the window closes as it is, the previous model runs
        from the next pass on, and the commands thread hears why."""
        assert model.fallback is not None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self.failed.add(model.sha256)
        if self.control.next_model is None or self.control.next_model.sha256 == model.sha256:
            self.control.swap(model.fallback)
        else:
            self.control.wake = True
        self.fell_back(model.sha256, f"inference failed on the new model: {first}")

    @staticmethod
    def _shadow(shadow: Runner, batch: Any, lat: array | None) -> Runner | None:
        """Time one pass of the old model beside the new one; None (no more shadow passes)
        if it fails, which says nothing about the model on trial."""
        t0 = time.perf_counter()
        try:
            shadow(batch)
        except RuntimeError:
            return None
        if lat is not None:
            lat.append(time.perf_counter() - t0)
        return shadow

    def _sleep_until(self, tick: float, next_event: float) -> None:
        """Sleep until `tick` for a fixed rate, waking for windows, pings and stop()."""
        while True:
            now = time.perf_counter()
            if now >= tick or self.control.wake:
                return
            # Wake at the next event too, so windows close and the watchdog is fed on time,
            # and at least every 50 ms to notice stop().
            time.sleep(min(tick, max(next_event, now + 0.001), now + 0.05) - now)
            if time.perf_counter() >= next_event:
                return

    def _close(self, lat: array, start: float, end: float, correct: int | None,
               old: array | None = None, served: Served | None = None) -> None:
        self.windows += 1
        labelled = len(lat) * self.cfg.batch_size if correct is not None else 0
        self.emit(Window(self.windows, time.time(), end - start, self.cfg.batch_size, lat,
                         correct, labelled, self.model.sha256, old, served,
                         self.model.runner.engine))
