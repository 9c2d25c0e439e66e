"""scripts/export_dataset.py (issue 30): a real scripts/sample.py folder of a tiny anatomical model exported as an
nnU-Net v2 raw dataset and a MONAI datalist, checked with the tools themselves (nnU-Net's integrity check,
fingerprint, 2d planning and preprocessing; monai's datalist reader and LoadImage), exact label and geometry
round trips, real cases mixed in by prefix, and refusals that name the file and write nothing."""
from __future__ import annotations

import json
import os
import pickle
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.phantom import write_phantom_2d, write_phantom_nifti
from ldm.export_dataset import export_dataset, slice_last
from ldm.util import instantiate_from_config
from test_sample_run import load_script, tiny_config

SOURCE_AFFINE = np.array([[0.0, -0.9, 0.0, 30.0],  # stored LPS-like, axes swapped: the sample NIfTIs keep it
                          [-0.7, 0.0, 0.0, -12.0],
                          [0.0, 0.0, 2.5, 55.0],
                          [0.0, 0.0, 0.0, 1.0]])
EXPECTED_ZOOMS = (0.9 * 20 / 16, 0.7 * 20 / 16, 2.5)  # 20 x 16 source pixels padded to 20 x 20, resized to 16
N_NII, N_PNG = 5, 3


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two sample folders of one tiny anatomical model (label set ctorgan, trained on a NIfTI volume with a
    non-canonical affine): NIfTI samples and PNG-only samples, both with masks; and a phantom PNG data folder."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("export")
    labels = np.zeros((16, 20, 4), np.uint8)
    labels[2:6, 3:8, :] = 1
    labels[9:14, 10:18, :] = 4
    hu = np.where(labels > 0, 120, -900).astype(np.int16)
    for sub, arr in (("images", hu), ("masks", labels)):
        os.makedirs(root / "data" / sub)
        nib.save(nib.Nifti1Image(arr, SOURCE_AFFINE), str(root / "data" / sub / "v.nii.gz"))
    config = tiny_config(True)
    config["model"]["params"]["label_set"] = "ctorgan"
    config["data"] = {"target": "main.DataModuleFromConfig", "params": {"batch_size": 4, "train": {
        "target": "ldm.data.medical_images.MedicalImagesBase",
        "params": {"data_root": str(root / "data" / "images"), "segmentation_root": str(root / "data" / "masks"),
                   "size": 16, "n_labels": 6, "intensity": "ct", "window": [40, 400]}}}}
    model = instantiate_from_config(config["model"])
    run = root / "2026-01-01T00-00-00_export"
    os.makedirs(run / "checkpoints")
    os.makedirs(run / "configs")
    torch.save({"state_dict": model.state_dict()}, run / "checkpoints" / "last.ckpt")
    OmegaConf.save(OmegaConf.create(config), run / "configs" / "2026-01-01T00-00-00-project.yaml")
    sample = load_script("sample")
    common = ["-r", str(run), "-c", "2", "--save_masks", "--no-progress", "--device", "cpu"]
    assert sample.main([*common, "-n", str(N_NII), "--batch_size", str(N_NII), "--seed", "3", "--format", "nii",
                        "-l", str(root / "nii")]) == 0
    assert sample.main([*common, "-n", str(N_PNG), "--batch_size", str(N_PNG), "--seed", "4",
                        "-l", str(root / "png")]) == 0
    write_phantom_2d(root / "phantom", size=16, slices_per_patient=2, patients={"train": 2})
    return {"root": root, "nii": str(root / "nii"), "png": str(root / "png"), "phantom": str(root / "phantom")}


def _tree(path) -> dict[str, bytes]:
    """Every file under ``path`` (relative path -> bytes)."""
    out = {}
    for dirpath, _, names in os.walk(path):
        for n in names:
            full = os.path.join(dirpath, n)
            out[os.path.relpath(full, path)] = open(full, "rb").read()
    return out


def _export(folders, out, **kwargs):
    kwargs.setdefault("progress", False)
    return export_dataset(folders["nii"], str(out), kwargs.pop("dataset_id", 501), kwargs.pop("name", "Syn"),
                          **kwargs)


def test_labels_and_geometry_round_trip_exactly(folders, tmp_path):
    result = _export(folders, tmp_path)
    assert result.num_synthetic == N_NII and result.num_real == 0
    ds = json.load(open(result.dataset_json))
    assert ds["labels"] == {"background": 0, "liver": 1, "bladder": 2, "lungs": 3, "kidneys": 4, "bone": 5}
    assert ds["numTraining"] == N_NII and ds["file_ending"] == ".nii.gz" and ds["channel_names"] == {"0": "CT"}
    manifest = json.load(open(os.path.join(folders["nii"], "samples.json")))
    for i in range(N_NII):
        case = f"syn_{i:06d}"
        image = nib.load(os.path.join(result.dataset_dir, "imagesTr", case + "_0000.nii.gz"))
        label = nib.load(os.path.join(result.dataset_dir, "labelsTr", case + ".nii.gz"))
        sample_img = nib.load(os.path.join(folders["nii"], "images", f"{i:06d}.nii.gz"))
        sample_mask = nib.load(os.path.join(folders["nii"], "masks", f"{i:06d}.nii.gz"))
        png_mask = np.asarray(Image.open(os.path.join(folders["nii"], "masks", f"{i:06d}.png")))
        assert image.shape == label.shape == (16, 16, 1)
        assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
        lab = np.asanyarray(label.dataobj)
        assert np.array_equal(lab, np.asanyarray(sample_mask.dataobj))  # exact, same voxel order
        values, counts = np.unique(lab, return_counts=True)
        png_values, png_counts = np.unique(png_mask, return_counts=True)  # the PNG's voxel counts too
        assert np.array_equal(values, png_values) and np.array_equal(counts, png_counts)
        assert set(values.tolist()) <= set(range(6))
        assert np.array_equal(np.asanyarray(image.dataobj), np.asanyarray(sample_img.dataobj).astype(np.float32))
        assert np.allclose(image.affine, sample_img.affine) and np.allclose(label.affine, sample_img.affine)
        assert np.allclose(image.header.get_zooms(), EXPECTED_ZOOMS)
        assert np.allclose(image.header.get_zooms(), manifest["geometry"]["spacing_mm"])
    card = json.load(open(result.card_json))
    assert card["synthetic"] is True and card["num_pairs"] == {"synthetic": N_NII, "real": 0, "total": N_NII}
    assert card["generator"]["checkpoint_sha256"] == manifest["checkpoint_sha256"]
    assert card["seeds"] == [3] and card["mask_source"] == "segmentation_head" and card["sampler"]["sampler"] == "ddim"
    assert card["generator"]["config"]["model"]["params"]["label_set"] == "ctorgan"
    readme = open(result.card_md).read()
    assert "**These data are synthetic.**" in readme and manifest["checkpoint_sha256"] in readme


def test_png_samples_get_unit_spacing_and_the_card_says_so(folders, tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"dice": {"liver": 0.91}, "rule_pass_rate": 0.75}))
    result = export_dataset(folders["png"], str(tmp_path / "out"), 7, "SynPng", benchmark=str(bench),
                            progress=False)
    for i in range(N_PNG):
        label = nib.load(os.path.join(result.dataset_dir, "labelsTr", f"syn_{i:06d}.nii.gz"))
        image = nib.load(os.path.join(result.dataset_dir, "imagesTr", f"syn_{i:06d}_0000.nii.gz"))
        mask = np.asarray(Image.open(os.path.join(folders["png"], "masks", f"{i:06d}.png")))
        pixels = np.asarray(Image.open(os.path.join(folders["png"], "images", f"{i:06d}.png")))
        assert label.shape == (16, 16, 1) and np.allclose(label.header.get_zooms(), 1.0)
        lab = np.asanyarray(label.dataobj)
        assert (np.unique(lab, return_counts=True)[1] == np.unique(mask, return_counts=True)[1]).all()
        assert np.allclose(np.sort(np.asanyarray(image.dataobj).ravel()), np.sort(pixels.ravel() / 127.5 - 1.0),
                           atol=1e-6)
    card = json.load(open(result.card_json))
    assert "unit spacing" in card["geometry"]["summary"] and card["benchmark"]["dice"]["liver"] == 0.91
    assert card["channel_names"] == {"0": "zscore"}  # a PNG-only folder records no CT window
    readme = open(result.card_md).read()
    assert "unit spacing" in readme and "| dice.liver | 0.91 |" in readme


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader:UserWarning")  # monai without nvImageCodec
def test_monai_reads_the_datalist_and_loads_the_files(folders, tmp_path):
    monai_data = pytest.importorskip("monai.data")
    from monai.transforms import LoadImage

    result = _export(folders, tmp_path, real_dir=folders["phantom"])
    items = monai_data.load_decathlon_datalist(result.datalist, is_segmentation=True, data_list_key="training")
    assert len(items) == N_NII + 4
    loader = LoadImage(image_only=True, reader="NibabelReader")
    for item in items:
        assert os.path.isabs(item["image"]) and os.path.isfile(item["image"]) and os.path.isfile(item["label"])
        image, label = loader(item["image"]), loader(item["label"])
        assert tuple(image.shape) == tuple(label.shape) == (16, 16, 1)
    raw = json.load(open(result.datalist))
    assert all(not os.path.isabs(e["image"]) for e in raw["training"])  # relative to the datalist's folder


def test_real_cases_are_mixed_in_by_prefix(folders, tmp_path):
    result = _export(folders, tmp_path / "a", real_dir=folders["phantom"])
    assert result.num_real == 4 and result.num_synthetic == N_NII
    names = sorted(os.listdir(os.path.join(result.dataset_dir, "labelsTr")))
    assert len([n for n in names if n.startswith("syn_")]) == N_NII
    real = [n for n in names if n.startswith("real_")]
    assert real == ["real_phantom-train-000-0000.nii.gz", "real_phantom-train-000-0001.nii.gz",
                    "real_phantom-train-001-0000.nii.gz", "real_phantom-train-001-0001.nii.gz"]
    source = np.asarray(Image.open(os.path.join(folders["phantom"], "train", "masks", "phantom-train-001", "0001.png")))
    got = np.asanyarray(nib.load(os.path.join(result.dataset_dir, "labelsTr", real[-1])).dataobj)
    assert (np.unique(got, return_counts=True)[1] == np.unique(source, return_counts=True)[1]).all()
    card = json.load(open(result.card_json))
    assert card["num_pairs"] == {"synthetic": N_NII, "real": 4, "total": N_NII + 4}
    assert card["real"]["layout"] == "slices" and json.load(open(result.dataset_json))["numTraining"] == N_NII + 4
    # an nnU-Net raw folder as --real: the first export's cases again, now with the real_ prefix
    second = export_dataset(folders["png"], str(tmp_path / "b"), 502, "Mixed", real_dir=result.dataset_dir,
                            progress=False)
    assert second.num_real == N_NII + 4 and second.num_synthetic == N_PNG and \
        "real_syn_000000" in second.cases and "real_real_phantom-train-000-0000" in second.cases
    assert json.load(open(second.card_json))["real"]["layout"] == "nnunet"
    # real NIfTI volumes (the phantom's split layout): kept as volumes, with their affine, as float32 / uint8
    write_phantom_nifti(tmp_path / "vol", size=16, slices_per_patient=3, patients={"train": 1})
    third = _export(folders, tmp_path / "c", real_dir=str(tmp_path / "vol"))
    assert third.num_real == 1 and "real_volume-0" in third.cases
    source = nib.load(tmp_path / "vol" / "train" / "masks" / "volume-0.nii.gz")
    got = nib.load(os.path.join(third.dataset_dir, "labelsTr", "real_volume-0.nii.gz"))
    image = nib.load(os.path.join(third.dataset_dir, "imagesTr", "real_volume-0_0000.nii.gz"))
    assert got.shape == source.shape == (16, 16, 3) and np.allclose(got.affine, source.affine)
    assert np.array_equal(np.asanyarray(got.dataobj), np.asanyarray(source.dataobj))
    assert got.get_data_dtype() == np.uint8 and image.get_data_dtype() == np.float32


def test_bad_input_is_refused_with_the_file_named_and_nothing_written(folders, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folders["nii"], broken)
    os.remove(broken / "samples.json")
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=f"{broken / 'samples.json'} is missing"):
        export_dataset(str(broken), str(out), 9, "X", progress=False)
    assert not out.exists()
    shutil.copy(os.path.join(folders["nii"], "samples.json"), broken / "samples.json")
    os.remove(broken / "masks" / "000002.nii.gz")
    with pytest.raises(FileNotFoundError, match=f"mask file {broken / 'masks' / '000002.nii.gz'} of sample 000002"):
        export_dataset(str(broken), str(out), 9, "X", progress=False)
    assert not out.exists() or os.listdir(out) == []
    # an existing dataset folder: refused, untouched; --overwrite replaces it only when the new one is complete
    first = _export(folders, out)
    before = _tree(first.dataset_dir)
    with pytest.raises(ValueError, match="Dataset501_Syn exists and is not empty; pass --overwrite"):
        _export(folders, out)
    with pytest.raises(FileNotFoundError, match="000002.nii.gz"):  # a failed overwrite loses nothing
        export_dataset(str(broken), str(out), 501, "Syn", overwrite=True, progress=False)
    assert _tree(first.dataset_dir) == before and os.listdir(out) == ["Dataset501_Syn"]
    again = _export(folders, out, overwrite=True, real_dir=folders["phantom"])
    assert again.num_real == 4 and os.listdir(out) == ["Dataset501_Syn"]
    with pytest.raises(ValueError, match="already holds Dataset501_Syn with the same dataset id"):
        _export(folders, out, name="Other")
    with pytest.raises(ValueError, match="--dataset-id must be an integer from 1 to 999"):
        _export(folders, tmp_path / "o2", dataset_id=1000)
    # labels outside the label set: named
    with pytest.raises(ValueError, match=r"holds label values \[2, 3, 4, 5\] outside the label set 'breastmri'|"
                                         r"outside the label set 'breastmri'"):
        _export(folders, tmp_path / "o3", label_set="breastmri", real_dir=folders["phantom"])
    assert not (tmp_path / "o3" / "Dataset501_Syn").exists()


def test_command_line_reports_one_line(folders, tmp_path, capsys):
    script = load_script("export_dataset")
    assert script.main([folders["png"], str(tmp_path), "--dataset-id", "12", "--name", "Cli", "--no-progress"]) == 0
    assert "wrote 3 synthetic and 0 real cases" in capsys.readouterr().out
    from ldm.atomic_io import run_script_reporting_writes

    code = run_script_reporting_writes(script.main, [folders["png"], str(tmp_path), "--dataset-id", "12", "--name",
                                                     "Cli", "--no-progress"])
    assert code == 2 and "Dataset012_Cli exists and is not empty" in capsys.readouterr().err


def test_slice_last_moves_the_single_slice_axis_and_keeps_world_positions():
    volume = np.arange(12, dtype=np.float32).reshape(3, 1, 4)
    affine = np.array([[0.5, 0, 0, 1], [0, 2.0, 0, 2], [0, 0, 0.7, 3], [0, 0, 0, 1]])
    out, moved = slice_last(volume, affine)
    assert out.shape == (3, 4, 1)
    for idx in np.ndindex(volume.shape):
        new = (idx[0], idx[2], idx[1])
        assert out[new] == volume[idx]
        assert np.allclose(moved @ np.array([*new, 1.0]), affine @ np.array([*idx, 1.0]))


def test_nnunet_accepts_plans_and_preprocesses_the_export(folders, tmp_path, monkeypatch):
    pytest.importorskip("nnunetv2")
    raw, pre, res = tmp_path / "raw", tmp_path / "pre", tmp_path / "res"
    for var, path in (("nnUNet_raw", raw), ("nnUNet_preprocessed", pre), ("nnUNet_results", res)):
        monkeypatch.setenv(var, str(path))
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    result = _export(folders, raw, dataset_id=503, name="SynNN", real_dir=folders["phantom"])
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiment_dataset, preprocess_dataset)
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(result.dataset_dir, num_processes=1)
    fingerprint = extract_fingerprint_dataset(503, DatasetFingerprintExtractor, num_processes=1, clean=True,
                                              verbose=False, show_progress_bar=False)
    n = N_NII + 4
    assert len(fingerprint["spacings"]) == n and len(fingerprint["shapes_after_crop"]) == n
    plans, identifier = plan_experiment_dataset(503, ExperimentPlanner)
    preprocess_dataset(503, identifier, ["2d"], [1], verbose=False, show_progress_bar=False)
    folder = pre / "Dataset503_SynNN"
    assert (folder / "dataset_fingerprint.json").is_file() and (folder / "dataset.json").is_file()
    written = json.load(open(folder / f"{identifier}.json"))
    assert written["dataset_name"] == "Dataset503_SynNN" and "2d" in written["configurations"]
    plan_2d = written["configurations"]["2d"]
    assert plan_2d["patch_size"] == [int(v) for v in plans["configurations"]["2d"]["patch_size"]] == [16, 16]
    assert plan_2d["normalization_schemes"] == ["CTNormalization"]  # channel "CT": a CT run's export
    assert list(written["configurations"]) == ["2d"]  # single-slice volumes: nnU-Net plans them as 2D data
    assert written["transpose_forward"] == [0, 1, 2] and written["original_median_spacing_after_transp"][0] == 2.5
    assert json.load(open(folder / "dataset.json"))["labels"] == json.load(open(result.dataset_json))["labels"]
    # spacing: the synthetic cases' in-plane 0.875 x 1.125 mm (numpy order) and the phantom PNGs' 1 mm, medians
    assert np.allclose(sorted(plan_2d["spacing"]), sorted([EXPECTED_ZOOMS[1], EXPECTED_ZOOMS[0]])) or \
        np.allclose(plan_2d["spacing"], [1.0, 1.0])
    intensity = written["foreground_intensity_properties_per_channel"]["0"]
    assert -1.0 - 1e-6 <= intensity["min"] <= intensity["max"] <= 1.0 + 1e-6  # every case in the model's [-1, 1]
    cases = sorted(p.name[:-4] for p in (folder / written["configurations"]["2d"]["data_identifier"]).glob("*.pkl"))
    assert cases == sorted(result.cases) and len(cases) == n
    assert len(list((folder / "gt_segmentations").glob("*.nii.gz"))) == n
    with open(folder / plan_2d["data_identifier"] / "syn_000000.pkl", "rb") as f:
        properties = pickle.load(f)  # the foreground classes nnU-Net found in the case, with voxel locations
    exported = np.asanyarray(nib.load(os.path.join(result.dataset_dir, "labelsTr", "syn_000000.nii.gz")).dataobj)
    found = {int(k) for k, v in properties["class_locations"].items() if len(v)}
    assert found == set(np.unique(exported).tolist()) - {0}
