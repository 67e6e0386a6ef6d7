"""Small, dependency-free summaries of latency samples."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Linear-interpolated percentile of an already sorted sequence (nan when empty)."""
    if not sorted_values:
        return math.nan
    position = (len(sorted_values) - 1) * fraction
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    weight = position - low
    return sorted_values[low] * (1 - weight) + sorted_values[high] * weight


def latency_summary(samples_us: Sequence[float]) -> dict[str, float | int]:
    """p50, p90, p99, max and count of latencies given in microseconds, reported in ms."""
    ordered = sorted(samples_us)
    return {
        "count": len(ordered),
        "p50_ms": round(percentile(ordered, 0.50) / 1000, 3),
        "p90_ms": round(percentile(ordered, 0.90) / 1000, 3),
        "p99_ms": round(percentile(ordered, 0.99) / 1000, 3),
        "max_ms": round(ordered[-1] / 1000, 3) if ordered else math.nan,
    }
