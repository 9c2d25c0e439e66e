"""Samplers as pure functions over one denoiser, and the registry every caller picks them from.

A denoiser is ``denoise(x, t) -> (eps, x0)``; :meth:`~ldm.models.diffusion.ddpm.DDPM.denoiser` builds it
from the model's one eps/x0 dispatcher (``model_predictions``). Every sampler in :data:`SAMPLERS` has the
signature of :class:`Sampler`::

    sampler(denoise, x, timesteps, alphas_cumprod, *, eta=None, noise_fn=None, callback=None) -> x_final

- ``x``: the start latents x_T [B, ...].
- ``timesteps``: the descending grid of ``n + 1`` ints for ``n`` model calls
  (:func:`sampler_timesteps`, from the sampler's :class:`SamplerSpec`): step ``i`` calls the denoiser at
  ``timesteps[i]`` and moves to ``timesteps[i + 1]``; ``-1`` stands for the clean data (alpha-bar 1).
- ``alphas_cumprod``: the training schedule's alpha-bar [T] (tensor or array).
- ``eta``: the amount of step noise; ``None`` takes the sampler's default (DDIM 0, ancestral 1);
  DPM-Solver++(2M) is deterministic and accepts only 0.
- ``noise_fn(like, step)``: standard normal noise shaped, placed and typed like ``like`` for step ``step``
  (e.g. drawn per sample, so that a sample does not depend on its batch); asked for only by steps that add
  noise; default ``torch.randn_like``.
- ``callback(step, x, x0_pred)``: once per step, after its update, with the latents ``x`` the step started
  from and the x0 prediction made from them.

What a caller needs to know about a sampler beyond its function (the grid it walks, whether a user's eta
applies, whether it keeps the DDPM loop's conventions) is its :class:`SamplerSpec` in :data:`SAMPLER_SPECS`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ldm.modules.diffusionmodules.util import dpm_solver_timesteps, make_ddim_timesteps

Denoiser = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``denoise(x, t) -> (eps, x0)``: the model's noise and clean-data predictions for latents ``x`` at steps ``t`` [B]."""
NoiseFn = Callable[[torch.Tensor, int], torch.Tensor]
"""``noise_fn(like, step)``: standard normal noise shaped, placed and typed like ``like``, for step ``step``."""
Callback = Callable[[int, torch.Tensor, torch.Tensor], None]
"""``callback(step, x, x0_pred)``: step number (0 first), the latents it started from, their x0 prediction."""

# DPM-Solver++(2M) takes a first-order last step below this many steps (stabilises short runs; Lu et al. 2022).
LOWER_ORDER_FINAL_BELOW = 15


class Sampler(Protocol):
    """The one sampler signature (see the module docstring); returns the final latents."""

    def __call__(self, denoise: Denoiser, x: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: Any, *,
                 eta: Optional[float] = None, noise_fn: Optional[NoiseFn] = None,
                 callback: Optional[Callback] = None) -> torch.Tensor: ...


# ----------------------------------------------------------------------------------------------- helpers
def _grid_alphas(alphas_cumprod: Any, timesteps: Sequence[int]) -> np.ndarray:
    """float64 alpha-bar at every grid entry (1 for -1), after checking the grid."""
    if isinstance(alphas_cumprod, torch.Tensor):
        alphas_cumprod = alphas_cumprod.detach().cpu().double().numpy()
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    grid = np.asarray(timesteps, dtype=np.int64)
    if grid.ndim != 1 or len(grid) < 2:
        raise ValueError(f"timesteps must hold at least 2 entries (start and end), got {list(grid)}")
    if grid.min() < -1 or grid.max() >= len(abar) or np.any(np.diff(grid) > 0) or np.any(grid[:-1] < 0):
        raise ValueError(f"timesteps must descend within 0..{len(abar) - 1} (only the last may be -1, the clean "
                         f"data); got {list(grid)}; build them with sampler_timesteps")
    return np.where(grid >= 0, abar[np.clip(grid, 0, None)], 1.0)


def _steps(t: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((like.shape[0],), int(t), device=like.device, dtype=torch.long)


def _noise(noise_fn: Optional[NoiseFn], like: torch.Tensor, step: int) -> torch.Tensor:
    noise = torch.randn_like(like) if noise_fn is None else noise_fn(like, step)
    if noise.shape != like.shape:
        raise ValueError(f"noise_fn returned shape {tuple(noise.shape)} for latents of shape {tuple(like.shape)}; "
                         "it must return noise shaped like its first argument")
    return noise


def randn(shape: Sequence[int], device: torch.device, generator: Optional[torch.Generator] = None,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise on ``device``, drawn from ``generator`` (on whatever device it lives)."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)


def generator_noise(generator: Optional[torch.Generator]) -> NoiseFn:
    """A ``noise_fn`` drawing batch noise from ``generator`` (the global RNG when None)."""
    return lambda like, step: randn(like.shape, like.device, generator, like.dtype)


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


# ------------------------------------------------------------------------------------------------- steps
def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_next: float, sigma: float,
              noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One DDIM update to alpha-bar ``alpha_next`` from the predictions (DDIM, Song et al. 2021, eq. 12)."""
    x = math.sqrt(alpha_next) * x0 + math.sqrt(max(1.0 - alpha_next - sigma ** 2, 0.0)) * eps
    return x + sigma * noise if sigma != 0.0 else x


def ddim_sigma(alpha: float, alpha_next: float, eta: float) -> float:
    """sigma of a DDIM step from alpha-bar ``alpha`` to ``alpha_next`` (DDIM, Song et al. 2021, eq. 16)."""
    return eta * math.sqrt((1.0 - alpha_next) / (1.0 - alpha) * (1.0 - alpha / alpha_next))


def dpmpp_2m_step(x: torch.Tensor, x0: torch.Tensor, prev_x0: Optional[torch.Tensor], i: int, alphas: np.ndarray,
                  sigmas: np.ndarray, lambdas: np.ndarray) -> torch.Tensor:
    """Grid point ``i`` -> ``i + 1``; second order when the previous x0 is given (DPM-Solver++(2M), Lu et al.
    2022, Algorithm 2: ``D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}``), else first order (a DDIM eta = 0 step)."""
    s, t = i, i + 1
    h = lambdas[t] - lambdas[s]
    ratio = float(sigmas[t] / sigmas[s])
    coef = float(-alphas[t] * np.expm1(-h))
    if prev_x0 is None:
        return ratio * x + coef * x0
    r = (lambdas[s] - lambdas[s - 1]) / h
    return ratio * x + coef * ((1.0 + 0.5 / r) * x0 - (0.5 / r) * prev_x0)


def vp_coefficients(abar: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(alpha, sigma, lambda)`` of a VP process: sqrt(abar), sqrt(1 - abar), log(alpha / sigma)."""
    alphas, sigmas = np.sqrt(abar), np.sqrt(1.0 - abar)
    return alphas, sigmas, np.log(alphas) - np.log(sigmas)


# ---------------------------------------------------------------------------------------------- samplers
def sample_ddim(denoise: Denoiser, x: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: Any, *,
                eta: Optional[float] = None, noise_fn: Optional[NoiseFn] = None,
                callback: Optional[Callback] = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): eta = 0 (default) is deterministic; eta = 1 on adjacent steps is DDPM."""
    eta = 0.0 if eta is None else float(eta)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    abar = _grid_alphas(alphas_cumprod, timesteps)
    for i in range(len(abar) - 1):
        sigma = ddim_sigma(abar[i], abar[i + 1], eta)
        eps, x0 = denoise(x, _steps(timesteps[i], x))
        x_next = ddim_step(x0, eps, abar[i + 1], sigma, _noise(noise_fn, x, i) if sigma != 0.0 else None)
        if callback is not None:
            callback(i, x, x0)
        x = x_next
    return x


def sample_dpmpp_2m(denoise: Denoiser, x: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: Any, *,
                    eta: Optional[float] = None, noise_fn: Optional[NoiseFn] = None,
                    callback: Optional[Callback] = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2: multistep, data prediction) on the probability-flow ODE.

    Deterministic (``eta`` must be 0 or None; ``noise_fn`` is never asked). The first step, and the last one
    for fewer than ``LOWER_ORDER_FINAL_BELOW`` steps, are first order. The grid must end at timestep >= 0.
    """
    if eta not in (None, 0, 0.0):
        raise ValueError(f"the dpmpp2m sampler is deterministic; eta must be 0 (got {eta}); use ddim for eta > 0")
    if int(min(timesteps)) < 0:
        raise ValueError("the dpmpp2m grid must end at timestep 0 at the latest (lambda is infinite at -1)")
    alphas, sigmas, lambdas = vp_coefficients(_grid_alphas(alphas_cumprod, timesteps))
    n = len(alphas) - 1
    prev_x0: Optional[torch.Tensor] = None
    for i in range(n):
        _, x0 = denoise(x, _steps(timesteps[i], x))
        first_order = prev_x0 is None or (i == n - 1 and n < LOWER_ORDER_FINAL_BELOW)
        x_next = dpmpp_2m_step(x, x0, None if first_order else prev_x0, i, alphas, sigmas, lambdas)
        if callback is not None:
            callback(i, x, x0)
        x, prev_x0 = x_next, x0
    return x


def sample_ancestral(denoise: Denoiser, x: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: Any, *,
                     eta: Optional[float] = None, noise_fn: Optional[NoiseFn] = None,
                     callback: Optional[Callback] = None) -> torch.Tensor:
    """Ancestral sampling from the posterior q(x_s | x_t, x0_pred) (Ho et al. 2020, Algorithm 2 and eqs. 6-7).

    ``eta`` scales the posterior's standard deviation (1, the default: DDPM; 0: the posterior mean).
    """
    eta = 1.0 if eta is None else float(eta)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    abar = _grid_alphas(alphas_cumprod, timesteps)
    for i in range(len(abar) - 1):
        a_t, a_s = abar[i], abar[i + 1]
        beta = 1.0 - a_t / a_s
        _, x0 = denoise(x, _steps(timesteps[i], x))
        mean = (math.sqrt(a_s) * beta / (1.0 - a_t)) * x0 + (math.sqrt(a_t / a_s) * (1.0 - a_s) / (1.0 - a_t)) * x
        std = eta * math.sqrt(beta * (1.0 - a_s) / (1.0 - a_t))
        x_next = mean + std * _noise(noise_fn, x, i) if std > 0.0 else mean
        if callback is not None:
            callback(i, x, x0)
        x = x_next
    return x


# ------------------------------------------------------------------------------------------- the registry
def ddim_grid(num_steps: Optional[int], alphas_cumprod: Any, ddim_discretize: str = "uniform") -> np.ndarray:
    """The CompVis DDIM steps (:func:`~ldm.modules.diffusionmodules.util.make_ddim_timesteps`) descending, then 0
    (CompVis ends at ``alphas_cumprod[0]``)."""
    steps = make_ddim_timesteps(ddim_discretize, int(num_steps), len(alphas_cumprod))
    return np.concatenate([steps[::-1], [0]]).astype(np.int64)


def dpmpp_2m_grid(num_steps: Optional[int], alphas_cumprod: Any, skip_type: str = "logSNR") -> np.ndarray:
    """:func:`~ldm.modules.diffusionmodules.util.dpm_solver_timesteps` (``skip_type`` spacing)."""
    return dpm_solver_timesteps(int(num_steps), alphas_cumprod, skip_type)


def ancestral_grid(num_steps: Optional[int], alphas_cumprod: Any) -> np.ndarray:
    """``num_steps - 1`` (default ``T - 1``) down to 0, then -1 (Ho et al. 2020, Algorithm 2)."""
    num_timesteps = len(alphas_cumprod)
    start = num_timesteps if num_steps is None else int(num_steps)
    if not 1 <= start <= num_timesteps:
        raise ValueError(f"the number of ancestral steps must lie in 1..{num_timesteps}, got {num_steps}")
    return np.arange(start - 1, -2, -1, dtype=np.int64)


@dataclass(frozen=True)
class SamplerSpec:
    """One registered sampler: its function, the timestep grid it walks and its eta rule.

    Attributes:
        name: the registry key (``--sampler`` value).
        label: the name people read (plots, logs, manifests).
        fn: the sampler function (:class:`Sampler`).
        grid: ``grid(num_steps, alphas_cumprod, **options) -> timesteps``.
        takes_eta: whether a user's eta applies (``-e``): DDIM only; the ancestral loop draws from the DDPM
            posterior (eta 1) and DPM-Solver++(2M) is deterministic.
        ddpm_loop: the ancestral DDPM loop's conventions: x0 clipped with the model's ``clip_denoised``,
            conditioning noised per step, and by default every training step (``num_steps=None``).
    """

    name: str
    label: str
    fn: Sampler
    grid: Callable[..., np.ndarray]
    takes_eta: bool = False
    ddpm_loop: bool = False

    def timesteps(self, num_steps: Optional[int], alphas_cumprod: Any, **options: Any) -> np.ndarray:
        """The descending grid of ``n + 1`` entries for ``n`` model calls (see the module docstring)."""
        return self.grid(num_steps, alphas_cumprod, **options)


SAMPLER_SPECS: dict[str, SamplerSpec] = {spec.name: spec for spec in (
    SamplerSpec("ddim", "DDIM", sample_ddim, ddim_grid, takes_eta=True),
    SamplerSpec("dpmpp2m", "DPM-Solver++(2M)", sample_dpmpp_2m, dpmpp_2m_grid),
    SamplerSpec("ancestral", "DDPM ancestral", sample_ancestral, ancestral_grid, ddpm_loop=True),
)}
"""Every sampler's :class:`SamplerSpec`, by registry name."""

SAMPLERS: dict[str, Sampler] = {name: spec.fn for name, spec in SAMPLER_SPECS.items()}
"""The registry: every caller (DDIMSampler, DDPM.sample/sample_log, ldm.sampling, scripts) picks a sampler here."""


def check_sampler(name: str) -> str:
    """The registry key for ``name`` (case-insensitive); ``ValueError`` naming the valid ones otherwise."""
    key = str(name).lower()
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return key


def sampler_spec(name: str) -> SamplerSpec:
    """The :class:`SamplerSpec` of ``name`` (case-insensitive; ``ValueError`` for an unknown one)."""
    return SAMPLER_SPECS[check_sampler(name)]


def sampler_timesteps(sampler: str, num_steps: Optional[int], alphas_cumprod: Any, ddim_discretize: str = "uniform",
                      skip_type: str = "logSNR") -> np.ndarray:
    """The descending timestep grid the registered ``sampler`` walks: ``n + 1`` entries for ``n`` model calls.

    Step ``i`` goes from ``grid[i]`` (where the model is called) to ``grid[i + 1]``; ``-1`` stands for the clean
    data (alpha-bar 1). ``ddim_discretize`` applies to ``ddim``, ``skip_type`` to ``dpmpp2m``.
    """
    key = str(sampler).lower()
    if key not in SAMPLER_SPECS:
        raise ValueError(f"no timestep grid for sampler {sampler!r}; choose one of {', '.join(SAMPLER_SPECS)}")
    spec = SAMPLER_SPECS[key]
    options = {"ddim": {"ddim_discretize": ddim_discretize}, "dpmpp2m": {"skip_type": skip_type}}.get(key, {})
    return spec.timesteps(num_steps, alphas_cumprod, **options)


# ---------------------------------------------------------------------------------- running on a model
class Trajectory:
    """A sampler ``callback`` that keeps the intermediates every sampler returns, in one shape.

    ``finish(x_final)`` returns ``{"x_inter": [x_T, ...], "pred_x0": [x_T, ...]}``: the latents after, and the
    x0 prediction of, the first step and every ``log_every_t``-th step counted from the last (as CompVis logs
    them). Each step also calls ``hooks`` and advances a progress bar.

    Args:
        x_T: the start latents.
        num_steps: how many steps the sampler takes.
        log_every_t: the logging interval, in steps.
        hooks: further callbacks, called in order.
        progress: the progress bar's label; None for no bar.
    """

    def __init__(self, x_T: torch.Tensor, num_steps: int, log_every_t: int = 100, hooks: Sequence[Callback] = (),
                 progress: Optional[str] = None) -> None:
        self.num_steps, self.log_every_t, self.hooks = int(num_steps), max(int(log_every_t), 1), list(hooks)
        self.x_inter, self.pred_x0 = [x_T], [x_T]
        self._bar = tqdm(total=self.num_steps, desc=progress, disable=progress is None)

    def _logged(self, step: int) -> bool:
        return (self.num_steps - 1 - step) % self.log_every_t == 0 or step == 0

    def __call__(self, step: int, x: torch.Tensor, x0_pred: torch.Tensor) -> None:
        if step > 0 and self._logged(step - 1):
            self.x_inter.append(x)  # the input of this step is the output of the previous one
        if self._logged(step):
            self.pred_x0.append(x0_pred)
        for hook in self.hooks:
            hook(step, x, x0_pred)
        self._bar.update(1)

    def finish(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        if self._logged(self.num_steps - 1):
            self.x_inter.append(x)
        self._bar.close()
        return {"x_inter": self.x_inter, "pred_x0": self.pred_x0}


def inpainting_denoiser(denoise: Denoiser, q_sample: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        x0: torch.Tensor, mask: torch.Tensor) -> Denoiser:
    """``denoise`` on inputs whose known region (mask == 1) is replaced by ``q_sample(x0, t)`` (CompVis inpainting)."""
    def wrapped(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return denoise(q_sample(x0, t) * mask + (1.0 - mask) * x, t)
    return wrapped


@torch.no_grad()
def sample_model(model: Any, sampler: str, x_T: torch.Tensor, steps: Optional[int] = None, *, cond: Any = None,
                 eta: Optional[float] = None, noise_fn: Optional[NoiseFn] = None, callback: Optional[Callback] = None,
                 log_every_t: int = 100, progress: bool = False,
                 make_denoiser: Optional[Callable[..., Denoiser]] = None
                 ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """Run the registered ``sampler`` with a :class:`~ldm.models.diffusion.ddpm.DDPM` from ``x_T``.

    ``steps``: model calls (``ancestral``: start at timestep ``steps - 1``, default every training step).
    The ancestral sampler keeps the DDPM loop's conventions (x0 clipped with ``clip_denoised``, conditioning
    noised per step). ``make_denoiser(cond, clip_denoised=, noise_cond=)`` builds the denoiser instead of
    ``model.denoiser`` (e.g. :meth:`~ldm.models.diffusion.guidance.AnatomyGuidance.denoiser`). Returns
    ``(samples, intermediates)`` (see :class:`Trajectory`).
    """
    spec = sampler_spec(sampler)
    grid = spec.timesteps(steps, model.alphas_cumprod)
    x_T = x_T.to(model.alphas_cumprod.device)
    denoise = (make_denoiser or model.denoiser)(cond, clip_denoised=spec.ddpm_loop and model.clip_denoised,
                                                noise_cond=spec.ddpm_loop)
    trajectory = Trajectory(x_T, len(grid) - 1, log_every_t, [callback] if callback else (),
                            progress=spec.name if progress else None)
    x = spec.fn(denoise, x_T, grid, model.alphas_cumprod, eta=eta, noise_fn=noise_fn, callback=trajectory)
    return x, trajectory.finish(x)
