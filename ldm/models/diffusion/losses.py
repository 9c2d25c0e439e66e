"""The diffusion loss, written once: the simple loss weighted by the per-step log-variance, plus the VLB term,
over the model's channels or over channel groups (the joint image + mask mode's mask channels).

With no group it is the CompVis loss::

    loss = l_simple_weight * mean_b(L_b / exp(logvar_t) + logvar_t) + original_elbo_weight * mean_b(lvlb_t * L_b)

where ``L_b`` is the per-sample mean of the element loss (``l1`` or ``l2``) against the target (the noise for
``eps``, the clean latents for ``x0``). Each :class:`LossGroup` takes its channels out of ``L_b`` and adds
``weight * sum_b(w_b L^g_b / exp(logvar_t)) / sum_b(w_b)`` inside the simple part and ``w_b L^g_b`` inside the VLB.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class LossGroup:
    """The channels ``start:`` of the latents (up to the next group's start) as a separately weighted group: its
    samples weighted by ``sample_weights`` [B] (bool or float, e.g. which examples have a mask), the group by
    ``weight``; logged as ``<name>_loss_simple`` and ``<name>_fraction`` (the mean sample weight)."""

    name: str
    start: int
    sample_weights: torch.Tensor
    weight: float = 1.0


def element_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2") -> torch.Tensor:
    """Elementwise ``|target - pred|`` (``l1``) or ``(target - pred)^2`` (``l2``)."""
    if loss_type == "l1":
        return (target - pred).abs()
    if loss_type == "l2":
        return torch.nn.functional.mse_loss(target, pred, reduction="none")
    raise ValueError(f"loss_type must be 'l1' or 'l2', got {loss_type!r}")


def diffusion_loss(per_element: torch.Tensor, t: torch.Tensor, logvar: torch.Tensor, lvlb_weights: torch.Tensor, *,
                   l_simple_weight: float = 1.0, original_elbo_weight: float = 0.0, learn_logvar: bool = False,
                   prefix: str = "train", groups: Sequence[LossGroup] = ()) -> tuple[torch.Tensor, dict]:
    """The loss and its log entries (``<prefix>/loss_simple``, ``loss_vlb``, ``loss``; ``loss_gamma`` and ``logvar``
    with a learned log-variance; per group ``<name>_loss_simple`` and ``<name>_fraction``) from the element loss
    ``[B, C, ...]`` at timesteps ``t`` [B] (see the module docstring)."""
    dims = list(range(1, per_element.ndim))
    starts = [g.start for g in groups] + [per_element.shape[1]]
    loss_simple = (per_element if not groups else per_element[:, :starts[0]]).mean(dim=dims)
    logvar_t = logvar[t].to(loss_simple.device)
    loss = loss_simple / torch.exp(logvar_t) + logvar_t
    log = {f"{prefix}/loss_simple": loss_simple.mean() if not groups else loss_simple.mean().detach()}
    if learn_logvar:
        log[f"{prefix}/loss_gamma"] = loss.mean()
        log["logvar"] = logvar.data.mean()
    loss = loss.mean()
    vlb_simple = loss_simple
    for group, stop in zip(groups, starts[1:]):
        simple = per_element[:, group.start:stop].mean(dim=dims)
        weights = group.sample_weights.to(simple.dtype)
        n = weights.sum()
        part = (weights * simple / torch.exp(logvar_t)).sum() / n.clamp_min(1.0)
        loss = loss + group.weight * part
        vlb_simple = vlb_simple + weights * simple
        log[f"{prefix}/{group.name}_loss_simple"] = part.detach()
        log[f"{prefix}/{group.name}_fraction"] = (n / len(weights)).detach()
    loss = l_simple_weight * loss
    loss_vlb = (lvlb_weights[t] * vlb_simple).mean()
    log[f"{prefix}/loss_vlb"] = loss_vlb if not groups else loss_vlb.detach()
    loss = loss + original_elbo_weight * loss_vlb
    log[f"{prefix}/loss"] = loss
    return loss, log
