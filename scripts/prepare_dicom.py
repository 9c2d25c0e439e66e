#!/usr/bin/env python
r"""Convert DICOM series (+ segmentation masks as NIfTI/NRRD/DICOM-SEG) to the NIfTI layout the datasets read,
split by patient.

Input: a folder searched recursively for DICOM series (any file names; one folder may hold several series;
DICOM-SEG objects in it are not taken as images).
Masks (optional): a folder with one label volume per series or patient, NIfTI (.nii, .nii.gz) or NRRD (.nrrd,
.seg.nrrd), found by --mask_pattern; each is resampled onto its image's grid (nearest neighbour, physical
coordinates), so a mask stored at another orientation or cropping still lines up.
DICOM-SEG masks (optional, --dicom_seg, needs highdicom): a folder (it may be the input folder) searched
recursively for DICOM-SEG files; each belongs to the series it references (ReferencedSeriesSequence), and its
frames are placed on that series' slices by their referenced SOP instance UIDs (by their plane positions, resampled
nearest neighbour, when the frames name no source slice or have another size). Segments become class ids by
--seg_label_map (segment number or label -> id; default: the segment number), where segments overlap the one
listed later wins; fractional segmentations are thresholded at 0.5. A series with a DICOM-SEG takes it instead
of a --masks file. Output::

    OUT/split.json                                   patients per split, series converted, settings
    OUT/<split>/images/<patient>/<series>.nii.gz     intensities as stored after rescale (CT: HU)
    OUT/<split>/masks/<patient>/<series>.nii.gz      uint8 class ids on the image's grid (when a mask exists)

Use OUT as CTORG_ROOT / BREASTMRI_ROOT (NIfTI volumes, see docs/data.md) or as data_root of MedicalImagesBase.
A patient (DICOM PatientID) goes to one split with all its series. <series> is <SeriesNumber>_<Description>;
series of one patient that share it (follow-up studies) get _<StudyDate> appended, and, when that is shared
too, _<StudyDate>_<last 8 digits of the SeriesInstanceUID>; no two series are ever written to one file.

Before anything is written every selected series is checked from its headers (pydicom): each file readable and
complete, one orientation, distinct slice positions along the slice normal, even spacing, no missing slices
(ldm/data/dicom_series.py, ldm/data/dicom_geometry.py). A bad series stops the run with one error naming the
series, the file and the reason; --skip_bad converts the others and lists the bad ones under "skipped" in
split.json. Volumes are written to OUT/.partial and moved into place when all are done; each is read back (header
and every voxel) before it counts, and split.json is written last, whole or not at all, so a full disk stops the run
with one error naming the file (SimpleITK itself only prints one) and a rerun after freeing space starts again (a
split.json that is empty or cut off does not count as a finished conversion). A series stored as one
multi-frame file (enhanced CT/MR) is checked frame by frame and read as one image. Reading uses SimpleITK (the
'dicom' extra): its GDCM reader applies rescale slope/intercept, decodes compressed transfer syntaxes and keeps
the geometry, and the same library reads NRRD masks and writes NIfTI with a correct affine.

    python scripts/prepare_dicom.py /data/dicom /data/ct_nifti --modality CT --masks /data/masks \
        --mask_pattern "{patient}*.nii.gz"
    python scripts/prepare_dicom.py /data/dicom /data/ct_nifti --modality CT --dicom_seg /data/dicom \
        --seg_label_map Liver:1 Kidney:4
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ldm.atomic_io import TMP_PREFIX, save_nifti_file, write_json  # noqa: E402
from ldm.cli_flags import ArgumentParser  # noqa: E402
from ldm.data.dicom_read import (Series, assign_output_names, check_selected, check_unique_outputs,  # noqa: E402,F401
                                 describe_bad, find_series, import_dicom_package, import_sitk, is_dicom_file,
                                 read_volume, safe_name, select_series, skipped_entry)

if TYPE_CHECKING:
    from ldm.data.dicom_series import SeriesGeometry

logger = logging.getLogger("prepare_dicom")
SPLITS = ("train", "validation", "test")
STAGING = ".partial"  # OUT/.partial: volumes written there, moved into OUT when every series is done
# SOP classes of DICOM-SEG objects: Segmentation Storage and Label Map Segmentation Storage
SEG_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")


def resample_mask(mask: Any, reference: Any, source: str) -> Any:
    """``mask`` on ``reference``'s grid (nearest neighbour in physical space) as uint8 labels."""
    sitk = import_sitk()
    if mask.GetDimension() != 3 or mask.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"mask {source} is not a single-layer 3D label volume (dimension {mask.GetDimension()}, "
                         f"{mask.GetNumberOfComponentsPerPixel()} components); export it as a labelmap")
    values = sitk.GetArrayViewFromImage(mask)
    if values.size and (values.min() < 0 or values.max() > 255 or (values % 1 != 0).any()):
        raise ValueError(f"mask {source} holds values outside the integer range 0..255; masks must be class ids")
    return sitk.Resample(sitk.Cast(mask, sitk.sitkUInt8), reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                         sitk.sitkUInt8)


def find_mask(masks_dir: Path, pattern: str, series: Series) -> Optional[Path]:
    """The mask file for ``series``: ``pattern`` with ``{patient}``, ``{series}``, ``{uid}`` filled, searched
    recursively; None when there is none; ``ValueError`` when several match."""
    glob = pattern.format(patient=series.patient, series=series.name, uid=series.uid)
    hits = sorted(p for p in masks_dir.rglob(glob) if p.is_file())
    if len(hits) > 1:
        raise ValueError(f"several masks match {glob!r} for patient {series.patient} series {series.name}: "
                         f"{[str(h) for h in hits[:5]]}; make --mask_pattern more specific (e.g. use {{series}})")
    return hits[0] if hits else None


MaskReader = Callable[[Series, Any], Optional[Any]]


def mask_reader_from_folder(masks_dir: Optional[Path], pattern: str,
                            label_map: Optional[dict[int, int]] = None) -> MaskReader:
    """A function ``(series, image) -> mask on the image grid or None`` reading masks from ``masks_dir``."""
    def read(series: Series, image: Any) -> Optional[Any]:
        if masks_dir is None:
            return None
        path = find_mask(masks_dir, pattern, series)
        if path is None:
            return None
        sitk = import_sitk()
        mask = resample_mask(sitk.ReadImage(str(path)), image, str(path))
        if label_map:
            mask = remap_labels(mask, label_map)
        return mask

    if masks_dir is not None and not masks_dir.is_dir():
        raise FileNotFoundError(f"mask folder {masks_dir} does not exist")
    return read


def remap_labels(mask: Any, label_map: dict[int, int]) -> Any:
    """Labels replaced by ``label_map`` (ids it does not name are kept)."""
    import numpy as np

    sitk = import_sitk()
    arr = sitk.GetArrayFromImage(mask)
    out = arr.copy()
    for src, dst in label_map.items():
        out[arr == src] = dst
    result = sitk.GetImageFromArray(out.astype(np.uint8))
    result.CopyInformation(mask)
    return result


def import_highdicom() -> Any:
    """highdicom, or an ImportError saying how to install it."""
    return import_dicom_package("highdicom", "reading DICOM-SEG masks")


def find_dicom_segs(root: Path) -> dict[str, Path]:
    """DICOM-SEG files below ``root`` (searched recursively) by the SeriesInstanceUID they reference."""
    import_highdicom()
    import pydicom

    if not root.is_dir():
        raise FileNotFoundError(f"DICOM-SEG folder {root} does not exist")
    by_series: dict[str, Path] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if not is_dicom_file(path):
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "ReferencedSeriesSequence"])
        if str(ds.get("SOPClassUID", "")) not in SEG_SOP_CLASSES:
            continue
        refs = sorted({str(item.SeriesInstanceUID) for item in ds.get("ReferencedSeriesSequence", [])})
        if len(refs) != 1:
            raise ValueError(f"DICOM-SEG {path} references {len(refs)} series {refs} in its ReferencedSeriesSequence; "
                             "a mask must belong to exactly one image series")
        if refs[0] in by_series:
            raise ValueError(f"DICOM-SEG files {by_series[refs[0]]} and {path} both segment series {refs[0]}; keep "
                             "one of them under the --dicom_seg folder")
        by_series[refs[0]] = path
    if not by_series:
        raise ValueError(f"no DICOM-SEG files (SOP class Segmentation Storage) found under {root}")
    return by_series


def parse_seg_label_map(items: list[str]) -> dict[str, int]:
    """``["Liver:1", "3:2"]`` -> ``{"liver": 1, "3": 2}`` (keys: segment labels, lower case, or segment numbers)."""
    out: dict[str, int] = {}
    for item in items:
        key, sep, value = item.rpartition(":")
        if not sep or not key.strip() or not value.strip().isdigit() or int(value) > 255:
            raise ValueError(f"--seg_label_map entry {item!r} is not SEGMENT:ID with a segment label or number and a "
                             "class id 0..255, e.g. Liver:1 or 2:1")
        out[key.strip().lower()] = int(value)
    return out


def segment_classes(seg: Any, label_map: dict[str, int], source: str) -> dict[int, int]:
    """{segment number: class id} of a highdicom Segmentation, in painting order (later wins on overlap)."""
    labels = {int(n): str(seg.get_segment_description(n).segment_label) for n in seg.segment_numbers}
    if not label_map:
        if any(n > 255 for n in labels):
            raise ValueError(f"DICOM-SEG {source} has {len(labels)} segments, numbers up to {max(labels)}, but class "
                             "ids are 0..255; map its segments to class ids with --seg_label_map")
        return {n: n for n in sorted(labels)}
    classes: dict[int, int] = {}
    for key, class_id in label_map.items():
        hits = [n for n, label in labels.items() if key in (str(n), label.lower())]
        if not hits:
            logger.warning("DICOM-SEG %s has no segment %r (its segments: %s)", source, key,
                           ", ".join(f"{n} {label!r}" for n, label in labels.items()))
        for n in hits:
            classes.pop(n, None)
            classes[n] = class_id
    left_out = [f"{n} {labels[n]!r}" for n in labels if n not in classes]
    if left_out:
        logger.info("DICOM-SEG %s: segments %s are not in --seg_label_map and stay background", source,
                    ", ".join(left_out))
    return classes


def _paint(pixels: Any, classes: dict[int, int]) -> Any:
    """uint8 class ids from per-segment pixels ``[..., segment]`` (in ``classes`` order; >= 0.5 is inside)."""
    import numpy as np

    labels = np.zeros(pixels.shape[:-1], np.uint8)
    for channel, class_id in enumerate(classes.values()):
        labels[pixels[..., channel] >= 0.5] = class_id
    return labels


def _frames_reference_sources(seg: Any) -> bool:
    """Whether every frame of a SEG dataset names the source image it was derived from."""
    shared = seg.get("SharedFunctionalGroupsSequence")
    if shared and "DerivationImageSequence" in shared[0]:
        return True
    frames = seg.get("PerFrameFunctionalGroupsSequence") or []
    return bool(frames) and all("DerivationImageSequence" in frame for frame in frames)


def _seg_by_position(seg: Any, classes: dict[int, int], image: Any, source: str) -> Any:
    """The SEG's segments as a volume at their own plane positions, resampled onto ``image`` (nearest neighbour)."""
    import numpy as np

    sitk = import_sitk()
    volume = seg.get_volume(segment_numbers=list(classes), combine_segments=False, dtype=np.float32)
    pixels = np.asarray(volume.array).reshape(tuple(volume.spatial_shape) + (len(classes),))
    affine = np.asarray(volume.affine, dtype=np.float64)  # (slice, row, column) index -> LPS mm, as ITK's world
    axes = [affine[:3, 2], affine[:3, 1], affine[:3, 0]]  # ITK index order: column, row, slice
    spacing = [float(np.linalg.norm(a)) for a in axes]
    if min(spacing) <= 0:
        raise ValueError(f"DICOM-SEG {source} has no usable plane geometry (spacing {spacing}); it cannot be placed "
                         "on the image by position")
    mask = sitk.GetImageFromArray(_paint(pixels, classes))
    mask.SetSpacing(spacing)
    mask.SetOrigin([float(v) for v in affine[:3, 3]])
    mask.SetDirection([float(v) for v in np.stack([a / n for a, n in zip(axes, spacing)], axis=1).ravel()])
    return resample_mask(mask, image, source)


def read_dicom_seg(path: Path, series: Series, image: Any, label_map: dict[str, int]) -> Any:
    """The DICOM-SEG ``path`` of ``series`` as uint8 class ids on ``image``'s grid: frames placed by their
    referenced SOP instance UIDs (``image`` was read from ``series.files`` in that order) when every frame names
    its source slice and has the slices' size, else by their plane positions (resampled, nearest neighbour)."""
    import numpy as np
    import pydicom

    hd, sitk = import_highdicom(), import_sitk()
    seg = hd.seg.segread(str(path))
    sop_uids = [str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
                for f in series.files]
    foreign = sorted({str(sop) for _, _, sop in seg.get_source_image_uids()} - set(sop_uids))
    if foreign:
        raise ValueError(f"DICOM-SEG {path} references {len(foreign)} instance(s) that are not slices of series "
                         f"{series.uid} (patient {series.patient}), e.g. {foreign[0]}; it was made for another "
                         "version of that series")
    classes = segment_classes(seg, label_map, str(path))
    columns, rows, _ = image.GetSize()
    if not classes:
        mask = sitk.GetImageFromArray(np.zeros((len(sop_uids), rows, columns), np.uint8))
    elif _frames_reference_sources(seg) and (int(seg.Rows), int(seg.Columns)) == (rows, columns) \
            and len(sop_uids) == image.GetSize()[2]:  # one file per slice (not a multi-frame source)
        pixels = seg.get_pixels_by_source_instance(sop_uids, segment_numbers=list(classes),
                                                   assert_missing_frames_are_empty=True, dtype=np.float32)
        mask = sitk.GetImageFromArray(_paint(pixels, classes))
    else:
        logger.info("DICOM-SEG %s: frames placed by their plane positions (no per-frame source references, or "
                    "another frame size than the series)", path)
        return _seg_by_position(seg, classes, image, str(path))
    mask.CopyInformation(image)
    return mask


class DicomSegMasks:
    """Mask reader for :func:`prepare`: the DICOM-SEG under ``seg_dir`` that references a series, else
    ``fallback`` (the --masks reader).

    Args:
        seg_dir: folder searched recursively for DICOM-SEG files (may be the DICOM input folder).
        label_map: ``parse_seg_label_map`` output; empty: segment number = class id.
        fallback: reader for series without a DICOM-SEG.
    """

    def __init__(self, seg_dir: Path, label_map: dict[str, int], fallback: MaskReader) -> None:
        self.segs = find_dicom_segs(seg_dir)
        self.label_map = label_map
        self.fallback = fallback

    def check_series(self, series: list[Series]) -> None:
        """Refuse a DICOM-SEG whose referenced series is not among ``series`` (every series of the input)."""
        known = {s.uid for s in series}
        for uid, path in self.segs.items():
            if uid not in known:
                raise ValueError(f"DICOM-SEG {path} references series {uid}, which is not among the {len(known)} "
                                 "DICOM series of the input folder; put the segmented series there or remove the SEG")

    def __call__(self, series: Series, image: Any) -> Optional[Any]:
        path = self.segs.get(series.uid)
        if path is None:
            return self.fallback(series, image)
        return read_dicom_seg(path, series, image, self.label_map)


def _write_series(series: Series, geometry: SeriesGeometry, staging: Path, split: str,
                  read_mask: MaskReader) -> dict[str, Any]:
    """Read one checked series (and its mask) and write them under ``staging``; returns its split.json record."""
    sitk = import_sitk()
    rel = Path(series.patient) / f"{series.name}.nii.gz"
    image = read_volume(series, geometry)
    mask = read_mask(series, image)
    outputs = [(image, staging / split / "images" / rel)] + ([] if mask is None else
                                                              [(mask, staging / split / "masks" / rel)])
    for volume, path in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        # SimpleITK only prints an error on a full disk and leaves a truncated file: each volume is written beside
        # its name, read back (header and every voxel) and renamed; a failure is a WriteError naming the file
        save_nifti_file(str(path), lambda tmp, volume=volume: sitk.WriteImage(volume, tmp, useCompression=True))
    logger.info("%s -> %s/%s%s", series.uid, split, rel, "" if mask is not None else " (no mask)")
    return {"patient": series.patient, "split": split, "file": str(rel), "uid": series.uid,
            "modality": series.modality, "description": series.description, "study_date": series.study_date,
            "spacing": list(image.GetSpacing()), "size": list(image.GetSize()), "mask": mask is not None}


def convert(checked: list[tuple[Series, SeriesGeometry]], out: Path, splits: dict[str, list[str]],
            read_mask: MaskReader, skip_bad: bool = False) -> dict[str, Any]:
    """Write every checked series (and its mask) into ``out/<split>/{images,masks}/<patient>/<series>.nii.gz``.

    Volumes go to ``out/.partial`` first and are moved into place only when every series is done, so a series that
    fails while being read stops the run with nothing written (or, with ``skip_bad``, is left out and listed in the
    returned ``skipped``)."""
    split_of = {p: s for s in SPLITS for p in splits[s]}
    staging = out / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    written, skipped = [], []
    try:
        for series, geometry in checked:
            try:
                written.append(_write_series(series, geometry, staging, split_of[series.patient], read_mask))
            except (ValueError, RuntimeError) as err:
                if not skip_bad:
                    raise ValueError(f"series {series.uid} (patient {series.patient}, {series.name}): {err}; "
                                     "nothing was written (pass --skip_bad to convert the other series)") from err
                skipped.append(skipped_entry(series, str(err)))
                for part in ("images", "masks"):
                    (staging / split_of[series.patient] / part / series.patient / f"{series.name}.nii.gz").unlink(
                        missing_ok=True)
        for path in sorted(p for p in staging.rglob("*") if p.is_file() and not p.name.startswith(TMP_PREFIX)):
            target = out / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    without_mask = [r["file"] for r in written if not r["mask"]]
    if without_mask:
        logger.warning("%d of %d series have no mask (first: %s); the datasets mark their slices "
                       "has_segmentation=False", len(without_mask), len(written), without_mask[0])
    return {"series": written, "skipped": skipped}


def complete_split_json(path: Path) -> bool:
    """Whether ``path`` is the split.json of a finished conversion (parses, with its ``series`` and ``splits``); an
    empty or cut-off file that a failed run left does not count."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(record, dict) and isinstance(record.get("series"), list) and isinstance(record.get("splits"),
                                                                                               dict)


def prepare(input_dir: Path, out: Path, read_mask: MaskReader, modality: Optional[str] = None,
            description: Optional[str] = None, val_fraction: float = 0.1, test_fraction: float = 0.2,
            seed: int = 0, settings: Optional[dict] = None, skip_bad: bool = False) -> dict[str, list[str]]:
    """Find, select, check, split (by patient) and convert; writes ``out/split.json``. Returns patients per split.

    Every selected series is checked before anything is written; a bad one raises ``ValueError`` naming the
    series, the file and the reason, unless ``skip_bad``: then the others are converted and the bad ones listed
    under ``skipped`` in split.json and in one warning."""
    from prepare_ctorg import split_patients

    if complete_split_json(out / "split.json"):
        raise ValueError(f"{out / 'split.json'} exists: prepare into a new (or emptied) output folder")
    if (out / "split.json").exists():  # an empty or cut-off file of a run that failed (a full disk): not a result
        logger.warning("%s is incomplete (left by a conversion that failed); converting again and replacing it",
                       out / "split.json")
    found = find_series(input_dir)
    check_series = getattr(read_mask, "check_series", None)  # DicomSegMasks: every SEG's series is in the input
    if check_series is not None:
        check_series(found)
    series = select_series(found, modality, description)
    checked, skipped = check_selected(series)
    if skipped and not skip_bad:
        raise ValueError(f"{describe_bad(skipped, len(series))}. Nothing was written: fix or remove those files, or "
                         "pass --skip_bad to convert the other series and list these in split.json")
    if not checked:
        raise ValueError(f"no series left to convert: {describe_bad(skipped, len(series))}")
    check_unique_outputs([s for s, _ in checked])
    splits = split_patients(sorted({s.patient for s, _ in checked}), {}, val_fraction, test_fraction, seed)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        record = convert(checked, out, splits, read_mask, skip_bad)
        if not record["series"]:
            raise ValueError(f"no series could be converted: {describe_bad(record['skipped'], len(series))}")
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    skipped += record.pop("skipped")
    converted = {r["patient"] for r in record["series"]}
    splits = {s: [p for p in splits[s] if p in converted] for s in SPLITS}  # a patient whose series all failed
    record.update({"splits": splits, "skipped": skipped,
                   "settings": dict(settings or {}, modality=modality, description=description,
                                    val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                                    skip_bad=skip_bad)})
    write_json(str(out / "split.json"), record)  # written last, atomically: a split.json that exists is whole
    if skipped:
        logger.warning("--skip_bad: %s; they are listed under 'skipped' in %s",
                       describe_bad(skipped, len(series)), out / "split.json")
    logger.info("%d series of %d patients (%s) written to %s", len(record["series"]), len(converted),
                ", ".join(f"{s}: {len(splits[s])}" for s in SPLITS), out)
    return splits


def parse_label_map(items: list[str]) -> dict[int, int]:
    """``["1:2", "4:0"]`` -> ``{1: 2, 4: 0}``."""
    out = {}
    for item in items:
        src, sep, dst = item.partition(":")
        if not sep or not src.strip().isdigit() or not dst.strip().isdigit():
            raise ValueError(f"--label_map entry {item!r} is not SRC:DST with two label ids, e.g. 4:0")
        out[int(src)] = int(dst)
    return out


def add_split_arguments(parser: ArgumentParser) -> None:
    """The patient-split options shared with scripts/prepare_breastmri.py."""
    parser.add_argument("--val_fraction", type=float, default=0.1, help="fraction of patients for validation")
    parser.add_argument("--test_fraction", type=float, default=0.2, help="fraction of patients for test")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient shuffle")


def get_parser() -> ArgumentParser:
    """The command line of this script."""
    p = ArgumentParser(description=__doc__)
    p.add_argument("input_dir", type=Path, help="folder searched recursively for DICOM series")
    p.add_argument("output_dir", type=Path, help="output root (a new folder)")
    p.add_argument("--modality", default=None, help="keep series of this DICOM Modality only, e.g. CT or MR")
    p.add_argument("--series_description", default=None, metavar="REGEX",
                   help="keep series whose SeriesDescription matches (case-insensitive search)")
    p.add_argument("--masks", type=Path, default=None, help="folder of label volumes (NIfTI or NRRD)")
    p.add_argument("--mask_pattern", default="{patient}*",
                   help="file name glob of a series' mask under --masks; {patient}, {series} and {uid} are filled")
    p.add_argument("--label_map", nargs="+", default=[], metavar="SRC:DST",
                   help="relabel the ids of --masks files, e.g. 4:0 to drop class 4")
    p.add_argument("--dicom_seg", type=Path, default=None,
                   help="folder searched for DICOM-SEG masks, each matched to the series it references (may be "
                        "input_dir; needs highdicom)")
    p.add_argument("--seg_label_map", nargs="+", default=[], metavar="SEGMENT:ID",
                   help="DICOM-SEG segment (label or number) to class id, e.g. Liver:1 Kidney:4; segments not "
                        "named stay background (default: class id = segment number)")
    p.add_argument("--skip_bad", action="store_true",
                   help="convert the good series and skip bad ones (unreadable or missing files, missing or duplicate "
                        "slices, uneven spacing), listed under 'skipped' in split.json; default: a bad series stops "
                        "the run before anything is written")
    add_split_arguments(p)
    return p


def main(argv: Optional[list[str]] = None) -> dict[str, list[str]]:
    """Run the conversion for command-line ``argv``; returns the patients per split."""
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    read_mask = mask_reader_from_folder(args.masks, args.mask_pattern, parse_label_map(args.label_map))
    seg_label_map = parse_seg_label_map(args.seg_label_map)
    if args.dicom_seg is not None:
        read_mask = DicomSegMasks(args.dicom_seg, seg_label_map, read_mask)
    elif seg_label_map:
        raise ValueError("--seg_label_map maps DICOM-SEG segments: give the DICOM-SEG folder with --dicom_seg")
    return prepare(args.input_dir, args.output_dir, read_mask, args.modality, args.series_description,
                   args.val_fraction, args.test_fraction, args.seed,
                   settings={"masks": str(args.masks) if args.masks else None, "mask_pattern": args.mask_pattern,
                             "label_map": args.label_map,
                             "dicom_seg": str(args.dicom_seg) if args.dicom_seg else None,
                             "seg_label_map": args.seg_label_map}, skip_bad=args.skip_bad)


if __name__ == "__main__":
    from ldm.atomic_io import run_script_reporting_writes

    sys.exit(run_script_reporting_writes(main))
