#!/usr/bin/env python
r"""Export a sample folder of scripts/sample.py (images + masks + samples.json) as a training set for nnU-Net v2
(raw layout: imagesTr/, labelsTr/, dataset.json) and MONAI (datalist.json), with a dataset card (README.md,
dataset_card.json). Details: docs/export_dataset.md.

Example:
    python scripts/sample.py -r logs/<run> -n 200 --save_masks --format nii -l samples/anat
    python scripts/export_dataset.py samples/anat nnUNet_raw --dataset-id 501 --name PhantomSyn
    nnUNet_raw=nnUNet_raw nnUNet_preprocessed=nnUNet_preprocessed nnUNet_results=nnUNet_results \
        nnUNetv2_plan_and_preprocess -d 501 -c 2d --verify_dataset_integrity
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ldm.cli_flags import ArgumentParser  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    """The command line (``--help`` imports nothing heavy)."""
    p = ArgumentParser(description=__doc__)
    p.add_argument("samples", metavar="SAMPLE_DIR", help="sample folder written by scripts/sample.py with masks")
    p.add_argument("out", metavar="OUT_DIR",
                   help="where the dataset folder DatasetNNN_Name is created (e.g. your nnUNet_raw)")
    p.add_argument("--dataset-id", dest="dataset_id", type=int, required=True, metavar="NNN",
                   help="nnU-Net dataset id, 1..999")
    p.add_argument("--name", required=True, help="dataset name: letters, digits, '_' and '-'")
    p.add_argument("--real", default=None, metavar="DIR",
                   help="also add real cases (prefix real_; synthetic ones are syn_) from an nnU-Net folder "
                        "(imagesTr/ + labelsTr/) or the project's data layout (images/ + masks/, or "
                        "<split>/images + <split>/masks)")
    p.add_argument("--real-split", dest="real_split", default="train",
                   help="split folder of --real in the project's layout")
    p.add_argument("--benchmark", default=None, metavar="JSON",
                   help="JSON file of benchmark numbers to record in the dataset card")
    p.add_argument("--label-set", dest="label_set", default=None, metavar="NAME",
                   help="label set of the masks (ldm/data/labels.py; default: the run config's label_set)")
    p.add_argument("--channel-name", dest="channel_name", default=None, metavar="NAME",
                   help="nnU-Net channel name, which picks its normalisation (CT, zscore, noNorm, ...; default: CT "
                        "for CT runs, else zscore)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty dataset folder (only once the new one is complete)")
    p.add_argument("--slices", action="store_true",
                   help="a sample.py --masks session of a NIfTI label volume: export its slices as single-slice "
                        "cases instead of its volumes (images_<k>.nii.gz labelled by condition_masks.nii.gz)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, export, print where the dataset is."""
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ldm.export_dataset import export_dataset

    result = export_dataset(args.samples, args.out, args.dataset_id, args.name, real_dir=args.real,
                            real_split=args.real_split, benchmark=args.benchmark, label_set=args.label_set,
                            channel_name=args.channel_name, overwrite=args.overwrite, progress=args.progress,
                            slices=args.slices)
    print(f"wrote {result.num_synthetic} synthetic and {result.num_real} real cases to {result.dataset_dir} "
          f"(nnU-Net: {result.dataset_json}; MONAI: {result.datalist}; card: {result.card_md})")
    return 0


if __name__ == "__main__":
    from ldm.atomic_io import run_script_reporting_writes

    sys.exit(run_script_reporting_writes(main))
