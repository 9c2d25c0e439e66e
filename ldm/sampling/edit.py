"""Editing anatomy in a real slice with a mask-conditioned model: redraw the region an edit of its mask changes and
keep the rest (issue 28).

Given an image, its edited mask (e.g. the liver moved or one organ replaced) and the region to keep (by default the
pixels whose label the edit did not change), :func:`edit_image` encodes the image to ``z0`` and samples with the
edited mask as the condition, while in the kept region every step's input is the encoded image noised to that step
(``q_sample(z0, t)`` with the start noise, as CompVis inpainting does; ``inpainting_denoiser``). The kept region
works on the latent grid: a latent cell is kept when every pixel under it is, shrunk by ``margin`` cells so that the
model blends the border. At the end the kept cells take ``z0`` exactly and the latents are decoded, so outside the
redrawn region the result differs from the input only by the autoencoder's reconstruction (measured by
``kept_region_error``).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ldm.models.diffusion.samplers import inpainting_denoiser, sample_model, sampler_spec
from ldm.modules.mask_condition import MASK_CONDITION_KEY
from ldm.sampling.masks import as_mask_batch, check_guidance_scale, conditional_denoiser, mask_condition_of


def kept_latent_cells(keep: torch.Tensor, latent_size: tuple[int, int], margin: int = 1) -> torch.Tensor:
    """``[B, 1, h, w]`` float 0/1: latent cells all of whose pixels are kept (``keep`` ``[B, H, W]`` bool), shrunk
    by ``margin`` cells (a cell next to the redrawn region within ``margin`` is redrawn too)."""
    changed = (~keep).float().unsqueeze(1)
    cells = F.adaptive_max_pool2d(changed, latent_size)  # 1 where any pixel of the cell changes
    if margin > 0:
        cells = F.max_pool2d(cells, 2 * margin + 1, stride=1, padding=margin)
    return 1.0 - cells


def kept_region_error(edited: torch.Tensor, image: torch.Tensor, keep: torch.Tensor) -> dict[str, float]:
    """Mean absolute error and PSNR (data range 2) between ``edited`` and ``image`` over the kept pixels."""
    diff = (edited.clamp(-1, 1) - image.clamp(-1, 1)).abs().mean(1)[keep]
    mae = float(diff.mean()) if diff.numel() else float("nan")
    mse = float(diff.pow(2).mean()) if diff.numel() else float("nan")
    return {"mae": mae, "psnr": float(10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-12))))}


@torch.no_grad()
def edit_image(model: torch.nn.Module, image: torch.Tensor, new_mask: Any, old_mask: Any = None,
               keep: Optional[torch.Tensor] = None, ddim_steps: int = 50, seed: int = 0, guidance_scale: float = 1.0,
               margin: int = 1, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """Edit ``image`` ``[B, C, H, W]`` (in [-1, 1]) to follow ``new_mask`` ``[B, H, W]``: the region to redraw is
    where ``new_mask`` differs from ``old_mask`` (or ``~keep``); returns ``{"images": edited [B, C, H, W],
    "latents": their latents, "encoded": the input's latents, "keep": the kept pixels [B, H, W], "kept_cells":
    [B, 1, h, w]}``. DDIM, eta 0, start noise of ``(seed, i)``."""
    from ldm.sampling import initial_noise, latent_shape

    condition = mask_condition_of(model)
    scale = check_guidance_scale(guidance_scale)
    new = as_mask_batch(new_mask, condition.num_classes, condition.ignore_index)
    if keep is None:
        if old_mask is None:
            raise ValueError("edit_image needs the original mask (old_mask) or the region to keep (keep)")
        keep = as_mask_batch(old_mask, condition.num_classes, condition.ignore_index) == new
    keep = torch.as_tensor(keep, dtype=torch.bool)
    if image.ndim != 4 or image.shape[0] != new.shape[0] or tuple(image.shape[2:]) != tuple(new.shape[1:]) \
            or keep.shape != new.shape:
        raise ValueError(f"image {tuple(image.shape)}, new mask {tuple(new.shape)} and keep {tuple(keep.shape)} must "
                         "describe the same [B, H, W] slices")
    if bool(keep.all()):
        raise ValueError("the edit changes no pixel: new_mask equals the original mask everywhere")
    device = next(model.parameters()).device
    grid = latent_shape(model)[1:]
    ema = model.ema_scope("editing") if use_ema and getattr(model, "use_ema", False) else nullcontext()
    with ema:
        z0 = model.encode_mean(image.to(device).clamp(-1, 1))  # the posterior mean: no sampling noise
        cells = kept_latent_cells(keep.to(device), tuple(z0.shape[2:]), margin)
        x_T = initial_noise(latent_shape(model), seed, list(range(image.shape[0])), device=device)
        cond = condition.condition(new.to(device), grid) if scale > 0 else None
        base = model.denoiser if cond is None or scale == 1.0 else conditional_denoiser(
            model, scale, {MASK_CONDITION_KEY: torch.zeros_like(cond[MASK_CONDITION_KEY])})

        def make(c: Any, **kw: Any) -> Any:
            return inpainting_denoiser(base(c, **kw), lambda x0, t: model.q_sample(x0, t, noise=x_T), z0, cells)
        z, _ = sample_model(model, sampler_spec("ddim").name, x_T, ddim_steps, cond=cond, eta=0.0,
                            make_denoiser=make)
        z = cells * z0 + (1.0 - cells) * z
        edited = model.decode_first_stage(z)
    return {"images": edited, "latents": z, "encoded": z0, "keep": keep, "kept_cells": cells}
