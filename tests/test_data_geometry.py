"""Geometry reported by the datasets (spacing, affine), spacing: resampling, the CT multi-window, and
channel-first (MONAI-style) batches through get_input and training."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data import intensity
from ldm.data.batch import to_channels_first
from ldm.data.io import display_slice_to_canonical
from ldm.data.medical_images import CTOrganTrain, MedicalImagesBase
from ldm.util import instantiate_from_config
from tiny_models import first_stage_config, ldm_config


def _nii(path: Path, arr: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def _lps_volume(tmp_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU volume and labels stored LPS with axes 0/1 swapped, spacing 0.7 x 0.9 x 2.5 mm, an origin; a
    label-1 block off centre. Returns (stored labels, affine, world centroid of the block per axial slice)."""
    shape = (12, 10, 4)  # stored (y, x, z)
    labels = np.zeros(shape, np.uint8)
    labels[2:5, 6:9, 1:3] = 1
    hu = np.where(labels == 1, 240, -1000).astype(np.int16)
    aff = np.zeros((4, 4))
    aff[0, 1], aff[1, 0], aff[2, 2], aff[3, 3] = -0.9, -0.7, 2.5, 1.0  # x from axis 1, y from axis 0
    aff[:3, 3] = [30.0, -12.0, 55.0]
    _nii(tmp_path / "img" / "v.nii.gz", hu, aff)
    _nii(tmp_path / "seg" / "v.nii.gz", labels, aff)
    return labels, aff, np.array([30.0 - 0.9 * 7, -12.0 - 0.7 * 3])  # block centre (x, y) in mm


def _world_centroid(mask: np.ndarray, affine: np.ndarray, axis: int = 2) -> np.ndarray:
    """World (x, y, z) centroid of the label-1 pixels of a display slice, through the reported affine."""
    canon = display_slice_to_canonical(mask, axis)
    idx = np.argwhere(canon == 1).astype(np.float64)
    return nib.affines.apply_affine(affine.astype(np.float64), idx).mean(0)


@pytest.mark.parametrize("kwargs, spacing", [
    (dict(size=None), (0.7, 0.9)),  # rows: anterior-posterior (stored axis 0), columns: left-right
    (dict(size=24, interpolation="nearest"), (0.7 * 12 / 24, 0.9 * 12 / 24)),  # padded to 12 x 12, resized x2
    (dict(size=8, square="crop", interpolation="nearest"), (0.7 * 10 / 8, 0.9 * 10 / 8)),
    (dict(size=None, spacing=1.4), (1.4, 0.9 * 10 / 6)),  # 12 x 10 -> 6 x 6 (0.9 * 10 / 1.4 rounds to 6)
    (dict(size=16, spacing=[0.35, 0.45]), (0.35, 0.45)),  # 24 x 20 -> centre-cropped/padded to 16
    (dict(size=None, flip_p=1.0), (0.7, 0.9)),
])
def test_reported_affine_puts_pixels_where_their_voxels_were(tmp_path, kwargs, spacing):
    labels, aff, centre = _lps_volume(tmp_path)
    ds = MedicalImagesBase(tmp_path / "img", tmp_path / "seg", n_labels=2, intensity="ct", **kwargs)
    for k in (1, 2):
        ex = ds[k]
        assert ex["spacing"].dtype == np.float32 and ex["affine"].shape == (4, 4)
        np.testing.assert_allclose(ex["spacing"], spacing, rtol=1e-5)
        world = _world_centroid(ex["segmentation"], ex["affine"])
        # Exact where every source pixel maps to whole output pixels; nearest-neighbour downsampling of
        # the 3-pixel block may move its centroid by up to half an output pixel.
        coarser = spacing[0] > 0.7 + 1e-6 or spacing[1] > 0.9 + 1e-6
        np.testing.assert_allclose(world, [*centre, 55.0 + 2.5 * k], atol=0.5 * max(spacing) if coarser else 1e-4)
        if not kwargs.get("flip_p"):
            geo = ds.slice_geometry(k)
            np.testing.assert_array_equal(geo["affine"], ex["affine"])
            np.testing.assert_array_equal(geo["spacing"], ex["spacing"])
        else:
            assert np.linalg.det(ex["affine"][:3, :3]) < 0  # a flipped slice is mirrored, and says so
    # Written with nibabel, a slice opens as RAS+ with its spacing: what a NIfTI writer needs.
    ex = ds[1]
    img = nib.Nifti1Image(display_slice_to_canonical(ex["image"][..., 0], 2), ex["affine"].astype(np.float64))
    if not kwargs.get("flip_p"):
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    np.testing.assert_allclose(img.header.get_zooms()[:2], spacing[::-1], rtol=1e-5)


def test_spacing_resamples_to_the_target_grid(tmp_path):
    ramp = np.tile(np.linspace(-160, 240, 16, dtype=np.float32), (16, 1)).T[:, :, None].repeat(2, axis=2)
    _nii(tmp_path / "img" / "r.nii", ramp, np.diag([0.5, 0.5, 3.0, 1.0]))  # 0.5 mm pixels, 16 x 16
    ds = MedicalImagesBase(tmp_path / "img", None, size=None, intensity="ct", window=(40, 400), spacing=1.0,
                           interpolation="bilinear")
    ex = ds[0]
    assert ex["image"].shape == (8, 8, 1)
    np.testing.assert_allclose(ex["spacing"], [1.0, 1.0])
    cols = ex["image"][0, :, 0]  # canonical x = ramp; display columns run right-to-left
    assert np.all(np.diff(cols) < 0) and abs(cols[3] + cols[4]) < 1e-5  # still a ramp, centred
    padded = MedicalImagesBase(tmp_path / "img", None, size=12, intensity="ct", spacing=1.0)[0]["image"][..., 0]
    assert padded.shape == (12, 12) and np.all(padded[:2] == -1.0) and np.all(padded[:, -2:] == -1.0)
    np.testing.assert_allclose(padded[2:10, 2:10], MedicalImagesBase(
        tmp_path / "img", None, size=None, intensity="ct", spacing=1.0)[0]["image"][..., 0], atol=1e-6)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "img" / "flat.png")
    with pytest.raises(ValueError, match=r"flat\.png .*record no pixel spacing"):
        MedicalImagesBase(tmp_path / "img", None, spacing=1.0)
    for bad in (0, -1.0, [1.0], "x", [1.0, float("nan")]):
        with pytest.raises(ValueError, match="spacing must be"):
            MedicalImagesBase(tmp_path / "img", None, spacing=bad)


def test_2d_files_report_unknown_geometry_and_batch(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "b.png")
    ds = MedicalImagesBase(tmp_path, None, size=8)
    assert np.all(np.isnan(ds[0]["spacing"])) and np.all(np.isnan(ds[0]["affine"]))
    assert np.all(np.isnan(ds.slice_geometry(1)["affine"]))
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["affine"].shape == (2, 4, 4) and batch["spacing"].shape == (2, 2)


# -------------------------------------------------------------------------------------- CT windows
CTORGAN_HU = {"air": -1000, "lung": -850, "fat": -100, "bladder": 10, "liver": 60, "kidney": 160,
              "cancellous bone": 300, "cortical bone": 1000}


def test_multi_window_keeps_every_ctorgan_class_apart():
    hu = np.array(list(CTORGAN_HU.values()), dtype=np.float32)
    soft = intensity.window_ct(hu, 40, 400)
    multi = intensity.window_multi(hu, "multi")
    step = 1 / 127.5  # one 8-bit grey level
    assert soft[0] == soft[1] == -1.0 and soft[6] == soft[7] == 1.0  # 40/400: lungs = air, bone saturates
    assert np.all(np.diff(multi) > 8 * step)  # multi: every class at least 8 grey levels from the next
    np.testing.assert_allclose(intensity.window_multi(np.array([-1000, -160, 40, 240, 1500]), "multi"),
                               [-1, -0.5, 0, 0.5, 1], atol=1e-6)
    np.testing.assert_allclose(intensity.hu_from_ct(multi, "multi"), hu, atol=0.05)
    np.testing.assert_allclose(intensity.hu_from_ct(soft[2:6], (40, 400)), hu[2:6], atol=0.01)
    pts = [[-1000, -1], [0, 0], [2000, 1]]
    np.testing.assert_allclose(intensity.window_multi(np.array([-500.0, 1000.0]), pts), [-0.5, 0.5])


def test_multi_window_in_datasets_and_bad_windows(tmp_path):
    hu = np.array(list(CTORGAN_HU.values()), dtype=np.int16).reshape(8, 1, 1).repeat(2, axis=2)
    _nii(tmp_path / "train" / "images" / "v.nii.gz", hu, np.eye(4))
    ds = CTOrganTrain(data_root=tmp_path, size=None, window="multi")
    got = ds[0]["image"][0, ::-1, 0]  # one display row; columns run right-to-left in canonical x
    np.testing.assert_allclose(got, intensity.window_multi(hu[:, 0, 0], "multi"), atol=1e-6)
    default = CTOrganTrain(data_root=tmp_path, size=None)[0]["image"][0, ::-1, 0]
    np.testing.assert_allclose(default, intensity.window_ct(hu[:, 0, 0], 40, 400), atol=1e-6)
    for bad in ("lung", 5, [[0, -1]], [[0, -1], [-10, 1]], [[0, -1], [10, 0.5]], (40, 0)):
        with pytest.raises(ValueError, match="window"):
            MedicalImagesBase(tmp_path, None, intensity="ct", window=bad)


# --------------------------------------------------------------------------- channel-first batches
def test_to_channels_first_decides_by_the_model_channel_count():
    last = torch.randn(2, 16, 12, 1)
    first = last.permute(0, 3, 1, 2).clone()
    assert torch.equal(to_channels_first(last, 1, "image"), first)
    assert torch.equal(to_channels_first(first, 1, "image"), first)
    assert to_channels_first(np.zeros((2, 16, 12)), 1, "image").shape == (2, 1, 16, 12)
    assert to_channels_first(torch.zeros(2, 5, 7, 3), None, "x").shape == (2, 3, 5, 7)  # unknown: CompVis order
    with pytest.raises(ValueError, match=r"batch\['image'\] has shape \(2, 1, 16, 1\).*channel-first .*channel-last"):
        to_channels_first(torch.zeros(2, 1, 16, 1), 1, "image")
    with pytest.raises(ValueError, match=r"\(2, 3, 16, 16\), but the model takes 1 channel"):
        to_channels_first(torch.zeros(2, 3, 16, 16), 1, "image")
    with pytest.raises(ValueError, match=r"has shape \(2, 16\)"):
        to_channels_first(torch.zeros(2, 16), 1, "image")


def test_autoencoder_get_input_takes_both_layouts():
    ae = instantiate_from_config(first_stage_config())
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.equal(ae.get_input({"image": x}, "image"), x)
    assert torch.equal(ae.get_input({"image": x.permute(0, 2, 3, 1)}, "image"), x)


class _ChannelFirst(torch.utils.data.Dataset):
    """A MONAI-like dataset: ``image`` 1 x H x W (channel first) in [-1, 1]."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"image": torch.rand(1, 16, 16, generator=g) * 2 - 1}


def test_channel_first_batches_train_a_tiny_ldm(tmp_path):
    model = instantiate_from_config(ldm_config())
    model.learning_rate = 1e-4
    batch = next(iter(DataLoader(_ChannelFirst(), batch_size=4)))
    assert batch["image"].shape == (4, 1, 16, 16)
    torch.manual_seed(0)
    loss_first, _ = model.shared_step(batch)
    torch.manual_seed(0)
    loss_last, _ = model.shared_step({"image": batch["image"].permute(0, 2, 3, 1)})
    assert torch.isfinite(loss_first) and torch.equal(loss_first, loss_last)  # the same batch, either layout
    before = [p.detach().clone() for p in model.model.parameters()]
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(model, DataLoader(_ChannelFirst(), batch_size=2))
    assert trainer.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.model.parameters()))


class _Layout(torch.utils.data.Dataset):
    """Labelled squares, as channel-last (the project's datasets) or channel-first (a MONAI pipeline) items."""

    def __init__(self, channel_first: bool) -> None:
        self.channel_first = channel_first

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict:
        mask = torch.zeros(16, 16, dtype=torch.long)
        mask[2 + i:8 + i, 3:9] = 1
        image = (mask.float() * 1.6 - 0.8)[None]  # 1 x H x W
        return {"image": image if self.channel_first else image.permute(1, 2, 0), "segmentation": mask,
                "has_segmentation": True}


def test_evaluation_reads_channel_first_items_like_channel_last():
    from ldm.data.batch import item_channels_first
    from ldm.evaluation.compare import load_dataset_arrays
    from ldm.evaluation.segmenter import train_segmenter

    last, first = load_dataset_arrays(_Layout(False)), load_dataset_arrays(_Layout(True))
    assert last[0].shape == (6, 1, 16, 16) and torch.equal(last[0], first[0]) and torch.equal(last[1], first[1])
    seg_last = train_segmenter(_Layout(False), 2, steps=3, batch_size=3, seed=0)
    seg_first = train_segmenter(_Layout(True), 2, steps=3, batch_size=3, seed=0)
    for a, b in zip(seg_last.parameters(), seg_first.parameters()):
        assert torch.equal(a, b)  # the same training, either layout
    assert item_channels_first(np.zeros((16, 12, 3))).shape == (3, 16, 12)
    assert item_channels_first(np.zeros((3, 16, 12))).shape == (3, 16, 12)
    assert item_channels_first(np.zeros((16, 12))).shape == (1, 16, 12)
    with pytest.raises(ValueError, match="ambiguous|equal"):
        item_channels_first(np.zeros((3, 16, 3)))
