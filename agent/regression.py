"""Is the model on trial slower than the one it replaced? Decided on a busy board too.

A trial's latencies come in pairs: the loop runs the new model and the old one (the shadow)
on every input, alternating which goes first (agent/loop.py), so both samples see the same
load, thermal state and caches. Under load, tail latency measures preemption more than the
model, so the verdict rests on the median, the way a canary analysis (Kayenta's
Mann-Whitney classifier) compares a canary with its baseline:

- a one-sided Mann-Whitney U test (normal approximation with tie correction) asks whether
  the new model's latencies are stochastically larger than the old one's, and
- the effect must also be large: the new median more than `max_p50_pct` above the old, or,
  as the second signal, the new p99 more than `max_p99_pct` above the old p99.

Only a significant and large rise rolls back. A model of the same speed has a ratio near 1
whatever the load; one several times slower is caught within a few windows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from agent.telemetry import percentile

ALPHA = 0.01  # the test's significance level
MAX_SAMPLES = 5000  # per side: a Pi ranks this many in well under a second


@dataclass(frozen=True)
class Verdict:
    """The comparison of a trial's paired latencies (milliseconds)."""

    new_p50_ms: float
    old_p50_ms: float
    new_p99_ms: float
    old_p99_ms: float
    p_value: float  # one-sided: the new model's latencies are larger
    passes: int  # pairs compared (after thinning)
    problems: tuple[str, ...]  # empty: no regression

    @property
    def p50_rise_pct(self) -> float:
        return 100.0 * (self.new_p50_ms / max(self.old_p50_ms, 1e-9) - 1.0)

    @property
    def p99_rise_pct(self) -> float:
        return 100.0 * (self.new_p99_ms / max(self.old_p99_ms, 1e-9) - 1.0)

    def summary(self) -> str:
        return (f"median {self.new_p50_ms:.3f} ms vs the old model's {self.old_p50_ms:.3f} ms "
                f"({self.p50_rise_pct:+.0f}%), p99 {self.new_p99_ms:.3f} vs "
                f"{self.old_p99_ms:.3f} ms ({self.p99_rise_pct:+.0f}%), measured side by side "
                f"on {self.passes} passes each (Mann-Whitney p={self.p_value:.2g})")


def thin(values: Sequence[float], limit: int = MAX_SAMPLES) -> list[float]:
    """At most `limit` values taken evenly across `values` (order kept)."""
    if len(values) <= limit:
        return list(values)
    step = len(values) / limit
    return [values[int(i * step)] for i in range(limit)]


def mann_whitney_greater(a: Sequence[float], b: Sequence[float]) -> float:
    """One-sided p-value that values of `a` tend to be larger than values of `b`.

    Normal approximation with continuity and tie correction; fine from about 20 per side.
    """
    n1, n2 = len(a), len(b)
    if n1 == 0 or n2 == 0:
        return 1.0
    pooled = sorted([(v, 0) for v in a] + [(v, 1) for v in b])
    rank_sum_a = 0.0
    ties = 0.0
    i, n = 0, n1 + n2
    while i < n:
        j = i
        while j + 1 < n and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        mid = (i + j) / 2.0 + 1.0  # ranks are 1-based; tied values share their mean rank
        rank_sum_a += mid * sum(1 for k in range(i, j + 1) if pooled[k][1] == 0)
        t = j - i + 1
        ties += t ** 3 - t
        i = j + 1
    u = rank_sum_a - n1 * (n1 + 1) / 2.0
    mean = n1 * n2 / 2.0
    var = n1 * n2 / 12.0 * ((n + 1) - ties / (n * (n - 1))) if n > 1 else 0.0
    if var <= 0:
        return 1.0
    z = (u - mean - 0.5) / math.sqrt(var)
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def compare(new_s: Sequence[float], old_s: Sequence[float], max_p50_pct: float,
            max_p99_pct: float) -> Verdict:
    """Judge a trial from its paired latencies in seconds (new model, old model).

    Raises:
        ValueError: either side is empty (nothing to compare).
    """
    if not new_s or not old_s:
        raise ValueError("compare needs latencies of both models")
    new, old = thin(new_s), thin(old_s)
    new_sorted, old_sorted = sorted(new), sorted(old)
    ms = 1000.0
    p_value = mann_whitney_greater(new, old)
    new_p50, old_p50 = percentile(new_sorted, 50) * ms, percentile(old_sorted, 50) * ms
    new_p99, old_p99 = percentile(new_sorted, 99) * ms, percentile(old_sorted, 99) * ms
    verdict = Verdict(new_p50, old_p50, new_p99, old_p99, p_value, min(len(new), len(old)), ())
    problems = []
    if p_value < ALPHA:
        if verdict.p50_rise_pct > max_p50_pct:
            problems.append(f"median latency {new_p50:.3f} ms is {verdict.p50_rise_pct:.0f}% "
                            f"above the old model's {old_p50:.3f} ms (limit {max_p50_pct:g}%)")
        if verdict.p99_rise_pct > max_p99_pct:
            problems.append(f"p99 latency {new_p99:.3f} ms is {verdict.p99_rise_pct:.0f}% "
                            f"above the old model's {old_p99:.3f} ms (limit {max_p99_pct:g}%)")
    return replace(verdict, problems=tuple(problems))
