"""Batch layout: channel-last (CompVis datasets) and channel-first (MONAI, torchvision) image batches.

``to_channels_first`` turns a batch entry into the ``B, C, H, W`` float tensor the models take:

- ``B, H, W`` gets one channel;
- ``B, H, W, C`` (channel-last, what this project's datasets and CompVis's return) is permuted;
- ``B, C, H, W`` (channel-first, what a MONAI ``EnsureChannelFirstd`` pipeline yields) is kept.

The model's channel count ``C`` decides: the layout whose channel axis has size ``C`` is taken. A
shape that fits both (``B, C, H, C``) is refused as ambiguous, one that fits neither names ``C``.
Without a known channel count (a key the model does not encode, e.g. a conditioning input with no
encoder) the CompVis channel-last convention applies.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import torch


def to_channels_first(x: Any, channels: Optional[int], key: str) -> torch.Tensor:
    """``x`` (``B,H,W``, ``B,H,W,C`` or ``B,C,H,W``) as a contiguous float ``B,C,H,W`` tensor (see module doc)."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim != 4:
        raise ValueError(f"batch[{key!r}] has shape {tuple(x.shape)}; expected B,H,W,C (channel-last), B,C,H,W "
                         "(channel-first) or B,H,W")
    elif channels is None or (x.shape[3] == channels and x.shape[1] != channels):
        x = x.permute(0, 3, 1, 2)
    elif x.shape[1] == channels and x.shape[3] == channels:
        raise ValueError(f"batch[{key!r}] has shape {tuple(x.shape)}: with {channels} model channel(s) it reads as "
                         "channel-first B,C,H,W and as channel-last B,H,W,C; give images whose width differs from "
                         "the channel count, or convert them to B,H,W,C yourself")
    elif x.shape[1] != channels:
        raise ValueError(f"batch[{key!r}] has shape {tuple(x.shape)}, but the model takes {channels} channel(s): "
                         f"expected B,H,W,{channels} (channel-last) or B,{channels},H,W (channel-first)")
    return x.to(memory_format=torch.contiguous_format).float()


def item_channels_first(x: Any) -> torch.Tensor:
    """One dataset item's image (no batch axis: ``H,W``, ``H,W,C`` or ``C,H,W``) as a float ``C,H,W`` tensor.

    Without a model to name the channel count, the shorter of the two end axes is the channel axis (images are
    wider than they have channels); a shape whose end axes are equal (``C,H,C``) is refused as ambiguous.
    """
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.ndim == 2:
        return x[None].float()
    if x.ndim != 3:
        raise ValueError(f"an item's image has shape {tuple(x.shape)}; expected H,W,C (channel-last), C,H,W "
                         "(channel-first) or H,W")
    if x.shape[0] == x.shape[2]:
        raise ValueError(f"an item's image has shape {tuple(x.shape)}: its first and last axes are equal, so it reads "
                         "as C,H,W and as H,W,C; give images whose width differs from the channel count")
    return (x.permute(2, 0, 1) if x.shape[2] < x.shape[0] else x).contiguous().float()


def masks_from_batch(batch: Mapping[str, Any], key: str, ignore_index: int, dims: int = 2) -> torch.Tensor:
    """``batch[key]`` as int64 ``[B, H, W]`` (``dims`` 3: ``[B, D, H, W]``; a trailing channel of 1 squeezed);
    examples whose ``has_segmentation`` is false become all ``ignore_index``. ``ValueError`` for a missing key,
    another shape or float values. The one reader of a batch's masks: the anatomical LDM, the joint mode and the
    mask autoencoder use it."""
    if key not in batch:
        raise ValueError(f"batch has no key {key!r} (mask_key); it has {sorted(batch)}")
    mask = torch.as_tensor(batch[key])
    if mask.ndim == dims + 2 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != dims + 1:
        layout = "[B, H, W]" if dims == 2 else "[B, D, H, W]" if dims == 3 else f"[B] + {dims} spatial sizes"
        raise ValueError(f"batch[{key!r}] must be {layout} integer masks, got shape {tuple(mask.shape)}")
    if mask.is_floating_point():
        raise ValueError(f"batch[{key!r}] must hold integer class ids, got dtype {mask.dtype}")
    mask = mask.long()
    has = batch.get("has_segmentation")
    if has is not None:
        has = torch.as_tensor(has, device=mask.device).bool().view(-1, *([1] * dims))
        mask = torch.where(has, mask, torch.full_like(mask, ignore_index))
    return mask
