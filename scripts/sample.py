#!/usr/bin/env python
r"""Sample images and their masks (predicted by anatomical models, generated with the image by joint models).

Example:
    python scripts/sample.py -r logs/2026-01-01T00-00-00_demo -n 64 --batch_size 16 -c 50 -e 0.0 \
        -l samples/demo --seed 0 --save_masks
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import torch  # noqa: E402

from ldm.models.diffusion.samplers import SAMPLERS  # noqa: E402
from ldm.util import resolve_device  # noqa: E402

from ldm import sampling  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-r", "--resume", required=True, metavar="RUN_DIR_OR_CKPT",
                   help="log directory of a run, or a checkpoint (.ckpt, bare state dict, .safetensors)")
    p.add_argument("-b", "--base", nargs="*", default=[], metavar="CONFIG.yaml",
                   help="model config(s), merged over the run's configs/*-project.yaml (needed for a bare checkpoint)")
    p.add_argument("-n", "--n_samples", type=int, default=16, help="number of samples to add")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("-c", "--custom_steps", type=int, default=50, help="sampler steps (model calls)")
    p.add_argument("--sampler", choices=list(SAMPLERS), default="ddim",
                   help="ddim (CompVis default), dpmpp2m (DPM-Solver++(2M): 20-25 steps match 200-step DDIM; "
                        "deterministic, eta must be 0) or ancestral (the full DDPM loop; -c and -e unused)")
    p.add_argument("-e", "--eta", type=float, default=0.0, help="DDIM eta (0: deterministic given the seed)")
    p.add_argument("-l", "--logdir", default=None, metavar="OUT_DIR",
                   help="output folder (default: <run>/samples/ddim<c>_eta<e>_seed<seed>); "
                        "re-running continues the numbering")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--vanilla_sample", action="store_true", help="same as --sampler ancestral (CompVis flag)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="sample with the live weights, not EMA")
    p.add_argument("--save_masks", action="store_true",
                   help="anatomical models: also write predicted masks (masks/) and colour previews (masks_colour/); "
                        "joint models (joint_mask_config) always write their generated masks there")
    p.add_argument("--anatomy_guidance", type=float, default=0.0, metavar="S",
                   help="anatomical models: steer every step with the model's own segmentation head along the "
                        "gradient of an anatomical energy (co-occurrence, laterality, position, border; "
                        "README_anatomical.md); 0 (default): off, bit-identical to plain sampling; each guided "
                        "step costs a forward pass with gradients and a backward pass")
    p.add_argument("--format", nargs="+", choices=["png", "nii", "npz"], default=["png"],
                   help="extra formats beside the 8-bit PNGs (always written)")
    p.add_argument("--unsafe-load", dest="unsafe_load", action="store_true",
                   help="allow full unpickling of the checkpoint (only for files you trust)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    model, info = sampling.load_model_for_sampling(args.resume, args.base, args.unsafe_load, device)
    load_s = time.perf_counter() - t0
    out_dir = args.logdir
    if out_dir is None:
        _, run_dir = sampling.resolve_run(args.resume)
        base = run_dir or os.path.dirname(os.path.abspath(args.resume))
        ancestral = args.vanilla_sample or args.sampler == "ancestral"
        tag = "vanilla" if ancestral else f"{args.sampler}{args.custom_steps}_eta{args.eta:g}"
        tag += f"_guided{args.anatomy_guidance:g}" if args.anatomy_guidance else ""
        out_dir = os.path.join(base, "samples", f"{tag}_seed{args.seed}")
    run = sampling.generate(model, out_dir, args.n_samples, args.batch_size, args.custom_steps, args.eta, args.seed,
                            vanilla=args.vanilla_sample, use_ema=args.ema and info["has_ema"],
                            save_masks=args.save_masks, formats=args.format,
                            colours=sampling.palette_for(model), progress=args.progress, sampler=args.sampler,
                            anatomy_guidance=args.anatomy_guidance)
    run["timings"]["load_s"] = load_s
    path = sampling.update_manifest(out_dir, info, run)
    print(f"wrote {run['count']} samples ({run['start_index']:06d}..{run['start_index'] + run['count'] - 1:06d}) "
          f"to {out_dir}; manifest {path}")
    return 0


if __name__ == "__main__":
    from ldm.util import run_script

    sys.exit(run_script(main))
