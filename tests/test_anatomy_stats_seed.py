"""Seed-level statistics of the anatomy benchmark v2 (``bench/anatomy_stats.py``) against known values."""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
from scipy import stats

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

from anatomy_stats import (holm, minimum_detectable_effect, paired_t_power, samples_needed,  # noqa: E402
                           seed_level_table, seed_paired_test, seeds_needed, variance_components)


def test_seed_paired_test_matches_hand_and_scipy():
    a = [0.91, 0.95, 0.93, 0.97, 0.92]
    b = [0.90, 0.91, 0.92, 0.93, 0.89]
    out = seed_paired_test(a, b)
    d = np.array(a) - np.array(b)  # 0.01, 0.04, 0.01, 0.04, 0.03
    assert out["n"] == 5 and out["df"] == 4
    assert out["diff"] == pytest.approx(0.026) and out["sd"] == pytest.approx(d.std(ddof=1))
    ref = stats.ttest_rel(a, b)
    assert out["t"] == pytest.approx(ref.statistic) and out["p"] == pytest.approx(ref.pvalue)
    half = 2.776445 * d.std(ddof=1) / math.sqrt(5)  # t_{0.975, 4}
    assert out["lo"] == pytest.approx(0.026 - half, rel=1e-5) and out["hi"] == pytest.approx(0.026 + half, rel=1e-5)
    assert out["dz"] == pytest.approx(0.026 / d.std(ddof=1))
    # a missing seed in either arm drops that pair
    gap = seed_paired_test(a + [None], b + [0.5])
    assert gap["n"] == 5 and gap["p"] == pytest.approx(ref.pvalue)
    with pytest.raises(ValueError):
        seed_paired_test(a, b[:3])


def test_seed_paired_test_degenerate_cases():
    one = seed_paired_test([0.9], [0.8])
    assert one["n"] == 1 and one["diff"] == pytest.approx(0.1)
    assert one["lo"] is None and one["hi"] is None and one["p"] is None and one["sd"] is None
    assert seed_paired_test([], [])["diff"] is None
    same = seed_paired_test([0.5, 0.7, 0.6], [0.5, 0.7, 0.6])
    assert same["diff"] == 0.0 and same["p"] == 1.0 and (same["lo"], same["hi"]) == (0.0, 0.0)
    shift = seed_paired_test([0.6, 0.8, 0.7], [0.5, 0.7, 0.6])
    assert shift["sd"] == 0.0 and shift["p"] == 0.0 and shift["t"] is None and "note" in shift
    assert shift["lo"] == pytest.approx(0.1) and shift["hi"] == pytest.approx(0.1)


def test_holm_worked_example():
    out = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert out == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    assert list(out) == ["a", "b", "c"]
    # None passes through and does not count; adjusted values are capped at 1
    out = holm({"x": 0.4, "y": None, "z": 0.3})
    assert out["y"] is None and out["z"] == pytest.approx(0.6) and out["x"] == pytest.approx(0.6)
    assert holm({"x": 0.6, "z": 0.7}) == {"x": 1.0, "z": 1.0}
    assert holm({}) == {}
    # monotone: a larger raw p never gets a smaller adjusted p
    raw = dict(zip("abcdef", [0.001, 0.2, 0.012, 0.013, 0.05, 0.9]))
    adj = holm(raw)
    order = sorted(raw, key=raw.get)
    assert all(adj[i] <= adj[j] for i, j in zip(order, order[1:]))
    assert adj["a"] == pytest.approx(0.006) and adj["c"] == pytest.approx(0.06) and adj["d"] == pytest.approx(0.06)
    with pytest.raises(ValueError):
        holm({"a": 1.5})


def test_seeds_needed_known_value_and_monotone():
    assert seeds_needed(1.0, 1.0) == 10  # dz = 1: power 0.748 at 9 seeds, 0.803 at 10
    assert paired_t_power(9, 1.0, 1.0) < 0.8 <= paired_t_power(10, 1.0, 1.0)
    assert seeds_needed(2.0, 2.0) == 10 and seeds_needed(1.0, -1.0) == 10  # scale-free, two-sided
    needs = [seeds_needed(1.0, e) for e in (0.5, 0.8, 1.0, 1.5, 3.0)]
    assert needs == sorted(needs, reverse=True) and needs[0] > needs[-1]
    assert needs[0] == 34  # dz = 0.5 (the textbook paired-t value)
    assert seeds_needed(1.0, 0.0) is None and seeds_needed(1.0, 0.01, max_seeds=50) is None
    assert seeds_needed(1.0, 1.0, power=0.9) > 10
    mde = minimum_detectable_effect(1.0, 10)
    assert mde < 1.0 and paired_t_power(10, mde, 1.0) == pytest.approx(0.8, abs=1e-6)
    assert minimum_detectable_effect(0.5, 10) == pytest.approx(0.5 * mde)
    assert minimum_detectable_effect(1.0, 1) is None


def test_variance_components_and_samples_needed():
    rng = np.random.default_rng(0)
    seeds, m = 400, 50
    d = 0.05 + rng.normal(0, 0.1, size=(seeds, 1)) + rng.normal(0, 0.5, size=(seeds, m))
    vc = variance_components(d)
    assert vc["within"] == pytest.approx(0.25, rel=0.05) and vc["between"] == pytest.approx(0.01, rel=0.25)
    assert vc["sampling_share"] == pytest.approx(0.005 / 0.015, abs=0.08)
    # share 0.1 of (0.01 + 0.25 / m): 0.25 / m <= 0.1 (0.01 + 0.25 / m)  <=>  m >= 225
    assert samples_needed(0.01, 0.25, share=0.1) == 225
    assert samples_needed(0.01, 0.25, share=0.5) == 25
    assert samples_needed(0.0, 0.25) is None and samples_needed(0.01, 0.0) == 1
    with pytest.raises(ValueError):
        variance_components(d[:1])


def test_seed_level_table_holm_and_pairing():
    values = {
        "ldm": {0: 0.90, 1: 0.92, 2: 0.91, 3: 0.89},
        "ldm_big": {0: 0.91, 1: 0.92, 2: 0.93, 3: None},
        "anatomical": {0: 0.97, 1: 0.98, 2: 0.96, 3: 0.98, 4: 0.99},
    }
    contrasts = [("anatomical", "ldm"), ("anatomical", "ldm_big"), ("ldm_big", "ldm")]
    rows = seed_level_table(values, contrasts)
    assert [r["contrast"] for r in rows] == ["anatomical - ldm", "anatomical - ldm_big", "ldm_big - ldm"]
    assert rows[0]["seeds"] == [0, 1, 2, 3] and rows[1]["seeds"] == [0, 1, 2]  # seed 4 unpaired, 3 missing
    ref = stats.ttest_rel([0.97, 0.98, 0.96, 0.98], [0.90, 0.92, 0.91, 0.89])
    assert rows[0]["p"] == pytest.approx(ref.pvalue)
    adj = holm({r["contrast"]: r["p"] for r in rows})
    assert [r["p_holm"] for r in rows] == pytest.approx([adj[r["contrast"]] for r in rows])
    assert rows[0]["p_holm"] == pytest.approx(3 * ref.pvalue)  # the smallest of three
    assert rows[0]["significant"] and not rows[2]["significant"]
    assert rows[0]["lo"] > 0 and rows[0]["level"] == pytest.approx(0.95)
    with pytest.raises(KeyError):
        seed_level_table(values, [("anatomical", "nope")])
    with pytest.raises(ValueError):
        seed_level_table(values, [("ldm", "ldm_big"), ("ldm", "ldm_big")])


def test_seed_t_interval_coverage_simulation():
    # per-seed differences: true mean 0.03, between-seed SD 0.02, 5 seeds; the 95 % t interval should cover
    # the true mean in about 95 % of 2000 replicate studies (binomial SE 0.5 %)
    rng = np.random.default_rng(11)
    reps, n, true = 2000, 5, 0.03
    a = 0.9 + rng.normal(0, 0.03, size=(reps, n))
    b = a - true - rng.normal(0, 0.02, size=(reps, n))
    covered = 0
    rejected = 0
    for i in range(reps):
        out = seed_paired_test(a[i], b[i])
        covered += out["lo"] <= true <= out["hi"]
        rejected += out["p"] < 0.05
    assert 0.935 < covered / reps < 0.965
    # the observed rejection rate agrees with the exact power of the test
    power = paired_t_power(n, true, 0.02)
    assert abs(rejected / reps - power) < 0.035


def test_power_far_in_the_noncentral_tail_is_finite_and_matches_the_integral():
    """With two seeds (df 1) scipy's noncentral t is NaN for large noncentrality; the chi-square integral takes
    over, and it agrees with scipy where scipy is finite."""
    import math

    from scipy import stats

    from anatomy_stats import _two_sided_power, minimum_detectable_effect

    crit = float(stats.t.ppf(0.975, 1))
    assert math.isfinite(_two_sided_power(crit, 1, 12.0)) and 0.5 < _two_sided_power(crit, 1, 12.0) < 1.0
    mde2 = minimum_detectable_effect(0.05, 2)
    assert mde2 is not None and mde2 > minimum_detectable_effect(0.05, 3) > minimum_detectable_effect(0.05, 10)
    assert _two_sided_power(crit, 1, float(mde2 / 0.05 * math.sqrt(2))) == pytest.approx(0.8, abs=1e-6)
