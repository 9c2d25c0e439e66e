"""Statistics of the anatomy benchmark: intervals for pass rates, paired comparisons between arms.

Every function takes plain arrays, so the numbers in ``bench/anatomy.json`` can be recomputed from the
per-sample outcomes the benchmark stores.

- ``wilson``: Wilson score interval of a binomial proportion (Wilson 1927).
- ``mcnemar``: exact McNemar test on paired binary outcomes (two-sided binomial test on the discordant pairs).
- ``paired_bootstrap``: interval of a difference of pass rates from a two-level bootstrap, resampling training
  seeds and then samples (shared start noise) the same way for both arms, so it covers training-seed variation
  as well as sampling variation.
- ``mean_interval``: mean and t interval over a few per-seed values (FID, Dice, ...).

Seed-level inference (benchmark v2): the training seed is the unit, so a contrast between two arms is a paired
t-test over the seeds both arms were trained with (the per-sample tests above are secondary: they treat one
trained model's samples as the population).

- ``seed_paired_test``: paired Student-t test and interval of per-seed differences.
- ``holm``: Holm-Bonferroni adjusted p-values over a family of contrasts.
- ``seed_level_table``: the paired test for each contrast, Holm-adjusted over the contrasts.
- ``paired_t_power``, ``seeds_needed``, ``minimum_detectable_effect``: exact power of the two-sided paired
  t-test from the noncentral t distribution, and the seeds (or effect) it takes.
- ``variance_components``, ``samples_needed``: the split of a seed-level difference's variance into a
  between-seed part and a sampling part, and the samples per seed that make the sampling part a given share.
"""
from __future__ import annotations

import math
from typing import Any, Hashable, Mapping, Optional, Sequence

import numpy as np
from scipy import stats

from ldm.evaluation.intervals import wilson

__all__ = ["wilson", "mcnemar", "paired_bootstrap", "mean_interval", "seed_paired_test", "holm",
           "seed_level_table", "paired_t_power", "seeds_needed", "minimum_detectable_effect",
           "variance_components", "samples_needed"]


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


# ------------------------------------------------------------------------------ seed-level inference (v2)

def _finite(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(float(v))


def seed_paired_test(a: Sequence[Optional[float]], b: Sequence[Optional[float]],
                     level: float = 0.95) -> dict[str, Any]:
    """Paired Student-t test of per-seed values ``a[s]`` against ``b[s]`` (same training seeds, same order).

    Pairs where either value is ``None`` or not finite are dropped. Returns ``n`` (pairs used), ``mean_a``,
    ``mean_b``, ``diff`` (mean of ``a - b``), ``sd`` (sample SD of the differences), ``se``, ``lo``/``hi`` (the
    ``level`` t interval of the mean difference), ``t``, ``df``, two-sided ``p`` and ``dz`` (``diff / sd``).
    With one pair only ``diff`` is defined (no interval, ``p`` ``None``). With constant differences (``sd`` 0)
    the interval is the point ``[diff, diff]`` and ``t`` is ``None``: ``p`` is 1 when ``diff`` is 0 and 0
    otherwise (the limit of the t-test), and ``note`` says so.
    """
    a_arr, b_arr = list(a), list(b)
    if len(a_arr) != len(b_arr):
        raise ValueError(f"seed_paired_test needs paired values, got {len(a_arr)} and {len(b_arr)}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    pairs = [(float(x), float(y)) for x, y in zip(a_arr, b_arr) if _finite(x) and _finite(y)]
    n = len(pairs)
    out: dict[str, Any] = {"n": n, "mean_a": None, "mean_b": None, "diff": None, "sd": None, "se": None,
                           "lo": None, "hi": None, "t": None, "df": None, "p": None, "dz": None, "level": level}
    if n == 0:
        return out
    x, y = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    d = x - y
    diff = float(d.mean())
    out.update(mean_a=float(x.mean()), mean_b=float(y.mean()), diff=diff)
    if n == 1:
        return out
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    df = n - 1
    out.update(sd=sd, se=se, df=df)
    if sd <= 1e-15 * max(1.0, abs(diff)):
        out.update(sd=0.0, se=0.0, lo=diff, hi=diff, p=1.0 if diff == 0.0 else 0.0,
                   note="differences are constant over seeds: no sampling variance to test against")
        return out
    t = diff / se
    half = float(stats.t.ppf(0.5 + level / 2.0, df)) * se
    out.update(lo=diff - half, hi=diff + half, t=float(t), p=float(2.0 * stats.t.sf(abs(t), df)), dz=diff / sd)
    return out


def holm(pvalues: Mapping[str, Optional[float]]) -> dict[str, Optional[float]]:
    """Holm-Bonferroni adjusted p-values (Holm 1979), in the input's key order.

    With the ``m`` non-``None`` p-values sorted ascending, ``p_adj(i) = max_{j <= i} min(1, (m - j + 1) p(j))``
    (monotone in the raw p-values, capped at 1). ``None`` passes through and does not count towards ``m``.
    Reject the contrasts with ``p_adj < alpha`` to control the family-wise error rate at ``alpha``.
    """
    keyed = [(k, float(p)) for k, p in pvalues.items() if p is not None]
    for k, p in keyed:
        if not 0.0 <= p <= 1.0 or math.isnan(p):
            raise ValueError(f"p-value of {k!r} must be in [0, 1], got {p}")
    m = len(keyed)
    adjusted: dict[str, float] = {}
    running = 0.0
    for rank, (k, p) in enumerate(sorted(keyed, key=lambda kp: kp[1])):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[k] = running
    return {k: adjusted.get(k) if p is not None else None for k, p in pvalues.items()}


def _seed_order(seeds: set) -> list:
    try:
        return sorted(seeds)
    except TypeError:
        return sorted(seeds, key=str)


def seed_level_table(values: Mapping[str, Mapping[Hashable, Optional[float]]],
                     contrasts: Sequence[tuple[str, str]], alpha: float = 0.05) -> list[dict[str, Any]]:
    """One row per contrast ``(arm_a, arm_b)``: :func:`seed_paired_test` of ``a - b`` over the seeds both arms have.

    ``values[arm][seed]``: one number per trained model (e.g. a pass rate, a descriptor W1, FID), ``None`` for a
    missing one. Each row holds ``contrast`` (``"a - b"``), ``a``, ``b``, ``seeds`` (the paired seeds with finite
    values in both arms), the test's keys (intervals at level ``1 - alpha``), ``p_holm`` (Holm over the given
    contrasts) and ``significant`` (``p_holm < alpha``; ``False`` where there is no p-value).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    names = [f"{a} - {b}" for a, b in contrasts]
    if len(set(names)) != len(names):
        raise ValueError(f"contrasts repeat: {names}")
    rows = []
    for (arm_a, arm_b), name in zip(contrasts, names):
        for arm in (arm_a, arm_b):
            if arm not in values:
                raise KeyError(f"arm {arm!r} has no values (arms: {sorted(values)})")
        va, vb = values[arm_a], values[arm_b]
        seeds = _seed_order({s for s in set(va) & set(vb) if _finite(va[s]) and _finite(vb[s])})
        test = seed_paired_test([va[s] for s in seeds], [vb[s] for s in seeds], level=1.0 - alpha)
        rows.append({"contrast": name, "a": arm_a, "b": arm_b, "seeds": list(seeds), **test})
    adjusted = holm({row["contrast"]: row["p"] for row in rows})
    for row in rows:
        row["p_holm"] = adjusted[row["contrast"]]
        row["significant"] = row["p_holm"] is not None and row["p_holm"] < alpha
    return rows


def paired_t_power(n: int, effect: float, sd_diff: float, alpha: float = 0.05) -> float:
    """Exact power of the two-sided paired t-test with ``n`` seeds for a true mean difference ``effect`` and an
    SD ``sd_diff`` of the per-seed differences: ``P(|T| > t_crit)`` with ``T ~ nct(n - 1, effect / sd * sqrt(n))``."""
    if n < 2:
        return 0.0
    if sd_diff <= 0:
        return 1.0 if effect != 0 else alpha
    df = n - 1
    crit = float(stats.t.ppf(1.0 - alpha / 2.0, df))
    return _two_sided_power(crit, df, abs(effect) / sd_diff * math.sqrt(n))


def _two_sided_power(crit: float, df: int, nc: float) -> float:
    """``P(|T| > crit)`` for ``T ~ nct(df, nc)``. scipy's noncentral t returns NaN far in its tail (e.g. df 1,
    nc >= 8); there the same probability is integrated over the chi-square of the denominator:
    ``T = (Z + nc) / sqrt(V / df)``, so ``P = E_V[Phi(nc - c) + Phi(-c - nc)]`` with ``c = crit * sqrt(V / df)``."""
    p = float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))
    if math.isfinite(p):
        return p
    from scipy.integrate import quad

    def integrand(v: float) -> float:
        c = crit * math.sqrt(v / df)
        return float((stats.norm.cdf(nc - c) + stats.norm.cdf(-c - nc)) * stats.chi2.pdf(v, df))

    return float(min(1.0, quad(integrand, 0.0, math.inf, limit=200)[0]))


def seeds_needed(sd_diff: float, effect: float, alpha: float = 0.05, power: float = 0.8,
                 max_seeds: int = 200) -> Optional[int]:
    """Smallest number of training seeds (>= 2) at which the two-sided paired t-test reaches ``power`` for a true
    mean difference ``effect`` between arms, given ``sd_diff``, the SD over seeds of the per-seed difference
    (between-seed and sampling variation together: see :func:`variance_components`). ``None`` when even
    ``max_seeds`` do not suffice (e.g. ``effect`` 0). Exact power from the noncentral t (:func:`paired_t_power`).
    """
    if sd_diff < 0:
        raise ValueError(f"sd_diff must be >= 0, got {sd_diff}")
    if not 0.0 < alpha < 1.0 or not 0.0 < power < 1.0:
        raise ValueError(f"alpha and power must be in (0, 1), got {alpha}, {power}")
    if effect == 0:
        return None
    for n in range(2, max_seeds + 1):
        if paired_t_power(n, effect, sd_diff, alpha) >= power:
            return n
    return None


def minimum_detectable_effect(sd_diff: float, n: int, alpha: float = 0.05, power: float = 0.8) -> Optional[float]:
    """The smallest true mean difference that ``n`` seeds detect with ``power`` (two-sided paired t-test,
    SD ``sd_diff`` of the per-seed differences); ``None`` for ``n < 2``."""
    from scipy.optimize import brentq

    if n < 2:
        return None
    if sd_diff <= 0:
        return 0.0
    if not 0.0 < alpha < 1.0 or not alpha < power < 1.0:
        raise ValueError(f"need 0 < alpha < power < 1, got alpha {alpha}, power {power}")
    df = n - 1
    crit = float(stats.t.ppf(1.0 - alpha / 2.0, df))

    def gap(nc: float) -> float:
        return _two_sided_power(crit, df, nc) - power

    hi = 1.0
    while gap(hi) < 0:
        hi *= 2.0
    nc = brentq(gap, 0.0, hi, xtol=1e-10)
    return nc * sd_diff / math.sqrt(n)


def variance_components(d: np.ndarray) -> dict[str, float]:
    """Split of per-sample paired differences ``d[seed, sample]`` (e.g. ``pass_a - pass_b`` on shared start
    noise) into the two parts of the variance of a seed's mean difference.

    Model: ``d[s, i] = delta + u_s + e_si`` with ``u_s`` the training-seed effect (variance ``between``) and
    ``e_si`` the sample-level variation (variance ``within``), so a seed's mean over ``m`` samples has variance
    ``between + within / m``. One-way random-effects ANOVA (method of moments): ``within`` = pooled within-seed
    variance, ``between = max(0, var(seed means) - within / m)``. Returns ``between``, ``within``, ``m``,
    ``seed_var`` (the observed variance of the seed means) and ``sampling_share`` (``within / m`` over
    ``between + within / m``).
    """
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] < 2 or d.shape[1] < 2:
        raise ValueError(f"variance_components needs [seeds >= 2, samples >= 2], got {d.shape}")
    m = d.shape[1]
    within = float(d.var(axis=1, ddof=1).mean())
    seed_var = float(d.mean(axis=1).var(ddof=1))
    between = max(0.0, seed_var - within / m)
    total = between + within / m
    return {"between": between, "within": within, "m": m, "seed_var": seed_var,
            "sampling_share": (within / m) / total if total > 0 else 0.0}


def samples_needed(between: float, within: float, share: float = 0.1) -> Optional[int]:
    """Samples per seed that keep the sampling part of a seed-level difference's variance at most ``share``.

    With the model of :func:`variance_components`, ``Var(seed mean difference) = between + within / m``; the
    sampling share ``(within / m) / (between + within / m) <= share`` gives ``m >= within (1 - share) /
    (share * between)``. Beyond that, more samples barely shrink the seed-level SD that :func:`seeds_needed`
    takes: more seeds are the remedy. ``None`` when ``between`` is 0 (sampling is then all of the variance,
    whatever ``m``). For paired binary outcomes ``within = p10 + p01 - (p10 - p01)**2`` (discordant rates).
    """
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must be in (0, 1), got {share}")
    if between < 0 or within < 0:
        raise ValueError(f"variances must be >= 0, got between {between}, within {within}")
    if within == 0:
        return 1
    if between == 0:
        return None
    return max(1, math.ceil(within * (1.0 - share) / (share * between) - 1e-9))
