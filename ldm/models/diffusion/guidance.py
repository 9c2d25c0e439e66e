"""Mask-free anatomy guidance: steer sampling with the model's own segmentation head.

An anatomical model's segmentation head is trained at every noise level, so at step ``t`` it is a noisy
classifier p(mask | x_t) of the model itself. :class:`AnatomicalEnergy` turns its class probabilities into
a differentiable energy ``E(p)`` written from the label set's rules (for CT-Organ those of
:mod:`ldm.data.anatomy_check`), and :class:`AnatomyGuidance` moves every step's noise prediction along the
energy's gradient w.r.t. ``x_t``, as classifier guidance does (Dhariwal & Nichol 2021, eq. 14 / Algorithm 2,
with ``-log p(y | x_t)`` replaced by ``E``)::

    eps' = eps + s * sqrt(1 - alpha_bar_t) * grad_x E(softmax(seg_logits(x_t, t)))
    x0'  = (x_t - sqrt(1 - alpha_bar_t) * eps') / sqrt(alpha_bar_t)

It acts through the denoiser every registry sampler calls (``sample_model(..., make_denoiser=
guidance.denoiser)``), so ddim, dpmpp2m and ancestral all take it. Scale 0 builds the plain denoiser and
does no extra work: samples are bit-identical to unguided sampling. Each guided step costs one forward
pass with autograd plus one backward pass to the input (``bench/guidance.py`` measures the ratio).

The head can be fooled: lower energy under the model's own head is not evidence of better anatomy; judge
guided samples with an independent segmenter (``bench/anatomy.py``).
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F

from ldm.data.labels import LabelSet, get_label_set
from ldm.data.phantom_rules import PHANTOM_THRESHOLDS
from ldm.models.diffusion.samplers import Denoiser
from ldm.modules.diffusionmodules.util import extract_into_tensor
from ldm.util import nonnegative_number

logger = logging.getLogger(__name__)

TermFn = Callable[[torch.Tensor], dict[str, torch.Tensor]]
"""``terms(probs [B, C, H, W]) -> {name: energy [B]}``."""

PRESENCE_SCALE = 0.005  # mean class probability at which a class counts as 1 - 1/e present (0.5 % of the image)
SIDE_SOFTNESS = 0.05  # width (in normalised coordinates) of the soft step that splits left from right


# ------------------------------------------------------------------------------------------ energy terms
def _grid(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised pixel-centre coordinates ``u`` (columns) and ``v`` (rows) in [-1, 1], shaped [H, W]."""
    h, w = probs.shape[-2:]
    v = (torch.arange(h, device=probs.device, dtype=probs.dtype) + 0.5) / h * 2.0 - 1.0
    u = (torch.arange(w, device=probs.device, dtype=probs.dtype) + 0.5) / w * 2.0 - 1.0
    return u[None, :].expand(h, w), v[:, None].expand(h, w)


def soft_presence(probs: torch.Tensor, scale: float = PRESENCE_SCALE) -> torch.Tensor:
    """``1 - exp(-mean_pixels(p_c) / scale)`` per class [B, C]: 0 for an absent class, near 1 once it covers
    a few times ``scale`` of the image."""
    return 1.0 - torch.exp(-probs.mean(dim=(2, 3)) / scale)


def _mass_fraction(p: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Fraction of the probability mass ``p`` [B, H, W] inside the soft ``region`` [H, W] (0 with no mass)."""
    return (p * region).sum(dim=(1, 2)) / (p.sum(dim=(1, 2)) + 1e-6)


def border_energy(probs: torch.Tensor) -> torch.Tensor:
    """Mean foreground probability (1 - p_background) in the checker's border band (``inside_field``,
    ``PHANTOM_THRESHOLDS.border``) [B]."""
    h, w = probs.shape[-2:]
    band = max(1, int(round(PHANTOM_THRESHOLDS.border * min(h, w))))
    inner = torch.zeros(h, w, dtype=torch.bool, device=probs.device)
    inner[band:h - band, band:w - band] = True
    return (1.0 - probs[:, 0])[:, ~inner].mean(dim=1)


def entropy_energy(probs: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel entropy of the class distribution, divided by log C (0 confident, 1 uniform) [B]."""
    ent = -(probs * torch.log(probs.clamp_min(1e-8))).sum(dim=1)
    return ent.mean(dim=(1, 2)) / math.log(probs.shape[1])


def generic_terms(probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Terms that hold for any label set whose class 0 is background: border and entropy."""
    return {"border": border_energy(probs), "entropy": entropy_energy(probs)}


def ctorgan_terms(probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """CT-Organ terms [B] from the phantom rules (:mod:`ldm.data.anatomy_check`; display orientation, the
    patient's right on the image's left), with the checker's thresholds (``th = PHANTOM_THRESHOLDS``,
    :mod:`ldm.data.phantom_rules`):

    - ``co_occurrence``: soft presences ``P`` multiplied for class pairs that never share a slice:
      ``P_bladder * (P_lungs + P_liver + P_kidneys) + P_lungs * P_kidneys``;
    - ``laterality``: the share of liver mass right of the midline beyond the allowed ``1 - th.liver_right_frac``,
      times ``P_liver``;
    - ``position``: kidney mass off the spine's sides (|u| < ``th.kidney_lateral[0]`` or in front,
      v < ``th.kidney_min_v``), bladder mass off its place (|u| >= ``th.bladder_lateral`` or v >= ``th.bladder_max_v``),
      lung mass on the midline (|u| < ``th.lung_spine_gap``), as fractions of each organ's mass;
    - ``spine``: ``1 - presence`` of bone near the midline in the posterior half (|u| < ``th.spine_half_width``,
      v > ``th.spine_min_v``);
    - ``border`` and ``entropy`` as :func:`generic_terms`.
    """
    if probs.shape[1] != 6:
        raise ValueError(f"the ctorgan energy needs 6 class probabilities (background, liver, bladder, lungs, "
                         f"kidneys, bone), got {probs.shape[1]}")
    from ldm.data.anatomy_check import BLADDER, BONE, KIDNEYS, LIVER, LUNGS

    th = PHANTOM_THRESHOLDS
    u, v = _grid(probs)
    pres = soft_presence(probs)
    co = pres[:, BLADDER] * (pres[:, LUNGS] + pres[:, LIVER] + pres[:, KIDNEYS]) + pres[:, LUNGS] * pres[:, KIDNEYS]
    right = torch.sigmoid(u / SIDE_SOFTNESS)
    liver_right = _mass_fraction(probs[:, LIVER], right)
    laterality = F.relu(liver_right - (1.0 - th.liver_right_frac)) * pres[:, LIVER]
    kidney_midline = (u.abs() < th.kidney_lateral[0]).to(probs.dtype)
    kidney_off = torch.clamp(kidney_midline + (v < th.kidney_min_v).to(probs.dtype), max=1.0)
    bladder_off = ((u.abs() >= th.bladder_lateral) | (v >= th.bladder_max_v)).to(probs.dtype)
    lung_midline = (u.abs() < th.lung_spine_gap).to(probs.dtype)
    position = (_mass_fraction(probs[:, KIDNEYS], kidney_off) * pres[:, KIDNEYS]
                + _mass_fraction(probs[:, BLADDER], bladder_off) * pres[:, BLADDER]
                + _mass_fraction(probs[:, LUNGS], lung_midline) * pres[:, LUNGS])
    spine_region = ((u.abs() < th.spine_half_width) & (v > th.spine_min_v)).to(probs.dtype)
    spine = 1.0 - soft_presence((probs[:, BONE] * spine_region)[:, None])[:, 0]
    return {"co_occurrence": co, "laterality": laterality, "position": position, "spine": spine,
            **generic_terms(probs)}


ENERGY_TERMS: dict[str, TermFn] = {"ctorgan": ctorgan_terms}
"""Label-set name -> its energy terms; any other label set gets :func:`generic_terms`."""
DEFAULT_WEIGHTS: dict[str, float] = {"co_occurrence": 1.0, "laterality": 1.0, "position": 1.0, "spine": 1.0,
                                     "border": 1.0, "entropy": 0.1}


class AnatomicalEnergy:
    """Differentiable anatomical energy ``E(p) = sum_k w_k * term_k(p)`` of class probabilities [B, C, H, W].

    The terms come from ``ENERGY_TERMS[label_set]`` (CT-Organ: :func:`ctorgan_terms`) or :func:`generic_terms`;
    probabilities at latent or image resolution both work (coordinates are normalised).

    Args:
        label_set: a :class:`~ldm.data.labels.LabelSet` or its registry name.
        weights: term name -> weight (>= 0), overriding ``DEFAULT_WEIGHTS`` for the names given.
    """

    def __init__(self, label_set: LabelSet | str, weights: Optional[Mapping[str, float]] = None) -> None:
        self.label_set = get_label_set(label_set) if isinstance(label_set, str) else label_set
        self.term_fn: TermFn = ENERGY_TERMS.get(self.label_set.name, generic_terms)
        names = list(self.term_fn(torch.full((1, self.label_set.num_classes, 4, 4),
                                             1.0 / self.label_set.num_classes)))
        given = dict(weights or {})
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(f"unknown anatomy energy terms {unknown} for label set {self.label_set.name!r}; "
                             f"its terms are {names}")
        bad = {k: w for k, w in given.items() if not (math.isfinite(float(w)) and float(w) >= 0)}
        if bad:
            raise ValueError(f"anatomy energy weights must be finite and >= 0, got {bad}")
        self.weights = {k: float(given.get(k, DEFAULT_WEIGHTS.get(k, 1.0))) for k in names}

    def terms(self, probs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each term's energy [B] (unweighted)."""
        if probs.ndim != 4 or probs.shape[1] != self.label_set.num_classes:
            raise ValueError(f"expected class probabilities [B, {self.label_set.num_classes}, H, W] for label set "
                             f"{self.label_set.name!r}, got shape {tuple(probs.shape)}")
        return self.term_fn(probs)

    def __call__(self, probs: torch.Tensor) -> torch.Tensor:
        """The weighted energy [B]."""
        terms = self.terms(probs)
        total = torch.zeros(probs.shape[0], device=probs.device, dtype=probs.dtype)
        for name, value in terms.items():
            if self.weights[name] != 0.0:
                total = total + self.weights[name] * value
        return total


# ------------------------------------------------------------------------------------------- guidance
def check_guidance_scale(scale: Any, model: Optional[torch.nn.Module] = None) -> float:
    """``scale`` as a float; ``ValueError`` unless it is finite and >= 0, and (when > 0 and ``model`` is given)
    the model predicts masks."""
    value = nonnegative_number(scale, "anatomy_guidance", " (0: off)")
    if value > 0 and model is not None and not (getattr(model, "use_anatomy", False)
                                                and hasattr(model, "apply_model_with_anatomy")):
        raise ValueError(f"anatomy_guidance > 0 needs an anatomical model (AnatomicalLatentDiffusion with "
                         f"use_anatomical_registers: true); got a {type(model).__name__}")
    return value


class AnatomyGuidance:
    """Classifier-style guidance of any registry sampler by the model's own segmentation head
    (Dhariwal & Nichol 2021, Algorithm 2; see the module docstring).

    Use ``sample_model(model, sampler, x_T, steps, make_denoiser=AnatomyGuidance(model, s).denoiser)`` or
    ``ldm.sampling.generate(..., anatomy_guidance=s)``. After sampling, ``calls``, ``seconds`` (wall time of the
    guided denoiser calls) and ``energies`` (the batch-mean energy seen at every call) describe the run.

    Args:
        model: an ``AnatomicalLatentDiffusion`` (``apply_model_with_anatomy``, eps or x0 parameterisation).
        scale: guidance scale ``s`` >= 0; 0 returns the model's own denoiser (bit-identical sampling).
        energy: the energy of the class probabilities; default ``AnatomicalEnergy(model.label_set)``.
    """

    def __init__(self, model: torch.nn.Module, scale: float,
                 energy: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        self.scale = check_guidance_scale(scale, model)
        self.model = model
        self.energy = energy
        if energy is None and self.scale > 0:
            self.energy = AnatomicalEnergy(model.label_set)
        self.calls, self.seconds = 0, 0.0
        self.energies: list[float] = []

    def denoiser(self, cond: Any = None, clip_denoised: bool = False, noise_cond: bool = False) -> Denoiser:
        """A denoiser with :meth:`~ldm.models.diffusion.ddpm.DDPM.denoiser`'s conventions, guided when ``scale > 0``."""
        model = self.model
        if self.scale == 0.0:
            return model.denoiser(cond, clip_denoised=clip_denoised, noise_cond=noise_cond)
        if model.parameterization not in ("eps", "x0"):
            raise ValueError(f"anatomy guidance supports eps and x0 parameterisations, got {model.parameterization!r}")

        def denoise(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            start = time.perf_counter()
            step_cond = model.cond_for_step(cond, t) if noise_cond else cond
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                out = model.apply_model_with_anatomy(x_in, t, step_cond)
                energy = self.energy(torch.softmax(out.seg_logits.float(), dim=1))
                (grad,) = torch.autograd.grad(energy.sum(), x_in)
            pred = out.prediction.detach()
            eps = pred if model.parameterization == "eps" else model.predict_noise_from_start(x, t, pred)
            sigma = extract_into_tensor(model.sqrt_one_minus_alphas_cumprod, t, x.shape)
            eps = eps + self.scale * sigma * grad.to(eps.dtype)
            x0 = model.predict_start_from_noise(x, t, eps)
            self.calls += 1
            self.energies.append(float(energy.detach().mean()))
            self.seconds += time.perf_counter() - start
            return eps, (x0.clamp(-1.0, 1.0) if clip_denoised else x0)

        return denoise

    def summary(self) -> dict[str, Any]:
        """``{"scale", "calls", "seconds", "seconds_per_call", "energy_first", "energy_last"}`` of the calls so far."""
        return {"scale": self.scale, "calls": self.calls, "seconds": self.seconds,
                "seconds_per_call": self.seconds / self.calls if self.calls else None,
                "energy_first": self.energies[0] if self.energies else None,
                "energy_last": self.energies[-1] if self.energies else None}


@torch.no_grad()
def anatomy_energy(model: torch.nn.Module, z: torch.Tensor, t: Optional[torch.Tensor] = None,
                   energy: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """The energy [B] of the model's own head on latents ``z`` at step ``t`` (default 0, clean latents)."""
    if not getattr(model, "use_anatomy", False):
        raise ValueError(f"anatomy_energy needs an anatomical model; got a {type(model).__name__}")
    energy = energy or AnatomicalEnergy(model.label_set)
    return energy(torch.softmax(model.predict_anatomy(z, t).seg_logits.float(), dim=1))
