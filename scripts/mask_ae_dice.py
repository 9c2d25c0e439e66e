#!/usr/bin/env python
r"""Reconstruction Dice of a trained mask autoencoder (the joint mode's mask first stage) on a data split.

Example:
    python scripts/mask_ae_dice.py -r logs/2026-01-01T00-00-00_mask_ae_phantom --split validation
Prints one Dice per class (pooled over the split's labelled pixels; posterior mode) and writes them as JSON
with ``-o``. Extra ``--data`` configs replace the run's data section (e.g. a larger validation set).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ldm.cli_flags import ArgumentParser, add_threads_argument  # noqa: E402

import torch  # noqa: E402

from ldm import sampling  # noqa: E402
from ldm.data.batch import masks_from_batch  # noqa: E402
from ldm.trust import add_trust_argument, check_run  # noqa: E402
from ldm.threads import configure_threads  # noqa: E402
from ldm.util import instantiate_from_config, resolve_device  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-r", "--resume", required=True, metavar="RUN_DIR_OR_CKPT", help="mask autoencoder run or checkpoint")
    p.add_argument("-b", "--base", nargs="*", default=[], metavar="CONFIG.yaml",
                   help="config(s) merged over the run's (needed for a bare checkpoint)")
    p.add_argument("--split", default="validation", help="data.params.<split> of the config")
    p.add_argument("--num_samples", type=int, default=None, help="override the split's num_samples (phantom)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("-o", "--out", default=None, help="write the Dice values to this JSON file")
    add_trust_argument(p)
    add_threads_argument(p)
    p.add_argument("--device", default=None)
    return p


@torch.no_grad()
def reconstruction_dice(model: torch.nn.Module, dataset: torch.utils.data.Dataset, batch_size: int,
                        device: torch.device) -> dict[int, float]:
    """Dice per class of ``argmax(decode(mode(encode(mask))))`` against the masks, pooled over ``dataset``."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    inter = torch.zeros(model.num_classes, dtype=torch.float64)
    total = torch.zeros(model.num_classes, dtype=torch.float64)
    for batch in loader:
        mask = masks_from_batch(batch, model.mask_key, model.ignore_index).to(device)
        pred = model.decode_mask(model.encode_mask(mask))
        valid = mask != model.ignore_index
        for c in range(model.num_classes):
            p, g = (pred == c) & valid, (mask == c) & valid
            inter[c] += float((p & g).sum())
            total[c] += float(p.sum() + g.sum())
    return {c: float(2 * inter[c] / total[c]) for c in range(model.num_classes) if total[c] > 0}


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_run(args.resume, args.base, args.trust_config)  # a run's config names allow-listed targets only
    device = resolve_device(args.device)
    configure_threads(args.threads, device.type == "cpu")
    model, info = sampling.load_model_for_sampling(args.resume, args.base, device=device,
                                                   trust_config=args.trust_config)
    if not hasattr(model, "encode_mask"):
        raise ValueError(f"{args.resume} is a {type(model).__name__}, not a mask autoencoder (MaskAutoencoderKL)")
    data = info["resolved_config"].get("data", {}).get("params", {})
    if args.split not in data:
        raise ValueError(f"the run's config has no data.params.{args.split}; its splits are {sorted(data)}")
    split = dict(data[args.split])
    if args.num_samples is not None:
        split["params"] = {**split.get("params", {}), "num_samples": args.num_samples}
    dataset = instantiate_from_config(split)
    dice = reconstruction_dice(model, dataset, args.batch_size, device)
    foreground = [v for c, v in dice.items() if c > 0]
    print(f"{len(dataset)} {args.split} masks; reconstruction Dice per class:")
    for c, v in dice.items():
        print(f"  {c} {model.label_set.classes[c] if c < len(model.label_set.classes) else c}: {v:.4f}")
    print(f"  foreground min {min(foreground):.4f}, mean {sum(foreground) / len(foreground):.4f}")
    if args.out:
        from ldm.atomic_io import write_json

        write_json(args.out, {"checkpoint": info["checkpoint"], "split": args.split, "num_masks": len(dataset),
                              "dice": dice})
    return 0


if __name__ == "__main__":
    from ldm.util import run_script

    sys.exit(run_script(main))
