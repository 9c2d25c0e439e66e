"""DDIM sampler (Song et al. 2021, "Denoising Diffusion Implicit Models"), CompVis interface.

Runs on whatever device the model's buffers are on; works for any number of steps from 1 to the
number of training timesteps. Predictions come from ``model.model_predictions`` (eps and x0), so
eps- and x0-parameterised models are both supported.

Beyond CompVis's ``callback(i)`` / ``img_callback(pred_x0, i)``, ``sample`` takes ``step_callback(i, t, x_t,
pred_x0)`` (each step's input latents and x0 prediction) and ``noise_fn(like, i)`` (the eta > 0 step noise from
the caller, e.g. drawn per sample so that a sample does not depend on its batch).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ldm.models.diffusion.sampling_utils import randn
from ldm.modules.diffusionmodules.util import make_ddim_sampling_parameters, make_ddim_timesteps

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
"""``step_callback(i, t, x_t, pred_x0)``: step number ``i`` (0 first), its DDIM timestep ``t``, the latents ``x_t``
the step started from and the model's x0 prediction from them."""
NoiseFn = Callable[[torch.Tensor, int], torch.Tensor]
"""``noise_fn(like, i)``: standard normal noise shaped, placed and typed like ``like``, for step ``i``."""


class DDIMSampler:
    """Deterministic (``eta=0``) or stochastic DDIM sampling with a trained diffusion model.

    Args:
        model: a :class:`~ldm.models.diffusion.ddpm.DDPM` (or subclass) exposing ``alphas_cumprod``,
            ``num_timesteps`` and ``model_predictions``.
        schedule: name of the training beta schedule (kept for CompVis compatibility; informational).
    """

    def __init__(self, model: Any, schedule: str = "linear", **kwargs: Any) -> None:
        self.model = model
        self.ddpm_num_timesteps = int(model.num_timesteps)
        self.schedule = schedule

    @property
    def device(self) -> torch.device:
        return self.model.alphas_cumprod.device

    def register_buffer(self, name: str, attr: Any) -> None:
        """Store ``attr`` (on the model's device when it is a tensor) as ``self.<name>``."""
        if isinstance(attr, np.ndarray):
            attr = torch.from_numpy(attr).float()
        if isinstance(attr, torch.Tensor):
            attr = attr.to(self.device)
        setattr(self, name, attr)

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Choose the visited timesteps and the per-step alphas / sigmas (eq. 16)."""
        self.ddim_timesteps = make_ddim_timesteps(ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps,
                                                  verbose=verbose)
        alphas_cumprod = self.model.alphas_cumprod
        if alphas_cumprod.shape[0] != self.ddpm_num_timesteps:
            raise ValueError("the model's alphas_cumprod does not have num_timesteps entries")
        self.register_buffer("betas", self.model.betas)
        self.register_buffer("alphas_cumprod", alphas_cumprod)
        self.register_buffer("alphas_cumprod_prev", self.model.alphas_cumprod_prev)
        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(alphas_cumprod, self.ddim_timesteps, ddim_eta,
                                                                    verbose=verbose)
        self.register_buffer("ddim_sigmas", sigmas)
        self.register_buffer("ddim_alphas", alphas)
        self.register_buffer("ddim_alphas_prev", alphas_prev)
        self.register_buffer("ddim_sqrt_one_minus_alphas", np.sqrt(1.0 - alphas))
        self.ddim_eta = ddim_eta

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: Sequence[int], conditioning: Any = None,
               callback: Optional[Callable[[int], None]] = None,
               img_callback: Optional[Callable[[torch.Tensor, int], None]] = None, quantize_x0: bool = False,
               eta: float = 0.0, mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None,
               temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector: Any = None,
               corrector_kwargs: Optional[dict] = None, verbose: bool = True, x_T: Optional[torch.Tensor] = None,
               log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, generator: Optional[torch.Generator] = None,
               ddim_discretize: str = "uniform", step_callback: Optional[StepCallback] = None,
               noise_fn: Optional[NoiseFn] = None) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Draw ``batch_size`` samples of shape ``shape`` (C, H, W) in ``S`` DDIM steps.

        ``x_T`` fixes the start noise, ``generator`` the random draws. ``mask``/``x0`` keep the known
        region (mask == 1) at ``q_sample(x0, t)`` (inpainting). Returns ``(samples, intermediates)`` with
        ``intermediates = {"x_inter": [...], "pred_x0": [...]}`` every ``log_every_t`` steps.

        After step ``i`` (0 first) ``callback(i)``, ``img_callback(pred_x0, i)`` and then
        ``step_callback(i, t, x_t, pred_x0)`` are called; ``x_t`` is the step's input (after the inpainting
        blend) at DDIM timestep ``t``. ``noise_fn(like, i)``, when given, replaces ``generator`` for the
        stochastic term of steps with ``sigma_t > 0`` (``eta > 0``); ``temperature`` and ``noise_dropout``
        still apply to what it returns.
        """
        _check_cond_batch(conditioning, batch_size)
        if mask is not None and x0 is None:
            raise ValueError("mask given without x0: pass the known latent x0 the mask refers to")
        self.make_schedule(ddim_num_steps=S, ddim_discretize=ddim_discretize, ddim_eta=eta, verbose=verbose)
        size = (batch_size, *shape)
        img = randn(size, self.device, generator) if x_T is None else x_T.to(self.device)
        intermediates: dict[str, list[torch.Tensor]] = {"x_inter": [img], "pred_x0": [img]}
        timesteps = self.ddim_timesteps
        total_steps = len(timesteps)
        if verbose:
            logger.info("Running DDIM sampling with %d timesteps", total_steps)
        for i, step in enumerate(tqdm(np.flip(timesteps), desc="DDIM Sampler", total=total_steps, disable=not verbose)):
            index = total_steps - i - 1
            ts = torch.full((batch_size,), int(step), device=self.device, dtype=torch.long)
            if mask is not None:
                img = self.model.q_sample(x0.to(self.device), ts) * mask + (1.0 - mask) * img
            noise = None
            if noise_fn is not None and float(self.ddim_sigmas[index]) != 0.0:
                noise = noise_fn(img, i)
                if noise.shape != img.shape:
                    raise ValueError(f"noise_fn returned shape {tuple(noise.shape)} for latents of shape "
                                     f"{tuple(img.shape)}; it must return noise shaped like its first argument")
            x_t = img
            img, pred_x0 = self.p_sample_ddim(
                img, conditioning, ts, index, quantize_denoised=quantize_x0, temperature=temperature,
                noise_dropout=noise_dropout, score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
                unconditional_guidance_scale=unconditional_guidance_scale,
                unconditional_conditioning=unconditional_conditioning, generator=generator, noise=noise)
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            if step_callback is not None:
                step_callback(i, int(step), x_t, pred_x0)
            if index % log_every_t == 0 or index == total_steps - 1:
                intermediates["x_inter"].append(img)
                intermediates["pred_x0"].append(pred_x0)
        return img, intermediates

    @torch.no_grad()
    def p_sample_ddim(self, x: torch.Tensor, c: Any, t: torch.Tensor, index: int, repeat_noise: bool = False,
                      quantize_denoised: bool = False, temperature: float = 1.0, noise_dropout: float = 0.0,
                      score_corrector: Any = None, corrector_kwargs: Optional[dict] = None,
                      unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
                      generator: Optional[torch.Generator] = None,
                      noise: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM update x_t -> x_{t_prev} (DDIM, Song et al. 2021, eq. 12).

        ``noise`` is the standard normal draw of the ``sigma_t`` term; when None it is drawn from
        ``generator`` (one draw repeated over the batch with ``repeat_noise``).
        """
        e_t, pred_x0 = self.model.model_predictions(x, t, c, unconditional_guidance_scale, unconditional_conditioning)
        if score_corrector is not None:
            if self.model.parameterization != "eps":
                raise ValueError("score_corrector needs an eps-parameterised model")
            e_t = score_corrector.modify_score(self.model, e_t, x, t, c, **(corrector_kwargs or {}))
            pred_x0 = self.model.predict_start_from_noise(x, t, e_t)
        if quantize_denoised:
            pred_x0, _, *_ = self.model.first_stage_model.quantize(pred_x0)
        a_prev = self.ddim_alphas_prev[index]
        sigma_t = self.ddim_sigmas[index]
        dir_xt = (1.0 - a_prev - sigma_t ** 2).clamp(min=0.0).sqrt() * e_t
        x_prev = a_prev.sqrt() * pred_x0 + dir_xt
        if float(sigma_t) != 0.0:
            if noise is None:
                shape = (1, *x.shape[1:]) if repeat_noise else x.shape
                noise = randn(shape, x.device, generator, x.dtype).expand_as(x)
            noise = noise * temperature
            if noise_dropout > 0.0:
                noise = torch.nn.functional.dropout(noise, p=noise_dropout)
            x_prev = x_prev + sigma_t * noise
        return x_prev, pred_x0


def _check_cond_batch(conditioning: Any, batch_size: int) -> None:
    first = conditioning
    while isinstance(first, (dict, list, tuple)) and len(first):
        first = next(iter(first.values())) if isinstance(first, dict) else first[0]
    if isinstance(first, torch.Tensor) and first.shape[0] != batch_size:
        logger.warning("Got %d conditionings but batch_size is %d", first.shape[0], batch_size)
