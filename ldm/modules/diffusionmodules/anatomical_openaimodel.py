"""The anatomical UNet: a :class:`UNetModel` whose features cross-attend to class-grouped register tokens.

:class:`AnatomicalUNetModel` adds three things to the base UNet through its extension point
(``prepare_state`` / ``block_hook`` / ``state["features"]``), without re-writing ``forward``:

1. a register bank (:mod:`ldm.modules.anatomical_registers`) evaluated once per call, from the time
   embedding, and carried in ``state["registers"]``;
2. an :class:`AnatomicalCrossAttention` after every chosen block (chosen by downsampling factor), whose
   output projection is zero-initialised so that a fresh model reproduces the base UNet exactly;
3. a segmentation head on the decoder features, used for the anatomical loss and to predict a mask
   for every sample.

``forward(x, t)`` returns the prediction tensor like ``UNetModel`` (so every sampler works unchanged);
``forward(x, t, return_anatomy=True)`` returns ``(prediction, {"seg_logits", "class_attention"})``.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.modules.anatomical_registers import AnatomicalRegisterBank, TimestepAwareRegisterBank
from ldm.modules.diffusionmodules.openaimodel import UNetModel

logger = logging.getLogger(__name__)

ANATOMICAL_KEY_PREFIXES = ("register_bank.", "anatomical_attention.", "segmentation_head.")
_ATTENDED_KINDS = ("res", "middle", "res_up")


def _num_groups(channels: int, preferred: int = 32) -> int:
    """Largest group count <= ``preferred`` that divides ``channels`` (32 for usual UNet widths)."""
    return math.gcd(int(channels), preferred)


class AnatomicalCrossAttention(nn.Module):
    """Cross-attention from UNet features (queries) to anatomical register tokens (keys/values).

    ``out = x + W_o · attention(W_q · GroupNorm(x) [+ W_p · pos], W_k · R, W_v · R)``, with ``W_o``
    zero-initialised so the layer is the identity at initialisation. Attention runs through
    ``scaled_dot_product_attention``; when the per-class attention mass is requested the (small,
    ``N x C*K``) attention matrix is formed explicitly instead, with the same result.

    Args:
        channels: feature channels of the block it follows (queries and output).
        register_dim: width ``D`` of the register tokens.
        heads: attention heads; must divide the attention width.
        position_dim: width of the spatial position codes added to the queries (``None``: no codes).
        dropout: dropout on the attention output.
        inner_dim: attention width (queries, keys, values); ``None``: ``channels``. A smaller width cuts the
            cost of the query and output projections, which dominate the layer at wide UNet levels.
    """

    def __init__(self, channels: int, register_dim: int, heads: int = 8, position_dim: Optional[int] = None,
                 dropout: float = 0.0, inner_dim: Optional[int] = None) -> None:
        super().__init__()
        inner = int(inner_dim or channels)
        if heads < 1 or inner % heads != 0:
            raise ValueError(f"anatomical_attention_heads ({heads}) must be >= 1 and divide the attention width "
                             f"({inner}: anatomical_attention_dim, or the feature channels of the level)")
        self.channels = int(channels)
        self.inner_dim = inner
        self.heads = int(heads)
        self.dim_head = inner // self.heads
        self.norm = nn.GroupNorm(_num_groups(channels), channels, eps=1e-6)
        self.to_q = nn.Linear(channels, inner, bias=False)
        self.to_k = nn.Linear(register_dim, inner, bias=False)
        self.to_v = nn.Linear(register_dim, inner, bias=False)
        self.pos_proj = nn.Linear(position_dim, inner, bias=False) if position_dim else None
        self.dropout = nn.Dropout(dropout)
        self.to_out = nn.Linear(inner, channels)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)  # [B, heads, n, dim_head]

    def forward(self, x: torch.Tensor, registers: torch.Tensor, pos: Optional[torch.Tensor] = None,
                class_membership: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Attend ``x`` [B, ch, H, W] to ``registers`` [B, T, D].

        ``pos``: position codes [H*W, position_dim]. ``class_membership``: one-hot [T, C]; when given,
        also returns the attention mass per class [B, C, H, W] (summed over each class's tokens,
        averaged over heads; it sums to 1 over classes), else ``None``.
        """
        b, ch, height, width = x.shape
        if ch != self.channels:
            raise ValueError(f"AnatomicalCrossAttention built for {self.channels} channels got {ch}")
        q_in = self.norm(x).flatten(2).transpose(1, 2)  # [B, N, ch]
        q = self.to_q(q_in)
        if self.pos_proj is not None:
            if pos is None:
                raise ValueError("this layer was built with position codes; pass pos=[H*W, position_dim]")
            q = q + self.pos_proj(pos.to(q.dtype)).unsqueeze(0)
        registers = registers.to(q.dtype)
        q, k, v = self._split(q), self._split(self.to_k(registers)), self._split(self.to_v(registers))
        mass = None
        if class_membership is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = torch.softmax((q @ k.transpose(-1, -2)) * self.dim_head ** -0.5, dim=-1)  # [B, h, N, T]
            out = attn @ v
            mass = attn.mean(dim=1) @ class_membership.to(attn.dtype)  # [B, N, C]
            mass = mass.transpose(1, 2).reshape(b, -1, height, width)
        out = out.transpose(1, 2).reshape(b, height * width, self.inner_dim)
        out = self.to_out(self.dropout(out)).transpose(1, 2).reshape(b, ch, height, width)
        return x + out, mass


class AnatomicalUNetModel(UNetModel):
    """UNetModel with anatomical register cross-attention and a segmentation head.

    Every ``UNetModel`` parameter is accepted unchanged (and every base state-dict key keeps its name);
    the anatomical modules live under ``register_bank.``, ``anatomical_attention.`` and
    ``segmentation_head.``.

    Args:
        *args, **kwargs: ``UNetModel``'s parameters.
        use_anatomical_registers: build the anatomical modules; ``False`` gives exactly a ``UNetModel``.
        num_anatomical_classes: classes ``C`` of the masks (background included).
        anatomical_register_dim: register token width ``D``.
        num_registers_per_class: registers ``K`` per class.
        anatomical_attention_heads: heads of each register cross-attention (must divide the channels).
        use_timestep_aware_registers: modulate the registers with the time embedding
            (:class:`TimestepAwareRegisterBank`).
        anatomical_attention_resolutions: downsampling factors (1 = full latent resolution, 2, 4, ...)
            whose res/middle blocks get a register cross-attention; ``None``: every level and the middle.
        use_spatial_encoding: add resolution-agnostic 2D position codes to the queries.
        anatomical_loss_weight: accepted for configs of the original implementation, where the loss
            weight sat in the UNet config; ``AnatomicalLatentDiffusion`` uses it when its own
            ``anatomical_loss_weight`` is not set.
        register_dropout: dropout on the register tokens.
        anatomical_attention_dim: width of each register cross-attention, capped at the level's channels;
            ``None`` (default): the level's channels. 256 at the CT-Organ size cuts the layers' FLOPs by about
            half at the 512/1024-channel levels (``bench/RESULTS.md``).
    """

    def __init__(self, *args: Any, use_anatomical_registers: bool = True, num_anatomical_classes: int = 6,
                 anatomical_register_dim: int = 256, num_registers_per_class: int = 4,
                 anatomical_attention_heads: int = 8, use_timestep_aware_registers: bool = True,
                 anatomical_attention_resolutions: Optional[Sequence[int]] = None,
                 use_spatial_encoding: bool = True, anatomical_loss_weight: Optional[float] = None,
                 register_dropout: float = 0.0, anatomical_attention_dim: Optional[int] = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.use_anatomical_registers = bool(use_anatomical_registers)
        self.num_anatomical_classes = int(num_anatomical_classes)
        self.anatomical_loss_weight = anatomical_loss_weight
        self.anatomical_attention_keys: list[str] = []
        if not self.use_anatomical_registers:
            return
        if self.num_anatomical_classes < 2:
            raise ValueError(f"num_anatomical_classes must be >= 2 (background + organs), "
                             f"got {num_anatomical_classes}")
        time_embed_dim = self.time_embed[-1].out_features
        if use_timestep_aware_registers:
            self.register_bank: AnatomicalRegisterBank = TimestepAwareRegisterBank(
                num_anatomical_classes, num_registers_per_class, anatomical_register_dim, time_embed_dim,
                dropout=register_dropout, use_spatial_encoding=use_spatial_encoding)
        else:
            self.register_bank = AnatomicalRegisterBank(
                num_anatomical_classes, num_registers_per_class, anatomical_register_dim,
                dropout=register_dropout, use_spatial_encoding=use_spatial_encoding)

        available = sorted({info["ds"] for info in self.block_info if info["kind"] in _ATTENDED_KINDS})
        wanted = available if anatomical_attention_resolutions is None else \
            sorted({int(r) for r in anatomical_attention_resolutions})
        unknown = [r for r in wanted if r not in available]
        if unknown or not wanted:
            raise ValueError(f"anatomical_attention_resolutions {list(wanted)} must be downsampling factors of "
                             f"this UNet (available: {available}); unknown: {unknown}")
        self.anatomical_attention = nn.ModuleDict()
        for info in self.block_info:
            if info["kind"] in _ATTENDED_KINDS and info["ds"] in wanted:
                key = f"{info['stage']}_{info['index']}"
                self.anatomical_attention[key] = AnatomicalCrossAttention(
                    info["channels"], anatomical_register_dim, heads=anatomical_attention_heads,
                    position_dim=self.register_bank.position_dim,
                    inner_dim=None if anatomical_attention_dim is None else min(int(anatomical_attention_dim),
                                                                                 info["channels"]))
                self.anatomical_attention_keys.append(key)

        feat_ch = self.model_channels
        self.segmentation_head = nn.Sequential(
            nn.GroupNorm(_num_groups(feat_ch), feat_ch, eps=1e-6), nn.SiLU(),
            nn.Conv2d(feat_ch, feat_ch, 3, padding=1),
            nn.GroupNorm(_num_groups(feat_ch), feat_ch, eps=1e-6), nn.SiLU(),
            nn.Conv2d(feat_ch, self.num_anatomical_classes, 1),
        )
        logger.info("AnatomicalUNetModel: %d classes x %d registers (dim %d), register attention at %d blocks "
                    "(ds %s)", num_anatomical_classes, num_registers_per_class, anatomical_register_dim,
                    len(self.anatomical_attention_keys), wanted)

    # ---- extension point -------------------------------------------------------------------------
    def prepare_state(self, x: torch.Tensor, timesteps: Optional[torch.Tensor] = None,
                      context: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None,
                      **extra: Any) -> dict:
        state = super().prepare_state(x, timesteps, context, y, **extra)
        if self.use_anatomical_registers:
            state["registers"] = self.register_bank(x.shape[0], state.get("emb"))
            state["anatomy"] = {"class_attention": [], "positions": {}}
        return state

    def block_hook(self, stage: str, index: int, h: torch.Tensor, state: dict) -> torch.Tensor:
        h = super().block_hook(stage, index, h, state)
        if not self.use_anatomical_registers:
            return h
        key = f"{stage}_{index}"
        if key not in self.anatomical_attention:
            return h
        layer = self.anatomical_attention[key]
        anatomy = state["anatomy"]
        size = (h.shape[-2], h.shape[-1])
        if size not in anatomy["positions"]:
            anatomy["positions"][size] = self.register_bank.position_codes(*size, device=h.device, dtype=h.dtype)
        pos = anatomy["positions"][size]
        # the anatomical modules stay in float32 when the blocks run in float16 (use_fp16)
        dtype = layer.to_out.weight.dtype
        membership = self.register_bank.class_membership(dtype) if state.get("return_anatomy") else None
        args = (h.to(dtype), state["registers"], None if pos is None else pos.to(dtype), membership)
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            out, mass = checkpoint(layer, *args, use_reentrant=False)
        else:
            out, mass = layer(*args)
        h = out.to(h.dtype)
        if mass is not None:
            anatomy["class_attention"].append(mass)
        return h

    def forward(self, x: torch.Tensor, timesteps: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None,
                return_anatomy: bool = False, **kwargs: Any):
        """The base UNet's prediction; with ``return_anatomy`` also ``{"seg_logits", "class_attention"}``.

        ``seg_logits`` [B, C, h, w] and ``class_attention`` [B, C, h, w] are at the input's (latent)
        resolution; ``class_attention`` is the per-class attention mass averaged over all register
        attention layers (each resized bilinearly to the input size), summing to 1 over classes.
        """
        if not return_anatomy:
            return super().forward(x, timesteps, context, y, **kwargs)
        if not self.use_anatomical_registers:
            raise ValueError("return_anatomy=True needs use_anatomical_registers: true in the UNet config")
        out, state = self.forward_with_state(x, timesteps, context, y, return_anatomy=True, **kwargs)
        size = x.shape[-2:]
        seg_logits = self.segmentation_head(state["features"].to(self.segmentation_head[-1].weight.dtype))
        if seg_logits.shape[-2:] != size:
            seg_logits = F.interpolate(seg_logits, size=size, mode="bilinear", align_corners=False)
        masses = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                  for m in state["anatomy"]["class_attention"]]
        class_attention = torch.stack(masses, dim=0).mean(dim=0)
        return out, {"seg_logits": seg_logits, "class_attention": class_attention}
