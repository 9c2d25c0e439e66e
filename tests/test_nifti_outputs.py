"""NIfTI samples carry the training data's geometry: a tiny anatomical model trained on a NIfTI volume stored in
a non-canonical orientation writes samples and integer masks whose affine (checked with nibabel) has the source's
directions and spacing, with anatomy at the source's world position; HU, stacks, exports and the fallback."""
from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm import sample_io
from ldm.data.intensity import hu_from_ct
from ldm.data.io import display_slice_to_canonical, volume_slice_to_display
from ldm.sample_geometry import SampleGeometry, display_to_canonical, resolve_geometry
from ldm.util import instantiate_from_config
from test_sample_run import load_script, tiny_config

SOURCE_AFFINE = np.array([[0.0, -0.9, 0.0, 30.0],   # world x (R) from stored axis 1, pointing left
                          [-0.7, 0.0, 0.0, -12.0],  # world y (A) from stored axis 0, pointing posterior
                          [0.0, 0.0, 2.5, 55.0],
                          [0.0, 0.0, 0.0, 1.0]])
# canonical: 20 columns of 0.9 mm (R), 16 rows of 0.7 mm (A); padded to 20 x 20, resized to 16 px
EXPECTED_ZOOMS = (0.9 * 20 / 16, 0.7 * 20 / 16, 2.5)
COMMON = ["-c", "3", "--seed", "2", "--no-progress", "--device", "cpu"]


def _world_centroid(volume: np.ndarray, affine: np.ndarray, label: int) -> np.ndarray:
    return nib.affines.apply_affine(affine, np.argwhere(volume == label).astype(float)).mean(0)


@pytest.fixture(scope="module")
def nifti_run(tmp_path_factory):
    """A NIfTI volume (stored LPS, axes swapped) with a label-1 block on the patient's right-anterior side, and a
    run directory of a tiny anatomical model trained 2 steps on its slices, with the data section in its config."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("nifti")
    labels = np.zeros((16, 20, 4), np.uint8)  # stored (y, x, z)
    labels[2:6, 3:8, :] = 1  # stored axis 0 low = anterior, axis 1 low = right
    hu = np.where(labels == 1, 120, -900).astype(np.int16)
    for sub, arr in (("images", hu), ("masks", labels)):
        os.makedirs(root / "data" / sub)
        nib.save(nib.Nifti1Image(arr, SOURCE_AFFINE), str(root / "data" / sub / "v.nii.gz"))
    data = {"target": "ldm.data.medical_images.MedicalImagesBase",
            "params": {"data_root": str(root / "data" / "images"), "segmentation_root": str(root / "data" / "masks"),
                       "size": 16, "n_labels": 6, "intensity": "ct", "window": [40, 400]}}
    config = tiny_config(True)
    config["data"] = {"target": "main.DataModuleFromConfig", "params": {"batch_size": 4, "train": data}}
    dataset = instantiate_from_config(data)
    model = instantiate_from_config(config["model"])
    opt = torch.optim.Adam([p for p in model.model.parameters() if p.requires_grad], lr=1e-3)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    for _ in range(2):
        loss, _ = model.shared_step(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.model_ema(model.model)
    run = root / "2026-01-01T00-00-00_nifti"
    os.makedirs(run / "checkpoints")
    os.makedirs(run / "configs")
    torch.save({"state_dict": model.state_dict()}, run / "checkpoints" / "last.ckpt")
    OmegaConf.save(OmegaConf.create(config), run / "configs" / "2026-01-01T00-00-00-project.yaml")
    return {"run": str(run), "root": root, "dataset": dataset, "config": config, "labels": labels}


def test_display_to_canonical_inverts_the_dataset_display_transform():
    volume = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    for axis in range(3):
        slices = np.stack([volume_slice_to_display(volume, k, axis) for k in range(volume.shape[axis])])
        assert np.array_equal(display_to_canonical(slices, axis), volume)


def test_nifti_sample_has_the_sources_orientation_and_spacing(nifti_run, tmp_path):
    out = tmp_path / "s"
    assert load_script("sample").main(["-r", nifti_run["run"], "-n", "2", "--batch_size", "2", "-l", str(out),
                                       "--format", "nii", "--save_masks", *COMMON]) == 0
    img = nib.load(str(out / "images" / "000000.nii.gz"))
    mask = nib.load(str(out / "masks" / "000000.nii.gz"))
    canonical = nib.as_closest_canonical(nib.Nifti1Image(np.zeros((16, 20, 4)), SOURCE_AFFINE))
    assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
    assert img.shape == (16, 16, 1) and np.allclose(img.header.get_zooms(), EXPECTED_ZOOMS)
    directions = img.affine[:3, :3] / np.asarray(EXPECTED_ZOOMS)
    assert np.allclose(directions, canonical.affine[:3, :3] / np.array([0.9, 0.7, 2.5]))
    # The sample is centred on the source volume's centre.
    centre = nib.affines.apply_affine(img.affine, [7.5, 7.5, 0])
    assert np.allclose(centre, nib.affines.apply_affine(SOURCE_AFFINE, [7.5, 9.5, 1.5]))
    # Masks: integer volumes on the same grid; the image in the model's [-1, 1] (no --hu).
    assert mask.get_data_dtype().kind in "iu" and np.array_equal(mask.affine, img.affine)
    assert np.asarray(mask.dataobj).max() < 6 and -1 <= img.get_fdata().min() <= img.get_fdata().max() <= 1
    # The dataset reports the same directions and spacing for its training slices.
    reported = np.asarray(nifti_run["dataset"][1]["affine"], dtype=np.float64)
    assert np.allclose(reported[:3, :3], img.affine[:3, :3], atol=1e-5)
    # samples.json records the geometry and where it came from.
    geometry = json.load(open(out / "samples.json"))["geometry"]
    assert geometry["source"].startswith("reference NIfTI") and geometry["source"].endswith("v.nii.gz")
    assert np.allclose(geometry["affine"], img.affine) and np.allclose(geometry["spacing_mm"], EXPECTED_ZOOMS)
    assert geometry["note"] is None and geometry["intensity"] == {"mode": "ct", "window": [40.0, 400.0]}


def test_training_slice_written_as_a_sample_lands_where_its_voxels_were(nifti_run, tmp_path):
    """The writer put through the dataset's own slice: the label block's world position (nibabel affine) is the
    source's, in-plane, to within one output pixel (a flipped axis would miss by ~9 mm)."""
    example = nifti_run["dataset"][1]
    geometry = resolve_geometry(nifti_run["config"])
    image = torch.from_numpy(example["image"]).permute(2, 0, 1)[None]
    sample_io.save_samples(str(tmp_path), [0], image, torch.from_numpy(example["segmentation"])[None], ["nii"],
                           geometry=geometry)
    written = nib.load(str(tmp_path / "masks" / "000000.nii.gz"))
    got = _world_centroid(np.asarray(written.dataobj), written.affine, 1)[:2]
    want = _world_centroid(nifti_run["labels"], SOURCE_AFFINE, 1)[:2]
    assert np.all(np.abs(got - want) <= EXPECTED_ZOOMS[0]), (got, want)
    centre = nib.affines.apply_affine(SOURCE_AFFINE, [7.5, 9.5, 1.5])[:2]
    assert want[0] - centre[0] > 3 and want[1] - centre[1] > 2  # right of and anterior to the centre
    # The same mask in the dataset's own reported slice geometry puts it at the same place.
    own = _world_centroid(display_slice_to_canonical(example["segmentation"], 2), example["affine"], 1)[:2]
    assert np.all(np.abs(own - got) <= EXPECTED_ZOOMS[0])


def test_hu_stack_and_export_keep_the_geometry(nifti_run, tmp_path):
    run = nifti_run["run"]
    sample = load_script("sample")
    assert sample.main(["-r", run, "-n", "3", "-l", str(tmp_path / "plain"), "--format", "nii", *COMMON]) == 0
    assert sample.main(["-r", run, "-n", "3", "-l", str(tmp_path / "hu"), "--hu", "--stack", "--save_masks",
                        *COMMON]) == 0
    plain = nib.load(str(tmp_path / "plain" / "images" / "000001.nii.gz")).get_fdata()
    hu = nib.load(str(tmp_path / "hu" / "images" / "000001.nii.gz")).get_fdata()
    assert np.allclose(hu, -160.0 + (plain + 1.0) * 200.0, atol=1e-3) and hu.std() > 1.0
    assert np.allclose(hu, hu_from_ct(plain, [40, 400]), atol=1e-3)
    # The stack: every sample as one slice along the source's slice axis, thickness from the source.
    stack = nib.load(str(tmp_path / "hu" / "stack.nii.gz"))
    stack_masks = nib.load(str(tmp_path / "hu" / "stack_masks.nii.gz"))
    assert stack.shape == (16, 16, 3) and np.allclose(stack.header.get_zooms(), EXPECTED_ZOOMS)
    assert np.allclose(stack.get_fdata()[..., 1:2], hu) and np.array_equal(stack_masks.affine, stack.affine)
    assert stack_masks.get_data_dtype().kind in "iu"
    manifest = json.load(open(tmp_path / "hu" / "samples.json"))
    assert manifest["stack"]["indices"] == [0, 1, 2] and manifest["sessions"][0]["hu"] is True
    # One volume needs one grid and unit: a folder of [-1, 1] samples, or of PNGs only, is not stacked with HU.
    with pytest.raises(ValueError, match="another geometry or intensity unit.*--stack needs one grid"):
        sample.main(["-r", run, "-n", "1", "-l", str(tmp_path / "plain"), "--hu", "--stack", *COMMON])
    assert sample.main(["-r", run, "-n", "1", "-l", str(tmp_path / "png"), *COMMON]) == 0
    with pytest.raises(ValueError, match="--stack: .* holds 1 samples without NIfTI files"):
        sample.main(["-r", run, "-n", "1", "-l", str(tmp_path / "png"), "--stack", *COMMON])
    assert sorted(os.listdir(tmp_path / "png" / "images")) == ["000000.png"]

    # An export records the geometry, so samples from it keep it when the training data is gone.
    assert load_script("export").main(["-r", run, "-o", str(tmp_path / "exported")]) == 0
    data = nifti_run["root"] / "data"
    shutil.move(str(data), str(nifti_run["root"] / "moved"))
    try:
        assert sample.main(["-r", str(tmp_path / "exported"), "-n", "1", "-l", str(tmp_path / "e"), "--format",
                            "nii", *COMMON]) == 0
    finally:
        shutil.move(str(nifti_run["root"] / "moved"), str(data))
    exported = nib.load(str(tmp_path / "e" / "images" / "000000.nii.gz"))
    assert np.allclose(exported.affine, nib.load(str(tmp_path / "plain" / "images" / "000000.nii.gz")).affine)


def test_hu_refused_for_mr_and_fallback_geometry_noted(nifti_run, tmp_path, monkeypatch):
    config = json.loads(json.dumps(nifti_run["config"]))
    config["data"]["params"]["train"]["params"]["intensity"] = "mr"
    with pytest.raises(ValueError, match="--hu needs a CT run .* intensity is 'mr'"):
        resolve_geometry(config).check_hu()
    # Through the script: refused before the model loads.
    run = tmp_path / "2026-01-01T00-00-00_mr"
    os.makedirs(run / "configs")
    os.symlink(os.path.join(nifti_run["run"], "checkpoints"), run / "checkpoints")
    OmegaConf.save(OmegaConf.create(config), run / "configs" / "2026-01-01T00-00-00-project.yaml")
    sample = load_script("sample")
    monkeypatch.setattr(sample.sampling, "load_model_for_sampling",
                        lambda *a, **k: pytest.fail("the model was loaded before --hu was checked"))
    with pytest.raises(ValueError, match="--hu needs a CT run"):
        sample.main(["-r", str(run), "-n", "1", "--hu", "-l", str(tmp_path / "o")])
    # No NIfTI data and no reference: 1 mm RAS+ with a note saying so.
    bare = resolve_geometry({"model": config["model"]})
    assert bare.note and "1 mm" in bare.note and bare.source == "default"
    assert np.allclose(bare.affine((16, 16, 1))[:3, :3], np.eye(3))
    assert SampleGeometry.from_dict(bare.to_dict()).to_dict() == bare.to_dict()
