"""The one timing loop: forward passes timed the same way on the host and on the board.

The optimizer's report, `edge-agent bench`, the update's smoke test, the agent's warm-up and
`engine: auto`'s race all call `time_passes`, and summarise with `Latency.of` (the
nearest-rank percentile of agent/telemetry.py), so a p99 from the workstation and a p99 from
a board mean one thing.
"""

from __future__ import annotations

import contextlib
import os
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.telemetry import percentile


def time_passes(module: Callable[[Any], object], batches: Sequence[Any], iters: int,
                warmup: int = 0) -> array:
    """Run `warmup` untimed passes, then `iters` timed ones, cycling through `batches`;
    return each timed pass's seconds (perf_counter), in order. An engine's runner runs inside
    its `session()` (agent/engines); a plain callable as it is.

    Raises:
        RuntimeError: a forward pass failed (the caller decides what that means).
    """
    lat = array("d")
    perf = time.perf_counter
    prepare = getattr(module, "prepare", None)
    run = module
    if callable(prepare):  # as the loop runs its pre-built batches
        batches = [prepare(b) for b in batches]
        run = getattr(module, "run_prepared", module)
    session = getattr(module, "session", None)
    with session() if callable(session) else contextlib.nullcontext():
        for i in range(warmup):
            run(batches[i % len(batches)])
        for i in range(warmup, warmup + iters):
            t0 = perf()
            run(batches[i % len(batches)])
            lat.append(perf() - t0)
    return lat


@dataclass(frozen=True)
class Latency:
    """Summary of timed passes, in seconds."""

    passes: int
    p50_s: float
    p90_s: float
    p99_s: float
    max_s: float
    mean_s: float
    total_s: float

    @classmethod
    def of(cls, lat: array | Sequence[float]) -> Latency:
        """Summarise at least one pass."""
        ordered = sorted(lat)
        total = sum(ordered)
        return cls(len(ordered), percentile(ordered, 50), percentile(ordered, 90),
                   percentile(ordered, 99), ordered[-1], total / len(ordered), total)


def race(runners: Mapping[str, Callable[[Any], object]], batches: Sequence[Any], rounds: int,
         passes: int, warmup: int = 3) -> dict[str, Latency]:
    """Time several runners on the same inputs in interleaved rounds (each round runs every
    runner for `passes` passes, the order turning each round), so a machine that gets busier
    halfway slows them all alike; one Latency per runner over all its passes.

    Raises:
        RuntimeError: a forward pass failed.
    """
    names = list(runners)
    lat: dict[str, array] = {name: array("d") for name in names}
    for name in names:  # a fresh runner's first passes profile and allocate: untimed
        time_passes(runners[name], batches, 0, warmup=warmup)
    for r in range(rounds):
        turn = r % len(names)
        for name in names[turn:] + names[:turn]:
            lat[name].extend(time_passes(runners[name], batches, passes))
    return {name: Latency.of(lat[name]) for name in names}


def process_age_s(stat: Path = Path("/proc/self/stat")) -> float | None:
    """Seconds since this process started, to the kernel's clock tick (10 ms): the boot-time
    clock now minus the process's start time in /proc (psutil's create_time adds the boot
    time, which /proc/stat gives in whole seconds). None where /proc does not say."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None
