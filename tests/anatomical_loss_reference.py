"""A frozen copy of the anatomical loss as it was at commit a5cbf62 (before the sync-free rewrite), used by
tests/test_anatomical_overhead.py to check that today's loss computes the same values for the same inputs.

Do not "fix" this file: it is the reference. ``model`` provides the configuration (``anatomical_ignore_index``,
``num_anatomical_classes``, ``anatomical_class_weights``, ``alignment_target``, ``segmentation_loss``,
``anatomical_timestep_weighting``, ``attention_alignment_weight``, ``alphas_cumprod``).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F


def timestep_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, mode: str) -> Optional[torch.Tensor]:
    if mode == "none":
        return None
    abar = alphas_cumprod.to(t.device)[t].float()
    if mode == "alpha_bar":
        return abar
    return (abar / (1.0 - abar).clamp_min(1e-12)).clamp(max=1.0)


def soft_class_targets(mask: torch.Tensor, size: Sequence[int], num_classes: int,
                       ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    size = tuple(int(s) for s in size)
    valid = mask != ignore_index
    safe = torch.where(valid, mask, torch.zeros_like(mask))
    onehot = F.one_hot(safe, num_classes).permute(0, 3, 1, 2).float() * valid.unsqueeze(1).float()
    counts = F.adaptive_avg_pool2d(onehot, size)
    labelled = F.adaptive_avg_pool2d(valid.unsqueeze(1).float(), size)[:, 0]
    fractions = counts / labelled.clamp_min(1e-12).unsqueeze(1)
    return torch.where(labelled.unsqueeze(1) > 0, fractions, torch.zeros_like(fractions)), labelled


def soft_alignment_loss(attention: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor,
                        sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    ce = -(target * torch.log(attention.float().clamp_min(1e-6))).sum(dim=1)
    total = labelled.sum()
    if total <= 0:
        return (attention * 0.0).sum()
    weights = labelled if sample_weights is None else labelled * sample_weights.view(-1, 1, 1).to(labelled.dtype)
    return (ce * weights).sum() / total


def soft_dice_loss(probs: torch.Tensor, mask: torch.Tensor, ignore_index: int,
                   sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    valid = (mask != ignore_index)
    has = valid.flatten(1).any(dim=1)
    if not has.any():
        return (probs * 0.0).sum()
    num_classes = probs.shape[1]
    safe = torch.where(valid, mask, torch.zeros_like(mask))
    onehot = F.one_hot(safe, num_classes).permute(0, 3, 1, 2).to(probs.dtype)
    v = valid.unsqueeze(1).to(probs.dtype)
    p, g = (probs * v)[:, 1:].flatten(2), (onehot * v)[:, 1:].flatten(2)
    dice = (2.0 * (p * g).sum(-1) + 1.0) / (p.sum(-1) + g.sum(-1) + 1.0)
    loss = 1.0 - dice.mean(dim=1)
    if sample_weights is not None:
        loss = loss * sample_weights.to(loss.dtype)
    return loss[has].sum() / has.sum()


def mode_downsample(mask: torch.Tensor, size: Sequence[int], num_classes: int, ignore_index: int) -> torch.Tensor:
    size = tuple(int(s) for s in size)
    if tuple(mask.shape[-2:]) == size:
        return mask
    valid = mask != ignore_index
    safe = torch.where(valid, mask, torch.full_like(mask, num_classes))
    onehot = F.one_hot(safe, num_classes + 1).permute(0, 3, 1, 2).float()
    votes = F.adaptive_avg_pool2d(onehot, size)
    winner = votes.argmax(dim=1)
    return torch.where(winner == num_classes, torch.full_like(winner, ignore_index), winner)


def weighted_ce(model: Any, log_probs: torch.Tensor, target: torch.Tensor,
                sample_weights: Optional[torch.Tensor] = None, class_weighted: bool = True) -> torch.Tensor:
    valid = target != model.anatomical_ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    nll = -log_probs.gather(1, safe.unsqueeze(1)).squeeze(1)
    weights = valid.to(nll.dtype)
    class_weights = model.objective.class_weights
    if class_weighted and class_weights is not None:
        weights = weights * class_weights.to(nll.dtype)[safe]
    total = weights.sum()
    if total <= 0:
        return (log_probs * 0.0).sum()
    if sample_weights is not None:
        return (nll * weights * sample_weights.to(nll.dtype).view(-1, 1, 1)).sum() / total
    return (nll * weights).sum() / total


@torch.no_grad()
def dice_stats(model: Any, pred: torch.Tensor, mask: torch.Tensor) -> dict:
    valid = mask != model.anatomical_ignore_index
    stats, fg = {}, []
    for c in range(model.num_anatomical_classes):
        p, g = (pred == c) & valid, (mask == c) & valid
        denom = p.sum() + g.sum()
        if g.sum() == 0:
            continue
        dice = 2.0 * (p & g).sum().float() / denom.float()
        stats[f"anatomical_dice_{c}"] = dice
        if c > 0:
            fg.append(dice)
    if fg:
        stats["anatomical_dice"] = torch.stack(fg).mean()
    return stats


def anatomical_loss(model: Any, seg_logits: torch.Tensor, class_attention: torch.Tensor,
                    mask: Optional[torch.Tensor], *, layer_class_attention: Optional[dict] = None,
                    t: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
    layers = list((layer_class_attention or {}).values())
    zero = (seg_logits * 0.0).sum() + sum((a * 0.0).sum() for a in [class_attention, *layers])
    if mask is None or not (mask != model.anatomical_ignore_index).any():
        return zero, {}
    weights = None if t is None else timestep_weights(model.alphas_cumprod, t, model.objective.timestep_weighting)
    logits = seg_logits.float()
    if logits.shape[-2:] != mask.shape[-2:]:
        logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
    log_probs = F.log_softmax(logits, dim=1)
    seg_ce = weighted_ce(model, log_probs, mask, weights)
    stats = {"anatomical_seg_ce": seg_ce.detach()}
    seg = seg_ce
    terms = model.objective.terms  # the configuration read from the objective; the arithmetic is the frozen one
    if "segmentation_dice" in terms:
        dice = soft_dice_loss(log_probs.exp(), mask, model.anatomical_ignore_index, weights)
        stats["anatomical_dice_loss"] = dice.detach()
        seg = seg + dice
    if "alignment_majority" in terms:
        small = mode_downsample(mask, class_attention.shape[-2:], model.num_anatomical_classes,
                                model.anatomical_ignore_index)
        align_ce = weighted_ce(model, torch.log(class_attention.float().clamp_min(1e-6)), small, weights)
    else:
        targets: dict = {}
        layer_terms = []
        for attention in layers or [class_attention]:
            size = tuple(attention.shape[-2:])
            if size not in targets:
                targets[size] = soft_class_targets(mask, size, model.num_anatomical_classes,
                                                   model.anatomical_ignore_index)
            layer_terms.append(soft_alignment_loss(attention, *targets[size], sample_weights=weights))
        align_ce = torch.stack(layer_terms).mean()
    alignment_weight = terms.get("alignment_majority", terms.get("alignment_soft"))
    loss = seg + alignment_weight * align_ce + zero
    stats["anatomical_alignment_ce"] = align_ce.detach()
    if weights is not None:
        stats["anatomical_timestep_weight"] = weights.detach().mean()
    stats.update(dice_stats(model, logits.detach().argmax(1), mask))
    return loss, stats
