"""scripts/prepare_ctorg.py and scripts/make_phantom_dataset.py on phantom volumes in tmp_path."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ldm.data.medical_images import CTOrganTest, CTOrganTrain, CTOrganValidation
from ldm.data.phantom import check_phantom_anatomy, write_phantom_nifti

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prepare():
    return _load("prepare_ctorg")


@pytest.fixture()
def raw(tmp_path) -> Path:
    """Ten CT-ORG-style phantom volumes (volume-N / labels-N side by side), 4 slices of 32 px."""
    write_phantom_nifti(tmp_path / "raw", size=32, slices_per_patient=4, layout="ctorg",
                        patients={"train": 10, "validation": 0, "test": 0})
    return tmp_path / "raw"


def _slice_dirs(out: Path, split: str) -> set[str]:
    return {p.name for p in (out / split / "images").iterdir()} if (out / split / "images").is_dir() else set()


def test_patient_level_split_and_idempotence(prepare, raw, tmp_path):
    out = tmp_path / "out"
    splits = prepare.main([str(raw), str(out), "--size", "16", "--val-fraction", "0.2", "--test-fraction", "0.2"])
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [6, 2, 2]
    recorded = json.loads((out / "split.json").read_text())
    assert recorded["splits"] == splits and recorded["settings"]["size"] == 16
    seen = [v for s in splits.values() for v in s]
    assert sorted(seen) == sorted(f"volume-{i}" for i in range(10))  # each volume in exactly one split
    for split in splits:
        assert _slice_dirs(out, split) == set(splits[split])
        for other in splits:
            assert other == split or _slice_dirs(out, split).isdisjoint(_slice_dirs(out, other))
    png = out / "train" / "images" / splits["train"][0] / "slice_0000.png"
    stamp = png.stat().st_mtime_ns
    assert prepare.main([str(raw), str(out), "--size", "16", "--val-fraction", "0.2",
                         "--test-fraction", "0.2"]) == splits
    assert png.stat().st_mtime_ns == stamp  # finished volumes are skipped
    train, val, test = (cls(data_root=out, size=16) for cls in (CTOrganTrain, CTOrganValidation, CTOrganTest))
    assert (len(train), len(val), len(test)) == (24, 8, 8)
    assert all(check_phantom_anatomy(train[i]["segmentation"]).valid_labels for i in range(len(train)))
    with pytest.raises(ValueError, match=r"split\.json was written with settings"):
        prepare.main([str(raw), str(out), "--size", "32"])


def test_patient_map_keeps_a_patient_together(prepare, raw, tmp_path):
    pmap = tmp_path / "patients.json"
    pmap.write_text(json.dumps({f"volume-{i}": "p-shared" for i in range(5)}))
    splits = prepare.main([str(raw), str(tmp_path / "o"), "--size", "8", "--patient-map", str(pmap),
                           "--val-fraction", "0.2", "--test-fraction", "0.2"])
    homes = {s for s, vols in splits.items() for v in vols if int(v.split("-")[1]) < 5}
    assert len(homes) == 1
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        prepare.main([str(raw), str(tmp_path / "o2"), "--patient-map", str(tmp_path / "nope.json")])


def test_prepare_errors_name_files(prepare, raw, tmp_path):
    (raw / "labels-3.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"volume-3\.nii\.gz has no label volume labels-3\.nii\.gz"):
        prepare.main([str(raw), str(tmp_path / "o")])
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 3), np.uint8), np.eye(4)), str(raw / "labels-3.nii.gz"))
    with pytest.raises(ValueError, match=r"volume-3\.nii\.gz has shape .*labels-3\.nii\.gz"):
        prepare.main([str(raw), str(tmp_path / "o3"), "--test-fraction", "0", "--val-fraction", "0"])
    with pytest.raises(ValueError, match="--val-fraction"):
        prepare.main([str(raw), str(tmp_path / "o4"), "--val-fraction", "0.6", "--test-fraction", "0.5"])
    with pytest.raises(FileNotFoundError, match=r"missing"):
        prepare.main([str(tmp_path / "missing"), str(tmp_path / "o5")])
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match=r"no CT-ORG volumes .*none"):
        prepare.main([str(tmp_path / "none"), str(tmp_path / "o6")])


def test_make_phantom_dataset_script(tmp_path):
    script = _load("make_phantom_dataset")
    result = script.main([str(tmp_path / "ph"), "--size", "16", "--slices", "3", "--train", "2",
                          "--validation", "1", "--test", "1"])
    assert len(result["train"]) == 2
    ds = CTOrganTrain(data_root=tmp_path / "ph", size=16)
    assert len(ds) == 6 and ds[0]["image"].shape == (16, 16, 1) and ds[0]["has_segmentation"]
    script.main([str(tmp_path / "nii"), "--format", "nifti", "--size", "16", "--slices", "3", "--train", "1",
                 "--validation", "0", "--test", "0"])
    vol = nib.load(str(tmp_path / "nii" / "train" / "images" / "volume-0.nii.gz"))
    assert vol.shape == (16, 16, 3) and vol.get_data_dtype() == np.int16
    assert np.asanyarray(vol.dataobj).min() < -500  # HU, not windowed


def test_prepare_more_errors(prepare, raw, tmp_path):
    lab = nib.load(str(raw / "labels-2.nii.gz"))
    data = np.asanyarray(lab.dataobj)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 1.0, 1.0, 1.0])), str(raw / "labels-2.nii.gz"))
    with pytest.raises(ValueError, match=r"volume-2\.nii\.gz and labels .*labels-2\.nii\.gz have different affines"):
        prepare.main([str(raw), str(tmp_path / "a"), "--test-fraction", "0", "--val-fraction", "0"])
    nib.save(nib.Nifti1Image(data.astype(np.float32) + 0.5, lab.affine), str(raw / "labels-2.nii.gz"))
    with pytest.raises(ValueError, match=r"labels-2\.nii\.gz holds non-integer"):
        prepare.main([str(raw), str(tmp_path / "b"), "--test-fraction", "0", "--val-fraction", "0"])
    nib.save(nib.Nifti1Image(data.astype(np.int16) + 300, lab.affine), str(raw / "labels-2.nii.gz"))
    with pytest.raises(ValueError, match=r"labels-2\.nii\.gz holds values outside 0\.\.255"):
        prepare.main([str(raw), str(tmp_path / "c"), "--test-fraction", "0", "--val-fraction", "0"])
    with pytest.raises(ValueError, match="too few"):
        prepare.split_patients(["volume-0"], {}, 0.5, 0.4, 0)
    out = tmp_path / "d"
    out.mkdir()
    settings = {"size": 256, "window": [40.0, 400.0], "val_fraction": 0.1, "test_fraction": 0.2, "seed": 0,
                "slice_axis": 2}
    (out / "split.json").write_text(json.dumps({"settings": settings,
                                                "splits": {"train": ["volume-0"], "validation": [], "test": []}}))
    with pytest.raises(ValueError, match=r"split\.json lists other volumes"):
        prepare.main([str(raw), str(out)])
