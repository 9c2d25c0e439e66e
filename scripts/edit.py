#!/usr/bin/env python
r"""Edit the anatomy of a slice with a mask-conditioned run: redraw what an edit of its mask changes, keep the rest.

Example (move or replace a structure in a real slice: draw the edited mask, 255 where the model should decide):
    python scripts/edit.py -r logs/<run> --image slice.png --mask slice_mask.png --new_mask edited_mask.png \
        -l edits/slice --seed 0

Writes into a new folder ``-l``: ``edited.png``, ``input.png``, ``new_mask.png`` (class ids), ``kept.png`` (white: the
pixels kept from the input), ``edit_figure.png`` (input | its mask | the edited mask | the edited slice) and
``edit.json`` (settings, the redrawn share and the kept region's error against the input: MAE and PSNR).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ldm.cli_flags import ArgumentParser  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ldm.trust import add_trust_argument, check_run  # noqa: E402
from ldm.util import resolve_device  # noqa: E402

from ldm import sampling  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-r", "--resume", required=True, metavar="RUN_DIR_OR_CKPT", help="a mask-conditioned run")
    p.add_argument("-b", "--base", nargs="*", default=[], metavar="CONFIG.yaml")
    p.add_argument("--image", required=True, help="the slice: an 8-bit PNG, or an .npy in [-1, 1] (sample.py npz)")
    p.add_argument("--mask", default=None, help="its mask (PNG/NPY class ids): the kept region is where the edited "
                                                "mask agrees with it")
    p.add_argument("--new_mask", required=True, help="the edited mask (PNG/NPY class ids; 255: unknown)")
    p.add_argument("--keep", default=None, help="instead of --mask: a PNG/NPY, non-zero where the input is kept")
    p.add_argument("-l", "--logdir", required=True, metavar="OUT_DIR", help="a new folder for the results")
    p.add_argument("-c", "--custom_steps", type=int, default=50, help="DDIM steps (eta 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance_scale", type=float, default=1.0, help="classifier-free guidance of the edited mask")
    p.add_argument("--margin", type=int, default=1, help="latent cells around the change that are redrawn too")
    p.add_argument("--no-ema", dest="ema", action="store_false")
    p.add_argument("--unsafe-load", dest="unsafe_load", action="store_true")
    p.add_argument("--device", default=None)
    add_trust_argument(p)
    return p


def read_inputs(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """The image in [-1, 1] and the masks (``ldm.data.io``'s readers: PNG or .npy), checked against each other
    before any model is loaded."""
    from ldm.data.io import read_image_2d, read_mask_2d

    if (args.mask is None) == (args.keep is None):
        raise ValueError("give the slice's own mask (--mask) or the region to keep (--keep), one of them")
    raw = read_image_2d(args.image)
    image = raw.astype(np.float32) / 127.5 - 1.0 if raw.dtype == np.uint8 else raw.astype(np.float32)
    if not np.isfinite(image).all() or image.min() < -1.001 or image.max() > 1.001:
        raise ValueError(f"--image {args.image}: an .npy image must be in [-1, 1] (8-bit PNGs are scaled)")
    out = {"image": image, "new_mask": read_mask_2d(args.new_mask)}
    if args.mask is not None:
        out["mask"] = read_mask_2d(args.mask)
    else:
        out["keep"] = read_mask_2d(args.keep) != 0
    for key, value in out.items():
        if value.shape != image.shape:
            raise ValueError(f"--{key} is {value.shape[0]}x{value.shape[1]} but --image is {image.shape[0]}x"
                             f"{image.shape[1]}")
    if os.path.isdir(args.logdir) and os.listdir(args.logdir):
        raise ValueError(f"output folder {args.logdir} is not empty; edit.py writes into a new folder")
    return out


def write_outputs(out_dir: str, inputs: dict[str, np.ndarray], result: dict[str, torch.Tensor], record: dict,
                  palette: np.ndarray) -> None:
    from PIL import Image

    from ldm.atomic_io import write_json
    from ldm.data.labels import colourise
    from ldm.sample_io import _save_png, to_uint8

    os.makedirs(out_dir, exist_ok=True)
    edited = to_uint8(result["images"].cpu())[0]
    source = to_uint8(torch.from_numpy(inputs["image"])[None, None])[0]
    _save_png(os.path.join(out_dir, "edited.png"), edited)
    _save_png(os.path.join(out_dir, "input.png"), source)
    _save_png(os.path.join(out_dir, "new_mask.png"), inputs["new_mask"].astype(np.uint8))
    _save_png(os.path.join(out_dir, "kept.png"), result["keep"][0].cpu().numpy().astype(np.uint8) * 255)
    old = inputs.get("mask")
    panels = [np.repeat(source[..., None], 3, -1),
              colourise(old, palette) if old is not None else np.repeat(
                  result["keep"][0].cpu().numpy().astype(np.uint8)[..., None] * 255, 3, -1),
              colourise(inputs["new_mask"], palette), np.repeat(edited[..., None], 3, -1)]
    figure = np.concatenate([np.pad(p, ((2, 2), (2, 2), (0, 0)), constant_values=255) for p in panels], axis=1)
    scale = max(1, 256 // figure.shape[0])
    Image.fromarray(figure).resize((figure.shape[1] * scale, figure.shape[0] * scale), Image.NEAREST).save(
        os.path.join(out_dir, "edit_figure.png"))
    write_json(os.path.join(out_dir, "edit.json"), record)


def main(argv: list[str] | None = None) -> int:
    from ldm.sampling.edit import edit_image, kept_region_error
    from ldm.sampling.masks import check_guidance_scale

    args = get_parser().parse_args(argv)
    check_run(args.resume, args.base, args.trust_config)
    check_guidance_scale(args.guidance_scale)
    if args.custom_steps < 1 or args.margin < 0:
        raise ValueError(f"-c must be >= 1 and --margin >= 0, got {args.custom_steps} and {args.margin}")
    inputs = read_inputs(args)
    device = resolve_device(args.device)
    model, info = sampling.load_model_for_sampling(args.resume, args.base, args.unsafe_load, device,
                                                   trust_config=args.trust_config)
    from ldm.sampling.masks import check_mask_size

    check_mask_size(model, inputs["new_mask"][None])
    image = torch.from_numpy(inputs["image"])[None, None]
    new = torch.from_numpy(inputs["new_mask"].astype(np.int64))[None]
    old = torch.from_numpy(inputs["mask"].astype(np.int64))[None] if "mask" in inputs else None
    keep = torch.from_numpy(inputs["keep"])[None] if "keep" in inputs else None
    result = edit_image(model, image, new, old_mask=old, keep=keep, ddim_steps=args.custom_steps, seed=args.seed,
                        guidance_scale=args.guidance_scale, margin=args.margin, use_ema=args.ema and info["has_ema"])
    error = kept_region_error(result["images"].cpu(), image, result["keep"].cpu())
    record = {"image": os.path.abspath(args.image), "new_mask": os.path.abspath(args.new_mask),
              "mask": None if args.mask is None else os.path.abspath(args.mask),
              "keep": None if args.keep is None else os.path.abspath(args.keep), "seed": args.seed,
              "ddim_steps": args.custom_steps, "guidance_scale": args.guidance_scale, "margin": args.margin,
              "redrawn_pixel_share": float((~result["keep"]).float().mean()),
              "redrawn_latent_share": float(1 - result["kept_cells"].mean()), "kept_region": error,
              "checkpoint": info["checkpoint"], "checkpoint_sha256": info["checkpoint_sha256"]}
    write_outputs(args.logdir, inputs, result, record, sampling.palette_for(model))
    print(f"edited {args.image}: redrew {100 * record['redrawn_pixel_share']:.1f} % of the pixels; kept region MAE "
          f"{error['mae']:.4f}, PSNR {error['psnr']:.1f} dB; {os.path.join(args.logdir, 'edit_figure.png')}")
    return 0


if __name__ == "__main__":
    from ldm.util import run_script

    sys.exit(run_script(main))
