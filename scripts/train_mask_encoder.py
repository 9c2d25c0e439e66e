#!/usr/bin/env python
r"""Train the frozen mask encoder of representation alignment (REPA; ``LatentDiffusion(representation_alignment=...)``)
on the real masks of a run config's data split, and write it where that config's ``encoder_path`` points.

The encoder is a small autoencoder of one-hot masks (``ldm.modules.representation_alignment``); only real masks
train it. Its settings default to the config's ``model.params.representation_alignment`` (``num_classes``,
``encoder``, ``ignore_index``, ``encoder_path``); flags override them.

Example:
    python scripts/train_mask_encoder.py --config configs/latent-diffusion/my_repa_run.yaml --split train
    python main.py --base configs/latent-diffusion/my_repa_run.yaml -t
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ldm.cli_flags import ArgumentParser, add_threads_argument  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the main.py config of the run (its data.params.<split> and "
                                                   "model.params.representation_alignment)")
    p.add_argument("--split", default="train", help="data split whose masks train the encoder (default: train)")
    p.add_argument("--max_masks", type=int, default=None, help="use the first N labelled items only")
    p.add_argument("--num_classes", type=int, default=None, help="default: representation_alignment.num_classes")
    p.add_argument("--ignore_index", type=int, default=None, help="default: the config's, else 255")
    p.add_argument("--patch", type=int, default=None, help="feature grid factor (default: the config's encoder "
                                                           "settings, else 4)")
    p.add_argument("--channels", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--feature_dim", type=int, default=None)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default=None, help="file to write (default: the config's encoder_path)")
    add_threads_argument(p)
    p.add_argument("--device", default=None)
    return p


def settings(args: argparse.Namespace, config: Any) -> dict[str, Any]:
    """The encoder's and the training's settings: flags over the config's ``representation_alignment``; a
    ValueError says what is missing."""
    align = dict(((config.get("model") or {}).get("params") or {}).get("representation_alignment") or {})
    encoder = dict(align.get("encoder") or {})
    for key in ("patch", "channels", "depth", "feature_dim"):
        if getattr(args, key) is not None:
            encoder[key] = getattr(args, key)
    num_classes = args.num_classes if args.num_classes is not None else align.get("num_classes")
    output = args.output or align.get("encoder_path")
    if num_classes is None or output is None:
        raise ValueError(f"{args.config}: give --num_classes and -o/--output, or set model.params."
                         "representation_alignment.num_classes and .encoder_path in the config")
    ignore = args.ignore_index if args.ignore_index is not None else int(align.get("ignore_index", 255))
    return {"encoder": encoder, "num_classes": int(num_classes), "ignore_index": ignore, "output": str(output)}


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch
    from omegaconf import OmegaConf

    from ldm.modules.representation_alignment import save_mask_encoder, train_mask_encoder
    from ldm.sampling.masks import DATA_PREFIX, read_dataset_masks
    from ldm.sampling.run import resolve_config
    from ldm.threads import configure_threads
    from ldm.util import resolve_device

    device = resolve_device(args.device)
    configure_threads(args.threads, device.type == "cpu")
    if not os.path.isfile(args.config):
        raise FileNotFoundError(f"--config {args.config!r} not found")
    loaded = OmegaConf.load(args.config)
    chosen = settings(args, resolve_config(loaded) or {})
    spec = f"{DATA_PREFIX}{args.split}" + (f":{args.max_masks}" if args.max_masks is not None else "")
    _, masks = read_dataset_masks(loaded, spec, progress=True)
    model, info = train_mask_encoder(torch.from_numpy(masks).long().to(device), chosen["num_classes"],
                                     steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                     ignore_index=chosen["ignore_index"], progress=True, **chosen["encoder"])
    meta = {"config": os.path.abspath(args.config), "split": args.split, "masks": int(len(masks)),
            "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, **info}
    os.makedirs(os.path.dirname(os.path.abspath(chosen["output"])), exist_ok=True)
    save_mask_encoder(chosen["output"], model.cpu(), meta)
    print(f"wrote {chosen['output']}: {len(masks)} masks, {info['steps']} steps, reconstruction pixel accuracy "
          f"{info['pixel_accuracy']:.4f} on the last batch")
    return 0


if __name__ == "__main__":
    from ldm.util import run_script

    sys.exit(run_script(main))
