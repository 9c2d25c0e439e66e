"""Loss terms of the anatomical supervision that keep every class and weight samples by their noise level.

- :func:`soft_class_targets`: the area fraction of every class in each cell of a layer's grid (average
  pooling of the one-hot mask over labelled pixels), so a class smaller than a cell is never deleted, as
  a majority vote would delete it.
- :func:`soft_alignment_loss`: soft cross-entropy between a layer's per-class attention mass and those
  fractions, at the layer's own resolution.
- :func:`soft_dice_loss`: ``1 - mean foreground soft Dice`` per sample (Milletari et al. 2016, V-Net, eq. 1,
  with +1 smoothing), added to an unweighted cross-entropy instead of class weights that skew the argmax; pooled
  over the batch for the mask autoencoder.
- :func:`timestep_weights`: per-sample weight ``lambda(t)`` of the anatomical losses: ``alpha_bar_t``, or
  ``min(SNR_t, 1)`` (the Min-SNR clamp, Hang et al. 2023, eq. 6 with gamma = 1), so that samples whose
  mask is nearly unpredictable (SNR << 1) count little.

Masks are ``[B, *spatial]`` and maps ``[B, C, *spatial]`` with 1, 2 or 3 spatial dimensions (slices or volumes);
the docstrings write the 2D shapes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ldm.modules.diffusionmodules.util import adaptive_avg_pool_nd

TIMESTEP_WEIGHTINGS = ("none", "alpha_bar", "snr")
ALIGNMENT_TARGETS = ("majority", "soft")
SEGMENTATION_LOSSES = ("ce", "ce_dice")


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming the parameter and the choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def timestep_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, mode: str) -> Optional[torch.Tensor]:
    """Per-sample weights ``[B]`` of the anatomical losses at timesteps ``t``; ``None`` for ``"none"``.

    ``"alpha_bar"``: ``alpha_bar_t`` (1 at t = 0, ~0 at t = T). ``"snr"``: ``min(alpha_bar_t / (1 - alpha_bar_t), 1)``.
    """
    check_choice("anatomical_timestep_weighting", mode, TIMESTEP_WEIGHTINGS)
    if mode == "none":
        return None
    abar = alphas_cumprod.to(t.device)[t].float()
    if mode == "alpha_bar":
        return abar
    return (abar / (1.0 - abar).clamp_min(1e-12)).clamp(max=1.0)


def class_onehot(mask: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Boolean one-hot ``[B, C, H, W]`` of an integer mask ``[B, H, W]``, all False at ``ignore_index`` pixels.

    One comparison against ``arange(C)`` (``F.one_hot`` builds an int64 ``[B, H, W, C]`` tensor, 8x the bytes,
    and reads the mask's min and max back to the host on the CPU). Labels outside ``0..C-1`` match no class.
    """
    classes = torch.arange(int(num_classes), device=mask.device).view(1, -1, *([1] * (mask.dim() - 1)))
    onehot = mask.unsqueeze(1) == classes
    if 0 <= int(ignore_index) < int(num_classes):
        onehot = onehot & (mask != ignore_index).unsqueeze(1)
    return onehot


def soft_class_targets(mask: torch.Tensor, size: Sequence[int], num_classes: int,
                       ignore_index: int, onehot: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Class area fractions of an integer mask ``[B, H, W]`` on a ``size`` grid.

    Returns ``(fractions [B, C, h, w], labelled [B, h, w])``: ``fractions[:, c]`` is the share of class ``c``
    among the labelled pixels of each cell (summing to 1 over classes where ``labelled > 0``, all zeros
    elsewhere); ``labelled`` is the labelled share of each cell. Pixels equal to ``ignore_index`` count in
    neither. Exact cell averages for integer factors (adaptive average pooling otherwise). ``onehot``: the mask's
    :func:`class_onehot` when the caller has it already (one per step, shared by every loss term).
    """
    size = tuple(int(s) for s in size)
    valid = mask != ignore_index
    onehot = class_onehot(mask, num_classes, ignore_index) if onehot is None else onehot
    counts = adaptive_avg_pool_nd(onehot.float(), size)  # share of each class among all pixels of a cell
    labelled = adaptive_avg_pool_nd(valid.unsqueeze(1).float(), size)[:, 0]
    fractions = counts / labelled.clamp_min(1e-12).unsqueeze(1)
    return torch.where(labelled.unsqueeze(1) > 0, fractions, torch.zeros_like(fractions)), labelled


def mode_downsample(mask: torch.Tensor, size: Sequence[int], num_classes: int, ignore_index: int) -> torch.Tensor:
    """Downsample an integer mask [B, H, W] to ``size`` by majority vote over each pooling window.

    ``ignore_index`` pixels vote for "ignore"; a window whose majority is "ignore" stays ignored. Exact
    mode for integer factors (adaptive average pooling of one-hot maps otherwise).
    """
    size = tuple(int(s) for s in size)
    if tuple(mask.shape[1:]) == size:
        return mask
    valid = mask != ignore_index
    safe = torch.where(valid, mask, torch.full_like(mask, num_classes))
    onehot = class_onehot(safe, num_classes + 1, ignore_index=-1).float()  # channel C: the "ignore" votes
    votes = adaptive_avg_pool_nd(onehot, size)
    winner = votes.argmax(dim=1)
    return torch.where(winner == num_classes, torch.full_like(winner, ignore_index), winner)


def _per_sample(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample ``weights [B]`` shaped to broadcast over ``like [B, *spatial]``, in its dtype."""
    return weights.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def soft_alignment_loss(attention: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor,
                        sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Soft cross-entropy ``-sum_c target_c log attention_c`` between a layer's class attention ``[B, C, h, w]``
    (summing to 1 over classes) and ``(target, labelled)`` = :func:`soft_class_targets` of the mask at the
    layer's resolution.

    Cells are weighted by their labelled share (and by ``sample_weights[b]`` when given) and normalised by the
    labelled share alone, so the sample weights scale the loss. Exactly 0 (graph kept) with nothing labelled.
    No value is read back to the host (no device synchronisation, no graph break under ``torch.compile``).
    """
    if target.shape != attention.shape:
        raise ValueError(f"alignment target {tuple(target.shape)} does not match the attention {tuple(attention.shape)}")
    ce = -(target * torch.log(attention.float().clamp_min(1e-6))).sum(dim=1)  # [B, h, w], finite
    weights = labelled if sample_weights is None else labelled * _per_sample(sample_weights, labelled)
    # nothing labelled: every weight is 0, so the sum is 0 and the clamp only avoids 0 / 0
    return (ce * weights).sum() / labelled.sum().clamp_min(1e-12)


def soft_dice_loss(probs: torch.Tensor, mask: torch.Tensor, ignore_index: int,
                   sample_weights: Optional[torch.Tensor] = None, pooled: bool = False,
                   smooth: float = 1.0, onehot: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``1 - mean_{c >= 1} (2 sum p_c g_c + s) / (sum p_c + sum g_c + s)`` over labelled pixels (Milletari et al.
    2016, V-Net, eq. 1, with additive smoothing ``s``).

    Per sample (default), averaged over the samples with any labelled pixel (each scaled by ``sample_weights[b]``
    when given): a class absent from a sample and not predicted scores ~1, so absent classes do not dominate.
    ``pooled``: the sums run over the whole batch at once (the mask autoencoder's loss; ``sample_weights`` must
    be None). ``probs``: softmax probabilities ``[B, C, H, W]`` at the mask's size. Exactly 0 (graph kept) with
    nothing labelled. No value is read back to the host (no device synchronisation). ``onehot``: the mask's
    :func:`class_onehot`, when the caller has it already.
    """
    valid = (mask != ignore_index)
    onehot = (class_onehot(mask, probs.shape[1], ignore_index) if onehot is None else onehot).to(probs.dtype)
    v = valid.unsqueeze(1).to(probs.dtype)
    if pooled:
        if sample_weights is not None:
            raise ValueError("soft_dice_loss(pooled=True) pools the batch: it takes no sample_weights")
        p = probs * v
        dims = (0, *range(2, probs.dim()))
        inter = (p * onehot).sum(dims)[1:]
        denom = p.sum(dims)[1:] + onehot.sum(dims)[1:]
        return 1.0 - ((2.0 * inter + smooth) / (denom + smooth)).mean()
    has = valid.flatten(1).any(dim=1)
    p, g = (probs * v)[:, 1:].flatten(2), onehot[:, 1:].flatten(2)  # the one-hot is 0 at unlabelled pixels already
    dice = (2.0 * (p * g).sum(-1) + smooth) / (p.sum(-1) + g.sum(-1) + smooth)  # [B, C-1]
    loss = 1.0 - dice.mean(dim=1)
    if sample_weights is not None:
        loss = loss * sample_weights.to(loss.dtype)
    # samples without labelled pixels score dice 1 (loss 0) and are left out of the mean
    has = has.to(loss.dtype)
    return (loss * has).sum() / has.sum().clamp_min(1.0)


def mean_soft_alignment_loss(attentions: Sequence[torch.Tensor], mask: torch.Tensor, num_classes: int,
                             ignore_index: int, sample_weights: Optional[torch.Tensor] = None,
                             onehot: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over layers of :func:`soft_alignment_loss` of each layer's class attention ``[B, C, h_l, w_l]``
    against :func:`soft_class_targets` of ``mask`` at that layer's size.

    The layers of one size share their targets and are stacked, so the work is a few kernels per size instead
    of a dozen per layer (the CT-Organ UNet has 16 register layers at 3 sizes). Nothing is read back to the
    host; exactly 0 (graph kept) with nothing labelled. ``onehot``: the mask's :func:`class_onehot`, when the
    caller has it already.
    """
    if not attentions:
        raise ValueError("mean_soft_alignment_loss needs at least one attention map")
    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for attention in attentions:
        groups.setdefault(tuple(int(s) for s in attention.shape[2:]), []).append(attention)
    terms = []
    for size, maps in groups.items():
        target, labelled = soft_class_targets(mask, size, num_classes, ignore_index, onehot=onehot)
        stacked = torch.stack(maps) if len(maps) > 1 else maps[0].unsqueeze(0)  # [L, B, C, h, w]
        if stacked.shape[1:] != target.shape:
            raise ValueError(f"alignment target {tuple(target.shape)} does not match the attention "
                             f"{tuple(stacked.shape[1:])}")
        ce = -(target * torch.log(stacked.float().clamp_min(1e-6))).sum(dim=2)  # [L, B, h, w]
        weights = labelled if sample_weights is None else labelled * _per_sample(sample_weights, labelled)
        # nothing labelled: every weight is 0, so each sum is 0 and the clamp only avoids 0 / 0
        terms.append((ce * weights).flatten(1).sum(dim=1) / labelled.sum().clamp_min(1e-12))  # [L]
    return torch.cat(terms).mean()
