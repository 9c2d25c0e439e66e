"""scripts/prepare_dicom.py and scripts/prepare_breastmri.py on small synthetic DICOM series written with pydicom."""
from __future__ import annotations

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
                 intercept=-1024.0, shuffle=True, study_date="20240101") -> str:
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
        ds.StudyDate = study_date
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


def _source_datasets(folder: Path) -> list:
    """The slices of a series written by ``write_series``, sorted by z (the order of ``stored``), with the patient
    and study attributes a DICOM-SEG copies (``write_series`` leaves them out)."""
    slices = sorted((pydicom.dcmread(p) for p in folder.glob("*.dcm")), key=lambda d: float(d.ImagePositionPatient[2]))
    for ds in slices:
        ds.PatientName = f"{ds.PatientID}^"  # family name only, unambiguous for highdicom
        ds.PatientBirthDate, ds.PatientSex, ds.StudyTime = "", "O", "120000"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
    return slices


def write_seg(series_folder: Path, path: Path, segments: dict[str, np.ndarray]) -> None:
    """A binary DICOM-SEG (highdicom) of the series in ``series_folder``; ``segments`` maps segment labels (numbered
    1, 2, ... in order) to boolean arrays [slice, row, column]. The source slices are handed over from the top
    down, so only their SOP instance UIDs, not the order, tell where a frame belongs."""
    hd = pytest.importorskip("highdicom")
    from pydicom.sr.codedict import codes

    slices = _source_datasets(series_folder)[::-1]
    masks = np.stack([m[::-1] for m in segments.values()], axis=-1)
    descriptions = [hd.seg.SegmentDescription(segment_number=i + 1, segment_label=label,
                                              segmented_property_category=codes.SCT.Organ,
                                              segmented_property_type=codes.SCT.Organ, algorithm_type="MANUAL")
                    for i, label in enumerate(segments)]
    seg = hd.seg.Segmentation(source_images=slices, pixel_array=masks, segmentation_type="BINARY",
                              segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=300,
                              sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test",
                              manufacturer_model_name="test", software_versions="0", device_serial_number="0")
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(str(path))


def _organs(shape=(4, 6, 5)) -> dict[str, np.ndarray]:
    """Three segments [slice, row, column]: liver, kidney, and a tumour overlapping the kidney."""
    liver, kidney, tumour = (np.zeros(shape, bool) for _ in range(3))
    liver[0:2, 1:3, 0:2] = True
    kidney[2:4, 3:6, 2:5] = True
    tumour[3, 4, 3:5] = True
    return {"Liver": liver, "Kidney": kidney, "Tumour": tumour}


def test_prepare_dicom_places_dicom_seg_segments_on_the_series_grid(tmp_path):
    pytest.importorskip("highdicom", reason="the 'dicom' extra (highdicom) is not installed")
    mod = _load_script("prepare_dicom")
    dicom = tmp_path / "dicom"
    write_series(dicom / "P0" / "ct", "P0", _volume(0))
    write_series(dicom / "P1" / "ct", "P1", _volume(1))
    organs = _organs()
    write_seg(dicom / "P0" / "ct", dicom / "P0" / "seg" / "seg.dcm", organs)  # beside the images: not an image

    splits = mod.main([str(dicom), str(tmp_path / "out"), "--dicom-seg", str(dicom), "--seg-label-map", "1:2",
                       "kidney:4", "Tumour:5", "--val-fraction", "0", "--test-fraction", "0"])
    assert splits["train"] == ["P0", "P1"]
    record = json.loads((tmp_path / "out" / "split.json").read_text())
    assert [(r["patient"], r["mask"]) for r in record["series"]] == [("P0", True), ("P1", False)]
    image = nib.load(str(tmp_path / "out" / "train" / "images" / "P0" / "1_axial.nii.gz"))
    mask = nib.load(str(tmp_path / "out" / "train" / "masks" / "P0" / "1_axial.nii.gz"))
    expected = np.zeros((4, 6, 5), np.uint8)
    expected[organs["Liver"]], expected[organs["Kidney"]], expected[organs["Tumour"]] = 2, 4, 5
    assert mask.get_data_dtype() == np.uint8
    assert np.allclose(mask.affine, image.affine) and np.allclose(image.affine, expected_ras_affine(
        (-10.0, 20.0, 30.0), (0.8, 0.7), 2.5), atol=1e-4)
    labels = np.asarray(mask.dataobj)
    assert np.array_equal(labels, expected.transpose(2, 1, 0))  # NIfTI voxel order (column, row, slice)
    assert np.count_nonzero(labels == 5) == 2 and np.count_nonzero(labels == 4) == 2 * 3 * 3 - 2
    assert not (tmp_path / "out" / "train" / "masks" / "P1").exists()

    # without a map the segment numbers are the class ids; the tumour (3), listed after the kidney, wins
    mod.main([str(dicom / "P0" / "ct"), str(tmp_path / "out2"), "--dicom-seg", str(dicom / "P0" / "seg"),
              "--val-fraction", "0", "--test-fraction", "0"])
    labels = np.asarray(nib.load(str(tmp_path / "out2" / "train" / "masks" / "P0" / "1_axial.nii.gz")).dataobj)
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2, 3]
    assert np.array_equal(labels == 3, organs["Tumour"].transpose(2, 1, 0))
    assert np.array_equal(labels == 1, organs["Liver"].transpose(2, 1, 0))

    # frames that name no source slice are placed by their plane positions: the same mask
    seg = pydicom.dcmread(dicom / "P0" / "seg" / "seg.dcm")
    for frame in seg.PerFrameFunctionalGroupsSequence:
        del frame.DerivationImageSequence
    (tmp_path / "noref").mkdir()
    seg.save_as(tmp_path / "noref" / "seg.dcm", enforce_file_format=True)
    mod.main([str(dicom / "P0" / "ct"), str(tmp_path / "out3"), "--dicom-seg", str(tmp_path / "noref"),
              "--val-fraction", "0", "--test-fraction", "0"])
    by_position = nib.load(str(tmp_path / "out3" / "train" / "masks" / "P0" / "1_axial.nii.gz"))
    assert np.array_equal(np.asarray(by_position.dataobj), labels) and np.allclose(by_position.affine, image.affine)


def test_dicom_seg_errors(tmp_path, monkeypatch):
    pytest.importorskip("highdicom", reason="the 'dicom' extra (highdicom) is not installed")
    mod = _load_script("prepare_dicom")
    write_series(tmp_path / "a", "PA", _volume(0))
    b_uid = write_series(tmp_path / "b", "PB", _volume(1))
    write_seg(tmp_path / "a", tmp_path / "segs" / "a.dcm", _organs())
    with pytest.raises(ValueError, match=r"references series .* not among the 1 DICOM series of the input"):
        mod.main([str(tmp_path / "b"), str(tmp_path / "o1"), "--dicom_seg", str(tmp_path / "segs")])
    assert not (tmp_path / "o1").exists()  # refused before anything was written

    # a SEG relabelled to series b still references a's slices
    seg = pydicom.dcmread(tmp_path / "segs" / "a.dcm")
    seg.ReferencedSeriesSequence[0].SeriesInstanceUID = b_uid
    (tmp_path / "segs_b").mkdir()
    seg.save_as(tmp_path / "segs_b" / "a_as_b.dcm", enforce_file_format=True)
    with pytest.raises(ValueError, match="instance.* that are not slices of series"):
        mod.main([str(tmp_path / "b"), str(tmp_path / "o2"), "--dicom_seg", str(tmp_path / "segs_b")])
    (tmp_path / "segs_b" / "copy.dcm").write_bytes((tmp_path / "segs_b" / "a_as_b.dcm").read_bytes())
    with pytest.raises(ValueError, match="both segment series"):
        mod.find_dicom_segs(tmp_path / "segs_b")
    with pytest.raises(ValueError, match="no DICOM-SEG files"):
        mod.find_dicom_segs(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="DICOM-SEG folder"):
        mod.find_dicom_segs(tmp_path / "none")
    for bad in (["Liver"], ["Liver:256"], [":3"]):
        with pytest.raises(ValueError, match="SEGMENT:ID"):
            mod.parse_seg_label_map(bad)
    with pytest.raises(ValueError, match="give the DICOM-SEG folder with --dicom_seg"):
        mod.main([str(tmp_path / "a"), str(tmp_path / "o3"), "--seg_label_map", "Liver:1"])
    monkeypatch.setitem(sys.modules, "highdicom", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[dicom\]'"):
        mod.find_dicom_segs(tmp_path / "segs")


def test_prepare_breastmri_skip_bad_converts_the_good_patients(tmp_path):
    mod = _load_script("prepare_breastmri")
    root = tmp_path / "Duke-Breast-Cancer-MRI"
    for i, patient in enumerate(("Breast_MRI_001", "Breast_MRI_002")):
        write_series(root / patient / "study" / "3.000000-ax dyn pre-1", patient, _volume(i), modality="MR",
                     description="ax dyn pre", number=3, intercept=0.0)
    bad = sorted((root / "Breast_MRI_002").rglob("*.dcm"))
    bad[1].unlink()  # a missing slice inside the stack: the series' geometry is wrong
    args = [str(root), str(tmp_path / "out"), "--val_fraction", "0", "--test_fraction", "0"]
    with pytest.raises(ValueError, match="Breast_MRI_002.*missing"):
        mod.main(args)
    assert not (tmp_path / "out").exists()
    splits = mod.main([*args, "--skip-bad"])
    assert splits["train"] == ["Breast_MRI_001"]
    record = json.loads((tmp_path / "out" / "split.json").read_text())
    assert [s["patient"] for s in record["skipped"]] == ["Breast_MRI_002"]
    assert "missing" in record["skipped"][0]["reason"]
