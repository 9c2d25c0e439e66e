"""Phantom generator, anatomy checker and colourise."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ldm.data.labels import CTORGAN_COLOURS, IGNORE_COLOUR, INVALID_COLOUR, colourise
from ldm.data.phantom import (CTORGAN_CLASSES, PhantomDataset, anatomy_plausibility, check_phantom_anatomy,
                              write_phantom_2d, write_phantom_nifti)
from ldm.data.phantom_render import phantom_slice, sample_patient

LIVER, BLADDER, LUNGS, KIDNEYS, BONE = 1, 2, 3, 4, 5


def _slice(z: float, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return phantom_slice(sample_patient(rng), z, size, rng)


def test_contract_and_collate():
    ds = PhantomDataset(size=32, num_samples=16, seed=0)
    ex = ds[3]
    assert ex["image"].shape == (32, 32, 1) and ex["image"].dtype == np.float32
    assert ex["segmentation"].shape == (32, 32) and ex["segmentation"].dtype == np.int64
    assert -1.0 <= ex["image"].min() and ex["image"].max() <= 1.0
    assert ex["has_segmentation"] is True and ex["relative_file_path_"].startswith("train/")
    assert set(np.unique(ex["segmentation"])) <= set(range(6))
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 32, 32, 1) and batch["segmentation"].dtype == torch.int64
    assert batch["has_segmentation"].tolist() == [True] * 4


def test_deterministic_per_seed_and_split():
    a, b = PhantomDataset(32, 8, seed=5, split="train"), PhantomDataset(32, 8, seed=5, split="train")
    for i in range(8):
        np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
        np.testing.assert_array_equal(a[i]["segmentation"], b[i]["segmentation"])
    other_split = PhantomDataset(32, 8, seed=5, split="validation")
    other_seed = PhantomDataset(32, 8, seed=6, split="train")
    assert a.patients[0].body_a != other_split.patients[0].body_a
    assert not np.array_equal(a[0]["image"], other_split[0]["image"])
    assert not np.array_equal(a[0]["image"], other_seed[0]["image"])
    assert PhantomDataset(32, 8, seed=5, split="val").patients[0].body_a == other_split.patients[0].body_a


def test_cheap_to_build():
    start = time.perf_counter()
    PhantomDataset(size=32, num_samples=64)
    assert time.perf_counter() - start < 5.0  # about 0.5 s on one idle core


def test_lazy_rendering_matches_cached():
    ds = PhantomDataset(size=32, num_samples=4, seed=1)
    ds_lazy = PhantomDataset(size=32, num_samples=4, seed=1)
    ds_lazy._cache = None
    np.testing.assert_array_equal(ds[2]["image"], ds_lazy[2]["image"])


@pytest.mark.parametrize("bad", [dict(num_samples=0), dict(split="dev"), dict(z_range=(0.5, 0.2)),
                                 dict(num_patients=0)])
def test_bad_params(bad):
    with pytest.raises(ValueError, match="|".join(bad)):
        PhantomDataset(**bad)


def test_organs_follow_slice_height():
    _, low = _slice(0.08)
    _, mid = _slice(0.48)
    _, high = _slice(0.93)
    assert (low == BLADDER).any() and not (low == LUNGS).any() and not (low == LIVER).any()
    assert (mid == KIDNEYS).any() and (mid == LIVER).any() and not (mid == BLADDER).any()
    assert (high == LUNGS).any() and not (high == BLADDER).any() and not (high == KIDNEYS).any()
    for m in (low, mid, high):
        assert (m == BONE).any()
    liver_cols = np.nonzero(mid == LIVER)[1]
    assert liver_cols.mean() < 32  # patient's right = image left
    report = check_phantom_anatomy(mid)
    assert report.counts["kidneys"] == 2 and report.plausible


def test_hu_intensities():
    hu, labels = _slice(0.93, size=64)
    assert np.median(hu[labels == LUNGS]) < -700
    assert np.median(hu[labels == BONE]) > 300
    assert hu[0, 0] < -900  # air outside the body
    hu, labels = _slice(0.5, size=64)
    assert 20 < np.median(hu[labels == LIVER]) < 160


@pytest.mark.parametrize("size", [32, 64, 256])
def test_checker_accepts_phantom(size):
    n = 12 if size == 256 else 64
    ds = PhantomDataset(size=size, num_samples=n, seed=2, split="test")
    reports = [check_phantom_anatomy(ds[i]["segmentation"]) for i in range(n)]
    assert all(r.plausible for r in reports), [r.failed() for r in reports if not r.plausible]


def test_checker_tolerates_prediction_noise():
    ds = PhantomDataset(size=64, num_samples=64, seed=3)
    rng = np.random.default_rng(0)
    ok = 0
    for i in range(len(ds)):
        m = ds[i]["segmentation"].copy()
        flip = rng.uniform(size=m.shape) < 0.01
        m[flip] = rng.integers(0, 6, size=int(flip.sum()))
        ok += check_phantom_anatomy(torch.from_numpy(m)).plausible
    assert ok >= 62


def test_checker_rejects_corruptions():
    _, mid = _slice(0.45)
    _, high = _slice(0.93)
    _, low = _slice(0.08)
    assert check_phantom_anatomy(mid).plausible and check_phantom_anatomy(high).plausible
    assert check_phantom_anatomy(low).plausible
    assert check_phantom_anatomy(mid[:, ::-1]).failed() == ["liver_on_right"]
    extra = mid.copy()
    extra[14:20, 40:46] = KIDNEYS  # a third kidney in the anterior abdomen
    assert not check_phantom_anatomy(extra).kidney_count_ok
    assert not check_phantom_anatomy(extra).plausible
    kidney_front = mid.copy()
    kidney_front[mid == KIDNEYS] = 0
    kidney_front[16:24, 40:46] = KIDNEYS
    assert check_phantom_anatomy(kidney_front).failed() == ["kidneys_beside_spine"]
    lung_bladder = high.copy()
    lung_bladder[20:26, 29:35] = BLADDER
    assert "co_occurrence_ok" in check_phantom_anatomy(lung_bladder).failed()
    lung_mid = high.copy()
    lung_mid[24:30, 30:34] = LUNGS  # a lung in the mediastinum
    assert check_phantom_anatomy(lung_mid).failed() == ["lungs_ok"]
    no_bone = low.copy()
    no_bone[no_bone == BONE] = 0
    assert "spine_present" in check_phantom_anatomy(no_bone).failed()
    border = mid.copy()
    border[0:4, 0:4] = LIVER
    assert not check_phantom_anatomy(border).inside_field
    bad_ids = mid.copy()
    bad_ids[30, 30] = 9
    assert not check_phantom_anatomy(bad_ids).valid_labels
    rng = np.random.default_rng(0)
    assert not any(check_phantom_anatomy(rng.integers(0, 6, size=(32, 32))).plausible for _ in range(10))


def test_checker_input_checks_and_batch_metric():
    with pytest.raises(ValueError, match="H x W"):
        check_phantom_anatomy(np.zeros((2, 3, 8, 8)))
    with pytest.raises(ValueError, match="B x H x W"):
        anatomy_plausibility(np.zeros((8, 8)))
    ds = PhantomDataset(size=32, num_samples=8, seed=4)
    batch = torch.stack([torch.from_numpy(ds[i]["segmentation"]) for i in range(8)])
    scores = anatomy_plausibility(batch)
    assert scores["plausible"] == 1.0 and scores["kidney_count_ok"] == 1.0
    flipped = anatomy_plausibility(batch.flip(-1)[:, None])
    assert flipped["liver_on_right"] < 1.0
    assert check_phantom_anatomy(batch[0][None]).as_dict()["plausible"] is True


def test_colourise():
    assert CTORGAN_CLASSES[4] == "kidneys" and len(CTORGAN_COLOURS) == 6
    mask = np.array([[0, 1, 4], [5, 255, 9]])
    rgb = colourise(torch.from_numpy(mask))
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 1]) == CTORGAN_COLOURS[1] and tuple(rgb[1, 0]) == CTORGAN_COLOURS[5]
    assert tuple(rgb[1, 1]) == IGNORE_COLOUR and tuple(rgb[1, 2]) == INVALID_COLOUR
    assert colourise(np.zeros((2, 4, 4), dtype=np.float32)).shape == (2, 4, 4, 3)
    with pytest.raises(ValueError, match="integer class ids"):
        colourise(np.full((2, 2), 0.5))


def test_writers_match_dataset_layouts(tmp_path):
    from ldm.data.medical_images import CTOrganTrain, CTOrganValidation

    patients = {"train": 2, "validation": 1, "test": 0}
    ids = write_phantom_2d(tmp_path / "png", size=32, slices_per_patient=4, patients=patients, seed=1)
    write_phantom_nifti(tmp_path / "nii", size=32, slices_per_patient=4, patients=patients, seed=1)
    assert len(ids["train"]) == 2 and (tmp_path / "png" / "split.json").is_file()
    png = CTOrganTrain(data_root=tmp_path / "png", size=32)
    nii = CTOrganTrain(data_root=tmp_path / "nii", size=32)
    assert len(png) == len(nii) == 8 and len(CTOrganValidation(data_root=tmp_path / "nii", size=32)) == 4
    for i in (0, 5):
        np.testing.assert_array_equal(png[i]["segmentation"], nii[i]["segmentation"])
        assert np.abs(png[i]["image"] - nii[i]["image"]).max() < 0.01  # 8-bit rounding only
    with pytest.raises(ValueError, match="layout"):
        write_phantom_nifti(tmp_path / "x", layout="flat")
