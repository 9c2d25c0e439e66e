"""Write a synthetic abdominal-CT phantom data set (no download needed).

Formats:
  png    OUT/<split>/images/<patient>/<slice>.png + OUT/<split>/masks/... (windowed 8-bit; the CT-Organ 2D layout)
  nifti  OUT/<split>/images/volume-N.nii.gz + OUT/<split>/masks/volume-N.nii.gz (HU int16, labels uint8)
  ctorg  OUT/volume-N.nii.gz + OUT/labels-N.nii.gz side by side (input of scripts/prepare_ctorg.py)

    python scripts/make_phantom_dataset.py data/phantom --format png --size 64
    CTORG_ROOT=data/phantom python main.py ...   # CTOrganTrain/Validation/Test read it
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli_flags import ArgumentParser  # noqa: E402

from ldm.data.phantom import write_phantom_2d, write_phantom_nifti  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, list[str]]:
    parser = ArgumentParser(description="Write a synthetic CT-Organ-like phantom data set.")
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--format", choices=("png", "nifti", "ctorg"), default="png")
    parser.add_argument("--size", type=int, default=64, help="slice side in pixels")
    parser.add_argument("--slices", type=int, default=32, help="slices per patient (pelvis to chest)")
    parser.add_argument("--train", type=int, default=8, help="training patients")
    parser.add_argument("--validation", type=int, default=2, help="validation patients")
    parser.add_argument("--test", type=int, default=2, help="test patients")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.size < 8 or args.slices < 1 or min(args.train, args.validation, args.test) < 0:
        parser.error("--size must be >= 8, --slices >= 1 and patient counts >= 0")
    patients = {"train": args.train, "validation": args.validation, "test": args.test}
    if args.format == "png":
        result = write_phantom_2d(args.output_dir, args.size, args.slices, patients, args.seed)
    else:
        layout = "split" if args.format == "nifti" else "ctorg"
        result = write_phantom_nifti(args.output_dir, args.size, args.slices, patients, args.seed, layout=layout)
    total = sum(len(v) for v in result.values())
    print(f"wrote {total} phantom patients x {args.slices} slices ({args.format}, {args.size} px) to "
          f"{args.output_dir}")
    return result


if __name__ == "__main__":
    from ldm.util import run_script

    sys.exit(run_script(main))
