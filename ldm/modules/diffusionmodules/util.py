"""Building blocks shared by the diffusion models: the schedule math (betas, the DDPM buffers, the DDIM and
DPM-Solver timestep grids), the sinusoidal timestep embedding, layer factories, zero-initialisation and
gradient checkpointing.

Numbers follow the CompVis latent-diffusion conventions (names, defaults and value layouts), so that
schedules and embeddings computed here match checkpoints trained with that code.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

logger = logging.getLogger(__name__)

BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt")
DDIM_DISCRETIZATIONS = ("uniform", "quad")
DPM_SKIP_TYPES = ("logSNR", "time_uniform", "time_quadratic")


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------
def make_beta_schedule(schedule: str, n_timestep: int, linear_start: float = 1e-4, linear_end: float = 2e-2,
                       cosine_s: float = 8e-3) -> np.ndarray:
    """Betas of a diffusion process as a float64 numpy array of length ``n_timestep``.

    ``linear``: squares of values evenly spaced between sqrt(linear_start) and sqrt(linear_end)
    (the CompVis "linear", so betas[0] == linear_start and betas[-1] == linear_end);
    ``sqrt_linear``: evenly spaced betas; ``sqrt``: square roots of evenly spaced betas;
    ``cosine``: the squared-cosine alpha-bar of Nichol & Dhariwal 2021 (eq. 17), betas clipped to [0, 0.999].
    """
    if n_timestep < 1:
        raise ValueError(f"n_timestep (timesteps) must be >= 1, got {n_timestep}")
    if schedule == "linear":
        betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=np.float64) ** 2
    elif schedule == "cosine":
        steps = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep + cosine_s
        alpha_bar = np.cos(steps / (1.0 + cosine_s) * math.pi / 2.0) ** 2
        alpha_bar = alpha_bar / alpha_bar[0]
        betas = np.clip(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.0, 0.999)
    elif schedule == "sqrt_linear":
        betas = np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)
    elif schedule == "sqrt":
        betas = np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64) ** 0.5
    else:
        raise ValueError(f"unknown beta_schedule {schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")
    return betas


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous alpha-bar(t), t in [0, 1], into betas (each capped at ``max_beta``)."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1.0 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.asarray(betas, dtype=np.float64)


def make_ddim_timesteps(ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int,
                        verbose: bool = False) -> np.ndarray:
    """The DDPM steps a DDIM sampler visits, ascending, as an int64 numpy array.

    ``uniform``: ``range(0, T, T // S) + 1`` (T=1000, S=10 gives 1, 101, ..., 901, as CompVis);
    ``quad``: ``int((linspace(0, sqrt(0.8 T), S))**2) + 1``.
    Unlike CompVis, the result is clipped to the valid index range [0, T-1] and made unique, so every
    S in 1..T works: S=T gives 1, 2, ..., T-1 (T-1 steps, the last one ending at alphas_cumprod[0]),
    and repeated quad steps at small t are merged. Where CompVis does not crash the result is unchanged
    apart from those merged duplicates.
    """
    if not 1 <= num_ddim_timesteps <= num_ddpm_timesteps:
        raise ValueError(
            f"the number of DDIM steps must lie in 1..{num_ddpm_timesteps} (the training timesteps), "
            f"got {num_ddim_timesteps}"
        )
    if ddim_discr_method == "uniform":
        stride = num_ddpm_timesteps // num_ddim_timesteps
        steps = np.arange(0, num_ddpm_timesteps, stride, dtype=np.int64)
    elif ddim_discr_method == "quad":
        steps = (np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps) ** 2).astype(np.int64)
    else:
        raise ValueError(
            f"unknown ddim_discretize {ddim_discr_method!r}; choose one of {', '.join(DDIM_DISCRETIZATIONS)}"
        )
    steps = np.unique(np.clip(steps + 1, 0, num_ddpm_timesteps - 1))
    if verbose:
        logger.info("DDIM timesteps (%d): %s", len(steps), steps.tolist())
    return steps


def _as_float64(alphas_cumprod: Any) -> np.ndarray:
    if isinstance(alphas_cumprod, torch.Tensor):
        alphas_cumprod = alphas_cumprod.detach().cpu().double().numpy()
    return np.asarray(alphas_cumprod, dtype=np.float64)


def make_ddim_sampling_parameters(alphacums: Any, ddim_timesteps: Sequence[int], eta: float,
                                  verbose: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(sigmas, alphas, alphas_prev)`` for DDIM (Song et al. 2021, eq. 16), float64 numpy arrays.

    ``alphas`` are the cumulative alphas at ``ddim_timesteps``; the "previous" alpha of the first
    (smallest) step is ``alphacums[0]``, as CompVis, not 1.
    """
    alphacums = _as_float64(alphacums)
    idx = np.asarray(ddim_timesteps, dtype=np.int64)
    alphas = alphacums[idx]
    alphas_prev = np.concatenate([alphacums[:1], alphacums[idx[:-1]]])
    sigmas = eta * np.sqrt((1.0 - alphas_prev) / (1.0 - alphas) * (1.0 - alphas / alphas_prev))
    if verbose:
        logger.info("DDIM alphas: %s; alphas_prev: %s; sigma_t for eta=%s: %s", alphas, alphas_prev, eta, sigmas)
    return sigmas, alphas, alphas_prev


# Names (and order) of the persistent schedule buffers of DDPM, as in CompVis checkpoints.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def schedule_arrays(betas: Any, v_posterior: float, parameterization: str) -> dict[str, np.ndarray]:
    """Every schedule quantity (float64) derived from ``betas``; keys ``SCHEDULE_BUFFERS`` + ``lvlb_weights``.

    The posterior q(x_{t-1} | x_t, x_0) follows Ho et al. 2020, eqs. 6-7; ``v_posterior`` blends its
    variance with beta_t. ``lvlb_weights`` turn the per-step simple loss into the VLB term (eps: the
    eq. 12 weight of Ho et al.; x0: the CompVis weight, kept for numerical compatibility).
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or len(betas) == 0 or np.any(betas <= 0) or np.any(betas >= 1):
        raise ValueError("betas must be a non-empty 1-D sequence of values in (0, 1) "
                         "(check given_betas / beta_schedule)")
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


def dpm_solver_timesteps(num_steps: int, alphas_cumprod: Any, skip_type: str = "logSNR") -> np.ndarray:
    """``num_steps + 1`` distinct integer timesteps, descending from ``T - 1`` to 0 (the DPM-Solver grid).

    ``logSNR``: as uniform as the integer grid allows in the half log-SNR lambda (Lu et al. 2022 recommend it
    for latent-size images; it places more steps near t = 0, where lambda changes fastest);
    ``time_uniform``: uniform in t; ``time_quadratic``: uniform in sqrt(t).
    """
    abar = _as_float64(alphas_cumprod)
    num_timesteps = len(abar)
    if not 1 <= int(num_steps) <= num_timesteps - 1:
        raise ValueError(f"the number of DPM-Solver steps must lie in 1..{num_timesteps - 1} "
                         f"(training timesteps - 1), got {num_steps}")
    n, last = int(num_steps), num_timesteps - 1
    if skip_type == "time_uniform":
        steps = np.round(np.linspace(last, 0, n + 1))
    elif skip_type == "time_quadratic":
        steps = np.round(np.linspace(np.sqrt(last), 0, n + 1) ** 2)
    elif skip_type == "logSNR":
        lam = 0.5 * (np.log(abar) - np.log1p(-abar))  # increasing as t decreases
        targets = np.linspace(lam[last], lam[0], n + 1)
        steps = np.array([np.abs(lam - target).argmin() for target in targets], dtype=np.float64)
    else:
        raise ValueError(f"unknown skip_type {skip_type!r}; choose one of {', '.join(DPM_SKIP_TYPES)}")
    steps = steps.astype(np.int64)
    steps[0], steps[-1] = last, 0
    for k in range(n - 1, 0, -1):  # strictly descending: push collisions up from the t = 0 end ...
        steps[k] = max(steps[k], steps[k + 1] + 1)
    for k in range(1, n + 1):  # ... and down from the t = T - 1 end
        steps[k] = min(steps[k], steps[k - 1] - 1)
    assert steps[0] == last and steps[-1] == 0 and np.all(np.diff(steps) < 0)
    return steps


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
    """``a[t]`` per batch element, shaped ``[B, 1, 1, ...]`` to broadcast against ``x_shape``."""
    out = a.gather(-1, t)
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def noise_like(shape: Sequence[int], device: torch.device, repeat: bool = False,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard normal noise; with ``repeat`` one sample is shared by the whole batch."""
    if repeat:
        one = torch.randn((1, *shape[1:]), device=device, generator=generator)
        return one.repeat(shape[0], *((1,) * (len(shape) - 1)))
    return torch.randn(tuple(shape), device=device, generator=generator)


# --------------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------------
def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000,
                       repeat_only: bool = False) -> torch.Tensor:
    """Sinusoidal embedding ``[N, dim]`` of (possibly fractional) timesteps ``[N]``.

    Layout as CompVis: the first ``dim // 2`` entries are cos(t * f_i), the next ``dim // 2`` are
    sin(t * f_i) with f_i = max_period ** (-i / (dim // 2)); an odd ``dim`` gets a trailing zero.
    ``repeat_only`` returns the timestep itself repeated ``dim`` times.
    """
    if repeat_only:
        return timesteps[:, None].float().expand(-1, dim).contiguous()
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps[:, None].float() * torch.exp(exponent)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------
def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero and return it."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """Multiply every parameter of ``module`` by ``scale`` and return it."""
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(scale)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that computes in float32 whatever the input dtype and returns the input dtype.

    Args: as ``torch.nn.GroupNorm`` (num_groups, num_channels, eps, affine).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        out = nn.functional.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype)


def normalization(channels: int) -> nn.Module:
    """The UNet's normalisation layer: 32-group GroupNorm computed in float32."""
    if channels % 32:
        raise ValueError(f"GroupNorm with 32 groups needs channels divisible by 32, got {channels}; "
                         "pick model_channels (times channel_mult) as a multiple of 32")
    return GroupNorm32(32, channels)


def _check_dims(dims: int) -> None:
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """``nn.Conv1d``/``Conv2d``/``Conv3d`` for ``dims`` 1/2/3."""
    _check_dims(dims)
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](*args, **kwargs)


def adaptive_avg_pool_nd(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Adaptive average pooling of ``x [B, C, *spatial]`` to ``size`` (1, 2 or 3 spatial dimensions, one per entry)."""
    size = tuple(int(s) for s in size)
    _check_dims(len(size))
    if x.dim() != len(size) + 2:
        raise ValueError(f"adaptive_avg_pool_nd: a [B, C] + {len(size)}-d input for size {size}, got {tuple(x.shape)}")
    return (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[len(size) - 1](x, size)


def resize_maps(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x [B, C, *spatial]`` resized to ``size`` by (bi/tri)linear interpolation, ``align_corners=False``."""
    size = tuple(int(s) for s in size)
    _check_dims(len(size))
    return F.interpolate(x, size=size, mode=("linear", "bilinear", "trilinear")[len(size) - 1], align_corners=False)


def linear(*args: Any, **kwargs: Any) -> nn.Module:
    """``nn.Linear`` (kept as a factory for CompVis naming)."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """``nn.AvgPool1d``/``AvgPool2d``/``AvgPool3d`` for ``dims`` 1/2/3."""
    _check_dims(dims)
    return (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dims - 1](*args, **kwargs)


class ConditionedBlock(nn.Module):
    """Base class of layers that need conditioning inside a ``TimestepEmbedSequential``.

    The sequential passes one ``cond`` dict (the UNet's state); each layer reads what it needs in
    ``forward_cond``. The default reads ``cond[self.cond_key]`` and calls ``self(x, value)``; a layer
    that needs several keys (or writes into the dict, e.g. a collector) overrides ``forward_cond``.
    Subclasses set ``cond_key`` (``"emb"`` for timestep-conditioned blocks, ``"context"`` for
    cross-attention).
    """

    cond_key: str = "emb"

    def forward_cond(self, x: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        return self(x, cond.get(self.cond_key))


class TimestepBlock(ConditionedBlock):
    """A layer whose ``forward(x, emb)`` takes the timestep embedding (CompVis name)."""

    cond_key = "emb"


def checkpoint(func: Callable[..., Any], inputs: Iterable[Any], params: Iterable[torch.Tensor],
               flag: bool) -> Any:
    """``func(*inputs)``, recomputed in the backward pass instead of storing activations when ``flag``.

    Uses ``torch.utils.checkpoint`` in non-reentrant mode, which tracks the gradients of every
    parameter ``func`` uses by itself; ``params`` is accepted for CompVis call compatibility only.
    Outside autograd (``torch.no_grad``) it is a plain call.
    """
    del params  # non-reentrant checkpointing finds the parameters itself
    inputs = tuple(inputs)
    if flag and torch.is_grad_enabled():
        return _torch_checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
