"""Confidence intervals shared by the evaluation code and the benchmarks."""
from __future__ import annotations

import math

__all__ = ["wilson"]


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval ``(lo, hi)`` of ``successes / n`` (95 % for the default ``z``; Wilson 1927)."""
    if n <= 0:
        raise ValueError(f"wilson needs n >= 1, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson needs 0 <= successes <= n, got {successes} of {n}")
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
