"""Unsaturated anatomy measures (``ldm.evaluation.descriptors``) against hand-made masks and known answers."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage

from ldm.evaluation import descriptors as D


def _rect_mask(h=64, w=64, rects=()):
    m = np.zeros((h, w), dtype=np.int64)
    for c, (r0, r1, c0, c1) in rects:
        m[r0:r1, c0:c1] = c
    return m


def test_rectangle_descriptors():
    # class 1: a wide 10 x 30 rectangle; class 2: a tall 30 x 6 one; class 3 absent; class 4: two blobs
    m = _rect_mask(rects=[(1, (10, 20, 5, 35)), (2, (30, 60, 50, 56)), (4, (0, 3, 0, 3)), (4, (60, 64, 60, 64))])
    m[40, 10] = 4  # a one-pixel speck: counted in the area, not as a component (min_area 3)
    d = D.mask_descriptors(m, num_classes=5)
    assert set(d) == {"present", "area", "cu", "cv", "orientation", "components"}
    assert d["present"].shape == (1, 4) and d["present"].tolist() == [[True, True, False, True]]
    assert d["area"][0, 0] == pytest.approx(300 / 4096) and d["area"][0, 1] == pytest.approx(180 / 4096)
    assert d["area"][0, 2] == 0.0 and d["area"][0, 3] == pytest.approx(26 / 4096)
    # centroid of columns 5..34 is 19.5, of rows 10..19 is 14.5; normalised by (size - 1) / 2
    assert d["cu"][0, 0] == pytest.approx(2 * 19.5 / 63 - 1) and d["cv"][0, 0] == pytest.approx(2 * 14.5 / 63 - 1)
    assert d["cu"][0, 1] == pytest.approx(2 * 52.5 / 63 - 1) and d["cv"][0, 1] == pytest.approx(2 * 44.5 / 63 - 1)
    assert d["orientation"][0, 0] == pytest.approx(0.0, abs=1e-12)
    assert d["orientation"][0, 1] == pytest.approx(math.pi / 2)
    assert np.isnan(d["cu"][0, 2]) and np.isnan(d["cv"][0, 2]) and np.isnan(d["orientation"][0, 2])
    assert d["components"][0].tolist() == [1, 1, 0, 2]


def test_orientation_diagonal_round_and_torch():
    import torch

    m = np.zeros((2, 32, 32), dtype=np.int64)
    rows, cols = np.mgrid[0:32, 0:32]
    band = (np.abs(rows - cols) <= 1) & (rows >= 3) & (rows < 28) & (cols >= 3) & (cols < 28)
    m[0][band] = 1  # a band from top-left to bottom-right, symmetric about the diagonal: pi/4 from +u to +v
    m[0][band[:, ::-1] & (m[0] == 0)] = 2  # the mirror image (the crossing pixels stay class 1): 3 pi / 4
    m[1, 10:20, 10:20] = 1  # a square is round: no orientation
    d = D.mask_descriptors(torch.from_numpy(m), num_classes=3)
    assert d["orientation"][0, 0] == pytest.approx(math.pi / 4, abs=1e-9)
    assert d["orientation"][0, 1] == pytest.approx(3 * math.pi / 4, abs=1e-9)
    assert d["present"][1].tolist() == [True, False] and np.isnan(d["orientation"][1]).all()
    assert d["components"].tolist() == [[1, 2], [1, 0]]  # class 1 cuts the mirrored band in two
    with pytest.raises(ValueError):
        D.mask_descriptors(m, num_classes=2)  # label 2 outside 0..1


def test_components_match_a_per_mask_loop():
    rng = np.random.default_rng(1)
    masks = (rng.uniform(size=(20, 24, 24)) ** 3 * 4).astype(np.int64)  # speckled: many small components
    d = D.mask_descriptors(masks, num_classes=4, min_area=2)
    for i, m in enumerate(masks):
        for c in range(1, 4):
            lab, n = ndimage.label(m == c, structure=np.ones((3, 3)))
            sizes = np.bincount(lab.ravel())[1:]
            assert d["components"][i, c - 1] == int(np.sum(sizes >= 2))
            assert d["present"][i, c - 1] == (np.sum(m == c) >= 2)


def test_presence_patterns_and_distance():
    present = np.array([[1, 1], [1, 0], [1, 1], [1, 0]], dtype=bool)
    assert D.presence_patterns(present) == ["11", "10", "11", "10"]
    both = np.ones((4, 2), dtype=bool)
    out = D.presence_distance(present, both)  # {11: .5, 10: .5} vs {11: 1}
    assert out["tv"] == pytest.approx(0.5)
    js = 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)) + 0.5 * math.log2(1 / 0.75)
    assert out["js"] == pytest.approx(js)
    same = D.presence_distance(["10", "01"], ["01", "10"])
    assert same == {"tv": 0.0, "js": 0.0}
    disjoint = D.presence_distance(["10"] * 3, ["01"] * 5)
    assert disjoint["tv"] == pytest.approx(1.0) and disjoint["js"] == pytest.approx(1.0)


def _desc_from(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A descriptor dict of one class from per-mask values (NaN = absent)."""
    area = np.asarray(values["area"], dtype=np.float64)[:, None]
    present = np.isfinite(area)
    out = {"present": present}
    for name in D.DESCRIPTORS:
        v = np.asarray(values.get(name, np.full(area.shape[0], 0.5)), dtype=np.float64)[:, None]
        out[name] = np.where(present, v, np.nan)
    return out


def test_w1_zero_for_identical_and_shift_for_shifted():
    rng = np.random.default_rng(2)
    area = rng.uniform(0.01, 0.1, size=200)
    cu = rng.normal(0.0, 0.2, size=200)
    orient = rng.uniform(0.2, 1.0, size=200)
    real = _desc_from({"area": area, "cu": cu, "orientation": orient})
    same = D.descriptor_w1(real, real)
    assert all(same[name]["per_class"][0] == pytest.approx(0.0, abs=1e-12) for name in D.DESCRIPTORS)
    assert same["area"]["summary"] == pytest.approx(0.0, abs=1e-12)
    shifted = _desc_from({"area": area + 0.02, "cu": cu - 0.3, "orientation": orient + 0.1})
    out = D.descriptor_w1(shifted, real)
    assert out["area"]["per_class"][0] == pytest.approx(0.02)
    assert out["cu"]["per_class"][0] == pytest.approx(0.3)
    assert out["orientation"]["per_class"][0] == pytest.approx(0.1)
    assert out["area"]["spread"][0] == pytest.approx(np.std(area))
    assert out["area"]["summary"] == pytest.approx(0.02 / np.std(area))
    assert out["cu"]["n_classes"] == 1 and out["components"]["summary"] == pytest.approx(0.0)
    # too few values in the samples: None, counted as missing
    few = _desc_from({"area": np.r_[area[:3], np.full(197, np.nan)]})
    out = D.descriptor_w1(few, real)
    assert out["area"]["per_class"] == [None] and out["area"]["summary"] is None and out["area"]["n_missing"] == 1


def test_circular_w1_wraps():
    assert D.circular_w1([0.05], [math.pi - 0.05]) == pytest.approx(0.1)
    assert D.circular_w1([0.3, 0.5], [0.4, 0.6]) == pytest.approx(0.1)
    a = np.random.default_rng(3).uniform(0, math.pi, 50)
    assert D.circular_w1(a, a) == pytest.approx(0.0, abs=1e-12)
    assert D.circular_w1(a, a + 0.05) <= 0.05 + 1e-12  # near-uniform: cheaper than rotating every point
    # equal-size samples on a circle: the optimum is a cyclic shift of the sorted matching
    rng = np.random.default_rng(7)
    for _ in range(5):
        x = np.sort(rng.uniform(0, math.pi, 12))
        y = np.sort(np.mod(rng.normal(0.3, 0.6, 12), math.pi))
        gap = np.abs(x[:, None] - y[None, :])
        circ = np.minimum(gap, math.pi - gap)
        brute = min(np.mean(circ[np.arange(12), (np.arange(12) + s) % 12]) for s in range(12))
        assert D.circular_w1(x, y) == pytest.approx(brute, abs=1e-12)


def _two_clusters(rng, n, centres, d=4):
    return np.concatenate([rng.normal(size=(n, d)) + c for c in centres])


def test_precision_recall_density_coverage():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(400, 4))
    pr = D.precision_recall(real, real)
    assert pr == {"precision": 1.0, "recall": 1.0}
    dc = D.density_coverage(real, real, k=5)
    assert dc["coverage"] == 1.0 and dc["density"] == pytest.approx(6 / 5)  # each ball holds itself + 5
    other = rng.normal(size=(400, 4))
    pr, dc = D.precision_recall(real, other), D.density_coverage(real, other)
    assert pr["precision"] > 0.8 and pr["recall"] > 0.8
    assert 0.85 < dc["density"] < 1.15 and dc["coverage"] > 0.9
    far = other + 50.0
    assert D.precision_recall(real, far) == {"precision": 0.0, "recall": 0.0}
    assert D.density_coverage(real, far) == {"density": 0.0, "coverage": 0.0}
    # the samples cover only one of the real set's two clusters
    real2 = _two_clusters(rng, 300, [-20.0, 20.0])
    half = rng.normal(size=(300, 4)) - 20.0
    pr, dc = D.precision_recall(real2, half), D.density_coverage(real2, half)
    assert pr["precision"] > 0.95 and abs(pr["recall"] - 0.5) < 0.05
    assert abs(dc["coverage"] - 0.5) < 0.05
    with pytest.raises(ValueError):
        D.precision_recall(real[:4], real[:4], k=5)


def test_knn_chunks_agree_with_brute_force():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 3))
    full = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    expected = np.sort(full, axis=1)[:, 3]
    original = D._chunk_rows
    D._chunk_rows = lambda n_cols, max_elements=1000: max(1, max_elements // n_cols)  # 3-row chunks
    try:
        assert np.allclose(D._knn_radii(x, 3), expected)
    finally:
        D._chunk_rows = original


def test_vectors_fill_and_standardiser():
    m = np.zeros((3, 16, 16), dtype=np.int64)
    m[0, 0:4, 0:4] = 1
    m[1, 12:16, 12:16] = 1
    m[2, 0:4, 12:16] = 2  # class 1 absent here
    d = D.mask_descriptors(m, 3)
    fill = D.centroid_fill(d)
    assert fill[0].tolist() == pytest.approx([0.0, 0.0])  # mean of (-0.8, -0.8) and (0.8, 0.8)
    assert fill[1].tolist() == pytest.approx([2 * 13.5 / 15 - 1, 2 * 1.5 / 15 - 1])
    v = D.descriptor_vectors(d, fill)
    assert v.shape == (3, 10)
    # layout per class: presence, area, cu, cv, components
    assert v[2, :5].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.0])
    assert v[0, :5].tolist() == pytest.approx([1.0, 16 / 256, -0.8, -0.8, 1.0])
    std = D.fit_standardiser(v)
    z = std(v)
    assert np.allclose(z.mean(axis=0), 0.0)
    assert np.allclose(z[:, np.std(v, axis=0) > 1e-9].std(axis=0), 1.0)


def test_variant_summary_known_prevalences():
    real = ["normal"] * 90 + ["situs_inversus"] * 5 + ["single_kidney"] * 5
    fake = ["normal"] * 80 + ["situs_inversus"] * 10 + ["inconsistent"] * 10
    ok = [True] * 80 + [True] * 4 + [False] * 6 + [False] * 10
    out = D.variant_summary(real, fake, ok)
    v = out["variants"]
    assert list(v) == ["normal", "single_kidney", "situs_inversus", "inconsistent"]
    assert v["normal"]["real_prevalence"] == pytest.approx(0.9) and v["normal"]["sample_prevalence"] == 0.8
    assert v["situs_inversus"]["ratio"] == pytest.approx(2.0) and v["situs_inversus"]["plausible"] == 0.4
    assert v["single_kidney"]["ratio"] == 0.0 and v["single_kidney"]["plausible"] is None
    assert v["inconsistent"]["ratio"] is None and v["inconsistent"]["real_count"] == 0
    lo, hi = v["situs_inversus"]["sample_lo"], v["situs_inversus"]["sample_hi"]
    assert lo < 0.1 < hi and (round(lo, 4), round(hi, 4)) == (0.0552, 0.1744)
    assert out["tv"] == pytest.approx(0.5 * (0.1 + 0.05 + 0.05 + 0.1))
    assert out["rare_recall"] == pytest.approx(0.5) and out["n_rare"] == 2  # min(1, 2) and 0
    with pytest.raises(ValueError):
        D.variant_summary(real, fake, ok[:5])


def test_level_consistency():
    fake = ["thorax"] * 6 + ["abdomen"] * 2 + ["unknown", None]
    real = ["thorax"] * 5 + ["abdomen"] * 5
    out = D.level_consistency(fake, real)
    assert out["known_share"] == 0.8 and out["known_lo"] < 0.8 < out["known_hi"]
    assert out["distribution"] == {"abdomen": 0.2, "thorax": 0.6, "unknown": 0.2}
    assert out["tv"] == pytest.approx(0.5 * (0.1 + 0.3 + 0.2)) and out["real_known_share"] == 1.0
    assert "tv" not in D.level_consistency(fake)


def test_anatomy_measures_json():
    rng = np.random.default_rng(6)
    yy, xx = np.mgrid[0:32, 0:32]

    def blobs(n, shift):
        m = np.zeros((n, 32, 32), dtype=np.int64)
        for c, (y, x) in enumerate([(10, 10), (20, 22)], start=1):
            cy = y + shift + rng.normal(0, 1.5, n)[:, None, None]
            cx = x + rng.normal(0, 1.5, n)[:, None, None]
            m[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(9, 25, n)[:, None, None]] = c
        return m

    real, fake = blobs(60, 0.0), blobs(40, 3.0)
    fake[:10][fake[:10] == 2] = 0  # class 2 missing from a quarter of the samples
    reports = [SimpleNamespace(variant="normal", level="abdomen", plausible=True)] * 30 + \
              [SimpleNamespace(variant="inconsistent", level="unknown", plausible=False)] * 10
    real_reports = [{"variant": "normal", "level": "abdomen", "plausible": True}] * 60
    out = D.anatomy_measures(real, fake, 3, real_reports, reports)
    json.dumps(out, allow_nan=False)
    assert out["n_real"] == 60 and out["n_sample"] == 40
    assert out["presence"]["rate_sample"] == pytest.approx([1.0, 0.75]) and out["presence"]["tv"] == 0.25
    assert out["w1"]["cv"]["per_class"][0] == pytest.approx(2 * 3.0 / 31, abs=0.05)  # 3 px down
    assert out["w1"]["cv"]["summary"] > out["w1"]["cu"]["summary"]
    assert 0.0 <= out["prdc"]["precision"] <= 1.0 and out["prdc"]["coverage"] < 0.9
    assert out["variants"]["variants"]["normal"]["ratio"] == 0.75 and out["levels"]["known_share"] == 0.75
    assert out["levels"]["tv"] == 0.25
    bare = D.anatomy_measures(real[:3], fake[:3], 3)
    assert bare["prdc"] is None and "variants" not in bare and bare["w1"]["area"]["summary"] is None


def test_presence_distance_same_bits_in_every_process():
    """The pattern distance sums over patterns in a fixed order, so two processes (different string hashing)
    report the same bits: a benchmark re-run with the same seeds gives the same numbers."""
    import os
    import subprocess
    import sys

    code = ("import numpy as np; from ldm.evaluation import descriptors as D; r = np.random.default_rng(3); "
            "a = r.random((400, 9)) < 0.4; b = r.random((300, 9)) < 0.3; d = D.presence_distance(a, b); "
            "print(d['tv'].hex(), d['js'].hex())")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = set()
    for seed in ("1", "2", "3", "4"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": root}
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout)
    assert len(outs) == 1
    tv, js = (float.fromhex(x) for x in outs.pop().split())
    assert 0.0 < js <= 1.0 and 0.0 < tv <= 1.0
