"""ldm.data.dicom_geometry (slice stacks from positions and orientations) and the output naming rule of
ldm.data.dicom_series, on known answers (numpy only, no files)."""
from __future__ import annotations

import numpy as np
import pytest

from ldm.data.dicom_geometry import (SliceGeometryError, check_stack, find_duplicates, find_gaps,
                                     positions_along_normal, regular_spacing, slice_normal)

AXIAL = [1, 0, 0, 0, 1, 0]


def _axial(z, x=0.0, y=0.0):
    """Positions (n, 3) of axial slices at heights ``z``, orientations (n, 6), names s0, s1, ..."""
    z = np.asarray(z, dtype=float)
    positions = np.stack([np.full_like(z, x), np.full_like(z, y), z], axis=1)
    return positions, np.tile(np.asarray(AXIAL, dtype=float), (len(z), 1)), [f"s{k}" for k in range(len(z))]


def test_slice_normal_of_the_standard_planes():
    assert np.allclose(slice_normal(AXIAL), [0, 0, 1])
    assert np.allclose(slice_normal([1, 0, 0, 0, 0, -1]), [0, 1, 0])   # coronal: normal posterior
    assert np.allclose(slice_normal([0, 1, 0, 0, 0, -1]), [-1, 0, 0])  # sagittal: normal to the patient's right
    with pytest.raises(SliceGeometryError, match="perpendicular unit vectors"):
        slice_normal([1, 0, 0, 0.5, 0.866, 0])
    with pytest.raises(SliceGeometryError, match="six finite numbers"):
        slice_normal([1, 0, 0, 0, 1])


def test_check_stack_sorts_slices_along_the_normal():
    positions, orientations, names = _axial([40.0, 30.0, 45.0, 35.0])
    stack = check_stack(positions, orientations, names)
    assert stack.order == (1, 3, 0, 2)
    assert np.allclose(stack.distances, [30, 35, 40, 45]) and stack.spacing == pytest.approx(5.0)
    assert np.allclose(stack.origin, [0, 0, 30]) and np.allclose(stack.normal, [0, 0, 1])
    # positions jittered by 1 micrometre are one even stack; the spacing is (last - first) / (n - 1)
    positions, orientations, names = _axial([0.0, 2.501, 4.999, 7.5])
    assert check_stack(positions, orientations, names).spacing == pytest.approx(2.5)


def test_check_stack_on_an_oblique_stack():
    a = np.deg2rad(30)
    row, col = np.array([1.0, 0, 0]), np.array([0, np.cos(a), np.sin(a)])
    normal = np.cross(row, col)  # (0, -sin a, cos a)
    origin = np.array([-10.0, 20.0, 30.0])
    positions = np.array([origin + k * 3.0 * normal for k in (2, 0, 1)])
    stack = check_stack(positions, np.tile(np.r_[row, col], (3, 1)), ["c", "a", "b"])
    assert stack.order == (1, 2, 0) and stack.spacing == pytest.approx(3.0)
    assert np.allclose(stack.normal, [0, -0.5, np.sqrt(3) / 2])
    assert np.allclose(positions_along_normal(positions, normal), origin @ normal + np.array([6.0, 0.0, 3.0]))


def test_a_missing_slice_is_named_with_its_position_and_the_expected_spacing():
    positions, orientations, names = _axial([30, 35, 40, 50, 55])  # 45 missing: a uniform stack would be 6.25 mm
    with pytest.raises(SliceGeometryError) as err:
        check_stack(positions, orientations, names)
    assert str(err.value) == ("1 slice(s) missing (expected spacing 5 mm): 1 missing between s2 (at 40 mm) and s3 "
                              "(at 50 mm), expected at 45 mm")
    positions, orientations, names = _axial([0, 2.5, 10, 12.5, 15, 22.5])
    with pytest.raises(SliceGeometryError, match=r"^4 slice\(s\) missing \(expected spacing 2.5 mm\): 2 missing "
                                                 r"between s1 \(at 2.5 mm\) and s2 \(at 10 mm\), expected at 5, "
                                                 r"7.5 mm; 2 missing between s4 \(at 15 mm\) and s5 "):
        check_stack(positions, orientations, names)
    gaps, irregular = find_gaps(np.array([0, 2.5, 10, 12.5]), 2.5)
    assert [(g.before, g.after, g.missing, g.missing_positions(2.5)) for g in gaps] == [(1, 2, 2, [5.0, 7.5])]
    assert irregular == []


def test_duplicate_positions_are_named():
    positions, orientations, names = _axial([30, 35, 35, 40])
    with pytest.raises(SliceGeometryError, match=r"^2 slices share 1 position\(s\) along the slice normal: s1, s2 "
                                                 r"at 35 mm"):
        check_stack(positions, orientations, names)
    assert find_duplicates(np.array([0, 5, 5, 5, 10, 10.005])) == [[1, 2, 3], [4, 5]]


def test_uneven_spacing_is_named():
    positions, orientations, names = _axial([0, 5, 10, 17, 22])
    with pytest.raises(SliceGeometryError) as err:
        check_stack(positions, orientations, names)
    assert str(err.value) == ("uneven slice spacing: s2 (at 10 mm) and s3 (at 17 mm) are 7 mm apart, the other "
                              "slices 5 mm (1 uneven step(s))")
    assert regular_spacing(np.array([5.0, 10.0, 5.0, 15.0])) == 5.0  # gaps do not inflate the spacing


def test_orientation_and_tilt_are_checked():
    positions, orientations, names = _axial([0, 5, 10])
    orientations[2] = [1, 0, 0, 0, 0.9998, 0.02]
    with pytest.raises(SliceGeometryError, match=r"1 slice\(s\) have another ImageOrientationPatient than s0 .*"
                                                 r"e\.g\. s2"):
        check_stack(positions, orientations, names)
    # a gantry tilt: each slice 1 mm further along y than the one below
    positions, orientations, names = _axial([0, 5, 10])
    positions[:, 1] = [0, 1, 2]
    with pytest.raises(SliceGeometryError, match=r"drift across the slice plane: s2 is 2 mm off the line"):
        check_stack(positions, orientations, names)
    single = check_stack(*_axial([7.0]))
    assert single.order == (0,) and single.spacing == 0.0
    with pytest.raises(SliceGeometryError, match="no slices"):
        check_stack(np.zeros((0, 3)), np.zeros((0, 6)), [])


def test_output_names_are_unique_per_patient():
    from ldm.data.dicom_series import colliding_outputs, unique_output_names

    entries = [("P0", "1_axial", "20240101", "1.2.3.1111"), ("P0", "1_axial", "20240315", "1.2.3.2222"),
               ("P0", "2_scout", "20240101", "1.2.3.3333"), ("P1", "1_axial", "20240101", "1.2.3.4444"),
               ("P2", "1_axial", "20240101", "1.2.840.99.123456789"), ("P2", "1_Axial", "20240101", "1.2.840.99.5"),
               ("P3", "3_t1", "", "1.2.6"), ("P3", "3_t1", "", "1.2.7")]
    assert unique_output_names(entries) == [
        "1_axial_20240101", "1_axial_20240315",  # follow-up visit: the study date tells them apart
        "2_scout", "1_axial",                      # no clash: names kept
        "1_axial_20240101_23456789", "1_Axial_20240101_12840995",  # same date (and case-blind clash): UID tail
        "3_t1_nodate_126", "3_t1_nodate_127"]
    assert colliding_outputs([("P0/a.nii.gz", "u1"), ("P0/A.nii.gz", "u2"), ("P0/b.nii.gz", "u3")]) == \
        [("P0/a.nii.gz", ["u1", "u2"])]
