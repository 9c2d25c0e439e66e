"""Turn CT-ORG NIfTI volumes into 2D PNG slices + masks with a patient-level train/validation/test split.

Input: a folder (searched recursively) with ``volume-N.nii.gz`` and ``labels-N.nii.gz`` (the CT-ORG
download). Output (the layout ``ldm.data.medical_images.CTOrganTrain/Validation/Test`` read)::

    OUT/split.json                                   patients per split + the settings used
    OUT/<split>/images/volume-N/slice_0000.png       CT window -> 8-bit, resized to --size
    OUT/<split>/masks/volume-N/slice_0000.png        raw CT-ORG label ids (brain 6 kept), nearest neighbour

Every volume is one patient unless ``--patient-map`` (JSON ``{"volume-N": "patient-id"}``) groups
several; a patient's volumes always go to the same split. Re-running skips finished volumes
(``OUT/.done/volume-N``) and keeps the recorded split; different settings need a new output folder.

    python scripts/prepare_ctorg.py /data/CT-ORG/OrganSegmentations $CTORG_ROOT --size 256
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.atomic_io import write_json, write_text  # noqa: E402
from ldm.cli_flags import ArgumentParser  # noqa: E402

from ldm.data.intensity import pad_to_square, resize_image, resize_mask, window_ct  # noqa: E402
from ldm.data.io import (canonical_affines_match, load_canonical, nifti_info,  # noqa: E402
                         volume_slice_to_display)

logger = logging.getLogger("prepare_ctorg")
VOLUME_RE = re.compile(r"^volume-(\d+)\.nii(\.gz)?$")
SPLITS = ("train", "validation", "test")


def find_pairs(input_dir: Path) -> dict[str, tuple[Path, Path]]:
    """``{"volume-N": (volume path, labels path)}``; a volume without its labels file is an error."""
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder {input_dir} does not exist")
    pairs: dict[str, tuple[Path, Path]] = {}
    for vol in sorted(input_dir.rglob("volume-*.nii*")):
        match = VOLUME_RE.match(vol.name)
        if not match:
            continue
        labels = [vol.with_name(f"labels-{match.group(1)}{ext}") for ext in (".nii.gz", ".nii")]
        found = [p for p in labels if p.is_file()]
        if not found:
            raise FileNotFoundError(f"volume {vol} has no label volume {labels[0].name} beside it")
        pairs[f"volume-{match.group(1)}"] = (vol, found[0])
    if not pairs:
        raise ValueError(f"no CT-ORG volumes (volume-N.nii.gz) found under {input_dir}")
    return dict(sorted(pairs.items(), key=lambda kv: int(kv[0].split("-")[1])))


def split_patients(volume_ids: list[str], patient_of: dict[str, str], val_fraction: float, test_fraction: float,
                   seed: int) -> dict[str, list[str]]:
    """Patient-level split: shuffle patients with ``seed``, then cut test, validation, train."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must be in [0, 1) "
                         "and sum to less than 1")
    patients = sorted({patient_of.get(v, v) for v in volume_ids})
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    n_test = int(math.floor(test_fraction * len(order) + 0.5))
    n_val = int(math.floor(val_fraction * len(order) + 0.5))
    if len(order) - n_test - n_val < 1:
        raise ValueError(f"{len(order)} patients are too few for the requested validation/test fractions")
    groups = {"test": set(order[:n_test]), "validation": set(order[n_test:n_test + n_val]),
              "train": set(order[n_test + n_val:])}
    return {s: [v for v in volume_ids if patient_of.get(v, v) in groups[s]] for s in SPLITS}


def convert_volume(vid: str, vol: Path, lab: Path, out: Path, split: str, size: int,
                   window: tuple[float, float], slice_axis: int) -> int:
    """Write all slices of one volume; returns the number of slices."""
    info, linfo = nifti_info(vol), nifti_info(lab)
    if info.shape != linfo.shape:
        raise ValueError(f"volume {vol} has shape {info.shape} but labels {lab} has shape {linfo.shape}")
    if not canonical_affines_match(info.affine, linfo.affine):
        raise ValueError(f"volume {vol} and labels {lab} have different affines after reorientation to RAS+")
    hu = load_canonical(info).astype(np.float32)
    labels = load_canonical(linfo)
    if labels.dtype.kind == "f" and not np.all(labels == np.round(labels)):
        raise ValueError(f"labels {lab} holds non-integer values")
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() > 255:
        raise ValueError(f"labels {lab} holds values outside 0..255, which 8-bit PNG masks cannot store")
    img_dir, mask_dir = out / split / "images" / vid, out / split / "masks" / vid
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    n = info.shape[slice_axis]
    for k in range(n):
        img = window_ct(volume_slice_to_display(hu, k, slice_axis), *window)
        msk = volume_slice_to_display(labels, k, slice_axis)
        img, msk = pad_to_square(img, msk, -1.0, 0)
        img, msk = resize_image(img, size, "bicubic"), resize_mask(msk, size)
        Image.fromarray(np.round((img + 1.0) * 127.5).astype(np.uint8)).save(img_dir / f"slice_{k:04d}.png")
        Image.fromarray(msk.astype(np.uint8)).save(mask_dir / f"slice_{k:04d}.png")
    return n


def main(argv: list[str] | None = None) -> dict[str, list[str]]:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input_dir", type=Path, help="folder with volume-N.nii.gz and labels-N.nii.gz")
    parser.add_argument("output_dir", type=Path, help="output root (use it as CTORG_ROOT)")
    parser.add_argument("--size", type=int, default=256, help="output side in pixels")
    parser.add_argument("--window", type=float, nargs=2, default=(40.0, 400.0), metavar=("LEVEL", "WIDTH"),
                        help="CT window in HU")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient shuffle")
    parser.add_argument("--slice-axis", type=int, default=2, choices=(0, 1, 2), help="2 = axial")
    parser.add_argument("--patient-map", type=Path, default=None,
                        help='JSON {"volume-N": "patient-id"} for volumes that share a patient')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    pairs = find_pairs(args.input_dir)
    patient_of: dict[str, str] = {}
    if args.patient_map is not None:
        if not args.patient_map.is_file():
            raise FileNotFoundError(f"--patient-map file {args.patient_map} not found")
        patient_of = {str(k): str(v) for k, v in json.loads(args.patient_map.read_text()).items()}
    settings = {"size": args.size, "window": list(args.window), "val_fraction": args.val_fraction,
                "test_fraction": args.test_fraction, "seed": args.seed, "slice_axis": args.slice_axis}
    out: Path = args.output_dir
    split_file = out / "split.json"
    recorded = None
    if split_file.is_file():
        try:
            recorded = json.loads(split_file.read_text())
        except (UnicodeDecodeError, ValueError):  # empty or cut off by a full disk (before writes were atomic)
            logger.warning("%s is not readable JSON (a run that failed while writing it); writing it again",
                           split_file)
    if recorded is not None:
        if recorded.get("settings") != settings:
            raise ValueError(f"{split_file} was written with settings {recorded.get('settings')}, not {settings}; "
                             "use a new output folder (or delete it) to prepare with other settings")
        splits = {s: list(recorded["splits"][s]) for s in SPLITS}
        known = {v for s in SPLITS for v in splits[s]}
        if set(pairs) != known:
            raise ValueError(f"{split_file} lists other volumes than {args.input_dir} holds "
                             f"({len(known)} vs {len(pairs)}); use a new output folder")
    else:
        splits = split_patients(list(pairs), patient_of, args.val_fraction, args.test_fraction, args.seed)
        out.mkdir(parents=True, exist_ok=True)
        write_json(str(split_file), {"settings": settings, "splits": splits,
                                     "patients": {v: patient_of.get(v, v) for v in pairs}})
    split_of = {v: s for s in SPLITS for v in splits[s]}
    done_dir = out / ".done"
    done_dir.mkdir(parents=True, exist_ok=True)
    todo = [v for v in pairs if not (done_dir / v).is_file()]
    logger.info("%d volumes (%s), %d already done", len(pairs),
                ", ".join(f"{s}: {len(splits[s])}" for s in SPLITS), len(pairs) - len(todo))
    for vid in tqdm(todo, desc="CT-ORG volumes", unit="vol"):
        n = convert_volume(vid, *pairs[vid], out, split_of[vid], args.size, tuple(args.window), args.slice_axis)
        write_text(str(done_dir / vid), f"{n}\n")
    return splits


if __name__ == "__main__":
    from ldm.atomic_io import run_script_reporting_writes

    sys.exit(run_script_reporting_writes(main))
