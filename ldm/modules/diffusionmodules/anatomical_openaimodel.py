"""The anatomical UNet: a :class:`UNetModel` whose features cross-attend to class-grouped register tokens.

:class:`AnatomicalUNetModel` adds these to the base UNet through its typed extension point
(``prepare_state`` / ``block_hook`` / ``state.features``, with :class:`AnatomicalUNetState` as its
state), without re-writing ``forward``:

1. a register bank (:mod:`ldm.modules.anatomical_registers`) evaluated once per call, from the time
   embedding, and carried in ``state.registers``;
2. with ``register_update: read``, a :class:`~ldm.modules.anatomical_blocks.RegisterReadAttention` at every
   chosen block: the registers read the (pooled) features, so one register stream, updated block by block
   through the UNet, carries a per-sample state (``register_update: none``: the constant tokens of the
   first version);
3. an :class:`AnatomicalCrossAttention` after every chosen block (chosen by downsampling factor): the
   features read the registers. Both attentions' output projections are zero-initialised so that a fresh
   model reproduces the base UNet exactly;
4. a segmentation head on the decoder features (``mask_upsample_factor: 1``, latent resolution) or a
   :class:`~ldm.modules.anatomical_blocks.AnatomicalMaskDecoder` with learned upsampling to image
   resolution, used for the anatomical loss and to predict a mask for every sample.

``forward(x, t)`` always returns the prediction tensor like ``UNetModel`` (so every sampler works
unchanged); ``forward_with_anatomy(x, t)`` returns an :class:`AnatomyOutput` (prediction, segmentation
logits, class attention per layer and averaged, register tokens). ``forward(x, t, return_anatomy=True)``
is a deprecated alias returning ``(prediction, {"seg_logits", "class_attention"})``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.deprecation import deprecate
from ldm.modules.anatomical_blocks import (AnatomicalMaskDecoder, DecoderLevelFusion, PixelShuffleMaskHead,
                                           RegisterReadAttention)
from ldm.modules.anatomical_blocks import num_groups as _num_groups
from ldm.modules.anatomical_registers import AnatomicalRegisterBank, TimestepAwareRegisterBank
from ldm.modules.diffusionmodules.openaimodel import BlockInfo, BlockKind, BlockStage, UNetModel, UNetState
from ldm.modules.diffusionmodules.util import conv_nd, resize_maps

logger = logging.getLogger(__name__)

ANATOMICAL_KEY_PREFIXES = ("register_bank.", "anatomical_attention.", "segmentation_head.", "register_read.",
                           "mask_decoder.", "mask_levels.")
REGISTER_UPDATES = ("none", "read")
REGISTER_PLACEMENTS = ("every_block", "per_level")
MASK_DECODERS = ("upsample_conv", "pixel_shuffle")
_ATTENDED_KINDS = (BlockKind.RES, BlockKind.MIDDLE, BlockKind.RES_UP)


@dataclass
class AnatomicalUNetState(UNetState):
    """:class:`UNetState` plus what the register layers share within one call.

    Args (beyond :class:`UNetState`'s):
        registers: the register stream [B, C*K, D] (``None`` with registers off): the bank's tokens, updated
            by every register read so far with ``register_update: read``.
        register_states: block key -> the register stream after that block's read (``register_update: read``).
        collect_attention: record each register layer's per-class attention mass.
        class_attention: block key -> per-class attention mass [B, C, h_l, w_l] (when collected).
        position_codes: (h, w) -> position codes [h*w, P] (or ``None``), computed once per size.
        level_features: block key -> the output of a decoder block the mask head reads (``mask_head_levels > 1``).
    """

    registers: Optional[torch.Tensor] = None
    register_states: dict[str, torch.Tensor] = field(default_factory=dict)
    collect_attention: bool = False
    class_attention: dict[str, torch.Tensor] = field(default_factory=dict)
    position_codes: dict[tuple[int, int], Optional[torch.Tensor]] = field(default_factory=dict)
    level_features: dict[str, torch.Tensor] = field(default_factory=dict)


class AnatomyOutput:
    """What :meth:`AnatomicalUNetModel.forward_with_anatomy` returns (read-only attributes).

    Args:
        prediction: the UNet's prediction (eps, x0 or v, as trained), what ``forward`` returns.
        seg_logits: segmentation logits [B, C, f*h, f*w], ``f`` = the UNet's ``mask_upsample_factor`` (1: the
            input's latent resolution; the first stage's factor: image resolution).
        class_attention: per-class attention mass [B, C, h, w] averaged over the register layers (each
            resized bilinearly to the input size); sums to 1 over classes. ``None``: computed from
            ``layer_class_attention`` when first read (the training loss with ``alignment_target: soft`` never
            reads it, so the resizing and averaging of every layer is not done in its steps).
        layer_class_attention: block key (:attr:`BlockInfo.key`) -> that layer's per-class attention mass
            [B, C, h_l, w_l] at its own resolution, in block order.
        registers: the register tokens [B, C*K, D] at the end of the call (after the last read).
        register_states: block key -> register stream after that block's read (empty with
            ``register_update: none``).
    """

    __slots__ = ("prediction", "seg_logits", "_class_attention", "layer_class_attention", "registers",
                 "register_states", "_size")

    def __init__(self, prediction: torch.Tensor, seg_logits: torch.Tensor,
                 class_attention: Optional[torch.Tensor] = None,
                 layer_class_attention: Optional[dict[str, torch.Tensor]] = None,
                 registers: Optional[torch.Tensor] = None,
                 register_states: Optional[dict[str, torch.Tensor]] = None,
                 size: Optional[Sequence[int]] = None) -> None:
        if class_attention is None and not layer_class_attention:
            raise ValueError("AnatomyOutput needs class_attention or a non-empty layer_class_attention")
        sets = object.__setattr__
        sets(self, "prediction", prediction)
        sets(self, "seg_logits", seg_logits)
        sets(self, "_class_attention", class_attention)
        sets(self, "layer_class_attention", dict(layer_class_attention or {}))
        sets(self, "registers", registers)
        sets(self, "register_states", dict(register_states or {}))
        sets(self, "_size", None if size is None else tuple(int(v) for v in size))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"AnatomyOutput is read-only (tried to set {name!r})")

    @property
    def class_attention(self) -> torch.Tensor:
        """The layers' class attention averaged at the input's latent size (computed once, when first read)."""
        if self._class_attention is None:
            size = self._size or max((tuple(m.shape[2:]) for m in self.layer_class_attention.values()),
                                     key=math.prod)
            masses = [m if tuple(m.shape[2:]) == tuple(size) else resize_maps(m, size)
                      for m in self.layer_class_attention.values()]
            object.__setattr__(self, "_class_attention", torch.stack(masses, dim=0).mean(dim=0))
        return self._class_attention


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
        """Attend ``x`` [B, ch, H, W] (or ``[B, ch, D, H, W]``) to ``registers`` [B, T, D].

        ``pos``: position codes [H*W, position_dim]. ``class_membership``: one-hot [T, C]; when given,
        also returns the attention mass per class [B, C, H, W] (summed over each class's tokens,
        averaged over heads; it sums to 1 over classes), else ``None``.
        """
        b, ch, *spatial = x.shape
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
            mass = mass.transpose(1, 2).reshape(b, -1, *spatial)
        out = out.transpose(1, 2).reshape(b, math.prod(spatial), self.inner_dim)
        out = self.to_out(self.dropout(out)).transpose(1, 2).reshape(b, ch, *spatial)
        return x + out, mass


def _check_anatomical_options(register_placement: str, mask_decoder: str, register_update: str,
                              mask_upsample_factor: int, num_classes: int) -> None:
    """Refuse unknown :class:`AnatomicalUNetModel` options, a mask factor that is no power of two and < 2 classes."""
    if register_placement not in REGISTER_PLACEMENTS:
        raise ValueError(f"register_placement must be one of {REGISTER_PLACEMENTS} ('every_block': after every "
                         f"res/middle block; 'per_level': once per level and path), got {register_placement!r}")
    if mask_decoder not in MASK_DECODERS:
        raise ValueError(f"mask_decoder must be one of {MASK_DECODERS}, got {mask_decoder!r}")
    if register_update not in REGISTER_UPDATES:
        raise ValueError(f"register_update must be one of {REGISTER_UPDATES} ('none': constant tokens, 'read': "
                         f"registers read the features), got {register_update!r}")
    factor = int(mask_upsample_factor)
    if factor < 1 or factor & (factor - 1):
        raise ValueError(f"mask_upsample_factor must be a power of two >= 1 (1: latent-size head; the first "
                         f"stage's downsampling factor: image-size masks), got {mask_upsample_factor}")
    if int(num_classes) < 2:
        raise ValueError(f"num_anatomical_classes must be >= 2 (background + organs), got {num_classes}")


class AnatomicalUNetModel(UNetModel):
    """UNetModel with anatomical register cross-attention and a segmentation head.

    Every ``UNetModel`` parameter is accepted unchanged (and every base state-dict key keeps its name);
    the anatomical modules live under ``register_bank.``, ``anatomical_attention.``, ``register_read.``,
    ``segmentation_head.`` and ``mask_decoder.``.

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
        register_update: ``"none"`` (default; the first version): the registers are the bank's tokens in every
            layer, the same for every sample. ``"read"``: before the features read the registers at a chosen
            block, the registers read that block's features (pooled to ``register_read_pool``), one stream
            updated block by block, so they carry a per-sample state.
        register_read_pool: largest side of the pooled grid the registers read (``register_update: read``).
        mask_upsample_factor: ``1`` (default; the first version): segmentation head at latent resolution.
            A power of two ``f >= 2``: mask decoder with ``log2 f`` learned upsampling stages, logits at ``f``
            times the latent size; set it to the first stage's downsampling factor for image-size masks.
        register_placement: ``"every_block"`` (default; every version so far): a register layer pair (read, when
            ``register_update: read``, and cross-attention) after every res/middle block of the chosen levels.
            ``"per_level"`` (lean): one pair per chosen level and path, after the level's last block in the encoder and
            in the decoder, and one after the middle block (7 pairs for a 3-level UNet instead of 10 with one res
            block per level, 16 with two).
        mask_decoder: how masks reach ``mask_upsample_factor > 1``: ``"upsample_conv"`` (default): learned
            nearest-upsample + 3x3 convolution stages above the latent grid (:class:`AnatomicalMaskDecoder`);
            ``"pixel_shuffle"`` (lean): every convolution at the latent grid and a sub-pixel rearrangement
            (:class:`~ldm.modules.anatomical_blocks.PixelShuffleMaskHead`). Both live under ``mask_decoder.``.
        mask_head_levels: how many decoder levels the mask head reads. ``1`` (default; every version so far): the
            last decoder features only. ``L > 1``: also the last block of each of the ``L - 1`` next-coarser decoder
            levels, each projected to the last level's width, resized to its grid and added
            (:class:`~ldm.modules.anatomical_blocks.DecoderLevelFusion`, under ``mask_levels.``; zero-initialised, so
            a fresh head computes what the one-level head computes).
        segmentation_stop_gradient: the segmentation head (or mask decoder) reads the decoder features through a
            stop-gradient, so the mask loss trains the head alone and cannot pull the UNet away from denoising
            (a probe of what the features hold). Pair it with ``attention_alignment_weight: 0`` on the
            ``AnatomicalLatentDiffusion`` to keep the register attention free of mask supervision too.
    """

    def __init__(self, *args: Any, use_anatomical_registers: bool = True, num_anatomical_classes: int = 6,
                 anatomical_register_dim: int = 256, num_registers_per_class: int = 4,
                 anatomical_attention_heads: int = 8, use_timestep_aware_registers: bool = True,
                 anatomical_attention_resolutions: Optional[Sequence[int]] = None,
                 use_spatial_encoding: bool = True, anatomical_loss_weight: Optional[float] = None,
                 register_dropout: float = 0.0, anatomical_attention_dim: Optional[int] = None,
                 register_update: str = "none", register_read_pool: int = 8, mask_upsample_factor: int = 1,
                 segmentation_stop_gradient: bool = False, register_placement: str = "every_block",
                 mask_decoder: str = "upsample_conv", mask_head_levels: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.use_anatomical_registers = bool(use_anatomical_registers)
        self.num_anatomical_classes = int(num_anatomical_classes)
        self.anatomical_loss_weight = anatomical_loss_weight
        self.anatomical_attention_blocks: tuple[BlockInfo, ...] = ()
        self.register_update = register_update
        self.mask_upsample_factor = int(mask_upsample_factor)
        self.segmentation_stop_gradient = bool(segmentation_stop_gradient)
        self.register_placement = register_placement
        self.mask_level_keys: tuple[str, ...] = ()
        if not self.use_anatomical_registers:
            return
        _check_anatomical_options(register_placement, mask_decoder, register_update, mask_upsample_factor,
                                  num_anatomical_classes)
        factor = self.mask_upsample_factor
        self._build_register_bank(use_timestep_aware_registers, num_anatomical_classes, num_registers_per_class,
                                  anatomical_register_dim, register_dropout, use_spatial_encoding)
        wanted = self._choose_attention_blocks(anatomical_attention_resolutions, register_placement)
        self._build_register_layers(anatomical_register_dim, anatomical_attention_heads, anatomical_attention_dim,
                                    register_update, register_read_pool)
        self._build_mask_head(mask_decoder)
        self._build_mask_levels(mask_head_levels)
        logger.info("AnatomicalUNetModel: %d classes x %d registers (dim %d), register attention at %d blocks "
                    "(ds %s, %s), register_update=%s, mask at %dx latent size (%s)", num_anatomical_classes,
                    num_registers_per_class, anatomical_register_dim, len(self.anatomical_attention_keys), wanted,
                    register_placement, register_update, factor, "head" if factor == 1 else mask_decoder)

    def _build_register_bank(self, timestep_aware: bool, num_classes: int, registers_per_class: int,
                             register_dim: int, dropout: float, use_spatial_encoding: bool) -> None:
        """``self.register_bank``: timestep-aware (modulated by the time embedding) or constant tokens."""
        time_embed_dim = self.time_embed[-1].out_features
        if timestep_aware:
            self.register_bank: AnatomicalRegisterBank = TimestepAwareRegisterBank(
                num_classes, registers_per_class, register_dim, time_embed_dim,
                dropout=dropout, use_spatial_encoding=use_spatial_encoding, dims=self.dims)
        else:
            self.register_bank = AnatomicalRegisterBank(
                num_classes, registers_per_class, register_dim,
                dropout=dropout, use_spatial_encoding=use_spatial_encoding, dims=self.dims)

    def _choose_attention_blocks(self, resolutions: Optional[Sequence[int]], placement: str) -> list[int]:
        """Set ``self.anatomical_attention_blocks``: the res/middle blocks at the downsampling factors
        ``resolutions`` (``None``: all), with ``per_level`` only each level's last per path; returns the factors."""
        available = sorted({info.ds for info in self.block_info if info.kind in _ATTENDED_KINDS})
        wanted = available if resolutions is None else sorted({int(r) for r in resolutions})
        unknown = [r for r in wanted if r not in available]
        if unknown or not wanted:
            raise ValueError(f"anatomical_attention_resolutions {list(wanted)} must be downsampling factors of "
                             f"this UNet (available: {available}); unknown: {unknown}")
        chosen = [info for info in self.block_info if info.kind in _ATTENDED_KINDS and info.ds in wanted]
        if placement == "per_level":  # the last block of each (path, level): the level's final features
            last = {(info.stage, info.ds): info for info in chosen}
            chosen = [info for info in chosen if last[(info.stage, info.ds)] is info]
        self.anatomical_attention_blocks = tuple(chosen)
        return wanted

    def _build_register_layers(self, register_dim: int, heads: int, attention_dim: Optional[int],
                               register_update: str, read_pool: int) -> None:
        """``self.anatomical_attention`` (and with ``register_update: read`` ``self.register_read``): one layer
        per chosen block, keyed by its :attr:`BlockInfo.key`."""
        self.anatomical_attention = nn.ModuleDict({
            info.key: AnatomicalCrossAttention(
                info.channels, register_dim, heads=heads, position_dim=self.register_bank.position_dim,
                inner_dim=None if attention_dim is None else min(int(attention_dim), info.channels))
            for info in self.anatomical_attention_blocks})
        if register_update == "read":
            self.register_read = nn.ModuleDict({
                info.key: RegisterReadAttention(info.channels, register_dim, heads=heads, pool_size=read_pool,
                                                position_dim=self.register_bank.position_dim)
                for info in self.anatomical_attention_blocks})

    def _build_mask_head(self, mask_decoder: str) -> None:
        """``self.segmentation_head`` at latent resolution (``mask_upsample_factor: 1``), else ``self.mask_decoder``
        of the kind ``mask_decoder``; both read the decoder features (``model_channels``)."""
        feat_ch, factor = self.model_channels, self.mask_upsample_factor
        if factor == 1:
            self.segmentation_head = nn.Sequential(
                nn.GroupNorm(_num_groups(feat_ch), feat_ch, eps=1e-6), nn.SiLU(),
                conv_nd(self.dims, feat_ch, feat_ch, 3, padding=1),
                nn.GroupNorm(_num_groups(feat_ch), feat_ch, eps=1e-6), nn.SiLU(),
                conv_nd(self.dims, feat_ch, self.num_anatomical_classes, 1),
            )
        elif mask_decoder == "pixel_shuffle":
            self.mask_decoder = PixelShuffleMaskHead(feat_ch, self.num_anatomical_classes, factor, dims=self.dims)
        else:
            self.mask_decoder = AnatomicalMaskDecoder(feat_ch, self.num_anatomical_classes, factor, dims=self.dims)

    def _build_mask_levels(self, levels: int) -> None:
        """``self.mask_levels`` reading the last output block of each of the ``levels - 1`` next-coarser decoder
        levels (nothing for ``levels == 1``)."""
        n_levels = len(self.channel_mult)
        if int(levels) != levels or not 1 <= int(levels) <= n_levels:
            raise ValueError(f"mask_head_levels must be an integer from 1 to the UNet's {n_levels} levels "
                             f"(len(channel_mult)), got {levels!r}")
        if int(levels) == 1:
            return
        last: dict[int, BlockInfo] = {}
        for info in self.block_info:
            if info.stage == BlockStage.OUTPUT:
                last[info.ds] = info  # the last output block at each downsampling factor
        chosen = [last[2 ** i] for i in range(1, int(levels))]
        self.mask_level_keys = tuple(info.key for info in chosen)
        self.mask_levels = DecoderLevelFusion({info.key: info.channels for info in chosen}, self.model_channels,
                                              dims=self.dims)

    @property
    def mask_head(self) -> nn.Module:
        """The module mapping decoder features to segmentation logits (head or mask decoder)."""
        return self.segmentation_head if self.mask_upsample_factor == 1 else self.mask_decoder

    @property
    def anatomical_attention_keys(self) -> list[str]:
        """Block keys (:attr:`BlockInfo.key`) of the blocks followed by a register attention, in block order."""
        return [info.key for info in self.anatomical_attention_blocks]

    # ---- extension point -------------------------------------------------------------------------
    state_type: ClassVar[type[UNetState]] = AnatomicalUNetState

    def prepare_state(self, x: torch.Tensor, timesteps: Optional[torch.Tensor] = None,
                      context: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None,
                      collect_attention: bool = False, **extra: Any) -> AnatomicalUNetState:
        """:class:`AnatomicalUNetState` with the register tokens of this call; ``collect_attention`` also
        records each register layer's per-class attention mass in ``state.class_attention``."""
        state = super().prepare_state(x, timesteps, context, y, **extra)
        assert isinstance(state, AnatomicalUNetState)
        if self.use_anatomical_registers:
            state.registers = self.register_bank(x.shape[0], state.emb)
            state.collect_attention = bool(collect_attention)
        return state

    def block_hook(self, info: BlockInfo, h: torch.Tensor, state: AnatomicalUNetState) -> torch.Tensor:
        h = super().block_hook(info, h, state)
        if self.use_anatomical_registers and info.key in self.anatomical_attention:
            h = self._register_layers(info, h, state)
        if info.key in self.mask_level_keys:
            state.level_features[info.key] = h
        return h

    def _register_layers(self, info: BlockInfo, h: torch.Tensor, state: AnatomicalUNetState) -> torch.Tensor:
        """The register read (``register_update: read``) and the register cross-attention after block ``info``."""
        layer = self.anatomical_attention[info.key]
        # the anatomical modules stay in float32 when the blocks run in float16 (use_fp16); under autocast the
        # features keep their dtype (autocast casts per op: an upcast here copied every feature map to float32 and back)
        dtype = layer.to_out.weight.dtype
        features = h if torch.is_autocast_enabled(h.device.type) else h.to(dtype)
        use_checkpoint = self.use_checkpoint and self.training and torch.is_grad_enabled()
        if self.register_update == "read":
            reader = self.register_read[info.key]
            pooled_pos = self._position_codes(reader.pooled_size(*h.shape[2:]), state, h, dtype)
            args = (features, state.registers, pooled_pos)
            state.registers = checkpoint(reader, *args, use_reentrant=False) if use_checkpoint else reader(*args)
            state.register_states[info.key] = state.registers
        pos = self._position_codes(tuple(h.shape[2:]), state, h, dtype)
        membership = self.register_bank.class_membership(dtype) if state.collect_attention else None
        args = (features, state.registers, pos, membership)
        if use_checkpoint:
            out, mass = checkpoint(layer, *args, use_reentrant=False)
        else:
            out, mass = layer(*args)
        if mass is not None:
            state.class_attention[info.key] = mass
        return out.to(h.dtype)

    def _position_codes(self, size: tuple[int, ...], state: AnatomicalUNetState, h: torch.Tensor,
                        dtype: torch.dtype) -> Optional[torch.Tensor]:
        """Position codes of a ``size`` grid (``None`` without spatial encoding), computed once per call and size."""
        if size not in state.position_codes:
            state.position_codes[size] = self.register_bank.position_codes(*size, device=h.device, dtype=h.dtype)
        pos = state.position_codes[size]
        return None if pos is None else pos.to(dtype)

    # ---- calls -----------------------------------------------------------------------------------
    def compile(self, *args: Any, **kwargs: Any) -> None:
        """``Module.compile`` (``forward``, in place) plus the same compilation of :meth:`forward_with_anatomy`,
        which training and anatomy guidance call directly; state-dict keys are unchanged."""
        super().compile(*args, **kwargs)
        # the plain function, called with self: a deep copy of this module runs its own weights through it
        self._compiled_forward_with_anatomy = torch.compile(type(self)._forward_with_anatomy, *args, **kwargs)

    def forward_with_anatomy(self, x: torch.Tensor, timesteps: Optional[torch.Tensor] = None,
                             context: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None,
                             **kwargs: Any) -> AnatomyOutput:
        """The prediction together with the segmentation and class-attention outputs (see :class:`AnatomyOutput`)."""
        if not self.use_anatomical_registers:
            raise ValueError("forward_with_anatomy needs use_anatomical_registers: true in the UNet config")
        compiled = self.__dict__.get("_compiled_forward_with_anatomy")
        run = self._forward_with_anatomy if compiled is None else (lambda *a, **k: compiled(self, *a, **k))
        out, seg_logits, layers, registers, register_states = run(x, timesteps, context, y, **kwargs)
        return AnatomyOutput(prediction=out, seg_logits=seg_logits, layer_class_attention=layers, registers=registers,
                             register_states=register_states, size=x.shape[2:])

    def _forward_with_anatomy(self, x: torch.Tensor, timesteps: Optional[torch.Tensor],
                              context: Optional[torch.Tensor], y: Optional[torch.Tensor],
                              **kwargs: Any) -> tuple:
        """``(prediction, seg_logits, layer class attention, registers, register states)``: the traced part of
        :meth:`forward_with_anatomy` (plain tensors and dicts, which ``torch.compile`` returns without a break)."""
        out, state = self.forward_with_state(x, timesteps, context, y, collect_attention=True, **kwargs)
        assert isinstance(state, AnatomicalUNetState) and state.features is not None
        size = x.shape[2:]
        head = self.mask_head
        seg_logits = head(self._mask_features(state).to(next(head.parameters()).dtype))
        mask_size = tuple(s * self.mask_upsample_factor for s in size)
        if tuple(seg_logits.shape[2:]) != mask_size:
            seg_logits = resize_maps(seg_logits, mask_size)
        return out, seg_logits, dict(state.class_attention), state.registers, dict(state.register_states)

    def _mask_features(self, state: AnatomicalUNetState) -> torch.Tensor:
        """The features the mask head reads: the last decoder level's, plus the coarser levels' with
        ``mask_head_levels > 1``, through a stop-gradient with ``segmentation_stop_gradient``."""
        features, levels = state.features, state.level_features
        if self.segmentation_stop_gradient:
            features, levels = features.detach(), {k: v.detach() for k, v in levels.items()}
        if self.mask_level_keys:
            features = self.mask_levels(features, {k: levels[k] for k in self.mask_level_keys})
        return features

    def forward(self, x: torch.Tensor, timesteps: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None,
                return_anatomy: bool = False, **kwargs: Any) -> Any:
        """The base UNet's prediction tensor.

        ``return_anatomy=True`` is deprecated (use :meth:`forward_with_anatomy`): it returns
        ``(prediction, {"seg_logits", "class_attention"})`` as the first version did.
        """
        if not return_anatomy:
            return super().forward(x, timesteps, context, y, **kwargs)
        deprecate("AnatomicalUNetModel.forward(..., return_anatomy=True)", "0.2.0",
                  "call forward_with_anatomy(x, t), which returns an AnatomyOutput")
        anatomy = self.forward_with_anatomy(x, timesteps, context, y, **kwargs)
        return anatomy.prediction, {"seg_logits": anatomy.seg_logits, "class_attention": anatomy.class_attention}
