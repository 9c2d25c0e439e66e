"""scripts/prepare_dicom.py and scripts/prepare_breastmri.py on small synthetic DICOM series written with pydicom."""
from __future__ import annotations

import datetime
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="the 'dicom' extra (pydicom) is not installed")
sitk = pytest.importorskip("SimpleITK", reason="the 'dicom' extra (SimpleITK) is not installed")
nib = pytest.importorskip("nibabel")

ROOT = Path(__file__).resolve().parents[1]
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def write_series(folder: Path, patient: str, stored: np.ndarray, *, origin=(-10.0, 20.0, 30.0),
                 spacing=(0.8, 0.7), thickness=2.5, modality="CT", description="axial", number=1,
                 intercept=-1024.0, shuffle=True) -> str:
    """Slices ``stored[k]`` (rows x columns, uint16) as DICOM files at z = origin_z + k * thickness, written in a
    scrambled order under scrambled names so the reader must sort them by position. Returns the series UID."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid = generate_uid(), generate_uid()
    order = np.random.default_rng(number).permutation(len(stored)) if shuffle else range(len(stored))
    for n, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"x{n:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.PatientName = patient, patient
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality, ds.SeriesDescription, ds.SeriesNumber = modality, description, number
        ds.StudyDate = datetime.date(2024, 1, 1).strftime("%Y%m%d")
        ds.InstanceNumber = int(k) + 1
        ds.FrameOfReferenceUID = study_uid
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * thickness]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[0], spacing[1]]  # row spacing (y), column spacing (x)
        ds.SliceThickness = thickness
        ds.Rows, ds.Columns = stored.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = intercept, 1
        ds.PixelData = np.ascontiguousarray(stored[k].astype(np.uint16)).tobytes()
        ds.save_as(str(folder / f"x{n:03d}.dcm"), enforce_file_format=True)
    return series_uid


def expected_ras_affine(origin, spacing, thickness) -> np.ndarray:
    """The NIfTI (RAS) affine of a series with identity orientation in DICOM's LPS: x and y flip sign."""
    affine = np.diag([-spacing[1], -spacing[0], thickness, 1.0])
    affine[:3, 3] = [-origin[0], -origin[1], origin[2]]
    return affine


def _volume(seed: int, shape=(4, 6, 5)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2000, shape).astype(np.uint16)


def test_prepare_dicom_converts_series_with_geometry_masks_and_patient_splits(tmp_path):
    mod = _load_script("prepare_dicom")
    dicom, masks = tmp_path / "dicom", tmp_path / "masks"
    vols = {f"P{i}": _volume(i) for i in range(5)}
    for patient, stored in vols.items():
        write_series(dicom / patient / "ct", patient, stored)
    write_series(dicom / "P0" / "localizer", "P0", _volume(9, (2, 6, 5)), modality="CT", description="scout",
                 number=2)
    # a mask for P1 in NIfTI, written in the RAS voxel order (x = column, y = row, z = slice)
    stored = vols["P1"]
    labels = (stored > 1000).astype(np.uint8) + (stored > 1500).astype(np.uint8)  # [slice, row, column]
    affine = expected_ras_affine((-10.0, 20.0, 30.0), (0.8, 0.7), 2.5)
    masks.mkdir()
    nib.save(nib.Nifti1Image(labels.transpose(2, 1, 0), affine), str(masks / "P1_labels.nii.gz"))

    splits = mod.main([str(dicom), str(tmp_path / "out"), "--modality", "CT", "--series-description", "^axial$",
                       "--masks", str(masks), "--val-fraction", "0.2", "--test-fraction", "0.2", "--seed", "1"])
    assert sorted(p for s in splits.values() for p in s) == sorted(vols)  # each patient in exactly one split
    assert all(len(splits[s]) == 1 for s in ("validation", "test")) and len(splits["train"]) == 3
    record = json.loads((tmp_path / "out" / "split.json").read_text())
    assert {r["description"] for r in record["series"]} == {"axial"}  # the scout series is left out
    split_of = {p: s for s, ps in splits.items() for p in ps}

    img_path = tmp_path / "out" / split_of["P1"] / "images" / "P1" / "1_axial.nii.gz"
    img = nib.load(str(img_path))
    assert np.allclose(img.affine, affine, atol=1e-4)
    assert np.allclose(img.header.get_zooms()[:3], (0.7, 0.8, 2.5), atol=1e-5)
    data = np.asarray(img.dataobj)
    assert np.array_equal(data, stored.transpose(2, 1, 0).astype(np.float64) - 1024)  # HU, slices sorted by z
    mask = nib.load(str(tmp_path / "out" / split_of["P1"] / "masks" / "P1" / "1_axial.nii.gz"))
    assert mask.get_data_dtype() == np.uint8 and np.allclose(mask.affine, affine, atol=1e-4)
    assert np.array_equal(np.asarray(mask.dataobj), labels.transpose(2, 1, 0))
    assert not (tmp_path / "out" / split_of["P2"] / "masks" / "P2").exists()  # no mask given for P2

    from ldm.data.medical_images import MedicalImagesBase

    split = split_of["P1"]
    ds = MedicalImagesBase(tmp_path / "out" / split / "images", tmp_path / "out" / split / "masks", n_labels=3,
                           intensity="ct")
    assert len(ds) == 4 * len(splits[split]) and ds[0]["image"].shape[-1] == 1


def test_prepare_dicom_errors(tmp_path):
    mod = _load_script("prepare_dicom")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mod.find_series(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no DICOM series"):
        mod.find_series(tmp_path / "empty")
    write_series(tmp_path / "d", "P0", _volume(0))
    with pytest.raises(ValueError, match="no series match"):
        mod.main([str(tmp_path / "d"), str(tmp_path / "o"), "--modality", "MR"])
    with pytest.raises(ValueError, match="SRC:DST"):
        mod.parse_label_map(["1-2"])


def _nrrd(path: Path, labels: np.ndarray, segments: dict[str, int] | None = None) -> None:
    """A label volume [slice, row, column] on the synthetic series' grid (LPS origin and spacing set directly),
    with Slicer-style segment names in the header."""
    image = sitk.GetImageFromArray(labels.astype(np.uint8))
    image.SetSpacing((0.7, 0.8, 2.5))  # column (x), row (y), slice (z)
    image.SetOrigin((-10.0, 20.0, 30.0))
    for i, (name, value) in enumerate((segments or {}).items()):
        image.SetMetaData(f"Segment{i}_Name", name)
        image.SetMetaData(f"Segment{i}_LabelValue", str(value))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def test_prepare_breastmri_duke_layout_combines_breast_and_dense_vessel_files(tmp_path):
    mod = _load_script("prepare_breastmri")
    root = tmp_path / "Duke-Breast-Cancer-MRI"
    for i, patient in enumerate(("Breast_MRI_001", "Breast_MRI_002", "Breast_MRI_003")):
        study = root / patient / "01-01-1990-NA-MRI BREAST BILATERAL-97538"
        write_series(study / "3.000000-ax dyn pre-93877", patient, _volume(i), modality="MR",
                     description="ax dyn pre", number=3, intercept=0.0)
        write_series(study / "4.000000-ax dyn 1st pass-3", patient, _volume(10 + i), modality="MR",
                     description="ax dyn 1st pass", number=4, intercept=0.0)
    breast = np.zeros((4, 6, 5), np.uint8)
    breast[:, 1:5, 1:4] = 1
    dense = np.zeros((4, 6, 5), np.uint8)
    dense[1, 2, 2] = 2         # stored 2 = "Dense" in the header -> class 2
    dense[2, 3, 1:3] = 1       # stored 1 = "Vessels" -> class 3
    segs = tmp_path / "segmentations"
    _nrrd(segs / "Segmentation_Breast_MRI_001_Breast.seg.nrrd", breast, {"Breast": 1})
    _nrrd(segs / "Segmentation_Breast_MRI_001_Dense_and_Vessels.seg.nrrd", dense, {"Vessels": 1, "Dense": 2})

    splits = mod.main([str(root), str(tmp_path / "out"), "--segmentations", str(segs),
                       "--val_fraction", "0.34", "--test_fraction", "0"])
    split_of = {p: s for s, ps in splits.items() for p in ps}
    assert sorted(split_of) == ["Breast_MRI_001", "Breast_MRI_002", "Breast_MRI_003"]
    record = json.loads((tmp_path / "out" / "split.json").read_text())
    assert {r["description"] for r in record["series"]} == {"ax dyn pre"} and len(record["series"]) == 3
    base = tmp_path / "out" / split_of["Breast_MRI_001"]
    mask = np.asarray(nib.load(str(base / "masks" / "Breast_MRI_001" / "3_ax_dyn_pre.nii.gz")).dataobj)
    expected = breast.copy()
    expected[dense == 2] = 2
    expected[dense == 1] = 3
    assert np.array_equal(mask, expected.transpose(2, 1, 0))  # NIfTI voxel order (column, row, slice)
    assert sorted(np.unique(mask).tolist()) == [0, 1, 2, 3]
    image = np.asarray(nib.load(str(base / "images" / "Breast_MRI_001" / "3_ax_dyn_pre.nii.gz")).dataobj)
    assert np.array_equal(image, _volume(0).transpose(2, 1, 0))
    assert not any((tmp_path / "out").rglob("*1st_pass*"))


def test_breastmri_segment_names_must_be_known(tmp_path):
    mod = _load_script("prepare_breastmri")
    image = sitk.GetImageFromArray(np.zeros((2, 2, 2), np.uint8))
    image.SetMetaData("Segment0_Name", "Tumour")
    image.SetMetaData("Segment0_LabelValue", "1")
    with pytest.raises(ValueError, match="neither dense tissue nor vessels"):
        mod.segment_values(image, 1, 2, "x.seg.nrrd")
    assert mod.segment_values(sitk.GetImageFromArray(np.zeros((2, 2, 2), np.uint8)), 4, 5, "y") == {4: 2, 5: 3}
    with pytest.raises(FileNotFoundError, match="segmentation folder"):
        mod.DukeMasks(tmp_path / "none", "*", "*")
