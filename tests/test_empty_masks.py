"""A mask folder with no mask for any image is an error, not a warning (issue 31): the anatomical model would train
on the images alone (its segmentation loss adds exactly 0 for a batch without masks) and finish with exit 0.
Partial masks keep one warning with the count; main.py stops before training."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.medical_images import CTOrganTrain, MedicalImagesBase

ROOT = Path(__file__).resolve().parents[1]


def _png(path: Path, value: int = 100, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)
    return path


def _images(folder: Path, names: tuple[str, ...] = ("a.png", "b.png", "c.png"), size: int = 8) -> Path:
    for name in names:
        _png(folder / name, size=size)
    return folder


def test_an_empty_mask_folder_is_an_error_naming_it(tmp_path):
    images, masks = _images(tmp_path / "images"), tmp_path / "masks"
    masks.mkdir()
    message = (f"segmentation_root {masks} holds no mask for any of the 3 image files under {images} (it holds no "
               "files; for a.png it looked for a.png, a.npy, a.tif, ...). A mask must sit at its image's relative path")
    with pytest.raises(ValueError, match=re.escape(message) + ".*set load_segmentations: false"):
        MedicalImagesBase(images, masks, size=None)
    # The way out the message names: the images without masks.
    ds = MedicalImagesBase(images, masks, size=None, load_segmentations=False)
    assert len(ds) == 3 and not any(ds[i]["has_segmentation"] for i in range(3))


def test_masks_in_another_layout_are_an_error_naming_what_the_folder_holds(tmp_path):
    images, masks = _images(tmp_path / "images"), tmp_path / "masks"
    _png(masks / "patient-1" / "a.png", value=1)  # one folder level deeper than its image
    _png(masks / "patient-1" / "b.png", value=1)
    with pytest.raises(ValueError, match=re.escape(f"{masks} holds no mask for any of the 3 image files under {images}"
                                                   " (its 2 files match no image, first patient-1/a.png;")):
        MedicalImagesBase(images, masks, size=None, n_labels=2)


def test_partial_masks_keep_one_warning_with_the_count(tmp_path, caplog):
    images, masks = _images(tmp_path / "images"), tmp_path / "masks"
    _png(masks / "b.png", value=1)
    with caplog.at_level(logging.WARNING, logger="ldm.data.medical_images"):
        ds = MedicalImagesBase(images, masks, size=None, n_labels=2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"2 of 3 image files under {images} have no mask")
    assert [ds[i]["has_segmentation"] for i in range(3)] == [False, True, False]
    assert int(ds[1]["segmentation"].sum()) == 64 and int(ds[0]["segmentation"].min()) == 255


def test_named_data_set_with_an_empty_masks_folder(tmp_path):
    _images(tmp_path / "train" / "images")
    (tmp_path / "train" / "masks").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"segmentation_root {tmp_path / 'train' / 'masks'} holds no mask "
                                                   "for any of the 3 image files")):
        CTOrganTrain(data_root=tmp_path, size=8)
    (tmp_path / "train" / "masks").rmdir()  # no masks folder: a data set without masks, as before
    ds = CTOrganTrain(data_root=tmp_path, size=8)
    assert len(ds) == 3 and not ds[0]["has_segmentation"]


def test_ctorg_volumes_without_their_labels_in_the_same_folder(tmp_path):
    folder = tmp_path / "ctorg"
    folder.mkdir()
    volume = np.arange(4 * 4 * 2, dtype=np.int16).reshape(4, 4, 2)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(folder / "volume-0.nii.gz"))
    with pytest.raises(ValueError, match=r"holds no mask for any of the 1 image files under .* \(it holds only the "
                                         r"images; for volume-0\.nii\.gz it looked for volume-0\.nii\.gz, "
                                         r"volume-0\.nii, labels-0\.nii\.gz, \.\.\.\)"):
        MedicalImagesBase(folder, folder, size=None, intensity="ct")
    nib.save(nib.Nifti1Image((volume % 2).astype(np.uint8), np.eye(4)), str(folder / "labels-0.nii.gz"))
    ds = MedicalImagesBase(folder, folder, size=None, intensity="ct", n_labels=2)
    assert len(ds) == 2 and ds[0]["has_segmentation"]  # the label volume is found and not used as an image


def test_main_stops_before_training_on_an_empty_mask_folder(tmp_path, capsys):
    import main

    for split in ("train", "validation"):
        _images(tmp_path / "data" / split / "images", size=32)
        (tmp_path / "data" / split / "masks").mkdir()
    _png(tmp_path / "data" / "validation" / "masks" / "a.png", value=1, size=32)
    config = OmegaConf.load(ROOT / "configs" / "latent-diffusion" / "demo_phantom_anatomical.yaml")
    config.model.params.first_stage_config.params.ckpt_path = None
    for split, target in (("train", "CTOrganTrain"), ("validation", "CTOrganValidation")):
        config.data.params[split] = {"target": f"ldm.data.medical_images.{target}",
                                     "params": {"data_root": str(tmp_path / "data"), "size": 32}}
    OmegaConf.save(config, tmp_path / "anatomical.yaml")
    argv = ["--base", str(tmp_path / "anatomical.yaml"), "-t", "--accelerator", "cpu", "--threads", "1",
            "-l", str(tmp_path / "logs"), "-n", "empty_masks", "lightning.trainer.max_steps=2"]
    assert main.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("main.py: error: could not build the model or the data")
    assert f"segmentation_root {tmp_path / 'data' / 'train' / 'masks'} holds no mask for any of the 3" in lines[0]
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing was trained
