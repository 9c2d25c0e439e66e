"""Statistics of the anatomy benchmark: intervals for pass rates, paired comparisons between arms.

Every function takes plain arrays, so the numbers in ``bench/anatomy.json`` can be recomputed from the
per-sample outcomes the benchmark stores.

- ``wilson``: Wilson score interval of a binomial proportion (Wilson 1927).
- ``mcnemar``: exact McNemar test on paired binary outcomes (two-sided binomial test on the discordant pairs).
- ``paired_bootstrap``: interval of a difference of pass rates from a two-level bootstrap, resampling training
  seeds and then samples (shared start noise) the same way for both arms, so it covers training-seed variation
  as well as sampling variation.
- ``mean_interval``: mean and t interval over a few per-seed values (FID, Dice, ...).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from scipy import stats

__all__ = ["wilson", "mcnemar", "paired_bootstrap", "mean_interval"]


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval ``(lo, hi)`` of ``successes / n`` (95 % for the default ``z``)."""
    if n <= 0:
        raise ValueError(f"wilson needs n >= 1, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson needs 0 <= successes <= n, got {successes} of {n}")
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray) -> dict[str, float]:
    """Exact McNemar test of paired outcomes ``a[i]``, ``b[i]`` (same start noise, same training seed).

    Returns ``a_only`` (pairs where only ``a`` passes), ``b_only`` and the two-sided ``p_value`` of the
    binomial test of ``a_only`` against ``Binomial(a_only + b_only, 1/2)``; 1.0 without discordant pairs.
    """
    a, b = np.asarray(a, dtype=bool).ravel(), np.asarray(b, dtype=bool).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"mcnemar needs two non-empty outcome arrays of one length, got {a.shape} and {b.shape}")
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = a_only + b_only
    p = 1.0 if n == 0 else float(stats.binomtest(a_only, n, 0.5, alternative="two-sided").pvalue)
    return {"a_only": a_only, "b_only": b_only, "p_value": p}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, reps: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, tuple[float, float]]:
    """``mean(a) - mean(b)`` and its bootstrap interval for outcomes of shape ``[seeds, samples]``.

    Row ``s`` of ``a`` and of ``b`` come from training seed ``s`` and column ``i`` from start-noise seed ``i``
    in both arms, so each replicate draws seeds with replacement, then samples with replacement within each
    drawn seed, and applies the same draw to both arms (percentile interval).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired_bootstrap needs two [seeds, samples] arrays of one shape, got {a.shape}, {b.shape}")
    if reps < 100:
        raise ValueError(f"paired_bootstrap needs reps >= 100, got {reps}")
    n_seeds, n = a.shape
    rng = np.random.default_rng(seed)
    d = a - b
    seeds = rng.integers(0, n_seeds, size=(reps, n_seeds))
    cols = rng.integers(0, n, size=(reps, n_seeds, n))
    reps_diff = d[seeds[..., None], cols].mean(axis=(1, 2))
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(reps_diff, [alpha, 1.0 - alpha])
    return float(d.mean()), (float(lo), float(hi))


def mean_interval(values: Sequence[Optional[float]], level: float = 0.95) -> dict[str, Optional[float]]:
    """Mean of the finite ``values`` with a Student-t interval (``None`` bounds with fewer than two values)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    if x.size == 1:
        return {"mean": float(x[0]), "lo": None, "hi": None, "n": 1}
    half = float(stats.t.ppf(0.5 + level / 2.0, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return {"mean": float(x.mean()), "lo": float(x.mean() - half), "hi": float(x.mean() + half), "n": int(x.size)}
