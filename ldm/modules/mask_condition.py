"""Mask conditioning with condition dropout: one checkpoint that samples without a mask and from a (partial) mask.

What enters the UNet is the mask's **class fractions** on the latent grid, ``[B, C, h, w]``: the share of each
class among the pixels of a latent cell. Pixels of unknown class (``ignore_index``) count for no class, so a cell's
fractions sum to its known share: a full mask sums to 1 everywhere, a partial one (only the liver drawn) to 1 inside
the liver and 0 elsewhere, and a dropped condition is all zeros. One representation covers the three cases.

:class:`MaskConditionEncoder` maps the fractions to the UNet's width with two bias-free convolutions (the second
zero-initialised) and its output is added to the UNet's first feature map (``UNetModel(mask_condition_classes=C)``,
keys ``mask_condition.*``). Bias-free and ``SiLU(0) = 0``: an all-zero map adds exactly 0, so a model called without
a mask, with a dropped mask or with zeros computes the same numbers, a fresh conditioned UNet computes what the
plain one computes, and a plain checkpoint loads into it with only the ``mask_condition.*`` keys missing.

:class:`MaskCondition` (``LatentDiffusion(mask_condition={...})``) builds the fractions from a batch's masks and,
in training, drops them (classifier-free guidance, Ho & Salimans 2022): each sample's mask is dropped with
probability ``dropout`` (the model learns the unconditional distribution), and of the kept ones a share
``partial`` keeps a random non-empty subset of its classes, the others marked unknown (the model learns to fill
them in). ``dropout = 1`` draws no random numbers and passes no condition: it trains exactly the unconditional
model. At sampling, guidance scale ``s`` mixes ``eps_uncond + s (eps_cond - eps_uncond)``; 1 is conditional, 0 the
unconditional model itself.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.anatomical_losses import soft_class_targets
from ldm.modules.diffusionmodules.util import adaptive_avg_pool_nd, conv_nd

MASK_CONDITION_KEY = "mask_condition"
"""The UNet keyword (and conditioning dict key) that carries the class fractions."""


def mask_fractions(mask: torch.Tensor, num_classes: int, ignore_index: int, size: Sequence[int]) -> torch.Tensor:
    """Class fractions ``[B, C, *size]`` of an integer mask ``[B, H, W]``: the share of each class among all pixels
    of a cell, unknown (``ignore_index``) pixels counting for none. Labels outside ``0..C-1`` other than
    ``ignore_index`` are an error."""
    if mask.dtype.is_floating_point:
        raise ValueError(f"mask conditioning needs an integer mask [B, H, W], got {mask.dtype}")
    bad = (mask != ignore_index) & ((mask < 0) | (mask >= num_classes))
    if bool(bad.any()):
        found = sorted(mask[bad].unique().tolist())[:10]
        raise ValueError(f"mask conditioning: labels {found} are outside 0..{num_classes - 1} and not the unknown "
                         f"value {ignore_index}; set mask_condition.num_classes to the masks' class count")
    fractions, labelled = soft_class_targets(mask, size, num_classes, ignore_index)
    return fractions * labelled.unsqueeze(1)


class MaskConditionEncoder(nn.Module):
    """Class fractions ``[B, C, h d, w d]`` -> a residual ``[B, channels, h, w]`` for the UNet's first feature map
    (``conv -> SiLU -> conv3x3``, no biases, the second zero-initialised: zeros in, exactly zeros out).

    ``detail`` ``d``: the fractions come on a grid ``d`` times finer than the latent one and each latent cell's
    ``d x d`` sub-cells are stacked as channels (space to depth, ``C d^2`` maps), so the encoder sees where inside a
    cell a boundary runs, which the cell's fractions alone (``d = 1``) do not say. With ``d > 1`` the first
    convolution is 1x1 (the sub-cells already are the neighbourhood), keeping the cost near that of ``d = 1``."""

    def __init__(self, num_classes: int, channels: int, hidden: Optional[int] = None, dims: int = 2,
                 detail: int = 1) -> None:
        super().__init__()
        hidden = int(hidden or channels)
        self.num_classes, self.detail = int(num_classes), int(detail)
        if self.detail < 1 or (self.detail > 1 and dims != 2):
            raise ValueError(f"mask_condition_detail must be >= 1 (and 1 unless the UNet is 2D), got {detail!r}")
        kernel = 3 if self.detail == 1 else 1
        self.inp = conv_nd(dims, self.num_classes * self.detail ** 2, hidden, kernel, padding=kernel // 2,
                           bias=False)
        self.act = nn.SiLU()
        self.out = conv_nd(dims, hidden, int(channels), 3, padding=1, bias=False)
        nn.init.zeros_(self.out.weight)

    def forward(self, fractions: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if fractions.shape[1] != self.num_classes:
            raise ValueError(f"mask condition has {fractions.shape[1]} class maps, the UNet expects "
                             f"{self.num_classes} (mask_condition_classes)")
        fine = tuple(int(s) * self.detail for s in size)
        if tuple(fractions.shape[2:]) != fine:
            if any(have < want or have % want for have, want in zip(fractions.shape[2:], fine)):
                raise ValueError(f"mask condition of size {tuple(fractions.shape[2:])}: the UNet's encoder needs "
                                 f"{fine} (latent {tuple(size)} x mask_condition_detail {self.detail}) or a multiple")
            fractions = adaptive_avg_pool_nd(fractions, fine)
        if self.detail > 1:
            fractions = F.pixel_unshuffle(fractions, self.detail)
        return self.out(self.act(self.inp(fractions.to(self.inp.weight.dtype))))


def _probability(name: str, value: Any) -> float:
    p = float(value)
    if not math.isfinite(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"mask_condition.{name} must be a probability in [0, 1], got {value!r}")
    return p


class MaskCondition:
    """The mask condition of a ``LatentDiffusion``: its batch key, classes, unknown value and dropout.

    Args:
        key: batch key of the integer masks ``[B, H, W]`` (e.g. ``segmentation``).
        num_classes: classes ``C`` (background included); the UNet's ``mask_condition_classes``.
        ignore_index: the unknown value (a partial mask's undrawn pixels).
        dropout: probability that a training sample's mask is dropped (unconditional).
        partial: probability that a kept training mask keeps only a random non-empty subset of its classes.
    """

    def __init__(self, key: str = "segmentation", num_classes: int = 0, ignore_index: int = 255,
                 dropout: float = 0.1, partial: float = 0.0) -> None:
        if int(num_classes) < 2:
            raise ValueError(f"mask_condition.num_classes must be >= 2 (background included), got {num_classes!r}")
        self.key, self.num_classes, self.ignore_index = str(key), int(num_classes), int(ignore_index)
        self.dropout, self.partial = _probability("dropout", dropout), _probability("partial", partial)
        self.detail = 1  # the UNet encoder's sub-cell factor (its mask_condition_detail; check_mask_condition)

    @classmethod
    def from_config(cls, config: Optional[Mapping[str, Any]]) -> Optional["MaskCondition"]:
        """``None`` for no config, else the condition; unknown settings are an error naming them."""
        if not config:
            return None
        allowed = {"key", "num_classes", "ignore_index", "dropout", "partial"}
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise ValueError(f"unknown mask_condition settings {unknown}; allowed: {sorted(allowed)}")
        return cls(**dict(config))

    def drop(self, mask: torch.Tensor, generator: Optional[torch.Generator] = None) -> Optional[torch.Tensor]:
        """A training batch's masks after condition dropout (``None`` when every sample is dropped). Vectorised over
        the batch (no per-sample loop, nothing read back to the host)."""
        if self.dropout >= 1.0:
            return None  # no random numbers drawn: exactly the unconditional model's training
        b, c = mask.shape[0], self.num_classes
        rand = lambda *shape: torch.rand(shape, generator=generator, device=mask.device)  # noqa: E731
        unknown = torch.full_like(mask, self.ignore_index)
        if self.dropout > 0:
            dropped = (rand(b) < self.dropout).view(b, *([1] * (mask.dim() - 1)))
            mask = torch.where(dropped, unknown, mask)
        if self.partial > 0:
            known = mask != self.ignore_index
            flat = torch.where(known, mask, torch.zeros_like(mask)).clamp(0, c - 1).flatten(1)
            present = torch.stack([((flat == k) & known.flatten(1)).any(1) for k in range(c)], 1)  # [B, C]
            chosen = (rand(b) < self.partial) & (present.sum(1) >= 2)
            keep = (rand(b, c) < 0.5) & present
            # a sample that would keep no class keeps one present class, drawn at random
            pick = torch.where(present, rand(b, c), torch.full((b, c), -1.0, device=mask.device)).argmax(1)
            keep = keep | ((~keep.any(1)).unsqueeze(1) & F.one_hot(pick, c).bool())
            keep = torch.where(chosen.unsqueeze(1), keep, torch.ones_like(keep))
            kept = keep.gather(1, flat).view_as(mask)
            mask = torch.where(kept & known, mask, unknown)
        return mask

    def condition(self, mask: Optional[torch.Tensor], size: Sequence[int]) -> Optional[dict[str, torch.Tensor]]:
        """``{"mask_condition": fractions [B, C, *(size x detail)]}`` of integer masks (the latent grid ``size``
        refined by the UNet encoder's ``detail``), or ``None`` for no mask."""
        if mask is None:
            return None
        fine = [int(s) * self.detail for s in size]
        if any(have < want for have, want in zip(mask.shape[1:], fine)):
            raise ValueError(f"masks of size {tuple(mask.shape[1:])} are coarser than the condition grid "
                             f"{tuple(fine)} (latent {tuple(size)} x mask_condition_detail {self.detail})")
        return {MASK_CONDITION_KEY: mask_fractions(mask.long(), self.num_classes, self.ignore_index, fine)}

    def from_batch(self, batch: Mapping[str, Any], size: Sequence[int], device: torch.device, training: bool,
                   generator: Optional[torch.Generator] = None) -> Optional[dict[str, torch.Tensor]]:
        """The condition of a batch's masks (``batch[key]``, ``[B, H, W]`` or ``[B, H, W, 1]``); in training after
        :meth:`drop`."""
        if self.key not in batch:
            raise ValueError(f"mask conditioning reads batch[{self.key!r}], but the batch has only {sorted(batch)}; "
                             "set mask_condition.key to the dataset's mask key")
        mask = torch.as_tensor(batch[self.key]).to(device)
        if mask.ndim == 4 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        mask = mask.long()
        if training:
            mask = self.drop(mask, generator)
        return self.condition(mask, size)


def check_mask_condition(condition: Optional[MaskCondition], model: nn.Module) -> Optional[MaskCondition]:
    """``condition`` when ``model`` (a ``LatentDiffusion``) can take it: unconditional otherwise, its UNet built with
    ``mask_condition_classes`` equal to the condition's classes; else a ValueError saying what to set."""
    unet = model.model.diffusion_model
    classes = int(getattr(unet, "mask_condition_classes", 0) or 0)
    if condition is None:
        return None
    if model.model.conditioning_key is not None:
        raise ValueError(f"mask_condition needs an otherwise unconditional model (cond_stage_config: "
                         f"__is_unconditional__); this one has conditioning_key {model.model.conditioning_key!r}")
    if classes != condition.num_classes:
        raise ValueError(f"mask_condition.num_classes is {condition.num_classes}, but the UNet's "
                         f"mask_condition_classes is {classes or 'not set'}; set unet_config.params."
                         f"mask_condition_classes: {condition.num_classes}")
    condition.detail = int(unet.mask_condition.detail)  # the fractions' grid is the encoder's
    return condition
