"""Sampling from a labelmap: images for given (partial) masks from a mask-conditioned model
(``LatentDiffusion(mask_condition=...)``, :mod:`ldm.modules.mask_condition`), with classifier-free guidance.

    from ldm.sampling import load_model_for_sampling
    from ldm.sampling.masks import sample_from_masks
    model, _ = load_model_for_sampling("logs/<run>")
    images = sample_from_masks(model, masks, ddim_steps=50, guidance_scale=1.0)   # masks [N, H, W], 255 = unknown

Guidance scale ``s``: ``eps = eps_uncond + s (eps_cond - eps_uncond)`` (Ho & Salimans 2022); 1 is the conditional
model alone (one model call per step), 0 the unconditional model (no condition is passed: the same numbers as
sampling the checkpoint without a mask), anything else two calls per step.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable, Optional

import numpy as np
import torch

from ldm.modules.mask_condition import MASK_CONDITION_KEY


def check_guidance_scale(scale: Any) -> float:
    """``scale`` as a float; ValueError unless finite and >= 0."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_scale must be a number, got {scale!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"guidance_scale must be finite and >= 0 (1: conditional, 0: unconditional), got {scale!r}")
    return value


def mask_condition_of(model: torch.nn.Module):
    """The model's :class:`~ldm.modules.mask_condition.MaskCondition`, or a ValueError for a model without one."""
    condition = getattr(model, "mask_condition", None)
    if condition is None:
        raise ValueError(f"sampling from masks needs a mask-conditioned model (model.params.mask_condition and the "
                         f"UNet's mask_condition_classes); this {type(model).__name__} has no mask condition")
    return condition


def as_mask_batch(masks: Any, num_classes: int, ignore_index: int) -> torch.Tensor:
    """``masks`` (array or tensor ``[N, H, W]`` or one ``[H, W]``) as int64 ``[N, H, W]``; labels outside
    ``0..C-1`` other than ``ignore_index`` (unknown) and non-integer values are an error."""
    array = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or 0 in array.shape:
        raise ValueError(f"masks must be [N, H, W] (or one [H, W]) label maps, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise ValueError("masks must hold integer class labels")
    out = torch.from_numpy(array.astype(np.int64))
    bad = (out != ignore_index) & ((out < 0) | (out >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"masks hold labels {sorted(out[bad].unique().tolist())[:10]} outside 0..{num_classes - 1}; "
                         f"mark unknown pixels with {ignore_index}")
    return out


def conditional_denoiser(model: torch.nn.Module, guidance_scale: float, uncond: Any) -> Callable[..., Any]:
    """``make_denoiser(cond, clip_denoised=, noise_cond=)`` of the model's denoiser with classifier-free guidance at
    ``guidance_scale`` against the condition ``uncond``."""
    def make(cond: Any, clip_denoised: bool = False, noise_cond: bool = False) -> Any:
        return model.denoiser(cond, guidance_scale, uncond, clip_denoised=clip_denoised, noise_cond=noise_cond)
    return make


@torch.no_grad()
def sample_from_masks(model: torch.nn.Module, masks: Any, ddim_steps: int = 50, eta: float = 0.0, seed: int = 0,
                      guidance_scale: float = 1.0, per_mask: int = 1, batch_size: Optional[int] = None,
                      sampler: str = "ddim", use_ema: bool = True, return_masks: bool = False) -> Any:
    """Images ``[N * per_mask, C, H, W]`` (in [-1, 1], not clamped) for the label maps ``masks`` ``[N, H, W]``
    (``ignore_index`` = unknown: a partial mask), ``per_mask`` samples each (sample ``i`` is mask ``i // per_mask``,
    from the start noise of ``(seed, i)``). With ``return_masks`` (anatomical models) also the model's own predicted
    masks of the samples: ``(images, predicted)``."""
    from ldm.sampling import check_sampling_settings, draw_batch, is_anatomical, latent_shape

    condition = mask_condition_of(model)
    scale = check_guidance_scale(guidance_scale)
    if int(per_mask) < 1:
        raise ValueError(f"per_mask must be >= 1, got {per_mask}")
    labels = as_mask_batch(masks, condition.num_classes, condition.ignore_index)
    total = labels.shape[0] * int(per_mask)
    size = int(batch_size or total)
    sampler = check_sampling_settings(total, size, ddim_steps, eta, sampler)
    if return_masks and not is_anatomical(model):
        raise ValueError(f"return_masks needs an anatomical model; got a {type(model).__name__}")
    device = next(model.parameters()).device
    grid = latent_shape(model)[1:]
    ema = model.ema_scope("sampling") if use_ema and getattr(model, "use_ema", False) else nullcontext()
    images, predicted = [], []
    with ema:
        for first in range(0, total, size):
            indices = list(range(first, min(total, first + size)))
            batch_masks = labels[[i // int(per_mask) for i in indices]].to(device)
            cond = None if scale == 0 else condition.condition(batch_masks, grid)
            make = None
            if cond is not None and scale != 1.0:
                make = conditional_denoiser(model, scale,
                                            {MASK_CONDITION_KEY: torch.zeros_like(cond[MASK_CONDITION_KEY])})
            drawn = draw_batch(model, indices, seed, ddim_steps, eta, sampler, masks=return_masks, cond=cond,
                               make_denoiser=make)
            images.append(drawn["images"])
            if return_masks:
                predicted.append(drawn["masks"])
    out = torch.cat(images)
    return (out, torch.cat(predicted)) if return_masks else out
