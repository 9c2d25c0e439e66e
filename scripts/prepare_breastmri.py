#!/usr/bin/env python
r"""Convert the Duke breast MRI collection (DICOM) with its 3D breast/FGT segmentations to the breast MRI layout.

Input: the DICOM download (``Duke-Breast-Cancer-MRI/<PatientID>/<study>/<series>/*.dcm``, any depth) and,
optionally, the folder of the 3D segmentations (Slicer ``.seg.nrrd`` files, one with the breast and one with
the dense (fibroglandular) tissue and vessels per patient, drawn on the pre-contrast series). Output, as
``scripts/prepare_dicom.py`` writes it and ``ldm.data.medical_images.BreastMRITrain/Validation/Test`` read it
(set BREASTMRI_ROOT to OUT)::

    OUT/<split>/images/<PatientID>/<series>.nii.gz    MR intensities as stored
    OUT/<split>/masks/<PatientID>/<series>.nii.gz     0 background, 1 breast, 2 fibroglandular tissue, 3 vessels

Labels: the breast file's non-zero voxels become 1; then the dense/vessels file's segments are painted over:
the segment whose Slicer name (``Segment<i>_Name`` in the NRRD header) mentions dense/FGT/fibroglandular becomes
2 and the one naming vessels becomes 3. When a header has no segment names, --dense_label and --vessel_label
give the stored values. Only the series matching --series_description (default: the pre-contrast ``pre``
series the segmentations were drawn on) are converted.

    python scripts/prepare_breastmri.py /data/Duke-Breast-Cancer-MRI $BREASTMRI_ROOT \
        --segmentations "/data/Duke segmentations"
"""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ldm.cli_flags import ArgumentParser  # noqa: E402
from prepare_dicom import (Series, add_split_arguments, find_mask, import_sitk, prepare,  # noqa: E402
                           resample_mask)

logger = logging.getLogger("prepare_breastmri")
BREAST, DENSE, VESSELS = 1, 2, 3
_DENSE_NAME = re.compile(r"dense|fgt|fibroglandular", re.IGNORECASE)
_VESSEL_NAME = re.compile(r"vessel", re.IGNORECASE)


def segment_values(image: Any, dense_label: int, vessel_label: int, source: str) -> dict[int, int]:
    """``{stored value: class id}`` of a dense/vessels label volume, from its Slicer segment names if present."""
    names = {}
    for key in image.GetMetaDataKeys():
        match = re.fullmatch(r"Segment(\d+)_Name", key)
        if match:
            names[match.group(1)] = image.GetMetaData(key)
    if not names:
        return {dense_label: DENSE, vessel_label: VESSELS}
    values: dict[int, int] = {}
    for index, name in names.items():
        key = f"Segment{index}_LabelValue"
        if not image.HasMetaDataKey(key):
            raise ValueError(f"{source}: segment {name!r} has no {key} in the header; export the segmentation "
                             "as a labelmap")
        target = DENSE if _DENSE_NAME.search(name) else VESSELS if _VESSEL_NAME.search(name) else None
        if target is None:
            raise ValueError(f"{source}: segment {name!r} is neither dense tissue nor vessels")
        values[int(image.GetMetaData(key))] = target
    return values


class DukeMasks:
    """Mask reader for :func:`prepare_dicom.prepare`: breast + dense/vessels files -> one 4-class mask.

    Args:
        folder: where the segmentation files are (searched recursively); None: no masks.
        breast_pattern, dense_pattern: file name globs, ``{patient}`` filled with the PatientID.
        dense_label, vessel_label: stored values when the dense/vessels file names no segments.
    """

    def __init__(self, folder: Optional[Path], breast_pattern: str, dense_pattern: str, dense_label: int = 1,
                 vessel_label: int = 2) -> None:
        if folder is not None and not folder.is_dir():
            raise FileNotFoundError(f"segmentation folder {folder} does not exist")
        self.folder, self.breast_pattern, self.dense_pattern = folder, breast_pattern, dense_pattern
        self.dense_label, self.vessel_label = dense_label, vessel_label

    def __call__(self, series: Series, image: Any) -> Optional[Any]:
        if self.folder is None:
            return None
        import numpy as np

        sitk = import_sitk()
        breast_path = find_mask(self.folder, self.breast_pattern, series)
        dense_path = find_mask(self.folder, self.dense_pattern, series)
        if breast_path is None and dense_path is None:
            return None
        out = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
        if breast_path is not None:
            breast = resample_mask(sitk.ReadImage(str(breast_path)), image, str(breast_path))
            out[sitk.GetArrayViewFromImage(breast) > 0] = BREAST
        if dense_path is not None:
            raw = sitk.ReadImage(str(dense_path))
            values = segment_values(raw, self.dense_label, self.vessel_label, str(dense_path))
            # a copy: a view of the temporary resampled image would outlive its buffer
            dense = sitk.GetArrayFromImage(resample_mask(raw, image, str(dense_path)))
            for stored, target in values.items():
                out[dense == stored] = target
        mask = sitk.GetImageFromArray(out)
        mask.CopyInformation(image)
        return mask


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("input_dir", type=Path, help="the Duke-Breast-Cancer-MRI DICOM folder")
    p.add_argument("output_dir", type=Path, help="output root (a new folder; use it as BREASTMRI_ROOT)")
    p.add_argument("--segmentations", type=Path, default=None,
                   help="folder of the 3D breast and dense/vessels segmentations (.seg.nrrd)")
    p.add_argument("--series_description", default=r"\bpre\b", metavar="REGEX",
                   help="series to convert, matched against SeriesDescription (case-insensitive)")
    p.add_argument("--breast_pattern", default="*{patient}*Breast.seg.nrrd",
                   help="file name glob of a patient's breast segmentation")
    p.add_argument("--dense_pattern", default="*{patient}*Dense_and_Vessels.seg.nrrd",
                   help="file name glob of a patient's dense tissue and vessels segmentation")
    p.add_argument("--dense_label", type=int, default=1,
                   help="stored value of dense tissue when the file names no segments")
    p.add_argument("--vessel_label", type=int, default=2,
                   help="stored value of vessels when the file names no segments")
    p.add_argument("--skip_bad", action="store_true",
                   help="convert the good series and skip bad ones (named with their reasons under 'skipped' in "
                        "split.json); default: a bad series stops the run before anything is written")
    add_split_arguments(p)
    return p


def main(argv: Optional[list[str]] = None) -> dict[str, list[str]]:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    masks = DukeMasks(args.segmentations, args.breast_pattern, args.dense_pattern, args.dense_label,
                      args.vessel_label)
    return prepare(args.input_dir, args.output_dir, masks, "MR", args.series_description, args.val_fraction,
                   args.test_fraction, args.seed,
                   settings={"segmentations": str(args.segmentations) if args.segmentations else None,
                             "breast_pattern": args.breast_pattern, "dense_pattern": args.dense_pattern,
                             "dense_label": args.dense_label, "vessel_label": args.vessel_label},
                   skip_bad=args.skip_bad)


if __name__ == "__main__":
    from ldm.atomic_io import run_script_reporting_writes  # a full disk: one line naming the file

    sys.exit(run_script_reporting_writes(main))
