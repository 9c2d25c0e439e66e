"""DPM-Solver++(2M) with the CompVis sampler interface: a thin adapter over the ``dpmpp2m`` registry sampler.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
Algorithm 2 (multistep, data prediction), on the model's own discrete schedule (a VP process) and integer
training timesteps; see :func:`ldm.models.diffusion.samplers.sample_dpmpp_2m`.

``get_sampler(name, model)`` gives the CompVis-style sampler object for a registry name.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.samplers import SAMPLERS, check_sampler, dpmpp_2m_step, vp_coefficients
from ldm.modules.diffusionmodules.util import DPM_SKIP_TYPES, dpm_solver_timesteps

logger = logging.getLogger(__name__)

__all__ = ["DPMSolverSampler", "SAMPLERS", "dpm_solver_timesteps", "get_sampler"]


class DPMSolverSampler(DDIMSampler):
    """Deterministic DPM-Solver++(2M) sampling with a trained diffusion model (DDIMSampler's ``sample``).

    Step ``i`` goes from timestep ``t_{i-1}`` to ``t_i`` (descending from ``T - 1`` to 0, as many model
    calls as steps). ``eta``, ``temperature``, ``noise_dropout`` and ``ddim_discretize`` are ignored;
    ``score_corrector`` and ``quantize_x0`` raise ``ValueError``.

    Args:
        model: a :class:`~ldm.models.diffusion.ddpm.DDPM` (or subclass) exposing ``alphas_cumprod``,
            ``num_timesteps`` and ``denoiser``.
        skip_type: how the visited timesteps are spaced (see :func:`dpm_solver_timesteps`).
    """

    name, label = "dpmpp2m", "DPM-Solver++(2M)"
    supports_corrections = False

    def __init__(self, model: Any, skip_type: str = "logSNR") -> None:
        if skip_type not in DPM_SKIP_TYPES:
            raise ValueError(f"unknown skip_type {skip_type!r}; choose one of {', '.join(DPM_SKIP_TYPES)}")
        super().__init__(model)
        self.skip_type = skip_type

    def make_schedule(self, num_steps: int, *args: Any, verbose: bool = False, **kwargs: Any) -> None:
        """Choose the visited timesteps and their alpha, sigma and lambda (float64 on the host)."""
        if self.model.alphas_cumprod.shape[0] != self.ddpm_num_timesteps:
            raise ValueError("the model's alphas_cumprod does not have num_timesteps entries")
        self.timesteps = dpm_solver_timesteps(num_steps, self.model.alphas_cumprod, self.skip_type)
        abar = self.model.alphas_cumprod.detach().double().cpu().numpy()[self.timesteps]
        self.alphas, self.sigmas, self.lambdas = vp_coefficients(abar)

    def grid(self) -> np.ndarray:
        return self.timesteps

    def _eta(self, eta: float) -> float:
        if eta:
            logger.debug("DPMSolverSampler is deterministic: eta=%s ignored", eta)
        return 0.0

    def _step(self, x: torch.Tensor, x0: torch.Tensor, prev_x0: Optional[torch.Tensor], i: int) -> torch.Tensor:
        """x_{t_i} -> x_{t_{i+1}}; second order (DPM-Solver++(2M)) when the previous x0 is given."""
        return dpmpp_2m_step(x, x0, prev_x0, i, self.alphas, self.sigmas, self.lambdas)


def get_sampler(name: str, model: Any) -> DDIMSampler:
    """The CompVis-style sampler object for registry name ``name`` (``ddim`` or ``dpmpp2m``) and ``model``."""
    key = check_sampler(name)
    adapters = {cls.name: cls for cls in (DDIMSampler, DPMSolverSampler)}
    if key not in adapters:
        raise ValueError(f"sampler {name!r} has no CompVis sampler object (use model.sample for it); "
                         f"choose one of {', '.join(adapters)}")
    return adapters[key](model)
