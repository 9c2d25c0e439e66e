"""Headers of a DICOM series' files read with pydicom (no pixel decoding), checked before the series is converted.

:func:`check_series_files` reads every file of a series (``stop_before_pixels=True``), checks that each is
readable and holds all its pixel bytes, that the slices share one frame size and pixel spacing, and that their
positions form one evenly spaced stack (:func:`ldm.data.dicom_geometry.check_stack`); it returns the files in slice
order and the stack geometry, or raises ``ValueError`` naming the file and the reason. A series that is one
multi-frame file (enhanced CT/MR) is checked frame by frame from its per-frame plane positions.
:func:`probe_stray_file` tells why a DICOM file was left out of every series, and :func:`unique_output_names`
gives each series of a patient its own output name.
"""
from __future__ import annotations

import logging
import os
import re
import struct
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from ldm.data.dicom_geometry import ORIENTATION_TOLERANCE, SPACING_TOLERANCE, StackGeometry, check_stack

logger = logging.getLogger(__name__)
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float Pixel Data, Double Float Pixel Data
# explicit-VR elements whose length is a 4-byte field after two reserved bytes
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
TAG_KEYWORDS = {"patient": "PatientID", "modality": "Modality", "description": "SeriesDescription",
                "number": "SeriesNumber", "uid": "SeriesInstanceUID", "study_date": "StudyDate"}


def import_pydicom() -> Any:
    """pydicom, or an ImportError saying how to install it."""
    from ldm.data.dicom_read import import_dicom_package

    return import_dicom_package("pydicom", "checking DICOM headers")


@dataclass
class SliceHeader:
    """What one file contributes to a stack: its frames' positions and orientations, frame size, pixel spacing."""

    path: str
    frames: int
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    positions: np.ndarray  # (frames, 3) ImagePositionPatient per frame
    orientations: np.ndarray  # (frames, 6) ImageOrientationPatient per frame
    sop_class: str


@dataclass
class SeriesGeometry:
    """A checked series: ``files`` in slice order (ascending along the normal), its stack and pixel spacing.

    ``multiframe`` is True for a series stored as one multi-frame file; ``reversed_frames`` then says its frames
    are stored in descending order along the normal.
    """

    files: list[str]
    stack: StackGeometry
    pixel_spacing: tuple[float, float]
    size: tuple[int, int, int]  # columns, rows, slices (ITK order)
    origin: np.ndarray  # ImagePositionPatient of the first slice read (the first file, or frame 1)
    multiframe: bool = False
    reversed_frames: bool = False
    sop_class: str = ""


def series_tags(path: str) -> dict[str, str]:
    """PatientID, Modality, SeriesDescription, SeriesNumber, SeriesInstanceUID and StudyDate of one file (keys of
    ``TAG_KEYWORDS``; "" where absent); ``ValueError`` when its header cannot be read."""
    pydicom = import_pydicom()
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(TAG_KEYWORDS.values()), force=True)
    except Exception as err:  # pydicom raises several types for damaged files
        raise ValueError(f"{path}: cannot be read as DICOM ({type(err).__name__}: {err})") from err
    return {key: str(ds.get(keyword, "") or "").strip() for key, keyword in TAG_KEYWORDS.items()}


def _element_at(fp: Any, transfer_syntax: Any) -> Optional[tuple[int, int, int]]:
    """``(tag, value length, header bytes)`` of the data element starting at ``fp``'s position; None at the end."""
    head = fp.read(12)
    if len(head) < 8:
        return None
    endian = "<" if transfer_syntax.is_little_endian else ">"
    group, element = struct.unpack(endian + "HH", head[:4])
    if transfer_syntax.is_implicit_VR:
        return group << 16 | element, struct.unpack(endian + "I", head[4:8])[0], 8
    if head[4:6] in LONG_VRS:
        if len(head) < 12:
            return None
        return group << 16 | element, struct.unpack(endian + "I", head[8:12])[0], 12
    return group << 16 | element, struct.unpack(endian + "H", head[6:8])[0], 8


def pixel_data_problem(ds: Any, fp: Any, file_size: int) -> Optional[str]:
    """Why the pixel data of a file is incomplete, or None: ``ds`` was read from ``fp`` with
    ``stop_before_pixels=True`` (so ``fp`` stands at the pixel data element). Compressed (encapsulated) and deflated
    files are not measured; their decoder reports damage."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None or ts.is_deflated:
        return None
    start = fp.tell()
    found = _element_at(fp, ts)
    if found is None:
        return f"has no pixel data: the file ends after its header at byte {start} (truncated?)"
    tag, declared, header = found
    if tag not in PIXEL_TAGS:
        return None  # not where pydicom stopped: cannot measure
    if declared == 0xFFFFFFFF or ts.is_compressed:
        return None
    available = file_size - start - header
    if available < declared:
        return (f"is truncated: its pixel data element declares {declared} bytes but the file holds "
                f"{max(available, 0)} of them")
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 16) or 16)
    needed = (rows * columns * frames * samples * bits + 7) // 8
    if declared < needed:
        return (f"holds {declared} pixel bytes but {rows} x {columns} pixels x {frames} frame(s) x {samples} "
                f"sample(s) x {bits} bits need {needed}")
    return None


def _functional(frame: Any, shared: Any, sequence: str, attribute: str) -> Any:
    """``attribute`` of the first item of ``sequence`` in a per-frame functional group, else the shared one."""
    for group in (frame, shared):
        items = group.get(sequence) if group is not None else None
        if items and attribute in items[0]:
            return items[0].get(attribute)
    return None


def _numbers(value: Any, count: int, what: str, path: str) -> np.ndarray:
    """``value`` as ``count`` floats, or ``ValueError`` naming ``what`` and ``path``."""
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        out = np.zeros(0)
    if out.shape != (count,):
        raise ValueError(f"{path}: {what} is {value!r}, not {count} numbers")
    return out


def read_slice_header(path: str) -> SliceHeader:
    """The geometry of one image file (single- or multi-frame); ``ValueError`` naming ``path`` when it cannot be
    read, misses its pixel bytes or lacks ImagePositionPatient, ImageOrientationPatient or PixelSpacing."""
    pydicom = import_pydicom()
    try:
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)  # GDCM also reads files without a preamble
            problem = pixel_data_problem(ds, fp, os.fstat(fp.fileno()).st_size)
    except Exception as err:  # pydicom raises several types for damaged files
        raise ValueError(f"{path}: cannot be read as DICOM ({type(err).__name__}: {err})") from err
    if problem:
        raise ValueError(f"{path} {problem}")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if not rows or not columns:
        raise ValueError(f"{path}: no Rows/Columns, not an image")
    if frames == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in ds]
        if missing:
            raise ValueError(f"{path}: no {', '.join(missing)}; the slice cannot be placed in a volume")
        positions = _numbers(ds.ImagePositionPatient, 3, "ImagePositionPatient", path)[None]
        orientations = _numbers(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", path)[None]
        spacing = _numbers(ds.PixelSpacing, 2, "PixelSpacing", path)
    else:
        shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
        per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
        if len(per_frame) != frames:
            raise ValueError(f"{path} holds {frames} frames but {len(per_frame)} PerFrameFunctionalGroupsSequence "
                             "items: the frames' positions are unknown, so it cannot be checked or converted as "
                             "a volume")
        pos, ori, spc = [], [], []
        for k, frame in enumerate(per_frame):
            where = f"frame {k + 1}"
            values = (_functional(frame, shared, "PlanePositionSequence", "ImagePositionPatient"),
                      _functional(frame, shared, "PlaneOrientationSequence", "ImageOrientationPatient"),
                      _functional(frame, shared, "PixelMeasuresSequence", "PixelSpacing"))
            if any(v is None for v in values):
                raise ValueError(f"{path} {where} has no PlanePositionSequence, PlaneOrientationSequence or "
                                 "PixelMeasuresSequence (per frame or shared): its geometry is unknown")
            pos.append(_numbers(values[0], 3, f"{where} ImagePositionPatient", path))
            ori.append(_numbers(values[1], 6, f"{where} ImageOrientationPatient", path))
            spc.append(_numbers(values[2], 2, f"{where} PixelSpacing", path))
        if np.abs(np.asarray(spc) - spc[0]).max() > SPACING_TOLERANCE * float(min(spc[0])):
            raise ValueError(f"{path}: its frames have different PixelSpacing ({spc[0].tolist()} and others)")
        positions, orientations, spacing = np.asarray(pos), np.asarray(ori), spc[0]
    return SliceHeader(path, frames, rows, columns, (float(spacing[0]), float(spacing[1])), positions, orientations,
                       str(ds.get("SOPClassUID", "")))


def sop_class_name(uid: str) -> str:
    """The SOP class' name (e.g. ``Enhanced CT Image Storage``), else the UID itself."""
    pydicom = import_pydicom()
    name = pydicom.uid.UID(uid).name if uid else ""
    return name if name and name != uid else (uid or "unknown SOP class")


def check_series_files(files: Sequence[str]) -> SeriesGeometry:
    """Check a series' files (see the module docstring) and return them in slice order with the stack geometry;
    ``ValueError`` naming the file (frame) and the reason when the series is not one evenly spaced volume."""
    headers = [read_slice_header(f) for f in files]
    if not headers:
        raise ValueError("the series has no files")
    multi = [h for h in headers if h.frames > 1 or len(h.positions) > 1]
    if multi and len(headers) > 1:
        raise ValueError(f"{multi[0].path} is a multi-frame file ({multi[0].frames} frames) in a series of "
                         f"{len(headers)} files: only a series of one multi-frame file or of single-frame slices "
                         "can be converted")
    first = headers[0]
    for h in headers[1:]:
        if (h.rows, h.columns) != (first.rows, first.columns):
            raise ValueError(f"{h.path} has {h.rows} x {h.columns} pixels but {first.path} {first.rows} x "
                             f"{first.columns}: one volume needs one frame size")
        if max(abs(a - b) for a, b in zip(h.pixel_spacing, first.pixel_spacing)) > \
                SPACING_TOLERANCE * min(first.pixel_spacing):
            raise ValueError(f"{h.path} has PixelSpacing {list(h.pixel_spacing)} but {first.path} "
                             f"{list(first.pixel_spacing)}: one volume needs one pixel spacing")
    if multi:
        names = [f"{first.path} frame {k + 1}" for k in range(len(first.positions))]
        positions, orientations = first.positions, first.orientations
    else:
        names = [h.path for h in headers]
        positions = np.concatenate([h.positions for h in headers])
        orientations = np.concatenate([h.orientations for h in headers])
    stack = check_stack(positions, orientations, names, orientation_tol=ORIENTATION_TOLERANCE)
    if len(names) < 2:
        raise ValueError(f"{names[0]}: the series has a single slice, not a volume (leave it out with "
                         "--series_description or --modality)")
    size = (first.columns, first.rows, len(names))
    if not multi:
        return SeriesGeometry([headers[i].path for i in stack.order], stack, first.pixel_spacing, size,
                              stack.origin, sop_class=first.sop_class)
    ascending, descending = tuple(range(len(names))), tuple(range(len(names) - 1, -1, -1))
    if stack.order not in (ascending, descending):
        raise ValueError(f"{first.path}: its {len(names)} frames are not stored in slice order along the normal "
                         f"(sorted order {list(stack.order[:8])}...); reading it as one volume would scramble them")
    return SeriesGeometry([first.path], stack, first.pixel_spacing, size, first.positions[0], multiframe=True,
                          reversed_frames=stack.order == descending and len(names) > 1, sop_class=first.sop_class)


@dataclass
class StrayFile:
    """A DICOM file of a folder that the series reader left out of every series: ``tags`` (``series_tags`` keys,
    empty when its header is unreadable) and why it could not be used."""

    path: str
    reason: str
    tags: dict[str, str]


def probe_stray_file(path: str) -> Optional[StrayFile]:
    """Why ``path`` (a file with the DICM marker that no series took) is unusable, or None when it is no image (no
    Rows and no image SOP class: e.g. DICOMDIR, a structured report, RT structures), so not a slice of anything."""
    pydicom = import_pydicom()
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=list(TAG_KEYWORDS.values()) + ["SOPClassUID", "Rows", "Columns"])
    except Exception as err:  # pydicom raises several types for damaged files
        return StrayFile(path, f"cannot be read as DICOM ({type(err).__name__}: {err})", {})
    tags = {key: str(ds.get(keyword, "") or "").strip() for key, keyword in TAG_KEYWORDS.items()}
    if "Rows" not in ds and "Image Storage" not in sop_class_name(str(ds.get("SOPClassUID", "") or "")):
        return None
    try:
        read_slice_header(path)
    except ValueError as err:
        return StrayFile(path, str(err).removeprefix(path).lstrip(": "), tags)
    return StrayFile(path, "was left out by the GDCM series reader, which could not read it", tags)


def _uid_tail(uid: str, digits: int = 8) -> str:
    """The last ``digits`` digits of a UID (its dots dropped)."""
    return re.sub(r"\D", "", uid)[-digits:] or "nouid"


def unique_output_names(entries: Sequence[tuple[str, str, str, str]]) -> list[str]:
    """One output file name (without extension) per series, unique per patient, from
    ``(patient, base name, StudyDate, SeriesInstanceUID)`` entries (``base``: ``<SeriesNumber>_<Description>``).

    Rule: a base name that no other series of the patient shares (compared case-insensitively) is kept; series
    sharing one get ``_<StudyDate>`` (``_nodate`` without one) appended, and those still sharing a name (same
    date) get ``_<StudyDate>_<last 8 digits of the SeriesInstanceUID>``. The result depends only on the headers,
    not on the file order.
    """
    def key(patient: str, name: str) -> tuple[str, str]:
        return patient, name.casefold()

    def count(names: list[str]) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for (patient, *_), name in zip(entries, names):
            out[key(patient, name)] = out.get(key(patient, name), 0) + 1
        return out

    names = [base for _, base, _, _ in entries]
    counts = count(names)
    dated = [f"{base}_{re.sub(r'[^0-9A-Za-z]', '', date) or 'nodate'}" if counts[key(patient, base)] > 1 else base
             for patient, base, date, _ in entries]
    counts = count(dated)
    return [f"{name}_{_uid_tail(uid)}" if name != base and counts[key(patient, name)] > 1 else name
            for (patient, base, _, uid), name in zip(entries, dated)]


def colliding_outputs(paths: Sequence[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """``(output path, [series UIDs])`` for every path (compared case-insensitively) that several series of
    ``(path, uid)`` pairs would be written to."""
    by_path: dict[str, list[tuple[str, str]]] = {}
    for path, uid in paths:
        by_path.setdefault(path.casefold(), []).append((path, uid))
    return [(hits[0][0], [uid for _, uid in hits]) for hits in by_path.values() if len(hits) > 1]
