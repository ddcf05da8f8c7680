"""The one percentile every edgeforge figure uses (telemetry, benchmarks, trials)."""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence


def percentile(ordered: array | Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]
