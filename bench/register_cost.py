"""What the anatomical parts cost per training step, and what the lean register design saves: the plain LDM, the
shipped anatomical LDM and lean variants side by side in one run, as ratios to the plain step.

    python bench/register_cost.py [--size quick|cpu|mid|ctorgan] [--batch N] [--reps N] [--variants a,b,...]
                                  [--threads 1] [--device cpu|cuda] [-o OUT.json]

One step = ``p_losses`` from latents (q_sample, UNet, diffusion loss and, for the anatomical models, the anatomical
loss against an image-size mask of the size's classes) and backward, as ``bench/anatomical_overhead.py``. For every
variant, measured on the same inputs in one process:

- ``train GFLOPs/sample``: FLOPs of that step per sample (``bench/capacity.training_flops_per_sample``, the project's
  counter), and trainable parameters;
- ``kernels``: ATen ops of one step that are not views (each launches at least one kernel on a GPU), and host syncs
  (``bench/anatomical_overhead.OpCounter``: counted without a GPU);
- time: process CPU time per step on the CPU (``--threads 1``; wall time, synchronised, on CUDA), interleaved rounds
  after a warm-up, median; every ratio is a ratio of medians within this run.

Sizes: ``cpu`` = benchmark v2's cpu preset (64 px, 16x16 latents, 32-channel UNet 1-2-2, phantom v2's 10 classes,
batch 32), ``mid`` = the same with a 64-channel UNet 1-2-4 at 32x32 latents (128 px, batch 8), ``ctorgan`` = the
repo's CT-Organ configs (64x64x3 latents, 256 px masks, 6 classes, batch 2 on a CPU), ``quick`` = benchmark v2's
quick preset (the tests run it).

Variants (anatomical ones are the size's shipped anatomical config with these UNet overrides):

- ``plain``: the plain LDM of the size; ``shipped``: the anatomical config as shipped;
- ``width``: register width ``D`` = the UNet's ``model_channels``, heads ``D // 16`` (head size 16), attention width
  ``model_channels`` (shipped: ``D`` 256, 8 heads, attention width 256 capped at the level's channels);
- ``width+level``: and ``register_placement: per_level`` (one register layer pair per level and path + the middle);
- ``lean``: and ``mask_decoder: pixel_shuffle`` (every mask-head convolution at the latent grid);
- ``lean_low``: ``lean`` with register layers only at the lowest resolution (and the middle block);
- ``lean_head1``: ``lean`` with the mask head at the latent grid (``mask_upsample_factor: 1``; logits upsampled
  bilinearly to the mask in the loss).

Absolute times are only meaningful on a GPU, with its name (printed and written). The lean design's effect on what
the model learns is the anatomy benchmark's to measure (``bench/anatomy.py``; ``lean`` is its arm ``lean``).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
from typing import Any, Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402
from ldm.util import resolve_device  # noqa: E402

SIZES = ("quick", "cpu", "mid", "ctorgan")
VARIANTS = ("plain", "shipped", "width", "width+level", "lean", "lean_low", "lean_head1")
DEFAULT_BATCH = {"quick": 4, "cpu": 32, "mid": 8, "ctorgan": 2}
HEAD_SIZE = 16


def lean_overrides(unet: dict[str, Any], variant: str) -> dict[str, Any]:
    """The UNet overrides of a lean ``variant`` (see the module docstring) for the anatomical UNet params ``unet``."""
    if variant not in VARIANTS[2:]:
        raise ValueError(f"unknown lean variant {variant!r}; variants: {', '.join(VARIANTS[2:])}")
    width = int(unet["model_channels"])
    out: dict[str, Any] = {"anatomical_register_dim": width, "anatomical_attention_dim": width,
                           "anatomical_attention_heads": max(1, width // HEAD_SIZE)}
    if variant == "width":
        return out
    out["register_placement"] = "per_level"
    if variant == "width+level":
        return out
    out["mask_decoder"] = "pixel_shuffle"
    if variant == "lean_low":
        out["anatomical_attention_resolutions"] = [2 ** (len(unet["channel_mult"]) - 1)]
    if variant == "lean_head1":
        out["mask_upsample_factor"] = 1
    return out


def size_configs(size: str) -> tuple[dict[str, Any], dict[str, Any], int]:
    """``(plain config, shipped anatomical config, classes)`` at ``size`` (``{target, params}`` LDM configs)."""
    if size == "ctorgan":
        plain, _ = common.model_config("plain", quick=False)
        anat, _ = common.model_config("anatomical", quick=False)
        return plain, anat, int(anat["params"]["unet_config"]["params"].get("num_anatomical_classes", 6))
    import anatomy_v2 as v2

    preset = v2.PRESETS_V2["quick" if size == "quick" else "cpu"]
    if size == "mid":
        preset = dataclasses.replace(preset, size=128, unet={"model_channels": 64, "channel_mult": [1, 2, 4],
                                                             "num_res_blocks": 1, "num_heads": 4})
    elif size not in ("quick", "cpu"):
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return v2.arm_config("plain", preset, None, 1.0), v2.arm_config("anatomical", preset, None, 1.0), v2.NUM_CLASSES


def variant_config(variant: str, plain: dict[str, Any], shipped: dict[str, Any]) -> dict[str, Any]:
    """The LDM config of one variant."""
    if variant == "plain":
        return copy.deepcopy(plain)
    cfg = copy.deepcopy(shipped)
    if variant != "shipped":
        unet = cfg["params"]["unet_config"]["params"]
        unet.update(lean_overrides(unet, variant))
    return cfg


def make_inputs(model: torch.nn.Module, batch: int, classes: int, device: torch.device,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Latents, noise, timesteps and an image-size mask of 8x8 blocks of random classes (all variants share them)."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = common.latent_shape(model)
    size = common.image_size_of(model)
    coarse = torch.randint(0, classes, (batch, 8, 8), generator=g)
    return {"z": torch.randn(batch, c, h, w, generator=g).to(device),
            "noise": torch.randn(batch, c, h, w, generator=g).to(device),
            "t": torch.randint(0, 1000, (batch,), generator=g).to(device),
            "mask": coarse.repeat_interleave(size // 8, 1).repeat_interleave(size // 8, 2).to(device)}


def step(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """One ``p_losses`` (with the mask for an anatomical model) and backward; gradients cleared after."""
    extra = {"anatomy_target": inputs["mask"]} if hasattr(model, "anatomical_loss") else {}
    loss, _ = model.p_losses(inputs["z"], None, inputs["t"], noise=inputs["noise"], **extra)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.detach()


def run(size: str = "cpu", variants: Optional[list[str]] = None, batch: Optional[int] = None, reps: int = 5,
        device: Any = "cpu", timing: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure ``variants`` at ``size`` (see the module docstring); returns the JSON-able result."""
    import anatomical_overhead
    import capacity

    variants = list(variants or VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "plain" not in variants:
        raise ValueError(f"variants must include 'plain' and be among {', '.join(VARIANTS)}; unknown: {unknown}")
    device = torch.device(device)
    batch = int(batch or DEFAULT_BATCH[size])
    plain_cfg, shipped_cfg, classes = size_configs(size)
    configs = {v: variant_config(v, plain_cfg, shipped_cfg) for v in variants}
    rows: dict[str, dict[str, Any]] = {}
    for v, cfg in configs.items():
        flops = capacity.training_flops_per_sample(cfg, batch=2, device=device, include_encode=False)
        rows[v] = {"train_gflops_per_sample": flops["train_flops_per_sample"] / 1e9, "params": flops["params"]}
    models = {v: capacity.build_model(cfg, device) for v, cfg in configs.items()}
    inputs = make_inputs(models["plain"], batch, classes, device)
    for v, model in models.items():
        counter = anatomical_overhead.count(model, inputs)
        unet = model.unet
        rows[v].update(kernels=counter.kernels, host_syncs=counter.total_syncs,
                       register_layers=len(getattr(unet, "anatomical_attention_keys", ())))
    result: dict[str, Any] = {"size": size, "batch": batch, "classes": classes, "device": common.device_name(device),
                              "torch": torch.__version__, "threads": torch.get_num_threads(), "variants": rows,
                              "overrides": {v: (lean_overrides(shipped_cfg["params"]["unet_config"]["params"], v)
                                                if v not in ("plain", "shipped") else {}) for v in variants}}
    if timing:
        metric = common.default_metric(device)
        times = common.interleaved(variants, lambda v: common.time_call(lambda: step(models[v], inputs), device),
                                   reps, log=log)
        med = {v: common.median(times[v][metric]) for v in variants}
        for v in variants:
            rows[v].update(median_s=med[v], times_s=times[v][metric])
        result["metric"] = metric
    base = rows["plain"]
    for v, row in rows.items():
        row["flops_x_plain"] = row["train_gflops_per_sample"] / base["train_gflops_per_sample"]
        row["params_x_plain"] = row["params"] / base["params"]
        row["kernels_x_plain"] = row["kernels"] / base["kernels"]
        if timing:
            row["time_x_plain"] = row["median_s"] / base["median_s"]
    return result


def markdown(result: dict[str, Any]) -> str:
    """The result as a markdown table."""
    timing = "metric" in result
    head = ["variant", "register layers", "params x plain", "train FLOPs x plain", "kernels/step", "kernels x plain",
            "host syncs"] + (["time x plain (median)"] if timing else [])
    lines = [f"register_cost: size {result['size']}, batch {result['batch']}, {result['classes']} classes, "
             f"{result['device']}, torch {result['torch']}, {result['threads']} thread(s)"
             + (f", {result['metric']} time" if timing else ""), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v, row in result["variants"].items():
        cells = [v, str(row["register_layers"]), f"{row['params_x_plain']:.3f}", f"{row['flops_x_plain']:.3f}",
                 str(row["kernels"]), f"{row['kernels_x_plain']:.2f}", str(row["host_syncs"])]
        if timing:
            cells.append(f"{row['time_x_plain']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="cpu", choices=SIZES)
    parser.add_argument("--batch", type=int, default=None, help=f"default {DEFAULT_BATCH}")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds (interleaved, after one warm-up round)")
    parser.add_argument("--variants", default=None, help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--no-timing", action="store_true", help="FLOPs and kernel counts only")
    parser.add_argument("--quick", action="store_true", help="size quick, 1 round (what the tests run)")
    parser.add_argument("-o", "--out", default=None, help="JSON path (default bench/out/register_cost_<size>.json; "
                                                          "a .md beside it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size, reps = ("quick", 1) if args.quick else (args.size, args.reps)
    variants = args.variants.split(",") if args.variants else None
    result = run(size, variants, args.batch, reps, resolve_device(args.device), timing=not args.no_timing)
    text = markdown(result)
    print(text)
    out = args.out or os.path.join(common.OUT_DIR, f"register_cost_{size}.json")
    from ldm.atomic_io import write_json, write_text

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json(out, result)
    write_text(os.path.splitext(out)[0] + ".md", text)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
