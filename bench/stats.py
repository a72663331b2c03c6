"""Pure figures: percentiles, latency summaries, rates and ratios (no I/O, unit-tested)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

# The percentiles every latency summary reports.
PERCENTILES = (50, 95, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks.

    Same definition as numpy's default (``method="linear"``); an empty sample has none.
    """
    if not values:
        raise ValueError("no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not between 0 and 100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """Count, mean, p50, p95, p99 and max of a sample (all zero for an empty one)."""
    if not values:
        return {"count": 0, "mean": 0.0, "max": 0.0, **{f"p{q}": 0.0 for q in PERCENTILES}}
    return {
        "count": len(values),
        "mean": sum(values) / len(values),
        **{f"p{q}": percentile(values, q) for q in PERCENTILES},
        "max": max(values),
    }


def rate(count: int | float, seconds: float) -> float:
    """Items per second; 0 when no time passed (nothing was measured)."""
    return count / seconds if seconds > 0 else 0.0


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def slowest(rates: dict[str, float]) -> tuple[str, float]:
    """The name and value of the lowest positive rate (the bound on a pipeline)."""
    positive = {name: value for name, value in rates.items() if value > 0}
    if not positive:
        raise ValueError("no positive rate")
    name = min(positive, key=lambda key: positive[key])
    return name, positive[name]


def windows(
    points: Iterable[tuple[float, float]], width_s: float = 1.0
) -> list[tuple[float, list[float]]]:
    """Group (time, value) points into consecutive windows of ``width_s`` seconds.

    Returns (window start, values) for every non-empty window, in time order:
    what a lag-over-time chart plots one percentile line from.
    """
    if width_s <= 0:
        raise ValueError("a window has a positive width")
    grouped: dict[int, list[float]] = {}
    for at, value in points:
        grouped.setdefault(math.floor(at / width_s), []).append(value)
    return [(index * width_s, grouped[index]) for index in sorted(grouped)]
