"""MedicalImagesBase and the CT-Organ / breast MRI classes on files written into tmp_path."""
from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data.medical_images import (BreastMRITest, BreastMRITrain, CTOrganTrain, CTOrganValidation,
                                     MedicalImagesBase)


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _nii(path: Path, arr: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))
    return path


def _pair_2d(root: Path, rel: str, image: np.ndarray, mask: np.ndarray | None) -> None:
    _png(root / "images" / rel, image)
    if mask is not None:
        _png(root / "masks" / rel, mask.astype(np.uint8))


# ----------------------------------------------------------------------------------------------- 2D layout
def test_png_round_trip(tmp_path):
    img = np.arange(256, dtype=np.uint8).reshape(16, 16)
    mask = (np.arange(256).reshape(16, 16) % 3).astype(np.uint8)
    _pair_2d(tmp_path, "p1/a.png", img, mask)
    _pair_2d(tmp_path, "p2/b.png", img[::-1].copy(), mask[::-1].copy())
    ds = MedicalImagesBase(tmp_path / "images", tmp_path / "masks", size=None, n_labels=3)
    assert len(ds) == 2
    ex = ds[0]
    assert ex["relative_file_path_"] == "p1/a.png" and ex["slice_index"] == -1 and ex["has_segmentation"]
    assert ex["image"].shape == (16, 16, 1) and ex["image"].dtype == np.float32
    np.testing.assert_allclose(ex["image"][..., 0], img / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(ex["segmentation"], mask)
    assert ex["image"].min() == -1.0 and ex["image"].max() == 1.0
    assert ex["file_path_"].endswith("a.png")


def test_npy_image_and_mask_with_other_extension(tmp_path):
    hu = np.array([[-1000.0, -160.0], [40.0, 240.0]], dtype=np.float32)
    (tmp_path / "img").mkdir()
    (tmp_path / "seg").mkdir()
    np.save(tmp_path / "img" / "s.npy", hu)
    _png(tmp_path / "seg" / "s.png", np.array([[0, 1], [2, 1]], dtype=np.uint8))
    ds = MedicalImagesBase(tmp_path / "img", tmp_path / "seg", size=None, intensity="ct", window=(40, 400))
    np.testing.assert_allclose(ds[0]["image"][..., 0], [[-1.0, -1.0], [0.0, 1.0]], atol=1e-6)
    np.testing.assert_array_equal(ds[0]["segmentation"], [[0, 1], [2, 1]])


def test_resize_bicubic_and_nearest_mask(tmp_path):
    img = np.tile(np.linspace(0, 255, 8).astype(np.uint8), (8, 1))
    mask = np.kron(np.array([[0, 1], [2, 3]]), np.ones((4, 4))).astype(np.uint8)
    _pair_2d(tmp_path, "x.png", img, mask)
    up = MedicalImagesBase(tmp_path / "images", tmp_path / "masks", size=16, n_labels=4)[0]
    np.testing.assert_array_equal(up["segmentation"], np.kron(np.array([[0, 1], [2, 3]]), np.ones((8, 8))))
    assert up["image"].shape == (16, 16, 1) and -1.0 <= up["image"].min() and up["image"].max() <= 1.0
    row = up["image"][0, :, 0]
    assert np.all(np.diff(row) >= -1e-3) and row[0] < -0.9 and row[-1] > 0.9  # a monotone ramp stays one
    down = MedicalImagesBase(tmp_path / "images", tmp_path / "masks", size=4, interpolation="bilinear")[0]
    np.testing.assert_array_equal(down["segmentation"], np.kron(np.array([[0, 1], [2, 3]]), np.ones((2, 2))))


def test_non_square_pad_and_crop(tmp_path):
    img = np.full((4, 8), 255, dtype=np.uint8)
    _pair_2d(tmp_path, "r.png", img, np.ones((4, 8), dtype=np.uint8))
    pad = MedicalImagesBase(tmp_path / "images", tmp_path / "masks", size=8, interpolation="nearest")[0]
    assert pad["image"][0, 0, 0] == -1.0 and pad["image"][4, 4, 0] == 1.0
    assert pad["segmentation"][0].tolist() == [0] * 8 and pad["segmentation"][3].tolist() == [1] * 8
    crop = MedicalImagesBase(tmp_path / "images", tmp_path / "masks", size=8, square="crop")[0]
    assert np.all(crop["segmentation"] == 1) and np.allclose(crop["image"], 1.0)


def test_flip(tmp_path):
    img = np.zeros((4, 4), dtype=np.uint8)
    img[:, 0] = 255
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[:, 0] = 1
    _pair_2d(tmp_path, "f.png", img, mask)
    ex = MedicalImagesBase(tmp_path / "images", tmp_path / "masks", size=None, flip_p=1.0)[0]
    assert ex["image"][0, 3, 0] == 1.0 and ex["segmentation"][0, 3] == 1 and ex["segmentation"][0, 0] == 0


def test_missing_masks_warn_once_and_collate(tmp_path, caplog):
    img = np.full((8, 8), 100, dtype=np.uint8)
    _pair_2d(tmp_path, "a.png", img, np.ones((8, 8)))
    _pair_2d(tmp_path, "b.png", img, None)
    _pair_2d(tmp_path, "c.png", img, None)
    with caplog.at_level(logging.WARNING, logger="ldm.data.medical_images"):
        ds = MedicalImagesBase(tmp_path / "images", tmp_path / "masks", size=8, n_labels=2)
        _ = [ds[i] for i in range(3)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 3" in warnings[0].getMessage()
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["has_segmentation"].tolist() == [True, False, False]
    assert batch["segmentation"].dtype == torch.int64 and int(batch["segmentation"][1].unique()) == 255
    assert batch["image"].shape == (3, 8, 8, 1)
    no_masks = MedicalImagesBase(tmp_path / "images", None, size=8)
    assert not any(no_masks[i]["has_segmentation"] for i in range(3))


def test_label_map(tmp_path):
    mask = np.array([[0, 6], [3, 7]], dtype=np.uint8)
    _pair_2d(tmp_path, "m.png", np.zeros((2, 2), np.uint8), mask)
    ds = MedicalImagesBase(tmp_path / "images", tmp_path / "masks", size=None, n_labels=4,
                           label_map={"6": 0, 7: 2})
    np.testing.assert_array_equal(ds[0]["segmentation"], [[0, 0], [3, 2]])


# ------------------------------------------------------------------------------------------ errors (2D)
def test_label_out_of_range_names_file(tmp_path):
    _pair_2d(tmp_path, "bad.png", np.zeros((4, 4), np.uint8), np.full((4, 4), 7, np.uint8))
    ds = MedicalImagesBase(tmp_path / "images", tmp_path / "masks", size=None, n_labels=6)
    with pytest.raises(ValueError, match=r"masks/bad\.png.*\[7\].*n_labels=6"):
        ds[0]


def test_truncated_png_names_file(tmp_path):
    path = _png(tmp_path / "images" / "t.png", np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:200])
    ds = MedicalImagesBase(tmp_path / "images", None, size=None)
    with pytest.raises(ValueError, match=r"cannot read image .*t\.png"):
        ds[0]


def test_mask_size_mismatch_names_both(tmp_path):
    _pair_2d(tmp_path, "s.png", np.zeros((8, 8), np.uint8), np.zeros((4, 4), np.uint8))
    ds = MedicalImagesBase(tmp_path / "images", tmp_path / "masks", size=8)
    with pytest.raises(ValueError, match=r"masks/s\.png.*\(4, 4\).*images/s\.png.*\(8, 8\)"):
        ds[0]


def test_uint8_range_and_colour_mask_and_float_mask(tmp_path):
    _png(tmp_path / "a" / "w.png", np.full((4, 4), 4000, dtype=np.uint16))
    with pytest.raises(ValueError, match=r"w\.png.*0\.\.255.*minmax"):
        MedicalImagesBase(tmp_path / "a", None, size=None)[0]
    assert MedicalImagesBase(tmp_path / "a", None, size=None, intensity="minmax")[0]["image"].max() == -1.0
    _png(tmp_path / "b" / "images" / "c.png", np.zeros((4, 4), np.uint8))
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    _png(tmp_path / "b" / "masks" / "c.png", colour)
    with pytest.raises(ValueError, match=r"masks/c\.png is a colour image"):
        MedicalImagesBase(tmp_path / "b" / "images", tmp_path / "b" / "masks", size=None)[0]
    (tmp_path / "c" / "images").mkdir(parents=True)
    (tmp_path / "c" / "masks").mkdir(parents=True)
    np.save(tmp_path / "c" / "images" / "f.npy", np.zeros((2, 2), np.uint8))
    np.save(tmp_path / "c" / "masks" / "f.npy", np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match=r"masks/f\.npy holds non-integer"):
        MedicalImagesBase(tmp_path / "c" / "images", tmp_path / "c" / "masks", size=None)[0]
    np.save(tmp_path / "c" / "images" / "f.npy", np.zeros((2, 2, 2, 2)))
    with pytest.raises(ValueError, match=r"images/f\.npy has shape"):
        MedicalImagesBase(tmp_path / "c" / "images", None, size=None)[0]


def test_empty_and_missing_roots(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"data_root .*empty holds no images"):
        MedicalImagesBase(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"data_root .*nowhere"):
        MedicalImagesBase(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"segmentation_root .*nomasks"):
        MedicalImagesBase(tmp_path / "empty", tmp_path / "nomasks")


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_labels=6, ignore_index=3), "ignore_index"), (dict(intensity="hu"), "intensity"),
    (dict(intensity="ct", window=(40, 0)), "window"), (dict(percentiles=(99, 1)), "percentiles"),
    (dict(interpolation="cubic"), "interpolation"), (dict(slice_axis=3), "slice_axis"),
    (dict(square="stretch"), "square"), (dict(flip_p=2.0), "flip_p"), (dict(size=0), "size"),
    (dict(n_labels=0), "n_labels")])
def test_bad_params(tmp_path, kwargs, match):
    _png(tmp_path / "i.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match=match):
        MedicalImagesBase(tmp_path, **kwargs)


# -------------------------------------------------------------------------------------------- NIfTI
def _ras_volume() -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric HU volume (X=6, Y=5, Z=4) and a label volume marking its bright voxels."""
    hu = np.full((6, 5, 4), -1000.0, dtype=np.float32)
    hu[0:2, 3:5, :] = 240.0  # RAS+: low x = patient's left, high y = anterior
    hu[4, 0, 1:3] = 40.0
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[hu == 240.0] = 1
    labels[hu == 40.0] = 2
    return hu, labels


def test_nifti_slices_ct_window_and_display_orientation(tmp_path):
    hu, labels = _ras_volume()
    _nii(tmp_path / "img" / "volume-0.nii.gz", hu.astype(np.int16))
    _nii(tmp_path / "seg" / "volume-0.nii.gz", labels)
    ds = MedicalImagesBase(tmp_path / "img", tmp_path / "seg", size=None, n_labels=3, intensity="ct",
                           window=(40, 400))
    assert len(ds) == 4 and [ds[i]["slice_index"] for i in range(4)] == [0, 1, 2, 3]
    ex = ds[1]
    img, seg = ex["image"][..., 0], ex["segmentation"]
    assert img.shape == (5, 6)  # rows = Y (anterior on top), cols = X (patient's right on the left)
    np.testing.assert_array_equal(seg, labels[:, :, 1].T[::-1, ::-1])
    assert seg[0, 5] == 1 and seg[4, 1] == 2  # anterior on top, patient's left (low x) on the image's right
    np.testing.assert_allclose(img[seg == 1], 1.0)
    np.testing.assert_allclose(img[seg == 2], 0.0)
    np.testing.assert_allclose(img[seg == 0], -1.0)


def test_nifti_reoriented_label_volume_stays_aligned(tmp_path):
    hu, labels = _ras_volume()
    ras = np.diag([0.8, 0.8, 2.0, 1.0])
    _nii(tmp_path / "img" / "volume-1.nii.gz", hu.astype(np.int16), ras)
    # Same voxels stored LPS (x and y flipped) and with axes 0/1 swapped: an equivalent affine.
    lps = labels[::-1, ::-1, :].transpose(1, 0, 2)
    aff = np.zeros((4, 4))
    aff[0, 1], aff[1, 0], aff[2, 2], aff[3, 3] = -0.8, -0.8, 2.0, 1.0
    aff[:3, 3] = [0.8 * 5, 0.8 * 4, 0.0]
    _nii(tmp_path / "seg" / "volume-1.nii.gz", np.ascontiguousarray(lps), aff)
    ds = MedicalImagesBase(tmp_path / "img", tmp_path / "seg", size=None, n_labels=3, intensity="ct")
    for k in range(4):
        ex = ds[k]
        np.testing.assert_array_equal(ex["segmentation"], labels[:, :, k].T[::-1, ::-1])
        assert np.all(ex["image"][..., 0][ex["segmentation"] == 1] == 1.0)


def test_nifti_shape_and_affine_mismatch_name_both_files(tmp_path):
    hu, labels = _ras_volume()
    _nii(tmp_path / "img" / "volume-2.nii.gz", hu)
    _nii(tmp_path / "seg" / "volume-2.nii.gz", labels[:, :, :3])
    with pytest.raises(ValueError, match=r"img/volume-2\.nii\.gz has shape \(6, 5, 4\).*seg/volume-2\.nii\.gz"):
        MedicalImagesBase(tmp_path / "img", tmp_path / "seg")
    _nii(tmp_path / "seg" / "volume-2.nii.gz", labels, np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"img/volume-2\.nii\.gz and label volume .*seg/volume-2\.nii\.gz"):
        MedicalImagesBase(tmp_path / "img", tmp_path / "seg")
    assert len(MedicalImagesBase(tmp_path / "img", tmp_path / "seg", check_affine=False)) == 4


def test_nifti_bad_labels_truncated_and_4d(tmp_path):
    hu, labels = _ras_volume()
    _nii(tmp_path / "img" / "volume-3.nii.gz", hu)
    _nii(tmp_path / "seg" / "volume-3.nii.gz", (labels * 4).astype(np.uint8))
    ds = MedicalImagesBase(tmp_path / "img", tmp_path / "seg", size=None, n_labels=6)
    with pytest.raises(ValueError, match=r"seg/volume-3\.nii\.gz slice 1 holds label values \[8\]"):
        ds[1]
    _nii(tmp_path / "seg" / "volume-3.nii.gz", labels.astype(np.float32) + 0.5)
    with pytest.raises(ValueError, match=r"seg/volume-3\.nii\.gz holds non-integer"):
        MedicalImagesBase(tmp_path / "img", tmp_path / "seg", size=None)[0]
    path = _nii(tmp_path / "img" / "volume-3.nii.gz",
                np.random.default_rng(0).integers(-1000, 1000, (32, 32, 8)).astype(np.int16))
    path.write_bytes(path.read_bytes()[:-2000])
    ds = MedicalImagesBase(tmp_path / "img", None, size=None)
    with pytest.raises(ValueError, match=r"cannot read voxel data of .*img/volume-3\.nii\.gz"):
        ds[0]
    path.write_bytes(b"not a nifti file")
    with pytest.raises(ValueError, match=r"cannot read NIfTI header of .*volume-3\.nii\.gz"):
        MedicalImagesBase(tmp_path / "img", None)
    _nii(path, np.zeros((4, 4, 3, 2), np.int16))
    with pytest.raises(ValueError, match=r"volume-3\.nii\.gz has shape \(4, 4, 3, 2\)"):
        MedicalImagesBase(tmp_path / "img", None)
    _nii(path, np.zeros((4, 4, 3, 1), np.int16))
    assert len(MedicalImagesBase(tmp_path / "img", None)) == 3


def test_nifti_mr_percentiles_minmax_and_skip_empty(tmp_path):
    vol = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    labels = np.zeros(vol.shape, np.uint8)
    labels[:, :, 7] = 1
    _nii(tmp_path / "img" / "mr.nii", vol)
    _nii(tmp_path / "seg" / "mr.nii", labels)
    lo, hi = np.percentile(vol, [0.5, 99.5])
    ds = MedicalImagesBase(tmp_path / "img", tmp_path / "seg", size=None, intensity="mr")
    raw = vol[:, :, 3].T[::-1, ::-1]
    np.testing.assert_allclose(ds[3]["image"][..., 0], np.clip((raw - lo) / (hi - lo) * 2 - 1, -1, 1), atol=1e-5)
    mm = MedicalImagesBase(tmp_path / "img", None, size=None, intensity="minmax")
    np.testing.assert_allclose(mm[3]["image"][..., 0], raw / 999.0 * 2 - 1, atol=1e-5)
    skip = MedicalImagesBase(tmp_path / "img", tmp_path / "seg", size=None, skip_empty_slices=True)
    assert len(skip) == 1 and skip[0]["slice_index"] == 7
    with pytest.raises(ValueError, match="no slices left"):
        MedicalImagesBase(tmp_path / "img", None, skip_empty_slices=True)


def test_ctorg_raw_names_in_one_folder(tmp_path):
    hu, labels = _ras_volume()
    _nii(tmp_path / "volume-7.nii.gz", hu)
    _nii(tmp_path / "labels-7.nii.gz", labels)
    ds = MedicalImagesBase(tmp_path, tmp_path, size=None, n_labels=3, intensity="ct")
    assert len(ds) == 4 and {e.relative for e in ds.examples} == {"volume-7.nii.gz"}
    assert ds[1]["has_segmentation"] and ds[1]["segmentation"].max() == 2


# ------------------------------------------------------------------------------------ named data sets
def _split_layout(root: Path, split: str, mask_value: int = 1) -> None:
    _pair_2d(root / split, "p/0.png", np.zeros((8, 8), np.uint8), np.full((8, 8), mask_value, np.uint8))


def test_ctorgan_root_from_env_and_brain_mapping(tmp_path, monkeypatch):
    _split_layout(tmp_path, "train", mask_value=6)
    _split_layout(tmp_path, "validation", mask_value=5)
    monkeypatch.setenv("CTORG_ROOT", str(tmp_path))
    train = CTOrganTrain(size=16)
    assert train.n_labels == 6 and int(train[0]["segmentation"].max()) == 0  # brain -> background
    assert int(CTOrganTrain(size=16, label_map={6: 5})[0]["segmentation"].max()) == 5
    assert int(CTOrganValidation(size=16)[0]["segmentation"].max()) == 5
    _split_layout(tmp_path / "other", "train", mask_value=7)
    with pytest.raises(ValueError, match=r"masks/p/0\.png .*\[7\]"):
        CTOrganTrain(data_root=tmp_path / "other", size=16)[0]


def test_named_datasets_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("CTORG_ROOT", raising=False)
    monkeypatch.delenv("BREASTMRI_ROOT", raising=False)
    with pytest.raises(ValueError, match="CTORG_ROOT"):
        CTOrganTrain()
    with pytest.raises(ValueError, match="BREASTMRI_ROOT"):
        BreastMRITrain()
    with pytest.raises(FileNotFoundError, match=r"test/images"):
        BreastMRITest(data_root=tmp_path)


def test_breast_mri(tmp_path, monkeypatch):
    _split_layout(tmp_path, "train", mask_value=3)
    monkeypatch.setenv("BREASTMRI_ROOT", str(tmp_path))
    ds = BreastMRITrain(size=8)
    assert ds.n_labels == 4 and int(ds[0]["segmentation"].max()) == 3
    _split_layout(tmp_path / "b", "train", mask_value=4)
    with pytest.raises(ValueError, match=r"n_labels=4"):
        BreastMRITrain(data_root=tmp_path / "b", size=8)[0]


# ------------------------------------------------------------------------------ helpers' own input checks
def test_io_and_intensity_helper_errors(tmp_path):
    from ldm.data import intensity, io
    from ldm.data.phantom_render import phantom_slice, sample_patient

    _pair_2d(tmp_path, "gone.png", np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8))
    ds = MedicalImagesBase(tmp_path / "images", tmp_path / "masks", size=None)
    (tmp_path / "masks" / "gone.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"mask file not found: .*masks/gone\.png"):
        ds[0]
    np.save(tmp_path / "m3.npy", np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match=r"m3\.npy has shape"):
        io.read_mask_2d(tmp_path / "m3.npy")
    with pytest.raises(FileNotFoundError, match=r"absent\.nii\.gz"):
        io.nifti_info(tmp_path / "absent.nii.gz")
    with pytest.raises(ValueError, match="width must be positive"):
        intensity.window_ct(np.zeros(2), 40, 0)
    with pytest.raises(ValueError, match="percentiles"):
        intensity.scale_percentiles(np.zeros(2), 50, 10)
    with pytest.raises(ValueError, match="interpolation"):
        intensity.resize_image(np.zeros((2, 2)), 4, "cubic")
    with pytest.raises(ValueError, match="at least 8 pixels"):
        rng = np.random.default_rng(0)
        phantom_slice(sample_patient(rng), 0.5, 4, rng)
    np.testing.assert_allclose(intensity.scale_linear(np.array([1.0, 2.0]), 3.0, 3.0), [-1.0, -1.0])
