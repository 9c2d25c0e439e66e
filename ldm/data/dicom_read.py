"""Finding, checking and reading the DICOM series of a folder with SimpleITK (GDCM) and pydicom, for
``scripts/prepare_dicom.py``.

:func:`find_series` lists the series below a folder (a series spread over folders is one series) and gives each an
output name unique among its patient's series (:func:`ldm.data.dicom_series.unique_output_names`);
:func:`check_selected` checks every series from its headers before anything is written
(:func:`ldm.data.dicom_series.check_series_files`); :func:`read_volume` reads a checked series as one 3D image,
a series stored as one multi-frame file (enhanced CT/MR) as one image with the geometry of its frames.

Only the standard library is imported at module level, so a script's ``--help`` stays fast.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from ldm.data.dicom_series import SeriesGeometry

logger = logging.getLogger(__name__)


def import_dicom_package(module: str, purpose: str) -> Any:
    """The optional DICOM package ``module`` (SimpleITK, pydicom, highdicom: the ``dicom`` extra), or an ImportError
    saying that ``purpose`` needs it and how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{purpose} needs {module}: pip install -e '.[dicom]' (or pip install {module})") from err


def import_sitk() -> Any:
    """SimpleITK, or an ImportError saying how to install it."""
    return import_dicom_package("SimpleITK", "reading DICOM")


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` is a DICOM Part-10 file (the ``DICM`` marker after the 128-byte preamble)."""
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


@dataclass
class Series:
    """One DICOM series: its patient, tags, files (in slice order once checked) and any problems found."""

    patient: str
    uid: str
    modality: str
    description: str
    number: str
    files: list[str] = field(default_factory=list)
    study_date: str = ""
    output_name: str = ""  # set by assign_output_names: unique among the patient's series
    problems: list[str] = field(default_factory=list)  # unreadable files of this series found beside it

    @property
    def base_name(self) -> str:
        """File-system-safe ``<number>_<description>`` (or the UID's tail)."""
        text = f"{self.number}_{self.description}" if self.number or self.description else self.uid[-12:]
        return safe_name(text)

    @property
    def name(self) -> str:
        """Output file name without extension (``base_name`` unless it had to be disambiguated)."""
        return self.output_name or self.base_name


def safe_name(text: str) -> str:
    """``text`` with every run of characters other than letters, digits, ``.``, ``-`` and ``_`` made one ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("_") or "unnamed"


def assign_output_names(series: list[Series]) -> None:
    """Give each series its output name by the rule of ``ldm.data.dicom_series.unique_output_names``."""
    from ldm.data.dicom_series import unique_output_names

    names = unique_output_names([(s.patient, s.base_name, s.study_date, s.uid) for s in series])
    for s, name in zip(series, names):
        s.output_name = safe_name(name)


def check_unique_outputs(series: list[Series]) -> None:
    """Internal check before writing: ``ValueError`` when two series would be written to one output path."""
    from ldm.data.dicom_series import colliding_outputs

    clashes = colliding_outputs([(f"{s.patient}/{s.name}.nii.gz", s.uid) for s in series])
    if clashes:
        path, uids = clashes[0]
        raise ValueError(f"series {', '.join(uids)} would all be written to {path} ({len(clashes)} such path(s)); "
                         "this is a bug in the output naming of prepare_dicom.py: please report it")


def _new_series(tags: dict[str, str], files: list[str], source: str) -> Series:
    """A Series from ``series_tags`` values; ``ValueError`` without a PatientID."""
    if not tags["patient"]:
        raise ValueError(f"{source} has no PatientID (0010,0020): patient-level splits need it")
    return Series(safe_name(tags["patient"]), tags["uid"], tags["modality"], tags["description"], tags["number"],
                  files, tags["study_date"])


def find_series(root: Path) -> list[Series]:
    """Every DICOM series below ``root`` (searched recursively; a series spread over folders is one series),
    sorted by patient and series number, with output names assigned. DICOM files that the series reader left out
    are probed: an unusable image file is recorded in the ``problems`` of its series (of every series of its
    folder when its header names none), so that series is reported as bad rather than converted without it."""
    from ldm.data.dicom_series import probe_stray_file, series_tags

    sitk = import_sitk()
    if not root.is_dir():
        raise FileNotFoundError(f"DICOM folder {root} does not exist")
    warnings_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK warns about every folder without DICOM files
    try:
        folders = [(folder, sorted(names), sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder))
                   for folder, _, names in os.walk(root) if names]
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_shown)
    files_of: dict[str, list[str]] = {}
    folders_of: dict[str, set[str]] = {}
    strays = []
    for folder, names, uids in folders:
        taken: set[str] = set()
        for uid in uids:
            known = set(files_of.get(uid, []))
            files = [f for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid) if f not in known]
            files_of.setdefault(uid, []).extend(files)
            folders_of.setdefault(uid, set()).add(folder)
            taken.update(os.path.normpath(f) for f in files)
        for name in names:
            path = os.path.join(folder, name)
            if os.path.normpath(path) not in taken and is_dicom_file(Path(path)):
                stray = probe_stray_file(path)
                if stray is not None:
                    strays.append((folder, stray))
    found: dict[str, Series] = {}
    for uid, files in files_of.items():
        errors = []
        for f in files:
            try:
                tags = series_tags(f)
                break
            except ValueError as err:
                errors.append(str(err))
        else:
            found[uid] = Series("unknown", uid, "", "", "", files, problems=errors[:1])
            continue
        if tags["modality"].upper() == "SEG":
            logger.info("%s: DICOM-SEG series %s is not an image series (read it with --dicom_seg)", files[0], uid)
            continue
        found[uid] = _new_series(dict(tags, uid=uid), files, files[0])
    for folder, stray in strays:
        problem = f"{stray.path} {stray.reason}"
        uid = stray.tags.get("uid", "")
        if uid and stray.tags.get("modality", "").upper() == "SEG":
            continue
        if uid:
            if uid not in found:  # no file of the series was readable by the series reader
                found[uid] = _new_series(stray.tags, [], stray.path)
            found[uid].files.append(stray.path)
            found[uid].problems.append(problem)
            continue
        neighbours = [s for u, s in found.items() if folder in folders_of.get(u, ())]
        for s in neighbours:
            s.problems.append(f"{problem} (a DICOM file in the folder of this series)")
        if not neighbours:
            logger.warning("%s; it is in no folder of a series, so it is left out", problem)
    if not found:
        raise ValueError(f"no DICOM series found under {root}")
    series = sorted(found.values(), key=lambda s: (s.patient, int(s.number) if s.number.isdigit() else 0, s.uid))
    assign_output_names(series)
    return series


def select_series(series: list[Series], modality: Optional[str] = None,
                  description: Optional[str] = None) -> list[Series]:
    """Series of ``modality`` (e.g. CT, MR) whose SeriesDescription matches the regex ``description``."""
    pattern = re.compile(description, re.IGNORECASE) if description else None
    chosen = [s for s in series if (not modality or s.modality.upper() == modality.upper())
              and (pattern is None or pattern.search(s.description))]
    if not chosen:
        seen = sorted({f"{s.modality}: {s.description!r}" for s in series})
        raise ValueError(f"no series match modality={modality!r} description={description!r}; the input holds "
                         f"{seen[:20]}")
    return chosen


def skipped_entry(series: Series, reason: str) -> dict[str, Any]:
    """The record of a bad series (split.json ``skipped``): patient, output name, UID, description, files, reason."""
    return {"patient": series.patient, "series": series.name, "uid": series.uid, "description": series.description,
            "files": len(series.files), "reason": reason}


def describe_bad(bad: list[dict[str, Any]], total: int) -> str:
    """One line naming the bad series (``skipped_entry`` records), the file and the reason of each."""
    shown = " | ".join(f"series {b['uid']} (patient {b['patient']}, {b['series']}, {b['files']} file(s)): "
                       f"{b['reason']}" for b in bad[:5])
    more = f" | and {len(bad) - 5} more" if len(bad) > 5 else ""
    return f"{len(bad)} of {total} series cannot be converted: {shown}{more}"


def check_selected(series: list[Series]) -> tuple[list[tuple[Series, SeriesGeometry]], list[dict[str, Any]]]:
    """Check every series from its headers before anything is written: ``(good, bad)`` with each good series and
    its geometry (its ``files`` put in slice order) and a ``skipped_entry`` per bad one."""
    from ldm.data.dicom_series import check_series_files

    good, bad = [], []
    for s in series:
        try:
            if s.problems:
                raise ValueError("; ".join(s.problems))
            geometry = check_series_files(s.files)
        except ValueError as err:
            bad.append(skipped_entry(s, str(err)))
            continue
        s.files = list(geometry.files)
        good.append((s, geometry))
    return good, bad


def _itk_message(err: BaseException) -> str:
    """The last non-empty line of an exception's message (ITK's are long; the last line says what failed)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def read_volume(series: Series, geometry: SeriesGeometry) -> Any:
    """A checked series as one single-channel 3D SimpleITK image (rescaled values, DICOM LPS geometry).

    Slices are read in ``geometry.files`` order and the image's size, spacing, origin and slice direction must
    match the headers' (``ValueError`` otherwise). A multi-frame file is read as one image and given the geometry
    of its frames (GDCM's own reading of enhanced files may lack the slice spacing); ``ValueError`` saying what the
    file is when SimpleITK cannot read it as one 3D volume.
    """
    import numpy as np

    from ldm.data.dicom_series import sop_class_name

    sitk = import_sitk()
    what = f"series {series.uid} of patient {series.patient}"
    stack = geometry.stack
    step = -stack.normal if geometry.reversed_frames else stack.normal
    direction = np.stack([stack.orientation[:3], stack.orientation[3:], step], axis=1)
    spacing = (geometry.pixel_spacing[1], geometry.pixel_spacing[0], stack.spacing)  # column (x), row (y), slice

    def matches(image: Any) -> bool:
        return (tuple(image.GetSize()) == geometry.size
                and np.allclose(image.GetSpacing(), spacing, rtol=1e-3, atol=1e-4)
                and np.allclose(image.GetOrigin(), geometry.origin, atol=1e-2)
                and np.allclose(np.reshape(image.GetDirection(), (3, 3)), direction, atol=2e-3))

    if geometry.multiframe:
        path = geometry.files[0]
        kind = f"multi-frame {sop_class_name(geometry.sop_class)} file {path} ({geometry.size[2]} frames)"
        try:
            image = sitk.ReadImage(path)
        except RuntimeError as err:
            raise ValueError(f"{kind} of {what} could not be read as one image by SimpleITK/GDCM: "
                             f"{_itk_message(err)}") from err
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1 \
                or tuple(image.GetSize()) != geometry.size:
            raise ValueError(f"{kind} of {what} reads as a {image.GetDimension()}D image of size "
                             f"{list(image.GetSize())} with {image.GetNumberOfComponentsPerPixel()} component(s), "
                             f"not the single-channel {list(geometry.size)} volume its frames describe")
        if not matches(image):
            logger.info("%s: geometry taken from its frames' plane positions (GDCM read spacing %s, origin %s)", path,
                        [round(v, 4) for v in image.GetSpacing()], [round(v, 3) for v in image.GetOrigin()])
        image.SetSpacing([float(v) for v in spacing])
        image.SetOrigin([float(v) for v in geometry.origin])
        image.SetDirection([float(v) for v in direction.ravel()])
        return image
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(geometry.files))
    image = reader.Execute()
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{what} is not a single-channel 3D volume (dimension {image.GetDimension()}, "
                         f"{image.GetNumberOfComponentsPerPixel()} components)")
    if not matches(image):
        raise ValueError(f"{what}: SimpleITK read size {list(image.GetSize())}, spacing "
                         f"{[round(v, 4) for v in image.GetSpacing()]}, origin "
                         f"{[round(v, 3) for v in image.GetOrigin()]}, but the headers give {list(geometry.size)}, "
                         f"{[round(v, 4) for v in spacing]}, {[round(float(v), 3) for v in geometry.origin]}; the "
                         "volume would be misplaced")
    return image
