"""The benchmarks' verdict: each target as (name, measured, limit, op), judged and printed."""

from __future__ import annotations

from typing import Any

Check = tuple[str, float, float, str]  # op: "<=", ">=" or "<"


def passed(value: float, limit: float, op: str) -> bool:
    return value >= limit if op == ">=" else value <= limit if op == "<=" else value < limit


def as_json(checks: list[Check]) -> list[dict[str, Any]]:
    return [{"target": n, "measured": v, "limit": lim, "op": op} for n, v, lim, op in checks]


def report(checks: list[Check], width: int = 66) -> bool:
    """Print one line per target with PASS or FAIL; True when every one passed."""
    print(f"{'target':<{width}} {'measured':>9} {'limit':>8}  result")
    ok = True
    for name, value, limit, op in checks:
        good = passed(value, limit, op)
        ok &= good
        print(f"{name:<{width}} {value:>9.3f} {op:>2}{limit:>6}  {'PASS' if good else 'FAIL'}")
    return ok
