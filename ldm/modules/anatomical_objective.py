"""The anatomical objective in one place: mask targets read from a batch, named loss terms from one registry,
their weights, the schedule of the total weight, and the training statistics.

One training step of :class:`~ldm.models.diffusion.anatomical_ddpm.AnatomicalLatentDiffusion` adds

    w(step) * sum_k weight_k * term_k(seg_logits, class attention, mask, lambda(t))

where the terms are named in :data:`LOSS_TERMS` (``segmentation_ce``, ``segmentation_dice``, ``alignment_majority``,
``alignment_soft``). The shipped parameters choose them (``segmentation_loss``, ``alignment_target``,
``attention_alignment_weight``); ``anatomical_loss_terms: {name: weight}`` names them directly. A new term is one
function of :class:`TermInputs` and one entry in :data:`LOSS_TERMS`.

Everything here receives what it needs as arguments: the masks and which pixels are labelled are values, the
diffusion schedule (``alphas_cumprod``) and the step are passed in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.data.batch import masks_from_batch
from ldm.modules.anatomical_losses import (ALIGNMENT_TARGETS, SEGMENTATION_LOSSES, TIMESTEP_WEIGHTINGS, check_choice,
                                           class_onehot, mean_soft_alignment_loss, mode_downsample, soft_dice_loss,
                                           timestep_weights)
from ldm.modules.diffusionmodules.util import resize_maps
from ldm.modules.dice import class_argmax, dice_counts, dice_from_counts

ANATOMICAL_SCHEDULES = ("warmup_decay", "constant", "cosine", "ramp")
DEFAULT_ANATOMICAL_LOSS_WEIGHT = 0.1


# ------------------------------------------------------------------------------------------------- targets
def batch_masks(batch: Mapping[str, Any], key: str, ignore_index: int,
                bs: Optional[int] = None, dims: int = 2) -> Optional[torch.Tensor]:
    """The batch's masks ``[B, H, W]`` (``dims`` 3: ``[B, D, H, W]``) as int64 on the device they came on,
    examples without ``has_segmentation`` set to ``ignore_index``; ``None`` when the batch has no ``key``."""
    if key not in batch:
        return None
    mask = masks_from_batch(batch, key, ignore_index, dims)
    return mask if bs is None else mask[:bs]


def check_mask_labels(mask: torch.Tensor, num_classes: int, ignore_index: int, key: str = "segmentation") -> bool:
    """Whether ``mask`` has a labelled pixel; ValueError if it holds a label outside ``0..C-1`` other than
    ``ignore_index``. Reads the results back: call it on CPU masks."""
    valid = mask != ignore_index
    bad = valid & ((mask < 0) | (mask >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"batch['{key}'] holds labels outside 0..{num_classes - 1} (and ignore index {ignore_index}): "
                         f"found {sorted(mask[valid].unique().tolist())[:10]}; set num_anatomical_classes in the UNet "
                         "config")
    return bool(valid.any())


# ------------------------------------------------------------------------------------------------- schedule
def loss_weight_at(step: int, weight: float, warmup_steps: int, schedule: str = "warmup_decay",
                   progressive: bool = True) -> float:
    """The total anatomical weight ``w(step)``: ``"warmup_decay"`` (2w until W, linear to w at 2W, then w),
    ``"cosine"`` (2w at step 0 falling to w at 2W along a half cosine, then w), ``"ramp"`` (0 at step 0 rising
    linearly to w at W, then w: the mask loss comes in after the network has begun to draw) or ``"constant"``;
    ``w`` when not ``progressive`` or ``warmup_steps`` is 0."""
    step, w, warm = int(step), float(weight), int(warmup_steps)
    if not progressive or schedule == "constant" or warm == 0:
        return w
    if schedule == "warmup_decay":
        if step < warm:
            return 2.0 * w
        if step < 2 * warm:
            return w * (2.0 - (step - warm) / warm)
        return w
    if schedule == "ramp":
        return w * min(max(step, 0) / warm, 1.0)
    progress = min(max(step, 0) / (2.0 * warm), 1.0)  # cosine
    return w * (1.0 + 0.5 * (1.0 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------------------- terms
def weighted_nll(log_probs: torch.Tensor, target: torch.Tensor, ignore_index: int,
                 class_weights: Optional[torch.Tensor] = None,
                 sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean NLL over non-ignored pixels (class-weighted when ``class_weights`` is given), each sample's pixels
    scaled by ``sample_weights[b]`` (the normaliser stays unscaled); exactly 0 (graph kept) with none labelled.
    Nothing is read back to the host."""
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    nll = F.nll_loss(log_probs, safe, reduction="none")  # [B, H, W]: -log_probs at the target class
    weights = valid.to(nll.dtype)
    if class_weights is not None:
        weights = weights * class_weights.to(nll.dtype)[safe]
    total = weights.sum()
    total = torch.where(total > 0, total, 1.0)  # nothing weighted: the sums below are 0, and 0 / 1 = 0
    if sample_weights is not None:
        per_sample = sample_weights.to(nll.dtype).view(-1, *([1] * (nll.dim() - 1)))
        return (nll * weights * per_sample).sum() / total
    return (nll * weights).sum() / total


@dataclass(frozen=True)
class TermInputs:
    """What a loss term reads: ``log_probs`` of the seg logits at the mask's size [B, C, H, W], the integer ``mask``
    [B, H, W], the layer-averaged ``class_attention`` [B, C, h, w] (``None`` unless a term needs it), the register
    layers' class attention ``layers``, per-sample ``sample_weights`` lambda(t) (``None``: 1), the mask's one-hot
    (``None`` unless a term needs it), the class count, the ignore index and the optional class weights."""

    log_probs: torch.Tensor
    mask: torch.Tensor
    class_attention: Optional[torch.Tensor]
    layers: Sequence[torch.Tensor]
    sample_weights: Optional[torch.Tensor]
    onehot: Optional[torch.Tensor]
    num_classes: int
    ignore_index: int
    class_weights: Optional[torch.Tensor]


def segmentation_ce(x: TermInputs) -> torch.Tensor:
    """Class-weighted CE of the seg logits against the mask (labelled pixels)."""
    return weighted_nll(x.log_probs, x.mask, x.ignore_index, x.class_weights, x.sample_weights)


def segmentation_dice(x: TermInputs) -> torch.Tensor:
    """``1 - soft Dice`` over the foreground classes, per sample (:func:`~ldm.modules.anatomical_losses.soft_dice_loss`)."""
    return soft_dice_loss(x.log_probs.exp(), x.mask, x.ignore_index, x.sample_weights, onehot=x.onehot)


def alignment_majority(x: TermInputs) -> torch.Tensor:
    """CE of the layer-averaged class attention against the mask majority-voted to its size (the first version)."""
    small = mode_downsample(x.mask, x.class_attention.shape[2:], x.num_classes, x.ignore_index)
    return weighted_nll(torch.log(x.class_attention.float().clamp_min(1e-6)), small, x.ignore_index,
                        x.class_weights, x.sample_weights)


def alignment_soft(x: TermInputs) -> torch.Tensor:
    """Mean over register layers of the soft CE against the class area fractions at each layer's resolution."""
    return mean_soft_alignment_loss(list(x.layers) or [x.class_attention], x.mask, x.num_classes, x.ignore_index,
                                    sample_weights=x.sample_weights, onehot=x.onehot)


@dataclass(frozen=True)
class LossTerm:
    """A registered term: its function, the statistic it is logged as, and what it reads beyond the logits
    (``needs_onehot``: the mask's one-hot; ``needs_average``: the layer-averaged class attention)."""

    fn: Callable[[TermInputs], torch.Tensor]
    stat: str
    needs_onehot: bool = False
    needs_average: bool = False


LOSS_TERMS: dict[str, LossTerm] = {
    "segmentation_ce": LossTerm(segmentation_ce, "anatomical_seg_ce"),
    "segmentation_dice": LossTerm(segmentation_dice, "anatomical_dice_loss", needs_onehot=True),
    "alignment_majority": LossTerm(alignment_majority, "anatomical_alignment_ce", needs_average=True),
    "alignment_soft": LossTerm(alignment_soft, "anatomical_alignment_ce", needs_onehot=True),
}


def shipped_terms(segmentation_loss: str = "ce", alignment_target: str = "majority",
                  alignment_weight: float = 0.5) -> dict[str, float]:
    """The terms the shipped parameters name: ``segmentation_ce`` (1), ``segmentation_dice`` (1, with
    ``segmentation_loss: ce_dice``) and ``alignment_<alignment_target>`` (``alignment_weight``)."""
    check_choice("segmentation_loss", segmentation_loss, SEGMENTATION_LOSSES)
    check_choice("alignment_target", alignment_target, ALIGNMENT_TARGETS)
    terms = {"segmentation_ce": 1.0}
    if segmentation_loss == "ce_dice":
        terms["segmentation_dice"] = 1.0
    terms[f"alignment_{alignment_target}"] = float(alignment_weight)
    return terms


def check_terms(terms: Mapping[str, float]) -> dict[str, float]:
    """``terms`` as ``{name: float weight}``; ValueError for an unknown name, a negative weight, no terms, or two
    terms logged under the same statistic."""
    if not terms:
        raise ValueError(f"anatomical_loss_terms is empty; name at least one of {sorted(LOSS_TERMS)}")
    unknown = sorted(set(terms) - set(LOSS_TERMS))
    if unknown:
        raise ValueError(f"unknown anatomical loss terms {unknown}; choose from {sorted(LOSS_TERMS)}")
    out = {name: float(weight) for name, weight in terms.items()}
    negative = {name: w for name, w in out.items() if w < 0}
    if negative:
        raise ValueError(f"anatomical loss term weights must be >= 0, got {negative}")
    stats = [LOSS_TERMS[name].stat for name in out]
    if len(set(stats)) != len(stats):
        raise ValueError(f"anatomical loss terms {sorted(out)} include two alignment terms; choose one")
    return out


# ------------------------------------------------------------------------------------------------- objective
class AnatomicalObjective(nn.Module):
    """The anatomical loss: named terms (:data:`LOSS_TERMS`) with their weights, a per-sample timestep weighting,
    the total weight's schedule, and the Dice statistics of the predicted masks.

    Args:
        num_classes: classes of the masks (the UNet's ``num_anatomical_classes``; 0: not known, the class weights'
            length is then not checked).
        ignore_index: mask value excluded from every term and statistic.
        terms: ``{name: weight}`` of the terms (see :func:`shipped_terms` for the shipped choice).
        class_weights: optional per-class weights of the CE terms (length ``num_classes``), >= 0.
        timestep_weighting: ``"none"``, ``"alpha_bar"`` or ``"snr"`` (:func:`~ldm.modules.anatomical_losses.timestep_weights`).
        loss_weight: the base total weight ``w``.
        schedule, warmup_steps, progressive: the total weight's schedule (:func:`loss_weight_at`).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, terms: Optional[Mapping[str, float]] = None,
                 class_weights: Optional[Sequence[float]] = None, timestep_weighting: str = "none",
                 loss_weight: float = DEFAULT_ANATOMICAL_LOSS_WEIGHT, schedule: str = "warmup_decay",
                 warmup_steps: int = 5000, progressive: bool = True) -> None:
        super().__init__()
        check_choice("anatomical_schedule", schedule, ANATOMICAL_SCHEDULES)
        if int(warmup_steps) < 0:
            raise ValueError(f"anatomical_warmup_steps must be >= 0, got {warmup_steps}")
        if float(loss_weight) < 0:
            raise ValueError("anatomical_loss_weight and attention_alignment_weight must be >= 0")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.terms = check_terms(shipped_terms() if terms is None else terms)
        self.timestep_weighting = check_choice("anatomical_timestep_weighting", timestep_weighting,
                                               TIMESTEP_WEIGHTINGS)
        self.loss_weight = float(loss_weight)
        self.schedule, self.warmup_steps, self.progressive = schedule, int(warmup_steps), bool(progressive)
        weights = None
        if class_weights is not None:
            weights = torch.as_tensor(list(class_weights), dtype=torch.float32)
            if self.num_classes and weights.numel() != self.num_classes:
                raise ValueError(f"anatomical_class_weights has {weights.numel()} entries; the UNet has "
                                 f"num_anatomical_classes={self.num_classes}")
            if (weights < 0).any():
                raise ValueError("anatomical_class_weights must be >= 0")
        self.register_buffer("class_weights", weights, persistent=False)

    @property
    def needs_average(self) -> bool:
        """Whether a term reads the layer-averaged class attention (else it need not be formed)."""
        return any(LOSS_TERMS[name].needs_average for name in self.terms)

    def weight(self, step: int) -> float:
        """The total weight ``w(step)`` (:func:`loss_weight_at`)."""
        return loss_weight_at(step, self.loss_weight, self.warmup_steps, self.schedule, self.progressive)

    def forward(self, seg_logits: torch.Tensor, class_attention: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                *, layer_class_attention: Optional[Mapping[str, torch.Tensor]] = None, t: Optional[torch.Tensor] = None,
                alphas_cumprod: Optional[torch.Tensor] = None, statistics: bool = True) -> tuple[torch.Tensor, dict]:
        """``sum_k weight_k * term_k`` (before ``w(step)``) and the statistics (detached tensors, the same keys for
        every batch with a mask): each term's value under its statistic and, with ``statistics``, the Dice of the
        argmax (:meth:`dice_stats`).

        ``seg_logits`` may be at latent or image size (resized bilinearly to the mask's size); ``class_attention``
        may be ``None`` when no term needs the average and ``layer_class_attention`` (block key -> [B, C, h_l, w_l])
        is given; ``t`` with ``alphas_cumprod`` gives the timestep weighting (none without ``t``). ``mask`` ``None``:
        exactly 0 with a graph, no statistics. Nothing is read back to the host.
        """
        layers = list((layer_class_attention or {}).values())
        if class_attention is None and (self.needs_average or not layers):
            raise ValueError("anatomical_loss needs class_attention for alignment_target 'majority' or without "
                             "layer_class_attention")
        attentions = layers if class_attention is None else [class_attention, *layers]
        if mask is None:
            return (seg_logits * 0.0).sum() + sum((a * 0.0).sum() for a in attentions), {}
        if t is not None and alphas_cumprod is None:
            raise ValueError("the timestep weighting needs alphas_cumprod with t")
        weights = None if t is None else timestep_weights(alphas_cumprod, t, self.timestep_weighting)
        logits = seg_logits.float()
        if tuple(logits.shape[2:]) != tuple(mask.shape[1:]):
            logits = resize_maps(logits, mask.shape[1:])
        # one one-hot of the mask per step, shared by the terms that read it
        onehot = (class_onehot(mask, self.num_classes, self.ignore_index)
                  if any(LOSS_TERMS[name].needs_onehot for name in self.terms) else None)
        inputs = TermInputs(F.log_softmax(logits, dim=1), mask, class_attention, layers, weights, onehot,
                            self.num_classes, self.ignore_index, self.class_weights)
        loss, stats = None, {}
        for name, weight in self.terms.items():
            value = LOSS_TERMS[name].fn(inputs)
            stats[LOSS_TERMS[name].stat] = value.detach()
            loss = weight * value if loss is None else loss + weight * value
        if weights is not None:
            stats["anatomical_timestep_weight"] = weights.detach().mean()
        if statistics:
            stats.update(self.dice_stats(class_argmax(logits.detach()), mask))
        return loss, stats

    @torch.no_grad()
    def dice_stats(self, pred: torch.Tensor, mask: torch.Tensor) -> dict:
        """Dice of ``pred`` against ``mask`` over the labelled pixels, as tensors on the device:
        ``anatomical_dice_<c>`` per class (1 for a class absent from both) and ``anatomical_dice``, the mean over the
        foreground classes present in the labels (over all foreground classes when none is). No loop over classes,
        nothing read back to the host."""
        inter, p_count, g_count = dice_counts(pred, mask, self.num_classes, self.ignore_index)
        present = g_count > 0
        dice = dice_from_counts(inter, p_count, g_count, empty=1.0, dtype=torch.float32)  # [C]
        fg, fg_present = dice[1:], present[1:].float()
        mean_present = (fg * fg_present).sum() / fg_present.sum().clamp_min(1.0)
        stats = {f"anatomical_dice_{c}": dice[c] for c in range(self.num_classes)}
        stats["anatomical_dice"] = torch.where(fg_present.sum() > 0, mean_present, fg.mean())
        return stats
