#!/usr/bin/env python
r"""Train the independent segmentation network used by scripts/evaluate.py (small UNet, real training split).

Example:
    python scripts/train_segmenter.py --data configs/latent-diffusion/demo_phantom_anatomical.yaml \
        --split train --num_classes 6 --steps 2000 -o logs/segmenter_demo.pt
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ldm.cli_flags import ArgumentParser, add_threads_argument  # noqa: E402

import torch  # noqa: E402

from ldm.threads import configure_threads  # noqa: E402
from ldm.util import resolve_device  # noqa: E402

from ldm.evaluation import compare, segmenter  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True,
                   help="dataset config YAML ({target, params}) or a main.py config (its data.params.<split>)")
    p.add_argument("--split", default="train")
    p.add_argument("--num_classes", type=int, required=True)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--base_channels", type=int, default=32)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--ignore_index", type=int, default=255)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val_split", default=None, help="split to report Dice on after training (e.g. validation)")
    p.add_argument("-o", "--output", required=True, help="checkpoint to write (.pt)")
    add_threads_argument(p)
    p.add_argument("--device", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = resolve_device(args.device)
    configure_threads(args.threads, device.type == "cpu")
    dataset = compare.dataset_from_config(args.data, args.split)
    model = segmenter.train_segmenter(dataset, args.num_classes, steps=args.steps, batch_size=args.batch_size,
                                      lr=args.lr, base_channels=args.base_channels, depth=args.depth,
                                      ignore_index=args.ignore_index, seed=args.seed, device=device, progress=True)
    meta = {"data": os.path.abspath(args.data), "split": args.split, "steps": args.steps, "seed": args.seed}
    if args.val_split:
        from ldm.evaluation import anatomy

        images, masks = compare.load_dataset_arrays(compare.dataset_from_config(args.data, args.val_split))
        if masks is not None:
            dice = anatomy.dice_per_class(segmenter.segment(model, images), masks, args.num_classes, args.ignore_index)
            meta["val_dice_per_class"] = [None if d != d else float(d) for d in dice]
            print(f"validation Dice per class: {[round(float(d), 3) for d in dice]}")
    segmenter.save_segmenter(args.output, model, meta)
    print("wrote", args.output)
    return 0


if __name__ == "__main__":
    from ldm.util import run_script

    sys.exit(run_script(main))
