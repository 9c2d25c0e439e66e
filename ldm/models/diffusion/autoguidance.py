"""Autoguidance: guide a diffusion model with a weaker version of itself (Karras et al. 2024, "Guiding a Diffusion
Model with a Bad Version of Itself").

Classifier-free guidance extrapolates from an unconditional prediction towards a conditional one; autoguidance
extrapolates from a *guide* (the same kind of model, trained less or smaller) towards the model::

    eps' = eps_guide + w * (eps_model - eps_guide)        x0' = (x_t - sqrt(1 - alpha_bar_t) * eps') / sqrt(alpha_bar_t)

The guide makes the same kind of errors as the model, only more of them, so the difference points away from what
the weaker model gets wrong. It needs no conditioning and no training: an earlier checkpoint of the same run is a
guide (the benchmark keeps one at a quarter of the steps). ``w = 1`` is the model alone (the guide is not called:
samples are bit-identical to unguided ones); ``w > 1`` guides, at two network evaluations per step.

:class:`Autoguidance` acts through the denoiser every registry sampler calls (``sample_model(...,
make_denoiser=autoguidance.denoiser)``, ``draw_batch(..., guidance=autoguidance)``), so ddim, dpmpp2m and ancestral
all take it. The guide must denoise the same latent space: same timesteps and noise schedule, latent shape and
latent scale (``scale_factor``); a mismatch is an error before anything is sampled.
"""
from __future__ import annotations

import math
import time
from typing import Any, Optional

import torch

from ldm.models.diffusion.samplers import Denoiser
from ldm.util import nonnegative_number


def check_autoguidance_weight(weight: Any) -> float:
    """``weight`` as a float; ``ValueError`` unless it is finite and >= 0 (1: the model alone)."""
    return nonnegative_number(weight, "autoguidance weight", " (1: no guidance; Karras et al. use 1.5-3)")


def _latent_space(model: torch.nn.Module) -> dict[str, Any]:
    shape = (int(getattr(model, "channels", 0)), int(getattr(model, "image_size", 0)))
    return {"timesteps": int(model.num_timesteps), "latent shape (channels, size)": shape,
            "scale_factor": float(getattr(model, "scale_factor", 1.0))}


def check_same_latent_space(model: torch.nn.Module, guide: torch.nn.Module) -> None:
    """``ValueError`` naming what differs when ``guide`` does not denoise ``model``'s latent space."""
    a, b = _latent_space(model), _latent_space(guide)
    diff = [f"{k}: model {a[k]}, guide {b[k]}" for k in a
            if not (a[k] == b[k] or (isinstance(a[k], float) and math.isclose(a[k], b[k], rel_tol=1e-5)))]
    schedule_same = (a["timesteps"] == b["timesteps"]
                     and torch.allclose(model.alphas_cumprod.float().cpu(), guide.alphas_cumprod.float().cpu(),
                                        rtol=1e-5, atol=1e-7))
    if not schedule_same and a["timesteps"] == b["timesteps"]:
        diff.append("noise schedule (alphas_cumprod)")
    if diff:
        raise ValueError("the autoguidance guide must denoise the model's latent space (an earlier or smaller model "
                         f"of the same first stage and schedule); they differ in {'; '.join(diff)}")


class Autoguidance:
    """The model guided by a weaker ``guide`` of itself at ``weight`` ``w`` (see the module docstring).

    Args:
        model: the diffusion model that is sampled (a ``DDPM``/``LatentDiffusion``).
        guide: the weaker model (an earlier checkpoint or a smaller model of the same latent space), in eval mode on
            the model's device. It is used for guidance only: with ``guide_ema`` and EMA weights in it, its live
            weights are replaced by them once, here.
        weight: ``w``; 1 samples the model alone.
        guide_ema: use the guide's EMA weights (as the sampled model uses its own).
        description: what the guide is (e.g. its checkpoint), for the session record.
    """

    def __init__(self, model: torch.nn.Module, guide: torch.nn.Module, weight: float = 2.0, guide_ema: bool = True,
                 description: Optional[str] = None) -> None:
        if guide is model:
            raise ValueError("the autoguidance guide must be another model than the one sampled (e.g. an earlier "
                             "checkpoint of its run)")
        check_same_latent_space(model, guide)
        self.model, self.guide, self.weight = model, guide, check_autoguidance_weight(weight)
        self.description = description
        self.guide_ema = bool(guide_ema and getattr(guide, "use_ema", False) and hasattr(guide, "model_ema"))
        if self.guide_ema:
            guide.model_ema.copy_to(guide.model)
        self.guide.eval()
        self.calls, self.seconds = 0, 0.0

    def denoiser(self, cond: Any = None, clip_denoised: bool = False, noise_cond: bool = False) -> Denoiser:
        """``denoise(x, t) -> (eps', x0')`` with the same conventions as ``DDPM.denoiser`` (``clip_denoised`` clamps
        the guided x0 to [-1, 1]; ``noise_cond``: the ancestral loop's per-step conditioning)."""
        if self.weight == 1.0:
            return self.model.denoiser(cond, clip_denoised=clip_denoised, noise_cond=noise_cond)
        strong = self.model.denoiser(cond, noise_cond=noise_cond)
        weak = self.guide.denoiser(cond, noise_cond=noise_cond)
        w = self.weight

        def denoise(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            start = time.perf_counter()
            eps_model, _ = strong(x, t)
            eps_guide, _ = weak(x, t)
            eps = eps_guide + w * (eps_model - eps_guide)
            x0 = self.model.predict_start_from_noise(x, t, eps)
            self.calls += 1
            self.seconds += time.perf_counter() - start
            return eps, (x0.clamp(-1.0, 1.0) if clip_denoised else x0)
        return denoise

    def summary(self) -> dict[str, Any]:
        """``{"kind", "weight", "guide", "guide_ema", "calls", "seconds"}`` of the guided steps so far."""
        return {"kind": "autoguidance", "weight": self.weight, "guide": self.description,
                "guide_ema": self.guide_ema, "calls": self.calls, "seconds": self.seconds}
