"""ldm.data.monai_data.MonaiSliceDataset: a MONAI CacheDataset / transform chain over NIfTI files written here with
nibabel, checked against the project's own NIfTI reader, and a short main.py training run from it."""
from __future__ import annotations

import csv
import glob
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("monai", reason="the 'monai' extra is not installed")
nib = pytest.importorskip("nibabel")

from omegaconf import OmegaConf  # noqa: E402

from ldm.data.labels import DEFAULT_IGNORE_INDEX  # noqa: E402
from ldm.data.medical_images import MedicalImagesBase  # noqa: E402
from ldm.data.monai_data import MonaiSliceDataset  # noqa: E402
from tiny_models import ANATOMICAL_LDM_TARGET, anatomical_params, unet_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NX, NY, NZ = 12, 10, 3  # columns (x), rows (y), slices: non-square, so a swapped axis shows
MARK = (9, 7, 1)  # canonical RAS voxel (x, y, z): towards the patient's right and front, middle slice


def _canonical() -> tuple[np.ndarray, np.ndarray]:
    """HU volume and labels in RAS voxel order (x, y, z): air, a soft-tissue box with label 2, one bone voxel
    with label 3."""
    hu = np.full((NX, NY, NZ), -1000.0, np.float32)
    labels = np.zeros((NX, NY, NZ), np.uint8)
    hu[2:6, 1:4, :], labels[2:6, 1:4, :] = 40.0, 2
    hu[MARK], labels[MARK] = 1000.0, 3
    return hu, labels


def _write_lps(folder: Path, name: str, array: np.ndarray, spacing=(1.0, 1.0, 3.0)) -> None:
    """``array`` (RAS voxel order) stored as a DICOM-like LPS volume: x and y reversed, with the affine that says
    so; a reader that ignores the affine would put every voxel elsewhere."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [(NX - 1) * spacing[0], (NY - 1) * spacing[1], 0.0]
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array[::-1, ::-1]), affine), str(folder / name))


@pytest.fixture()
def volumes(tmp_path: Path) -> Path:
    hu, labels = _canonical()
    _write_lps(tmp_path / "images", "a.nii.gz", hu.astype(np.int16))
    _write_lps(tmp_path / "masks", "a.nii.gz", labels)
    _write_lps(tmp_path / "images", "b.nii.gz", np.flip(hu, axis=2).astype(np.int16))  # no mask
    return tmp_path


def test_slices_are_channel_first_in_display_orientation_with_masks(volumes):
    ds = MonaiSliceDataset(volumes / "images", volumes / "masks", size=None, intensity="ct", window=[40, 400],
                           n_labels=4)
    assert len(ds) == 2 * NZ
    ex = ds[MARK[2]]
    assert ex["image"].shape == (1, NY, NX) and ex["image"].dtype == torch.float32
    assert ex["segmentation"].shape == (NY, NX) and ex["segmentation"].dtype == torch.int64
    assert ex["has_segmentation"] is True and ex["slice_index"] == MARK[2] and ex["file_path_"].endswith("a.nii.gz")
    # display orientation: anterior at the top (row = NY-1-y), the patient's right on the left (column = NX-1-x)
    row, col = NY - 1 - MARK[1], NX - 1 - MARK[0]
    image, seg = ex["image"][0].numpy(), ex["segmentation"].numpy()
    assert image[row, col] == 1.0 and seg[row, col] == 3  # bone: clipped to the top of the window
    assert np.count_nonzero(seg == 3) == 1
    box = seg == 2
    assert box.sum() == 4 * 3 and np.all(image[box] == 0.0)  # 40 HU is the window's centre
    assert np.array_equal(np.argwhere(box)[[0, -1]], [[NY - 4, NX - 6], [NY - 2, NX - 3]])
    assert np.all(image[seg == 0] == -1.0)  # air below the window
    # the same pictures and masks as the project's NIfTI reader
    ref = MedicalImagesBase(volumes / "images", volumes / "masks", size=None, intensity="ct", window=[40, 400],
                            n_labels=4)
    for i in range(len(ds)):
        ours, theirs = ds[i], ref[i]
        np.testing.assert_allclose(ours["image"][0].numpy(), theirs["image"][..., 0], atol=1e-6)
        assert np.array_equal(ours["segmentation"].numpy(), theirs["segmentation"])
        assert ours["has_segmentation"] == theirs["has_segmentation"]
    unmasked = ds[NZ + 1]
    assert unmasked["has_segmentation"] is False and torch.all(unmasked["segmentation"] == DEFAULT_IGNORE_INDEX)


def test_resize_spacing_and_mr_scaling(volumes, tmp_path):
    resized = MonaiSliceDataset(volumes / "images", volumes / "masks", size=20, intensity="ct")
    ex = resized[MARK[2]]
    assert ex["image"].shape == (1, 20, 20) and ex["segmentation"].shape == (20, 20)
    assert set(torch.unique(ex["segmentation"]).tolist()) == {0, 2, 3}  # nearest neighbour: ids only
    assert -1.0 <= float(ex["image"].min()) and float(ex["image"].max()) <= 1.0
    # "mr": the volume's 0th and 100th percentiles (-1000 and 1000 HU) become -1 and 1
    mr = MonaiSliceDataset(volumes / "images", volumes / "masks", size=None, intensity="mr", percentiles=[0, 100])
    image, seg = mr[MARK[2]]["image"][0].numpy(), mr[MARK[2]]["segmentation"].numpy()
    assert image.min() == -1.0 and image.max() == 1.0
    np.testing.assert_allclose(image[seg == 2], 1040 / 1000 - 1, atol=1e-6)
    # 2 mm in-plane from 1 mm, air at 0 HU (0.0 in a [0, 400] window): Spacingd gives 6 x 6 pixels with centres at
    # 0, 2, ..., 10 mm (the border value beyond the 9 mm of y), padded to 8 x 8 with -1 (image) and 0 (mask); the
    # box (x 2..5 mm, y 1..3 mm) holds the pixel centres x = 2, 4 and y = 2
    hu, labels = _canonical()
    hu[hu == -1000.0] = 0.0
    _write_lps(tmp_path / "soft" / "images", "a.nii.gz", hu.astype(np.int16))
    _write_lps(tmp_path / "soft" / "masks", "a.nii.gz", labels)
    coarse = MonaiSliceDataset(tmp_path / "soft" / "images", tmp_path / "soft" / "masks", size=8, spacing=2.0,
                               intensity="ct", window=[0, 400])
    assert len(coarse) == NZ  # the slice spacing is kept
    rows_cols = MonaiSliceDataset(tmp_path / "soft" / "images", None, size=None, spacing=[1.0, 2.0])
    assert rows_cols[0]["image"].shape == (1, NY, 6)  # spacing is [row, column]: 1 mm rows, 2 mm columns
    ex = coarse[0]
    assert ex["image"].shape == (1, 8, 8) and ex["segmentation"].shape == (8, 8)
    image, seg = ex["image"][0].numpy(), ex["segmentation"].numpy()
    assert np.count_nonzero(image == -1.0) == 8 * 8 - 6 * 6 and np.all(image[1:7, 1:7] >= 0)
    assert np.count_nonzero(image == 0.0) == 6 * 6 - 2 and np.count_nonzero(seg == 2) == 2
    np.testing.assert_allclose(image[seg == 2], 0.2, atol=1e-6)  # 40 HU in the [0, 400] window


def test_bad_input_is_refused_with_the_reason(volumes, tmp_path, monkeypatch):
    images, masks = volumes / "images", volumes / "masks"
    with pytest.raises(FileNotFoundError, match="image_dir"):
        MonaiSliceDataset(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="mask_dir"):
        MonaiSliceDataset(images, tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no NIfTI volumes"):
        MonaiSliceDataset(tmp_path / "empty")
    for kwargs, message in (({"intensity": "minmax"}, "intensity must be one of"), ({"window": [40, 0]}, "window"),
                            ({"percentiles": [99, 1]}, "percentiles"), ({"spacing": [1, 2, 3]}, "spacing"),
                            ({"size": 0}, "size"), ({"slice_axis": 3}, "slice_axis")):
        with pytest.raises(ValueError, match=message):
            MonaiSliceDataset(images, masks, **kwargs)
    with pytest.raises(ValueError, match=r"label values \[3\] outside 0\.\.2"):
        MonaiSliceDataset(images, masks, n_labels=3)
    monkeypatch.setitem(sys.modules, "monai", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[monai\]'"):
        MonaiSliceDataset(images, masks)


def _phantom_like(folder: Path, n: int) -> None:
    """``n`` 16 x 16 x 3 CT volumes (HU) with masks under folder/{images,masks}."""
    rng = np.random.default_rng(n)
    for i in range(n):
        hu = rng.normal(0.0, 150.0, (16, 16, 3)).astype(np.int16)
        labels = (hu > 100).astype(np.uint8)
        affine = np.diag([1.5, 1.5, 5.0, 1.0])
        for sub, array in (("images", hu), ("masks", labels)):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, affine), str(folder / sub / f"volume-{i}.nii.gz"))


def _with_monai_data(cfg, root: Path) -> None:
    """``cfg``'s train/validation datasets: the example config's MonaiSliceDataset on ``root`` at 16 px, 2 classes."""
    example = OmegaConf.load(ROOT / "configs" / "autoencoder" / "monai_phantom_kl.yaml").data.params
    for split, n in (("train", 2), ("validation", 1)):
        _phantom_like(root / split, n)
        node = example[split]
        node.params.update(image_dir=str(root / split / "images"), mask_dir=str(root / split / "masks"), size=16,
                           n_labels=2)
        cfg.data.params[split] = node


def _train(tmp_path: Path, cfg, steps: int) -> Path:
    """``main.main`` on ``cfg`` for ``steps`` steps on the CPU (in this process); the run directory."""
    import main

    OmegaConf.save(cfg, tmp_path / "config.yaml")
    handler = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
    try:  # main installs a SIGUSR1 handler: restore the previous one for the tests that follow
        assert main.main(["--base", str(tmp_path / "config.yaml"), "-t", "-l", str(tmp_path / "logs"),
                          "--accelerator", "cpu", "--max_steps", str(steps)]) == 0
    finally:
        if handler is not None:
            signal.signal(signal.SIGUSR1, handler)
    (run,) = [p for p in (tmp_path / "logs").iterdir() if p.is_dir()]
    (project,) = glob.glob(str(run / "configs" / "*-project.yaml"))
    assert OmegaConf.load(project).data.params.train.target == "ldm.data.monai_data.MonaiSliceDataset"
    return run


def _checkpoint(run: Path) -> dict:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    return ckpt


def test_main_trains_an_autoencoder_from_the_monai_pipeline(tmp_path):
    cfg = OmegaConf.load(ROOT / "configs" / "tests" / "tiny_autoencoder.yaml")
    _with_monai_data(cfg, tmp_path / "data")
    run = _train(tmp_path, cfg, steps=4)
    assert _checkpoint(run)["global_step"] == 4  # two optimiser steps per batch
    assert glob.glob(str(run / "images" / "train" / "inputs_gs-*.png"))


def test_main_trains_an_anatomical_ldm_on_the_monai_masks(tmp_path):
    cfg = OmegaConf.load(ROOT / "configs" / "tests" / "tiny_ldm.yaml")
    cfg.model.target = ANATOMICAL_LDM_TARGET
    cfg.model.params.anatomical_warmup_steps = 0
    cfg.model.params.unet_config = unet_config(in_channels=3, out_channels=3, image_size=4,
                                               anatomy=anatomical_params(num_classes=2))
    _with_monai_data(cfg, tmp_path / "data")
    run = _train(tmp_path, cfg, steps=3)
    assert _checkpoint(run)["global_step"] == 3
    rows = list(csv.DictReader((next(run.glob("csv/version_*/metrics.csv"))).open()))
    losses = [float(r["train/anatomical_loss_step"]) for r in rows if r.get("train/anatomical_loss_step")]
    assert losses and all(np.isfinite(losses)) and min(losses) > 0  # the masks reached the segmentation loss
