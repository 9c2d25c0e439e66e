"""DPM-Solver++(2M): a second-order multistep solver of the diffusion probability-flow ODE.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
Algorithm 2 (multistep, data prediction). It runs on the model's own discrete schedule
(``alphas_cumprod``, a VP process: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), half log-SNR
lambda_t = log(alpha_t / sigma_t)) and visits integer training timesteps only, so any model the DDIM
sampler can drive works here too. Predictions come from ``model.model_predictions`` (the one eps/x0
dispatcher), so eps- and x0-parameterised models and classifier-free guidance are supported.

``get_sampler(name, model)`` picks a sampler by name (``"ddim"`` or ``"dpmpp2m"``).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ldm.models.diffusion.ddim import DDIMSampler, _check_cond_batch
from ldm.models.diffusion.sampling_utils import randn

logger = logging.getLogger(__name__)

SAMPLERS = ("ddim", "dpmpp2m")


SKIP_TYPES = ("logSNR", "time_uniform", "time_quadratic")


def dpm_solver_timesteps(num_steps: int, alphas_cumprod: Any, skip_type: str = "logSNR") -> np.ndarray:
    """``num_steps + 1`` distinct integer timesteps, descending from ``T - 1`` to 0.

    ``logSNR``: as uniform as the integer grid allows in lambda (Lu et al. 2022 recommend it for
    latent-size images; it places more steps near t = 0, where lambda changes fastest);
    ``time_uniform``: uniform in t; ``time_quadratic``: uniform in sqrt(t).
    """
    abar = np.asarray(alphas_cumprod.detach().double().cpu().numpy() if isinstance(alphas_cumprod, torch.Tensor)
                      else alphas_cumprod, dtype=np.float64)
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
        raise ValueError(f"unknown skip_type {skip_type!r}; choose one of {', '.join(SKIP_TYPES)}")
    steps = steps.astype(np.int64)
    steps[0], steps[-1] = last, 0
    for k in range(n - 1, 0, -1):  # strictly descending: push collisions up from the t = 0 end ...
        steps[k] = max(steps[k], steps[k + 1] + 1)
    for k in range(1, n + 1):  # ... and down from the t = T - 1 end
        steps[k] = min(steps[k], steps[k - 1] - 1)
    assert steps[0] == last and steps[-1] == 0 and np.all(np.diff(steps) < 0)
    return steps


class DPMSolverSampler:
    """Deterministic DPM-Solver++(2M) sampling with a trained diffusion model (DDIMSampler's interface).

    Step ``i`` goes from timestep ``t_{i-1}`` to ``t_i`` (descending from ``T - 1`` to 0, as many
    model calls as steps). The first step (and, for fewer than ``lower_order_final_below`` steps, the
    last) is first order, which is exactly a DDIM (eta = 0) step; the others use the previous step's
    x0 prediction as well (eq. of Algorithm 2: ``D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}``).

    Args:
        model: a :class:`~ldm.models.diffusion.ddpm.DDPM` (or subclass) exposing ``alphas_cumprod``,
            ``num_timesteps`` and ``model_predictions``.
        skip_type: how the visited timesteps are spaced (see :func:`dpm_solver_timesteps`).
        lower_order_final_below: use a first-order final step when sampling with fewer steps than this
            (stabilises very short schedules, as Lu et al. recommend); 0 disables it.
    """

    def __init__(self, model: Any, skip_type: str = "logSNR", lower_order_final_below: int = 15) -> None:
        if skip_type not in SKIP_TYPES:
            raise ValueError(f"unknown skip_type {skip_type!r}; choose one of {', '.join(SKIP_TYPES)}")
        self.model = model
        self.skip_type = skip_type
        self.num_timesteps = int(model.num_timesteps)
        self.lower_order_final_below = int(lower_order_final_below)

    @property
    def device(self) -> torch.device:
        return self.model.alphas_cumprod.device

    def make_schedule(self, num_steps: int) -> None:
        """Choose the visited timesteps and their alpha, sigma and lambda (float64 on the host)."""
        alphas_cumprod = self.model.alphas_cumprod
        if alphas_cumprod.shape[0] != self.num_timesteps:
            raise ValueError("the model's alphas_cumprod does not have num_timesteps entries")
        self.timesteps = dpm_solver_timesteps(num_steps, alphas_cumprod, self.skip_type)
        abar = alphas_cumprod.detach().double().cpu().numpy()[self.timesteps]
        self.alphas = np.sqrt(abar)
        self.sigmas = np.sqrt(1.0 - abar)
        self.lambdas = np.log(self.alphas) - np.log(self.sigmas)

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: Sequence[int], conditioning: Any = None,
               callback: Optional[Callable[[int], None]] = None,
               img_callback: Optional[Callable[[torch.Tensor, int], None]] = None, quantize_x0: bool = False,
               eta: float = 0.0, mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None,
               temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector: Any = None,
               corrector_kwargs: Optional[dict] = None, verbose: bool = True, x_T: Optional[torch.Tensor] = None,
               log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, generator: Optional[torch.Generator] = None,
               **kwargs: Any) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Draw ``batch_size`` samples of shape ``shape`` (C, H, W) in ``S`` solver steps (S model calls).

        Same signature and return as :meth:`DDIMSampler.sample`: ``x_T`` fixes the start noise,
        ``generator`` its draw; ``mask``/``x0`` keep the known region at ``q_sample(x0, t)``. The solver
        is deterministic, so ``eta``, ``temperature`` and ``noise_dropout`` are ignored (and
        ``ddim_discretize`` in ``kwargs``). Returns ``(samples, {"x_inter": [...], "pred_x0": [...]})``.
        """
        if score_corrector is not None or quantize_x0:
            raise ValueError("score_corrector and quantize_x0 are not supported by the dpmpp2m sampler; "
                             "use the ddim sampler for them")
        if mask is not None and x0 is None:
            raise ValueError("mask given without x0: pass the known latent x0 the mask refers to")
        unknown = set(kwargs) - {"ddim_discretize"}
        if unknown:
            raise TypeError(f"DPMSolverSampler.sample got unexpected keyword arguments {sorted(unknown)}")
        if eta:
            logger.debug("DPMSolverSampler is deterministic: eta=%s ignored", eta)
        _check_cond_batch(conditioning, batch_size)
        self.make_schedule(S)
        size = (batch_size, *shape)
        img = randn(size, self.device, generator) if x_T is None else x_T.to(self.device)
        intermediates: dict[str, list[torch.Tensor]] = {"x_inter": [img], "pred_x0": [img]}
        total_steps = len(self.timesteps) - 1
        if verbose:
            logger.info("Running DPM-Solver++(2M) sampling with %d steps", total_steps)
        prev_x0: Optional[torch.Tensor] = None
        for i in tqdm(range(total_steps), desc="DPM-Solver++(2M)", total=total_steps, disable=not verbose):
            ts = torch.full((batch_size,), int(self.timesteps[i]), device=self.device, dtype=torch.long)
            if mask is not None:
                img = self.model.q_sample(x0.to(self.device), ts) * mask + (1.0 - mask) * img
            _, pred_x0 = self.model.model_predictions(img, ts, conditioning, unconditional_guidance_scale,
                                                      unconditional_conditioning)
            first_order = prev_x0 is None or (i == total_steps - 1
                                               and total_steps < self.lower_order_final_below)
            img = self._step(img, pred_x0, None if first_order else prev_x0, i)
            prev_x0 = pred_x0
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            index = total_steps - i - 1
            if index % log_every_t == 0 or index == total_steps - 1:
                intermediates["x_inter"].append(img)
                intermediates["pred_x0"].append(pred_x0)
        return img, intermediates

    def _step(self, x: torch.Tensor, x0: torch.Tensor, prev_x0: Optional[torch.Tensor], i: int) -> torch.Tensor:
        """x_{t_i} -> x_{t_{i+1}}; second order (DPM-Solver++(2M)) when the previous x0 is given."""
        s, t = i, i + 1
        h = self.lambdas[t] - self.lambdas[s]
        phi = np.expm1(-h)  # e^{-h} - 1
        ratio = float(self.sigmas[t] / self.sigmas[s])
        coef = float(-self.alphas[t] * phi)
        if prev_x0 is None:
            return ratio * x + coef * x0
        r = (self.lambdas[s] - self.lambdas[s - 1]) / h
        d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * prev_x0
        return ratio * x + coef * d


def get_sampler(name: str, model: Any) -> Any:
    """A sampler for ``model`` by name: ``"ddim"`` (DDIMSampler) or ``"dpmpp2m"`` (DPMSolverSampler)."""
    key = str(name).lower()
    if key == "ddim":
        return DDIMSampler(model)
    if key == "dpmpp2m":
        return DPMSolverSampler(model)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
