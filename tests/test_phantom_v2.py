"""Phantom v2 (ldm/data/phantom_v2.py, phantom_v2_render.py) and its variant-aware checker (anatomy_check_v2.py)."""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch.utils.data import DataLoader

from ldm.data.anatomy_check_v2 import (AORTA, BLADDER, KIDNEY, LEVEL_REQUIRED, LEVELS, LIVER, RULES_V2, THRESHOLDS,
                                       VERTEBRA)
from ldm.data.labels import LABEL_SETS, PHANTOM2, get_label_set, get_rule_checker
from ldm.data.phantom_render import phantom_slice, sample_patient
from ldm.data.phantom_v2 import (CORRUPTION_RULES, CORRUPTIONS, NUM_CLASSES_V2, PHANTOM_V2_CLASSES, VARIANTS,
                                 PhantomV2Dataset, check_anatomy_v2, corrupt_slice, corrupted_arrays, corruption_z,
                                 patient_variants, patients_v2, phantom_v2_arrays, render_slice_v2,
                                 sample_patient_v2, shows_variant)

MIN_SIZES = (0.001, 0.004)
EIGHT = np.ones((3, 3), dtype=bool)


@pytest.fixture(scope="module")
def test_split():
    start = time.perf_counter()
    data = phantom_v2_arrays(64, 400, seed=0, split="test")
    data["seconds"] = time.perf_counter() - start
    data["patients"] = patients_v2(0, "test", 200)
    return data


def _forced(variant: str, index: int):
    return sample_patient_v2(np.random.default_rng([77, index]), variant)


def _components(mask: np.ndarray, label: int) -> list[np.ndarray]:
    lab, n = ndimage.label(mask == label, structure=EIGHT)
    return [lab == i for i in range(1, n + 1) if (lab == i).sum() >= 5]


def test_labels_and_registry():
    assert PHANTOM_V2_CLASSES == ("background", "liver", "spleen", "kidney", "bladder", "lungs", "aorta",
                                  "vertebra", "ribs", "pelvis") and NUM_CLASSES_V2 == 10
    assert "phantom2" in LABEL_SETS and get_label_set("phantom2") is PHANTOM2 and PHANTOM2.num_classes == 10
    assert get_rule_checker("phantom2") is check_anatomy_v2 and PHANTOM2.load_rule_checker() is check_anatomy_v2
    assert abs(sum(VARIANTS.values()) - 1.0) < 1e-9 and VARIANTS["situs_inversus"] == 0.03
    with pytest.raises(dataclasses.FrozenInstanceError):
        THRESHOLDS.max_fragments = 99


def test_contract_and_collate():
    ds = PhantomV2Dataset(size=32, num_samples=8, seed=0)
    ex = ds[3]
    assert ex["image"].shape == (32, 32, 1) and ex["image"].dtype == np.float32
    assert -1.0 <= ex["image"].min() and ex["image"].max() <= 1.0
    assert ex["segmentation"].shape == (32, 32) and ex["segmentation"].dtype == np.int64
    assert set(np.unique(ex["segmentation"])) <= set(range(10))
    assert ex["has_segmentation"] is True and ex["relative_file_path_"].startswith("train/")
    assert ex["variant"] in VARIANTS and isinstance(ex["z"], float) and ex["slice_index"] == 3
    assert len(ds.patients) == 4  # two slices per patient by default
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 32, 32, 1) and batch["segmentation"].dtype == torch.int64
    assert len(batch["variant"]) == 4
    for bad in (dict(num_samples=0), dict(split="dev"), dict(z_range=(0.5, 0.2)), dict(slices_per_patient=0)):
        with pytest.raises(ValueError):
            PhantomV2Dataset(size=16, **bad)


def test_deterministic_splits_differ_and_arrays_match_dataset():
    a = phantom_v2_arrays(32, 6, seed=4, split="train")
    b = phantom_v2_arrays(32, 6, seed=4, split="train")
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["segmentation"], b["segmentation"])
    assert a["image"].shape == (6, 1, 32, 32) and a["image"].dtype == torch.float32
    assert a["segmentation"].dtype == torch.int64 and isinstance(a["z"], np.ndarray) and len(a["variant"]) == 6
    other = phantom_v2_arrays(32, 6, seed=4, split="validation")
    assert not torch.equal(a["image"], other["image"])
    assert not torch.equal(a["image"], phantom_v2_arrays(32, 6, seed=5, split="train")["image"])
    ds = PhantomV2Dataset(size=32, num_samples=6, seed=4, split="train")
    for i in range(6):
        np.testing.assert_array_equal(ds[i]["image"][..., 0], a["image"][i, 0].numpy())
        np.testing.assert_array_equal(ds[i]["segmentation"], a["segmentation"][i].numpy())
    p = ds.patients[0]
    np.testing.assert_array_equal(render_slice_v2(p, 0.6, 32)[0], render_slice_v2(p, 0.6, 32)[0])
    assert patients_v2(4, "val", 1)[0].seed == patients_v2(4, "validation", 1)[0].seed


def test_variant_prevalence():
    n = 20000
    drawn = patient_variants(0, "train", n)
    assert drawn[:40] == [p.variant for p in patients_v2(0, "train", 40)]
    for name, prob in VARIANTS.items():
        count = drawn.count(name)
        tol = 4.5 * math.sqrt(n * prob * (1 - prob))
        assert abs(count - n * prob) <= tol, (name, count, n * prob)


def test_variants_consistent_along_the_body_axis():
    p = _forced("situs_inversus", 0)
    ribs_z, chest_z = p.level_z[1], p.level_z[2]
    for z in np.linspace(ribs_z + 0.01, chest_z - 0.01, 6):
        _, lab = render_slice_v2(p, float(z), 64)
        liver_col = np.nonzero(lab == LIVER)[1].mean()
        spine_col = np.nonzero(lab == VERTEBRA)[1].mean()
        assert liver_col > spine_col + 5  # the liver on the image's right in every upper-abdomen slice
        assert np.nonzero(lab == AORTA)[1].mean() < spine_col
        assert check_anatomy_v2(lab).variant == "situs_inversus"
    h = _forced("horseshoe_kidney", 1)
    for z in np.linspace(h.kidney_z[0] + 0.01, h.horseshoe_z1 - 0.01, 4):
        _, lab = render_slice_v2(h, float(z), 64)
        comps = _components(lab, KIDNEY)
        spine_col = np.nonzero(lab == VERTEBRA)[1].mean()
        assert len(comps) == 1 and np.nonzero(comps[0])[1].min() < spine_col < np.nonzero(comps[0])[1].max()
        assert check_anatomy_v2(lab).variant == "horseshoe_kidney"
    _, above = render_slice_v2(h, h.horseshoe_z1 + 0.05, 64)
    assert len(_components(above, KIDNEY)) == 2
    for variant in ("single_kidney", "pelvic_kidney"):
        q = _forced(variant, 2)
        for z in np.linspace(q.kidney_z[0] + 0.05, q.kidney_z[1] - 0.05, 4):
            _, lab = render_slice_v2(q, float(z), 64)
            assert len(_components(lab, KIDNEY)) == 1
        lo, hi = q.pelvic_z
        _, low = render_slice_v2(q, 0.5 * (lo + hi), 64)
        assert (low == KIDNEY).any() == (variant == "pelvic_kidney")
        assert q.level(0.5 * (lo + hi)) == "pelvis"


def _body_angle(hu: np.ndarray) -> float:
    rows, cols = np.nonzero(hu > -500)
    du, dv = cols - cols.mean(), rows - rows.mean()
    return math.degrees(0.5 * math.atan2(2 * (du * dv).mean(), (du * du).mean() - (dv * dv).mean()))


def test_variation_is_larger_than_v1():
    v1_area, v1_angle, v2_area, v2_angle = [], [], [], []
    for i in range(80):
        rng = np.random.default_rng([3, i])
        hu, lab = phantom_slice(sample_patient(rng), 0.65, 64, rng)
        v1_area.append((lab == 1).sum())
        v1_angle.append(_body_angle(hu))
    for p in patients_v2(3, "test", 80):
        hu, lab = render_slice_v2(p, 0.65, 64)
        v2_area.append((lab == LIVER).sum())
        v2_angle.append(_body_angle(hu))
    cv1, cv2 = np.std(v1_area) / np.mean(v1_area), np.std(v2_area) / np.mean(v2_area)
    assert cv2 > 1.6 * cv1, (cv1, cv2)  # measured about 0.13 (v1) and 0.29 (v2)
    assert np.std(v1_angle) < 3.0 and np.std(v2_angle) > 6.0 and np.max(np.abs(v2_angle)) > 10.0


def test_body_inside_field_and_intensities(test_split):
    band = round(0.03 * 64)
    body = test_split["image"][:, 0] > -0.95
    assert not body[:, :band].any() and not body[:, -band:].any()
    assert not body[:, :, :band].any() and not body[:, :, -band:].any()
    for p in patients_v2(1, "train", 300):
        assert abs(p.hu["spleen"] - p.hu["liver"]) >= 10.0  # an image segmenter can tell them apart
        assert p.hu["aorta"] - p.hu["fat"] >= 100.0  # the aorta shows in its fat rim without contrast
        assert abs(math.degrees(p.rotation)) <= 15.0 and 0.7 <= p.scale["liver"] <= 1.3


def _specificity_cases(test_split):
    cases = [(test_split["patients"][k], float(z), m.numpy())
             for k, z, m in zip(test_split["patient"], test_split["z"], test_split["segmentation"])]
    for i in range(10):  # forced examples of every variant at the heights that show it
        for variant, zr in (("situs_inversus", lambda p: (p.level_z[1], p.level_z[2])),
                            ("horseshoe_kidney", lambda p: (p.kidney_z[0], p.horseshoe_z1)),
                            ("pelvic_kidney", lambda p: p.pelvic_z),
                            ("single_kidney", lambda p: p.kidney_z)):
            p = _forced(variant, 100 + i)
            lo, hi = zr(p)
            z = lo + (hi - lo) * (0.25 + 0.5 * i / 9)
            cases.append((p, z, render_slice_v2(p, z, 64)[1]))
    return cases


def test_specificity_true_masks_pass_and_variant_is_inferred(test_split):
    cases = _specificity_cases(test_split)
    assert len(cases) == 440 and {p.variant for p, _, _ in cases} == set(VARIANTS)
    level_hits = 0
    for p, z, mask in cases:
        expected = shows_variant(p, z)
        for mf in MIN_SIZES:
            r = check_anatomy_v2(mask, min_area_frac=mf)
            assert r.plausible, (p.variant, z, mf, r.failed())
            if expected is not None:
                assert r.variant == expected, (p.variant, z, mf, r.variant)
            level_hits += r.level == p.level(z)
    assert level_hits >= 0.99 * 2 * len(cases)


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_sensitivity_per_corruption(kind):
    data = corrupted_arrays(64, 100, kind, seed=1)
    assert data["segmentation"].shape == (100, 64, 64) and data["image"].min() >= -1.0
    for mf in MIN_SIZES:
        reports = [check_anatomy_v2(m, min_area_frac=mf) for m in data["segmentation"].numpy()]
        flagged = np.mean([not r.plausible for r in reports])
        by_rule = np.mean([any(not getattr(r, rule) for rule in CORRUPTION_RULES[kind]) for r in reports])
        assert flagged >= 0.95 and by_rule >= 0.9, (kind, mf, flagged, by_rule)


def test_corruption_is_consistent_in_image_and_mask():
    p = _forced("normal", 5)
    rng = np.random.default_rng(0)
    lo, hi = corruption_z(p, "speckle")[0]
    hu, lab = corrupt_slice(p, 0.5 * (lo + hi), 64, "speckle", rng)
    clean_hu, clean = render_slice_v2(p, 0.5 * (lo + hi), 64)
    specks = lab != clean
    assert 0.008 * 64 * 64 <= specks.sum() <= 0.021 * 64 * 64
    organ = PHANTOM_V2_CLASSES[int(np.bincount(lab[specks]).argmax())]
    assert abs(float(np.median(hu[specks])) - p.hu[organ]) < 3 * p.noise_hu + 20
    lo, hi = corruption_z(p, "organ_deleted")[0]
    _, deleted = corrupt_slice(p, lo + 0.3 * (hi - lo), 64, "organ_deleted", np.random.default_rng(1))
    assert not check_anatomy_v2(deleted).required_present
    with pytest.raises(ValueError, match="applies to this patient"):
        corrupt_slice(p, 0.05, 64, "organ_swap", rng)
    with pytest.raises(ValueError, match="unknown corruption"):
        corruption_z(p, "blur")


def test_checker_edge_cases(test_split):
    empty = check_anatomy_v2(np.zeros((64, 64), dtype=np.int64))
    assert not empty.plausible and not empty.spine_present and not empty.required_present
    assert empty.level == "unknown" and empty.variant == "unknown"
    assert set(empty.as_dict()) >= set(RULES_V2) | {"plausible", "variant", "level", "present", "counts"}
    k = next(i for i, lv in enumerate(test_split["level"]) if lv == "upper_abdomen"
             and test_split["variant"][i] == "normal")
    mask = test_split["segmentation"][k]
    assert check_anatomy_v2(mask).plausible and check_anatomy_v2(mask.float()[None]).plausible  # tensor, 1 x H x W
    flipped = check_anatomy_v2(mask.numpy()[:, ::-1])  # a whole-slice flip is the situs-inversus appearance
    assert flipped.plausible and flipped.variant == "situs_inversus"
    no_liver = mask.numpy().copy()
    no_liver[no_liver == LIVER] = 0  # absence is never a default pass
    r = check_anatomy_v2(no_liver)
    assert not r.required_present and "liver" in LEVEL_REQUIRED[r.level]
    chest = next(i for i, lv in enumerate(test_split["level"]) if lv == "chest")
    speck = test_split["segmentation"][chest].numpy().copy()
    speck[30, 5:8] = BLADDER  # one 3-pixel speck does not decide the co-occurrence
    assert all(check_anatomy_v2(speck, min_area_frac=mf).plausible for mf in MIN_SIZES)
    speck[28:34, 3:8] = BLADDER  # a bladder-sized blob with the lungs does
    assert not check_anatomy_v2(speck).co_occurrence_ok
    bad = mask.numpy().copy()
    bad[0, 0] = 12
    assert not check_anatomy_v2(bad).valid_labels
    assert set(LEVELS) == set(LEVEL_REQUIRED)
