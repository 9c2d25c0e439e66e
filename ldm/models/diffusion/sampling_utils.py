"""Helpers of the diffusion models kept out of ``ddpm.py``: the schedule buffers, classifier-free
guidance, the ancestral (DDPM) sampling loop and image-grid helpers for ``log_images``.

Samplers never compute predictions themselves: they call ``model.model_predictions`` (the one
eps/x0 dispatcher of :class:`~ldm.models.diffusion.ddpm.DDPM`).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ldm.util import isimage

logger = logging.getLogger(__name__)

# Names (and order) of the persistent schedule buffers, as in CompVis checkpoints.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def schedule_arrays(betas: np.ndarray, v_posterior: float, parameterization: str) -> dict[str, np.ndarray]:
    """Every schedule quantity (float64) derived from ``betas``; keys ``SCHEDULE_BUFFERS`` + ``lvlb_weights``.

    The posterior q(x_{t-1} | x_t, x_0) follows Ho et al. 2020, eqs. 6-7; ``v_posterior`` blends its
    variance with beta_t. ``lvlb_weights`` turn the per-step simple loss into the VLB term (eps: the
    eq. 12 weight of Ho et al.; x0: the CompVis weight, kept for numerical compatibility).
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or len(betas) == 0 or np.any(betas <= 0) or np.any(betas >= 1):
        raise ValueError("betas must be a non-empty 1-D sequence of values in (0, 1) (check given_betas / beta_schedule)")
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = (1.0 - v_posterior) * betas * (1.0 - ac_prev) / (1.0 - ac) + v_posterior * betas
    out = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }
    if parameterization == "eps":
        with np.errstate(divide="ignore"):
            lvlb = betas ** 2 / (2.0 * post_var * alphas * (1.0 - ac))
    elif parameterization == "x0":
        lvlb = 0.5 * np.sqrt(ac) / (2.0 * 1 - ac)  # CompVis's weight, written exactly as it computes it
    else:
        raise ValueError(f"parameterization must be 'eps' or 'x0', got {parameterization!r}")
    if len(lvlb) > 1:
        lvlb[0] = lvlb[1]  # step 0 has zero posterior variance
    if not np.all(np.isfinite(lvlb)):
        raise ValueError("the beta schedule gives non-finite VLB weights; check betas / v_posterior")
    out["lvlb_weights"] = lvlb
    return out


def cat_cond(uncond: Any, cond: Any) -> Any:
    """Batch-concatenate unconditional and conditional conditioning (tensors, lists or dicts of them)."""
    if isinstance(cond, dict):
        return {k: cat_cond(uncond[k], cond[k]) for k in cond}
    if isinstance(cond, (list, tuple)):
        return [cat_cond(u, c) for u, c in zip(uncond, cond)]
    return torch.cat([uncond, cond])


def guided_output(apply: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, cond: Any,
                  guidance_scale: float = 1.0, uncond: Any = None) -> torch.Tensor:
    """The network output, with classifier-free guidance (Ho & Salimans 2022) when ``guidance_scale != 1``."""
    if uncond is None or guidance_scale == 1.0:
        return apply(x, t, cond)
    out_uncond, out_cond = apply(torch.cat([x, x]), torch.cat([t, t]), cat_cond(uncond, cond)).chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def randn(shape: Sequence[int], device: torch.device, generator: Optional[torch.Generator] = None,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise on ``device``, drawn from ``generator`` (on whatever device it lives)."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)


@torch.no_grad()
def ancestral_sample_loop(model: Any, cond: Any, shape: Sequence[int], x_T: Optional[torch.Tensor] = None,
                          return_intermediates: bool = False, verbose: bool = True,
                          callback: Optional[Callable[[int], None]] = None,
                          img_callback: Optional[Callable[[torch.Tensor, int], None]] = None,
                          mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None,
                          log_every_t: Optional[int] = None, timesteps: Optional[int] = None,
                          clip_denoised: Optional[bool] = None, generator: Optional[torch.Generator] = None,
                          record_x0: bool = False) -> Any:
    """Ancestral sampling x_T -> x_0 with p(x_{t-1} | x_t) (Ho et al. 2020, Algorithm 2).

    ``mask``/``x0`` keep the known region (mask == 1) at ``q_sample(x0, t)``. Intermediates are taken
    every ``log_every_t`` steps (and at the last); with ``record_x0`` they are the model's x_0
    predictions instead of x_t. Returns ``img`` or ``(img, intermediates)``.
    """
    device = model.betas.device
    img = randn(shape, device, generator) if x_T is None else x_T.to(device)
    timesteps = model.num_timesteps if timesteps is None else timesteps
    log_every_t = model.log_every_t if log_every_t is None else log_every_t
    clip = model.clip_denoised if clip_denoised is None else clip_denoised
    if mask is not None and x0 is None:
        raise ValueError("mask given without x0: pass the known latent x0 the mask refers to")
    intermediates = [img]
    steps = reversed(range(timesteps))
    for i in tqdm(steps, desc="Sampling t", total=timesteps, disable=not verbose):
        ts = torch.full((shape[0],), i, device=device, dtype=torch.long)
        step_cond = model.cond_for_step(cond, ts)
        mean, _, log_var, pred_x0 = model.p_mean_variance(img, step_cond, ts, clip_denoised=clip)
        noise = randn(img.shape, device, generator, img.dtype)
        nonzero = (ts != 0).to(img.dtype).reshape(-1, *([1] * (img.ndim - 1)))
        img = mean + nonzero * (0.5 * log_var).exp() * noise
        if mask is not None:
            img = model.q_sample(x0, ts) * mask + (1.0 - mask) * img
        if i % log_every_t == 0 or i == timesteps - 1:
            intermediates.append(pred_x0 if record_x0 else img)
        if callback is not None:
            callback(i)
        if img_callback is not None:
            img_callback(img, i)
    return (img, intermediates) if return_intermediates else img


def denoise_grid(decode: Callable[[torch.Tensor], torch.Tensor], samples: Sequence[torch.Tensor]) -> torch.Tensor:
    """A grid image: one row per sample, one column per intermediate, each decoded with ``decode``."""
    from torchvision.utils import make_grid

    rows = torch.stack([decode(s) for s in samples])  # n_steps, B, C, H, W
    n_steps = rows.shape[0]
    rows = rows.transpose(0, 1).reshape(-1, *rows.shape[2:])  # B*n_steps, C, H, W (sample-major)
    return make_grid(rows, nrow=n_steps)


def diffusion_row(model: Any, x_start: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Grid of ``x_start`` noised to every ``log_every_t``-th step (and the last), decoded."""
    frames = []
    for t in range(model.num_timesteps):
        if t % model.log_every_t == 0 or t == model.num_timesteps - 1:
            ts = torch.full((x_start.shape[0],), t, device=x_start.device, dtype=torch.long)
            frames.append(model.q_sample(x_start, ts, torch.randn_like(x_start)))
    return denoise_grid(decode, frames)


@torch.no_grad()
def latent_log_images(model: Any, batch: Any, N: int, n_row: int, sample: bool, ddim_steps: Optional[int],
                      ddim_eta: float, return_keys: Optional[Sequence[str]], plot_denoise_rows: bool,
                      plot_progressive_rows: bool, plot_diffusion_rows: bool) -> dict[str, torch.Tensor]:
    """The body of ``LatentDiffusion.log_images`` (see there)."""
    z, c, x, xrec, xc = model.get_input(batch, model.first_stage_key, return_first_stage_outputs=True,
                                        force_c_encode=True, return_original_cond=True, bs=N)
    N, n_row = min(x.shape[0], N), min(x.shape[0], n_row)
    log: dict[str, torch.Tensor] = {"inputs": x, "reconstruction": xrec}
    if model.model.conditioning_key is not None and isimage(xc):
        log["conditioning"] = xc
    if plot_diffusion_rows:
        log["diffusion_row"] = diffusion_row(model, z[:n_row], model.decode_first_stage)
    if sample:
        with model.ema_scope("Plotting"):
            samples, inter = model.sample_log(cond=c, batch_size=N, ddim=ddim_steps is not None,
                                              ddim_steps=ddim_steps, eta=ddim_eta)
        log["samples"] = model.decode_first_stage(samples)
        if plot_denoise_rows:
            rows = inter["x_inter"] if isinstance(inter, dict) else inter
            log["denoise_row"] = denoise_grid(model.decode_first_stage, [r[:n_row] for r in rows])
    if plot_progressive_rows:
        with model.ema_scope("Plotting Progressives"):
            _, x0_rows = model.sample(cond=truncate_cond(c, n_row), batch_size=n_row, return_intermediates=True,
                                      verbose=False, record_x0=True)
        log["progressive_row"] = denoise_grid(model.decode_first_stage, x0_rows[1:])
    if return_keys:
        log = {k: v for k, v in log.items() if k in return_keys}
    return log


def truncate_cond(cond: Any, batch_size: int) -> Any:
    """The first ``batch_size`` entries of conditioning (tensor, list or dict of them; None stays None)."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: truncate_cond(v, batch_size) for k, v in cond.items()}
    if isinstance(cond, list):
        return [truncate_cond(v, batch_size) for v in cond]
    return cond[:batch_size]
