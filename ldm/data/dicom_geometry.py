"""Slice geometry of a DICOM series, checked before it is stacked into a volume (pure numpy, no file I/O).

A series read slice by slice becomes a correct volume only when its slices share one ImageOrientationPatient,
lie at distinct positions along the slice normal (ImagePositionPatient projected on it), are evenly spaced
without gaps and stack straight along the normal (no gantry tilt). :func:`check_stack` checks all of this and
returns the slice order and spacing, or raises :class:`SliceGeometryError` naming the slices (files) at fault,
where they are and what was expected. ``scripts/prepare_dicom.py`` reads the headers and calls it.

Distances are in mm along the normal ``row direction x column direction`` (DICOM LPS patient coordinates).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

#: positions closer than this (mm) along the normal are one position; it is also the smallest spacing tolerance
POSITION_TOLERANCE_MM = 0.01
#: a step between neighbouring slices may differ from the series' spacing by this fraction of it
SPACING_TOLERANCE = 0.01
#: direction cosines of two slices may differ by this much per component
ORIENTATION_TOLERANCE = 1e-3
#: slices may drift across the slice plane by this fraction of the spacing per slice (about 0.06 degrees of tilt)
DRIFT_TOLERANCE = 1e-3


class SliceGeometryError(ValueError):
    """The slices of a series do not form one evenly spaced straight stack (the message says where and why)."""


@dataclass(frozen=True)
class Gap:
    """Missing slices between two neighbours (indices into the sorted stack), at ``start`` and ``end`` mm."""

    before: int
    after: int
    start: float
    end: float
    missing: int

    def missing_positions(self, spacing: float) -> list[float]:
        """The positions (mm along the normal) where the missing slices would be."""
        return [self.start + k * spacing for k in range(1, self.missing + 1)]


@dataclass(frozen=True)
class StackGeometry:
    """A checked stack: ``order[k]`` is the input index of the k-th slice along the normal (ascending).

    Attributes:
        order: input indices sorted by position along the normal.
        distances: positions of the sorted slices along the normal (mm).
        spacing: distance between neighbouring slices (mm; 0.0 for a single slice).
        orientation: the common ImageOrientationPatient (row cosines, then column cosines).
        normal: unit slice normal, ``row x column``.
        origin: ImagePositionPatient of the first sorted slice (mm).
    """

    order: tuple[int, ...]
    distances: np.ndarray
    spacing: float
    orientation: np.ndarray
    normal: np.ndarray
    origin: np.ndarray


def _fmt(value: float) -> str:
    """A distance in mm, short: ``5``, ``12.5``, ``-0.333``."""
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"


def slice_normal(orientation: Sequence[float], tolerance: float = ORIENTATION_TOLERANCE) -> np.ndarray:
    """Unit normal ``row x column`` of a six-value ImageOrientationPatient; ``ValueError`` when the two
    direction cosines are not unit length or not perpendicular (within ``tolerance``)."""
    iop = np.asarray(orientation, dtype=np.float64).ravel()
    if iop.shape != (6,) or not np.all(np.isfinite(iop)):
        raise SliceGeometryError(f"ImageOrientationPatient {list(iop)} is not six finite numbers")
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > tolerance or abs(np.linalg.norm(col) - 1) > tolerance \
            or abs(float(row @ col)) > tolerance:
        raise SliceGeometryError(f"ImageOrientationPatient {[round(float(v), 6) for v in iop]} does not hold two "
                                 "perpendicular unit vectors")
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)


def common_orientation(orientations: np.ndarray, names: Sequence[str],
                       tolerance: float = ORIENTATION_TOLERANCE) -> np.ndarray:
    """The ImageOrientationPatient all slices share (rows of ``orientations``, shape (n, 6)); raises
    :class:`SliceGeometryError` naming the first slice whose orientation differs from the first slice's."""
    iop = np.asarray(orientations, dtype=np.float64).reshape(-1, 6)
    deviation = np.abs(iop - iop[0]).max(axis=1)
    bad = np.flatnonzero(deviation > tolerance)
    if bad.size:
        i = int(bad[0])
        raise SliceGeometryError(f"{bad.size} slice(s) have another ImageOrientationPatient than {names[0]} "
                                 f"{[round(float(v), 4) for v in iop[0]]}, e.g. {names[i]} "
                                 f"{[round(float(v), 4) for v in iop[i]]}: one series must be one stack of "
                                 "parallel slices")
    return iop[0]


def positions_along_normal(positions: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Each ImagePositionPatient (rows of ``positions``, shape (n, 3)) projected on ``normal`` (mm)."""
    return np.asarray(positions, dtype=np.float64).reshape(-1, 3) @ np.asarray(normal, dtype=np.float64)


def find_duplicates(distances: np.ndarray, tolerance: float = POSITION_TOLERANCE_MM) -> list[list[int]]:
    """Groups (indices into the ascending ``distances``) of two or more slices at one position."""
    groups: list[list[int]] = []
    for k in range(1, len(distances)):
        if distances[k] - distances[k - 1] <= tolerance:
            if groups and groups[-1][-1] == k - 1:
                groups[-1].append(k)
            else:
                groups.append([k - 1, k])
    return groups


def regular_spacing(steps: np.ndarray, rel_tol: float = SPACING_TOLERANCE,
                    abs_tol: float = POSITION_TOLERANCE_MM) -> float:
    """The spacing of a stack from its positive steps between neighbours: the median of the steps that match the
    smallest one (a gap is a multiple of the spacing, so gaps do not inflate it)."""
    steps = np.asarray(steps, dtype=np.float64)
    smallest = float(steps.min())
    regular = steps[steps - smallest <= max(abs_tol, rel_tol * smallest)]
    return float(np.median(regular))


def find_gaps(distances: np.ndarray, spacing: float, rel_tol: float = SPACING_TOLERANCE,
              abs_tol: float = POSITION_TOLERANCE_MM) -> tuple[list[Gap], list[int]]:
    """Gaps and irregular steps of an ascending stack with ``spacing``: ``(gaps, irregular)`` where a gap is a step
    of a whole multiple (>= 2) of the spacing and ``irregular`` lists the indices ``k`` whose step from slice
    ``k - 1`` is neither one spacing nor a multiple of it (all within ``max(abs_tol, rel_tol * spacing)``)."""
    tol = max(abs_tol, rel_tol * spacing)
    gaps: list[Gap] = []
    irregular: list[int] = []
    for k in range(1, len(distances)):
        step = float(distances[k] - distances[k - 1])
        multiple = int(round(step / spacing))
        if multiple >= 1 and abs(step - multiple * spacing) <= tol * multiple:
            if multiple > 1:
                gaps.append(Gap(k - 1, k, float(distances[k - 1]), float(distances[k]), multiple - 1))
        else:
            irregular.append(k)
    return gaps, irregular


def check_stack(positions: np.ndarray, orientations: np.ndarray, names: Sequence[str],
                rel_tol: float = SPACING_TOLERANCE, abs_tol: float = POSITION_TOLERANCE_MM,
                orientation_tol: float = ORIENTATION_TOLERANCE) -> StackGeometry:
    """Check that slices (ImagePositionPatient rows of ``positions`` (n, 3), ImageOrientationPatient rows of
    ``orientations`` (n, 6), one name per slice for the messages) form one evenly spaced straight stack.

    Raises :class:`SliceGeometryError` for: no slices; orientations that differ; slices at one position
    (duplicates, e.g. several echoes or phases in one series); gaps (missing slices, with where they would be and
    the expected spacing); uneven spacing; positions that drift across the slice plane (gantry tilt). A single
    slice passes with spacing 0.0 (the caller decides whether one slice is a volume).
    """
    names = list(names)
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if len(names) != len(positions) or len(positions) != len(np.asarray(orientations).reshape(-1, 6)):
        raise ValueError(f"check_stack needs one position, orientation and name per slice, got {len(positions)}, "
                         f"{len(np.asarray(orientations).reshape(-1, 6))} and {len(names)}")
    if not len(positions):
        raise SliceGeometryError("the series has no slices")
    if not np.all(np.isfinite(positions)):
        bad = int(np.flatnonzero(~np.isfinite(positions).all(axis=1))[0])
        raise SliceGeometryError(f"{names[bad]} has ImagePositionPatient {list(positions[bad])}, not finite numbers")
    orientation = common_orientation(orientations, names, orientation_tol)
    normal = slice_normal(orientation, orientation_tol)
    along = positions_along_normal(positions, normal)
    order = np.argsort(along, kind="stable")
    distances = along[order]
    sorted_names = [names[i] for i in order]
    geometry = StackGeometry(tuple(int(i) for i in order), distances, 0.0, orientation, normal, positions[order[0]])
    if len(positions) == 1:
        return geometry

    duplicates = find_duplicates(distances, abs_tol)
    if duplicates:
        shown = "; ".join(f"{', '.join(sorted_names[k] for k in group)} at {_fmt(distances[group[0]])} mm"
                          for group in duplicates[:3])
        more = f" (and {len(duplicates) - 3} more positions)" if len(duplicates) > 3 else ""
        raise SliceGeometryError(f"{sum(len(g) for g in duplicates)} slices share {len(duplicates)} position(s) "
                                 f"along the slice normal: {shown}{more}; a volume needs one slice per position "
                                 "(several echoes, phases or a copied file in one series?)")
    spacing = regular_spacing(np.diff(distances), rel_tol, abs_tol)
    gaps, irregular = find_gaps(distances, spacing, rel_tol, abs_tol)
    if gaps:
        shown = "; ".join(f"{g.missing} missing between {sorted_names[g.before]} (at {_fmt(g.start)} mm) and "
                          f"{sorted_names[g.after]} (at {_fmt(g.end)} mm), expected at "
                          f"{', '.join(_fmt(p) for p in g.missing_positions(spacing)[:5])} mm"
                          for g in gaps[:3])
        more = f" (and {len(gaps) - 3} more gaps)" if len(gaps) > 3 else ""
        raise SliceGeometryError(f"{sum(g.missing for g in gaps)} slice(s) missing (expected spacing "
                                 f"{_fmt(spacing)} mm): {shown}{more}")
    if irregular:
        k = irregular[0]
        raise SliceGeometryError(f"uneven slice spacing: {sorted_names[k - 1]} (at {_fmt(distances[k - 1])} mm) "
                                 f"and {sorted_names[k]} (at {_fmt(distances[k])} mm) are "
                                 f"{_fmt(distances[k] - distances[k - 1])} mm apart, the other slices "
                                 f"{_fmt(spacing)} mm ({len(irregular)} uneven step(s))")
    spacing = float((distances[-1] - distances[0]) / (len(distances) - 1))
    drift = positions[order] - positions[order[0]] - np.outer(distances - distances[0], normal)
    offset = np.linalg.norm(drift, axis=1)
    excess = offset - np.maximum(abs_tol, DRIFT_TOLERANCE * spacing * np.arange(len(offset)))
    worst = int(np.argmax(excess))
    if excess[worst] > 0:
        raise SliceGeometryError(f"slice positions drift across the slice plane: {sorted_names[worst]} is "
                                 f"{_fmt(offset[worst])} mm off the line through {sorted_names[0]} along the "
                                 "slice normal (gantry tilt or a sheared stack); a volume of parallel slices "
                                 "would misplace them")
    return StackGeometry(geometry.order, distances, spacing, orientation, normal, positions[order[0]])
