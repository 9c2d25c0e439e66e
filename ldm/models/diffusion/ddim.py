"""The CompVis sampler interface: DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models") and the
options of CompVis's ancestral loop, as thin adapters over the sampler registry.

:class:`DDIMSampler` is a thin adapter over the registry (:mod:`ldm.models.diffusion.samplers`): ``sample`` builds the
timestep grid and the model's denoiser (``DDPM.denoiser``: eps- and x0-parameterised models alike), wraps
CompVis's extras around them (inpainting ``mask``/``x0``, ``score_corrector``, ``quantize_x0``,
``temperature``, ``noise_dropout``, classifier-free guidance) and runs the registered sampler. Runs on
whatever device the model's buffers are on, for any number of steps from 1 to the training timesteps.

Beyond CompVis's ``callback(i)`` / ``img_callback(pred_x0, i)``, ``sample`` takes ``step_callback(i, t, x_t,
pred_x0)`` (each step's input latents and x0 prediction) and ``noise_fn(like, i)`` (the eta > 0 step noise from
the caller, e.g. drawn per sample so that a sample does not depend on its batch).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ldm.models.diffusion.samplers import (SAMPLER_SPECS, SAMPLERS, Denoiser, NoiseFn, Trajectory, ddim_step,
                                           generator_noise, inpainting_denoiser, randn)
from ldm.modules.diffusionmodules.util import make_ddim_sampling_parameters, make_ddim_timesteps

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
"""``step_callback(i, t, x_t, pred_x0)``: step number ``i`` (0 first), its timestep ``t``, the latents ``x_t``
the step started from and the model's x0 prediction from them."""


class DDIMSampler:
    """Deterministic (``eta=0``) or stochastic DDIM sampling with a trained diffusion model.

    Args:
        model: a :class:`~ldm.models.diffusion.ddpm.DDPM` (or subclass) exposing ``alphas_cumprod``,
            ``num_timesteps`` and ``denoiser``.
        schedule: name of the training beta schedule (kept for CompVis compatibility; informational).
    """

    #: the registry sampler this adapter runs, and its progress-bar label
    name, label = "ddim", "DDIM Sampler"
    #: whether ``score_corrector`` and ``quantize_x0`` may be used
    supports_corrections = True

    def __init__(self, model: Any, schedule: str = "linear", **kwargs: Any) -> None:
        self.model = model
        self.ddpm_num_timesteps = int(model.num_timesteps)
        self.schedule = schedule

    @property
    def device(self) -> torch.device:
        return self.model.alphas_cumprod.device

    def _tensor(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(values)).float().to(self.device)

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Choose the visited timesteps (``ddim_timesteps``, ascending) and their alphas / sigmas (eq. 16)."""
        if self.model.alphas_cumprod.shape[0] != self.ddpm_num_timesteps:
            raise ValueError("the model's alphas_cumprod does not have num_timesteps entries")
        self.ddim_timesteps = make_ddim_timesteps(ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps,
                                                  verbose=verbose)
        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(self.model.alphas_cumprod, self.ddim_timesteps,
                                                                    ddim_eta, verbose=verbose)
        self.ddim_sigmas, self.ddim_alphas = self._tensor(sigmas), self._tensor(alphas)
        self.ddim_alphas_prev = self._tensor(alphas_prev)
        self.ddim_sqrt_one_minus_alphas = self._tensor(np.sqrt(1.0 - alphas))

    def grid(self) -> np.ndarray:
        """The descending grid the registry sampler walks (the DDIM steps, then 0 as CompVis)."""
        return np.concatenate([self.ddim_timesteps[::-1], [0]]).astype(np.int64)

    def _eta(self, eta: float) -> float:
        return eta

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
        """Draw ``batch_size`` samples of shape ``shape`` (C, H, W) in ``S`` steps.

        ``x_T`` fixes the start noise, ``generator`` the random draws. ``mask``/``x0`` keep the known
        region (mask == 1) of every model input at ``q_sample(x0, t)`` (inpainting). Returns ``(samples,
        intermediates)`` with ``intermediates = {"x_inter": [...], "pred_x0": [...]}`` every ``log_every_t`` steps.

        After step ``i`` (0 first) ``callback(i)``, ``img_callback(pred_x0, i)`` and then
        ``step_callback(i, t, x_t, pred_x0)`` are called; ``x_t`` is the step's input at timestep ``t``.
        ``noise_fn(like, i)``, when given, replaces ``generator`` for the stochastic term of steps with
        ``sigma_t > 0`` (``eta > 0``); ``temperature`` and ``noise_dropout`` still apply to what it returns.
        """
        _check_cond_batch(conditioning, batch_size)
        if mask is not None and x0 is None:
            raise ValueError("mask given without x0: pass the known latent x0 the mask refers to")
        self.make_schedule(S, ddim_discretize=ddim_discretize, ddim_eta=eta, verbose=verbose)
        grid = self.grid()
        denoise = self._denoiser(conditioning, quantize_x0, score_corrector, corrector_kwargs,
                                 unconditional_guidance_scale, unconditional_conditioning)
        if mask is not None:
            denoise = inpainting_denoiser(denoise, self.model.q_sample, x0.to(self.device), mask)
        img = randn((batch_size, *shape), self.device, generator) if x_T is None else x_T.to(self.device)

        def compvis_hooks(i: int, x_t: torch.Tensor, pred_x0: torch.Tensor) -> None:
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            if step_callback is not None:
                step_callback(i, int(grid[i]), x_t, pred_x0)

        if verbose:
            logger.info("Running %s with %d timesteps", self.label, len(grid) - 1)
        trajectory = Trajectory(img, len(grid) - 1, log_every_t, [compvis_hooks], self.label if verbose else None)
        img = SAMPLERS[self.name](denoise, img, grid, self.model.alphas_cumprod, eta=self._eta(eta),
                                  noise_fn=_step_noise(noise_fn, generator, temperature, noise_dropout),
                                  callback=trajectory)
        return img, trajectory.finish(img)

    def _denoiser(self, cond: Any, quantize_x0: bool, score_corrector: Any, corrector_kwargs: Optional[dict],
                  guidance_scale: float, uncond: Any) -> Denoiser:
        """The model's denoiser with CompVis's score corrector and first-stage quantisation of x0."""
        if not self.supports_corrections and (score_corrector is not None or quantize_x0):
            raise ValueError(f"score_corrector and quantize_x0 are not supported by the {self.name} sampler; "
                             "use the ddim sampler for them")
        model, base = self.model, self.model.denoiser(cond, guidance_scale, uncond)
        if score_corrector is None and not quantize_x0:
            return base
        if score_corrector is not None and model.parameterization != "eps":
            raise ValueError("score_corrector needs an eps-parameterised model")

        def corrected(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            eps, x0 = base(x, t)
            if score_corrector is not None:
                eps = score_corrector.modify_score(model, eps, x, t, cond, **(corrector_kwargs or {}))
                x0 = model.predict_start_from_noise(x, t, eps)
            if quantize_x0:
                x0, _, *_ = model.first_stage_model.quantize(x0)
            return eps, x0
        return corrected

    @torch.no_grad()
    def p_sample_ddim(self, x: torch.Tensor, c: Any, t: torch.Tensor, index: int, repeat_noise: bool = False,
                      quantize_denoised: bool = False, temperature: float = 1.0, noise_dropout: float = 0.0,
                      score_corrector: Any = None, corrector_kwargs: Optional[dict] = None,
                      unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
                      generator: Optional[torch.Generator] = None,
                      noise: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM update x_t -> x_{t_prev} at schedule ``index`` (DDIM, Song et al. 2021, eq. 12).

        ``noise`` is the standard normal draw of the ``sigma_t`` term; when None it is drawn from
        ``generator`` (one draw repeated over the batch with ``repeat_noise``).
        """
        eps, pred_x0 = self._denoiser(c, quantize_denoised, score_corrector, corrector_kwargs,
                                      unconditional_guidance_scale, unconditional_conditioning)(x, t)
        sigma = float(self.ddim_sigmas[index])
        if sigma != 0.0:
            if noise is None:
                shape = (1, *x.shape[1:]) if repeat_noise else x.shape
                noise = randn(shape, x.device, generator, x.dtype).expand_as(x)
            noise = _scaled(noise, temperature, noise_dropout)
        return ddim_step(pred_x0, eps, float(self.ddim_alphas_prev[index]), sigma, noise), pred_x0


def _scaled(noise: torch.Tensor, temperature: float, noise_dropout: float) -> torch.Tensor:
    noise = noise * temperature
    return torch.nn.functional.dropout(noise, p=noise_dropout) if noise_dropout > 0.0 else noise


def _step_noise(noise_fn: Optional[NoiseFn], generator: Optional[torch.Generator], temperature: float,
                noise_dropout: float) -> NoiseFn:
    """``noise_fn`` (or draws from ``generator``) scaled by ``temperature``, with ``noise_dropout``."""
    draw = noise_fn if noise_fn is not None else generator_noise(generator)
    if temperature == 1.0 and noise_dropout == 0.0:
        return draw
    return lambda like, step: _scaled(draw(like, step), temperature, noise_dropout)


def _check_cond_batch(conditioning: Any, batch_size: int) -> None:
    first = conditioning
    while isinstance(first, (dict, list, tuple)) and len(first):
        first = next(iter(first.values())) if isinstance(first, dict) else first[0]
    if isinstance(first, torch.Tensor) and first.shape[0] != batch_size:
        logger.warning("Got %d conditionings but batch_size is %d", first.shape[0], batch_size)


@torch.no_grad()
def ancestral_sample(model: Any, cond: Any, shape: Sequence[int], return_intermediates: bool = False,
                     x_T: Optional[torch.Tensor] = None, verbose: bool = True,
                     callback: Optional[Callable[[int], None]] = None,
                     img_callback: Optional[Callable[[torch.Tensor, int], None]] = None,
                     mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None,
                     log_every_t: Optional[int] = None, timesteps: Optional[int] = None,
                     clip_denoised: Optional[bool] = None, generator: Optional[torch.Generator] = None,
                     record_x0: bool = False) -> Any:
    """CompVis's ``p_sample_loop`` options (``DDPM.sample``) on the registry's ``ancestral`` sampler.

    ``x_T`` (drawn from ``generator`` when None) starts at step ``timesteps - 1`` (default: the last training
    step). ``mask``/``x0`` keep the known region (mask == 1) of every model input at ``q_sample(x0, t)``. After
    step ``t`` ``callback(t)`` and ``img_callback(x_{t-1}, t)`` are called. Returns ``img`` or ``(img,
    intermediates)``: x_T, then every ``log_every_t``-th latent (``record_x0``: x0 prediction) and the first.
    """
    if mask is not None and x0 is None:
        raise ValueError("mask given without x0: pass the known latent x0 the mask refers to")
    spec = SAMPLER_SPECS["ancestral"]
    grid = spec.timesteps(timesteps, model.alphas_cumprod)
    clip = model.clip_denoised if clip_denoised is None else clip_denoised
    denoise = model.denoiser(cond, clip_denoised=clip, noise_cond=True)
    if mask is not None:
        denoise = inpainting_denoiser(denoise, model.q_sample, x0, mask)
    device = model.alphas_cumprod.device
    img = randn(shape, device, generator) if x_T is None else x_T.to(device)
    hooks = _AncestralHooks(grid, callback, img_callback)
    trajectory = Trajectory(img, len(grid) - 1, model.log_every_t if log_every_t is None else log_every_t, [hooks],
                            "Sampling t" if verbose else None)
    img = spec.fn(denoise, img, grid, model.alphas_cumprod, noise_fn=generator_noise(generator), callback=trajectory)
    hooks.finish(img)
    intermediates = trajectory.finish(img)["pred_x0" if record_x0 else "x_inter"]
    return (img, intermediates) if return_intermediates else img


class _AncestralHooks:
    """CompVis's ``callback(t)`` and ``img_callback(x_{t-1}, t)`` of the ancestral loop, as a sampler callback.

    Args:
        grid: the sampler's timestep grid.
        callback, img_callback: the CompVis hooks (either may be None).
    """

    def __init__(self, grid: Sequence[int], callback: Optional[Callable], img_callback: Optional[Callable]) -> None:
        self.grid, self.callback, self.img_callback = grid, callback, img_callback

    def __call__(self, step: int, x: torch.Tensor, x0_pred: torch.Tensor) -> None:
        if step > 0 and self.img_callback is not None:
            self.img_callback(x, int(self.grid[step - 1]))  # this step's input is the previous step's output
        if self.callback is not None:
            self.callback(int(self.grid[step]))

    def finish(self, x: torch.Tensor) -> None:
        if self.img_callback is not None:
            self.img_callback(x, int(self.grid[-2]))


def truncate_cond(cond: Any, batch_size: int) -> Any:
    """The first ``batch_size`` entries of conditioning (tensor, list or dict of them; None stays None)."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: truncate_cond(v, batch_size) for k, v in cond.items()}
    if isinstance(cond, list):
        return [truncate_cond(v, batch_size) for v in cond]
    return cond[:batch_size]
