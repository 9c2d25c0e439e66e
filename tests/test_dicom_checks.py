"""scripts/prepare_dicom.py writes nothing silently wrong (issue 31): unique output paths for follow-up studies,
slice-by-slice geometry checks before anything is written, bad series named (or skipped with --skip_bad), and
multi-frame (enhanced CT) files read as one volume. Synthetic series from tests/test_dicom.py, and pydicom's
bundled vendor files (CT_small.dcm, MR_small.dcm, MR_truncated.dcm; no network)."""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from test_dicom import _load_script, _volume, expected_ras_affine, nib, pydicom, write_series  # noqa: E402

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def _run(src: Path, out: Path, *extra: str) -> dict:
    """prepare_dicom.main with every patient in train."""
    return _load_script("prepare_dicom").main([str(src), str(out), "--val-fraction", "0", "--test-fraction", "0",
                                               *extra])


def _tail(uid: str) -> str:
    return re.sub(r"\D", "", uid)[-8:]


def test_follow_up_studies_of_one_patient_get_their_own_files(tmp_path):
    src = tmp_path / "dicom"
    volumes = {write_series(src / "P0" / "visit1", "P0", _volume(0), study_date="20240101"): _volume(0),
               write_series(src / "P0" / "visit2", "P0", _volume(1), study_date="20240315"): _volume(1),
               write_series(src / "P0" / "visit2b", "P0", _volume(2), study_date="20240315"): _volume(2),
               write_series(src / "P1" / "ct", "P1", _volume(3)): _volume(3)}
    uids = list(volumes)
    _run(src, tmp_path / "out")
    record = json.loads((tmp_path / "out" / "split.json").read_text())
    assert {r["uid"]: r["file"] for r in record["series"]} == {
        uids[0]: "P0/1_axial_20240101.nii.gz",                 # the study date tells the visits apart
        uids[1]: f"P0/1_axial_20240315_{_tail(uids[1])}.nii.gz",  # two studies on one day: the UID's tail too
        uids[2]: f"P0/1_axial_20240315_{_tail(uids[2])}.nii.gz",
        uids[3]: "P1/1_axial.nii.gz"}                          # no clash: the name is kept
    for r in record["series"]:  # each file holds its own series (before the fix the last visit overwrote them)
        data = np.asarray(nib.load(str(tmp_path / "out" / "train" / "images" / r["file"])).dataobj)
        assert np.array_equal(data, volumes[r["uid"]].transpose(2, 1, 0) - 1024.0)


def test_two_series_on_one_output_path_are_refused_before_writing():
    from ldm.data.dicom_read import Series, check_unique_outputs

    a = Series("P0", "1.2.3", "CT", "axial", "1", output_name="1_axial")
    b = Series("P0", "1.2.4", "CT", "AXIAL", "1", output_name="1_AXIAL")  # one file on a case-blind file system
    check_unique_outputs([a])
    with pytest.raises(ValueError, match=r"series 1\.2\.3, 1\.2\.4 would all be written to P0/1_axial\.nii\.gz"):
        check_unique_outputs([a, b])


def _gap_series(src: Path, patient: str = "P0", drop: str = "x003.dcm") -> str:
    """Six slices 5 mm apart at z = 30 ... 55 (files x000..x005 in slice order), one of them removed."""
    uid = write_series(src / patient, patient, _volume(0, (6, 6, 5)), thickness=5.0, shuffle=False)
    (src / patient / drop).unlink()
    return uid


def test_a_missing_slice_stops_the_run_with_its_position(tmp_path):
    src = tmp_path / "dicom"
    uid = _gap_series(src)  # before the fix: one volume with 6.25 mm spacing, slices after the gap misplaced
    with pytest.raises(ValueError) as err:
        _run(src, tmp_path / "out")
    folder = src / "P0"
    assert (f"1 of 1 series cannot be converted: series {uid} (patient P0, 1_axial, 5 file(s)): 1 slice(s) missing "
            f"(expected spacing 5 mm): 1 missing between {folder / 'x002.dcm'} (at 40 mm) and "
            f"{folder / 'x004.dcm'} (at 50 mm), expected at 45 mm") in str(err.value)
    assert "--skip_bad" in str(err.value) and not (tmp_path / "out").exists()


def test_truncated_and_duplicate_slices_are_named(tmp_path):
    src = tmp_path / "dicom"
    write_series(src / "P0", "P0", _volume(0, (4, 6, 5)), shuffle=False)
    cut = src / "P0" / "x002.dcm"
    cut.write_bytes(cut.read_bytes()[:-30])  # 6 x 5 pixels x 16 bits = 60 pixel bytes, 30 left
    with pytest.raises(ValueError, match=re.escape(f"{cut} is truncated: its pixel data element declares 60 bytes "
                                                   "but the file holds 30 of them")):
        _run(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    write_series(src / "P1", "P1", _volume(1, (4, 6, 5)), shuffle=False)
    copy = pydicom.dcmread(src / "P1" / "x001.dcm")
    copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    copy.save_as(src / "P1" / "again.dcm", enforce_file_format=True)  # a second image at z = 32.5
    with pytest.raises(ValueError) as err:
        _run(src / "P1", tmp_path / "out")  # before the fix: stacked with an invented 1 mm spacing
    names = sorted([str(src / "P1" / "again.dcm"), str(src / "P1" / "x001.dcm")])
    assert re.search(rf"2 slices share 1 position\(s\) along the slice normal: ({re.escape(names[0])}, "
                     rf"{re.escape(names[1])}|{re.escape(names[1])}, {re.escape(names[0])}) at 32.5 mm",
                     str(err.value))


def test_a_bad_series_stops_the_run_or_is_skipped_with_skip_bad(tmp_path, caplog):
    src = tmp_path / "dicom"
    write_series(src / "P0", "P0", _volume(0))
    bad_uid = _gap_series(src, "P1", drop="x002.dcm")
    reason = (f"1 slice(s) missing (expected spacing 5 mm): 1 missing between {src / 'P1' / 'x001.dcm'} (at 35 mm) "
              f"and {src / 'P1' / 'x003.dcm'} (at 45 mm), expected at 40 mm")
    with pytest.raises(ValueError, match=re.escape(f"series {bad_uid} (patient P1, 1_axial, 5 file(s)): {reason}")):
        _run(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # before the fix P0 was written before P1 failed

    with caplog.at_level(logging.WARNING):
        splits = _run(src, tmp_path / "out", "--skip-bad")
    assert splits["train"] == ["P0"]
    record = json.loads((tmp_path / "out" / "split.json").read_text())
    assert [r["patient"] for r in record["series"]] == ["P0"] and record["settings"]["skip_bad"] is True
    assert record["skipped"] == [{"patient": "P1", "series": "1_axial", "uid": bad_uid, "description": "axial",
                                  "files": 5, "reason": reason}]
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.nii.gz")) == \
        ["train/images/P0/1_axial.nii.gz"]
    warnings = [r.getMessage() for r in caplog.records if "skip_bad" in r.getMessage()]
    assert len(warnings) == 1 and bad_uid in warnings[0] and reason in warnings[0]


def test_a_failure_while_converting_leaves_nothing_written(tmp_path):
    src, masks = tmp_path / "dicom", tmp_path / "masks"
    write_series(src / "P0", "P0", _volume(0))
    write_series(src / "P1", "P1", _volume(1))
    masks.mkdir()
    for name in ("P1_a.nii.gz", "P1_b.nii.gz"):  # P1's mask is ambiguous: found only after P0 is converted
        nib.save(nib.Nifti1Image(np.zeros((5, 6, 4), np.uint8), np.eye(4)), str(masks / name))
    with pytest.raises(ValueError, match="several masks match 'P1\\*' .* nothing was written"):
        _run(src, tmp_path / "out", "--masks", str(masks))
    assert not (tmp_path / "out").exists()
    _run(src, tmp_path / "out2", "--masks", str(masks), "--skip_bad")
    record = json.loads((tmp_path / "out2" / "split.json").read_text())
    assert [r["patient"] for r in record["series"]] == ["P0"] and record["skipped"][0]["patient"] == "P1"
    assert "several masks match" in record["skipped"][0]["reason"]
    assert not (tmp_path / "out2" / ".partial").exists()


def write_enhanced_ct(path: Path, patient: str, stored: np.ndarray, *, origin=(-10.0, 20.0, 30.0),
                      spacing=(0.8, 0.7), step=2.5, reverse=False, spacing_between_slices=True,
                      positions=True) -> str:
    """An Enhanced CT Image Storage file holding ``stored[k]`` (uint16, rescaled by -1024) as frames at
    z = origin_z + k * step, stored bottom-up (or top-down with ``reverse``). Returns the series UID."""
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ENHANCED_CT, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_CT, meta.MediaStorageSOPInstanceUID
    ds.PatientID = ds.PatientName = patient
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.SeriesDescription, ds.SeriesNumber, ds.StudyDate = "CT", "enhanced", 5, "20240101"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames, (ds.Rows, ds.Columns) = len(stored), stored.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    measures, plane, values = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = list(spacing), step
    if spacing_between_slices:
        measures.SpacingBetweenSlices = step
    plane.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    values.RescaleIntercept, values.RescaleSlope, values.RescaleType = -1024, 1, "HU"
    shared = Dataset()
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([plane])
    shared.PixelValueTransformationSequence = Sequence([values])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    order = list(range(len(stored)))[::-1] if reverse else list(range(len(stored)))
    frames = []
    for n, k in enumerate(order):
        frame, where, content = Dataset(), Dataset(), Dataset()
        where.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * step]
        content.InStackPositionNumber, content.StackID = n + 1, "1"
        frame.FrameContentSequence = Sequence([content])
        if positions:
            frame.PlanePositionSequence = Sequence([where])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.ascontiguousarray(stored[order].astype(np.uint16)).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return str(ds.SeriesInstanceUID)


@pytest.mark.parametrize("reverse,spacing_between_slices", [(False, True), (True, False)])
def test_a_multi_frame_enhanced_ct_file_is_read_as_one_volume(tmp_path, reverse, spacing_between_slices):
    stored = _volume(5, (5, 6, 4))
    write_enhanced_ct(tmp_path / "dicom" / "P0" / "enhanced.dcm", "P0", stored, reverse=reverse,
                      spacing_between_slices=spacing_between_slices)
    _run(tmp_path / "dicom", tmp_path / "out")  # before the fix: "not a single-channel 3D volume (dimension 4)"
    img = nib.load(str(tmp_path / "out" / "train" / "images" / "P0" / "5_enhanced.nii.gz"))
    data = np.asarray(img.dataobj)
    if reverse:  # stored top-down: voxel k is frame k, the affine runs downwards
        data = data[:, :, ::-1]
        img_affine = img.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 4], [0, 0, 0, 1]])
    else:
        img_affine = img.affine
    assert np.allclose(img_affine, expected_ras_affine((-10.0, 20.0, 30.0), (0.8, 0.7), 2.5), atol=1e-4)
    assert np.array_equal(data, stored.transpose(2, 1, 0).astype(np.float64) - 1024)  # HU


def test_a_multi_frame_file_without_frame_positions_is_named(tmp_path):
    write_enhanced_ct(tmp_path / "dicom" / "P0" / "enhanced.dcm", "P0", _volume(5, (3, 6, 4)), positions=False)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'dicom' / 'P0' / 'enhanced.dcm'} frame 1 has no "
                                                   "PlanePositionSequence")):
        _run(tmp_path / "dicom", tmp_path / "out")


def _bundled(name: str) -> Path:
    """A test file shipped inside the pydicom wheel (never downloaded); skip when this pydicom lacks it."""
    import pydicom.data

    if not (Path(pydicom.data.__file__).parent / "test_files" / name).is_file():
        pytest.skip(f"{name} is not bundled with this pydicom")
    return Path(pydicom.data.get_testdata_file(name))


def _vendor_series(source: Path, folder: Path, n: int, step: float) -> tuple[list[Path], pydicom.Dataset]:
    """``n`` copies of one vendor slice as one series, ``step`` mm apart along z (files v0..)."""
    ds = pydicom.dcmread(source)
    folder.mkdir(parents=True)
    ds.SeriesInstanceUID, z0 = pydicom.uid.generate_uid(), float(ds.ImagePositionPatient[2])
    paths = []
    for k in range(n):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], z0 + k * step]
        ds.InstanceNumber = k + 1
        paths.append(folder / f"v{k}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths, ds


def test_vendor_ct_slices_convert_and_a_missing_one_is_found(tmp_path):
    paths, ds = _vendor_series(_bundled("CT_small.dcm"), tmp_path / "ct", 4, 5.0)
    _run(tmp_path / "ct", tmp_path / "out")
    record = json.loads((tmp_path / "out" / "split.json").read_text())
    (series,) = record["series"]
    assert np.allclose(series["spacing"], [float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0]), 5.0])
    data = np.asarray(nib.load(str(tmp_path / "out" / "train" / "images" / series["file"])).dataobj)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert data.shape == (128, 128, 4) and np.array_equal(data[:, :, 2], hu.T)
    paths[2].unlink()  # CT_small lies at z = -75.7 mm: the gap is at -65.7
    with pytest.raises(ValueError, match=re.escape(f"1 missing between {paths[1]} (at -70.7 mm) and {paths[3]} "
                                                   "(at -60.7 mm), expected at -65.7 mm")):
        _run(tmp_path / "ct", tmp_path / "out2")


def test_vendor_mr_truncated_files_are_named(tmp_path):
    from ldm.data.dicom_series import read_slice_header

    truncated = _bundled("MR_truncated.dcm")
    with pytest.raises(ValueError, match=re.escape(f"{truncated} is truncated: its pixel data element declares "
                                                   "8192 bytes but the file holds")):
        read_slice_header(str(truncated))
    paths, _ = _vendor_series(_bundled("MR_small.dcm"), tmp_path / "mr", 3, 4.0)
    shutil.copyfile(paths[1], tmp_path / "copy.dcm")
    paths[1].write_bytes((tmp_path / "copy.dcm").read_bytes()[:1000])  # cut inside the header
    with pytest.raises(ValueError, match=re.escape(str(paths[1]))):
        _run(tmp_path / "mr", tmp_path / "out")
    assert not (tmp_path / "out").exists()
