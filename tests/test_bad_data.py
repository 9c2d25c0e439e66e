"""Bad data is named, not trained on: non-finite values, float ranges, symlinked folders, mixed sizes, damaged gzip."""
from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from ldm.data.medical_images import MedicalImagesBase


def _nii(path: Path, arr: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))
    return path


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


# ------------------------------------------------------------------------------------------ NaN / Inf
def _volume_with_nonfinite() -> np.ndarray:
    vol = np.linspace(-100.0, 300.0, 6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    vol[0, 0, 0] = np.nan
    vol[1, 2, 3] = np.nan
    vol[2, 1, 1] = np.inf
    return vol


@pytest.mark.parametrize("intensity", ["minmax", "mr", "ct"])
def test_nonfinite_voxels_name_the_file_and_count(tmp_path, intensity):
    _nii(tmp_path / "img" / "vol.nii.gz", _volume_with_nonfinite())
    ds = MedicalImagesBase(tmp_path / "img", None, size=None, intensity=intensity)
    with pytest.raises(ValueError, match=r"img/vol\.nii\.gz holds 3 non-finite voxels \(2 NaN, 1 Inf\) of 120.*"
                                         r"nonfinite: fill"):
        ds[1]  # slice 1 itself is finite: the whole volume is checked (it sets the minmax/mr range)


def test_nonfinite_fill_replaces_with_finite_extremes_and_warns_once(tmp_path, caplog):
    vol = _volume_with_nonfinite()
    _nii(tmp_path / "img" / "a.nii.gz", vol)
    _nii(tmp_path / "img" / "b.nii.gz", vol)
    ds = MedicalImagesBase(tmp_path / "img", None, size=None, intensity="minmax", nonfinite="fill")
    with caplog.at_level(logging.INFO, logger="ldm.data.medical_images"):
        images = [ds[i]["image"][..., 0] for i in range(len(ds))]
    assert all(np.all(np.isfinite(im)) for im in images)
    finite = vol[np.isfinite(vol)]
    lo, hi = float(finite.min()), float(finite.max())
    # slice 0 holds the NaN at canonical (0, 0): display pixel (H-1, W-1); minmax maps lo -> -1
    assert images[0][4, 5] == -1.0
    # slice 1 holds +Inf at (2, 1): display pixel (5-1-1, 6-1-2) = (3, 3) -> the file's maximum -> 1
    assert images[1][3, 3] == 1.0
    raw = vol[:, :, 2].T[::-1, ::-1]
    np.testing.assert_allclose(images[2], (raw - lo) / (hi - lo) * 2 - 1, atol=1e-5)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "non-finite" in r.getMessage()]
    infos = [r for r in caplog.records if r.levelno == logging.INFO and "non-finite" in r.getMessage()]
    assert len(warnings) == 1 and "a.nii.gz" in warnings[0].getMessage() and len(infos) == 1


def test_nonfinite_npy_pixels_and_all_nan_file(tmp_path):
    img = np.full((4, 4), 0.5, dtype=np.float32)
    img[1, 1] = np.nan
    (tmp_path / "a").mkdir()
    np.save(tmp_path / "a" / "s.npy", img)
    with pytest.raises(ValueError, match=r"a/s\.npy holds 1 non-finite pixels \(1 NaN, 0 Inf\) of 16"):
        MedicalImagesBase(tmp_path / "a", None, size=None, intensity="unit")[0]
    filled = MedicalImagesBase(tmp_path / "a", None, size=None, intensity="unit", nonfinite="fill")[0]["image"]
    np.testing.assert_allclose(filled[..., 0], np.zeros((4, 4)), atol=1e-6)  # NaN -> 0.5 -> 0.0
    np.save(tmp_path / "a" / "s.npy", np.full((4, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"16 non-finite pixels"):  # nothing finite to fill with
        MedicalImagesBase(tmp_path / "a", None, size=None, intensity="unit", nonfinite="fill")[0]
    with pytest.raises(ValueError, match="nonfinite"):
        MedicalImagesBase(tmp_path / "a", None, nonfinite="zero")


# --------------------------------------------------------------------------------------- float ranges
def test_float_2d_files_need_an_explicit_range(tmp_path):
    unit = np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(4, 4)
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "u.npy", unit)
    _png(tmp_path / "tif" / "u.tif", unit)  # PIL writes a 32-bit float TIFF (mode F)
    for folder, name in (("npy", r"u\.npy"), ("tif", r"u\.tif")):
        with pytest.raises(ValueError, match=name + r" holds float32 values 0\.\.1: .*intensity: unit"):
            MedicalImagesBase(tmp_path / folder, None, size=None)[0]
        with pytest.raises(ValueError, match=name + r" .*fractions.*'uint8' expects whole numbers.*unit"):
            MedicalImagesBase(tmp_path / folder, None, size=None, intensity="uint8")[0]
        out = MedicalImagesBase(tmp_path / folder, None, size=None, intensity="unit")[0]["image"][..., 0]
        np.testing.assert_allclose(out, unit * 2 - 1, atol=1e-6)
        assert out.min() == -1.0 and out.max() == 1.0  # full range, not a near-constant -1 image
    signed = unit * 2 - 1
    np.save(tmp_path / "npy" / "u.npy", signed)
    np.testing.assert_allclose(MedicalImagesBase(tmp_path / "npy", None, size=None, intensity="signed")[0]["image"]
                               [..., 0], signed, atol=1e-7)
    with pytest.raises(ValueError, match=r"u\.npy holds values -1\.\.1, outside the \[0, 1\] that intensity 'unit'"):
        MedicalImagesBase(tmp_path / "npy", None, size=None, intensity="unit")[0]
    np.save(tmp_path / "npy" / "u.npy", unit * 3)
    with pytest.raises(ValueError, match=r"outside the \[-1, 1\] that intensity 'signed'"):
        MedicalImagesBase(tmp_path / "npy", None, size=None, intensity="signed")[0]
    whole = np.arange(16, dtype=np.float64).reshape(4, 4) * 17  # 8-bit values stored as float: 0..255
    np.save(tmp_path / "npy" / "u.npy", whole)
    np.testing.assert_allclose(MedicalImagesBase(tmp_path / "npy", None, size=None, intensity="uint8")[0]["image"]
                               [..., 0], whole / 127.5 - 1, atol=1e-6)


def test_integer_2d_files_keep_the_8bit_default(tmp_path):
    img = np.arange(16, dtype=np.uint8).reshape(4, 4) * 17
    (tmp_path / "a").mkdir()
    np.save(tmp_path / "a" / "i.npy", img.astype(np.int16))
    np.testing.assert_allclose(MedicalImagesBase(tmp_path / "a", None, size=None)[0]["image"][..., 0],
                               img / 127.5 - 1, atol=1e-6)


# ----------------------------------------------------------------------------------- symlinked folders
def test_symlinked_patient_folders_are_followed_once(tmp_path, caplog):
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    for base, patient, value in ((root, "p1", 10), (elsewhere, "p2", 20)):
        _png(base / "images" / patient / "0.png", np.full((4, 4), value, np.uint8))
        _png(base / "masks" / patient / "0.png", np.full((4, 4), 1, np.uint8))
    os.symlink(elsewhere / "images" / "p2", root / "images" / "p2", target_is_directory=True)
    os.symlink(elsewhere / "masks" / "p2", root / "masks" / "p2", target_is_directory=True)
    os.symlink(root / "images", root / "images" / "p1" / "loop", target_is_directory=True)  # a loop
    os.symlink(root / "images" / "p1", root / "images" / "p3", target_is_directory=True)  # p1 a second time
    with caplog.at_level(logging.WARNING, logger="ldm.data.io"):
        ds = MedicalImagesBase(root / "images", root / "masks", size=None, n_labels=2)
    assert [e.relative for e in ds.examples] == ["p1/0.png", "p2/0.png"]
    ex = ds[1]
    assert ex["has_segmentation"] and ex["file_path_"] == str(root / "images" / "p2" / "0.png")
    np.testing.assert_allclose(ex["image"][..., 0], 20 / 127.5 - 1, atol=1e-6)
    assert any("2 linked folders" in r.getMessage() for r in caplog.records)


# -------------------------------------------------------------------------------- size: null, mixed sizes
def test_size_null_with_mixed_sizes_names_both_files(tmp_path):
    _png(tmp_path / "png" / "a.png", np.zeros((8, 8), np.uint8))
    _png(tmp_path / "png" / "b.png", np.zeros((8, 6), np.uint8))
    with pytest.raises(ValueError, match=r"png/a\.png gives 8x8 slices and .*png/b\.png gives 8x6.*size: 256"):
        MedicalImagesBase(tmp_path / "png", None, size=None)
    assert len(MedicalImagesBase(tmp_path / "png", None, size=8)) == 2  # a size resizes both
    _nii(tmp_path / "nii" / "a.nii.gz", np.zeros((6, 5, 3), np.int16))
    _nii(tmp_path / "nii" / "b.nii.gz", np.zeros((6, 7, 3), np.int16))
    with pytest.raises(ValueError, match=r"a\.nii\.gz gives 5x6 slices and .*b\.nii\.gz gives 7x6"):
        MedicalImagesBase(tmp_path / "nii", None, size=None)
    _nii(tmp_path / "nii" / "b.nii.gz", np.zeros((6, 5, 9), np.int16))  # more slices, same slice size: fine
    assert len(MedicalImagesBase(tmp_path / "nii", None, size=None)) == 12


# ------------------------------------------------------------------------------------- damaged .nii.gz
def test_nii_gz_with_bad_crc_is_refused(tmp_path):
    vol = np.arange(32 * 32 * 8, dtype=np.int16).reshape(32, 32, 8)
    plain = _nii(tmp_path / "plain" / "v.nii", vol)
    # Stored (level 0) deflate blocks: flipping a payload byte changes a voxel but keeps a valid stream.
    data = bytearray(gzip.compress(plain.read_bytes(), compresslevel=0))
    data[-20] ^= 0xFF
    (tmp_path / "img").mkdir()
    bad = tmp_path / "img" / "v.nii.gz"
    bad.write_bytes(bytes(data))
    assert np.count_nonzero(np.asanyarray(nib.load(str(bad)).dataobj) != vol) == 1  # nibabel alone: wrong voxel
    ds = MedicalImagesBase(tmp_path / "img", None, size=None, intensity="minmax")
    with pytest.raises(ValueError, match=r"cannot read voxel data of .*img/v\.nii\.gz: CRC check failed.*download"):
        ds[0]
    good = gzip.compress(plain.read_bytes(), compresslevel=0)
    bad.write_bytes(good)
    os.utime(bad, ns=(1, 1))  # a new version of the file is checked again
    assert MedicalImagesBase(tmp_path / "img", None, size=None, intensity="minmax")[0]["image"].shape == (32, 32, 1)
