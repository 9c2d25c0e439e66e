"""The latent-diffusion UNet (``UNetModel``) and its blocks, with CompVis parameter names and
state-dict keys, plus a typed extension point for subclasses.

Extension point (used by the anatomical UNet, see ``UNetModel``): ``prepare_state`` builds the per-call
:class:`UNetState` (a subclass sets ``state_type`` to its own dataclass with extra fields), every block
receives it, ``block_hook(info, h, state)`` runs after each block with that block's :class:`BlockInfo`,
``block_info`` describes every block and ``state.features`` holds the decoder features before the output
head.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.mask_condition import MASK_CONDITION_KEY, MaskConditionEncoder
from ldm.modules.diffusionmodules.util import (ConditionedBlock, TimestepBlock, avg_pool_nd, checkpoint, conv_nd,
                                               linear, normalization, timestep_embedding, zero_module)


__all__ = ["TimestepBlock", "TimestepEmbedSequential", "Upsample", "Downsample", "ResBlock", "AttentionBlock", "UNetModel",
           "qkv_attention", "token_qkv_attention", "BlockInfo", "BlockKind", "BlockStage", "UNetState", "compile_unet"]


class BlockStage(enum.StrEnum):
    """Where a block sits: the encoder (``input_blocks``), the middle block or the decoder (``output_blocks``)."""

    INPUT = "input"
    MIDDLE = "middle"
    OUTPUT = "output"


class BlockKind(enum.StrEnum):
    """What a block is: the input conv, a residual level block, a downsampler, the middle block, or a
    decoder block that ends in an upsampler."""

    CONV_IN = "conv_in"
    RES = "res"
    DOWNSAMPLE = "downsample"
    MIDDLE = "middle"
    RES_UP = "res_up"


@dataclass(frozen=True)
class BlockInfo:
    """Description of one UNet block, passed to ``UNetModel.block_hook``.

    Args:
        stage: input, middle or output.
        index: position within its stage (``input_blocks[index]``, ``output_blocks[index]``; 0 for middle).
        kind: see :class:`BlockKind`.
        ds: downsampling factor of the block's output relative to the input (1, 2, 4, ...).
        channels: channels of the block's output.
    """

    stage: BlockStage
    index: int
    kind: BlockKind
    ds: int
    channels: int

    @property
    def key(self) -> str:
        """``"{stage}_{index}"``, e.g. ``"output_3"``: unique within a UNet (the names of per-block modules)."""
        return f"{self.stage}_{self.index}"


@dataclass
class UNetState:
    """Per-call conditioning that every block of a ``UNetModel`` sees (built by ``prepare_state``).

    Subclasses of ``UNetModel`` extend it by subclassing (new fields need defaults) and setting
    ``state_type``. ``ConditionedBlock`` layers read their input with :meth:`get`.

    Args:
        emb: time [+ class] embedding [B, 4 * model_channels], in the blocks' dtype.
        timesteps: the diffusion steps [B].
        context: cross-attention conditioning, or ``None``.
        y: class labels of a class-conditional UNet, or ``None``.
        features: decoder features before the output head, set at the end of ``forward_with_state``.
        extra: keyword arguments of the call that no field takes (read by custom conditioned layers).
    """

    emb: torch.Tensor
    timesteps: torch.Tensor
    context: Optional[torch.Tensor] = None
    y: Optional[torch.Tensor] = None
    features: Optional[torch.Tensor] = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def reserved_names(cls) -> frozenset[str]:
        """Field names, which extra keyword arguments must not use."""
        return frozenset(f.name for f in fields(cls))

    def get(self, key: str, default: Any = None) -> Any:
        """The field ``key``, else the extra keyword argument ``key``, else ``default``."""
        if key in self.__dataclass_fields__ and key != "extra":
            return getattr(self, key)
        return self.extra.get(key, default)


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """``nn.Sequential`` that hands conditioning to the layers that need it.

    Called as ``block(x, cond)`` with ``cond`` the UNet's :class:`UNetState` (or a plain mapping), or
    CompVis style ``block(x, emb, context=None)``. Layers deriving from ``ConditionedBlock`` get
    ``layer.forward_cond(x, cond)`` and read their own key; all other layers get ``layer(x)``.

    Args: the layers, as ``nn.Sequential``.
    """

    def forward(self, x: torch.Tensor, cond: Any = None, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(cond, (Mapping, UNetState)):
            cond = {"emb": cond, "context": context}
        for layer in self:
            x = layer.forward_cond(x, cond) if isinstance(layer, ConditionedBlock) else layer(x)
        return x

    def forward_cond(self, x: torch.Tensor, cond: UNetState | Mapping[str, Any]) -> torch.Tensor:
        return self(x, cond)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling (spatial axes only; for ``dims=3`` the first axis is kept),
    optionally followed by a 3x3 conv.

    Args:
        channels: input channels.
        use_conv: apply a conv after upsampling.
        dims: 1, 2 or 3.
        out_channels: output channels (default ``channels``; must equal it without conv).
        padding: conv padding.
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None,
                 padding: int = 1) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)
        elif self.out_channels != channels:
            raise ValueError(f"Upsample without conv cannot change channels ({channels} -> {self.out_channels})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.channels
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 conv or average pooling (for ``dims=3`` the first axis is kept).

    Args:
        channels: input channels.
        use_conv: strided conv (else average pooling).
        dims: 1, 2 or 3.
        out_channels: output channels (default ``channels``; must equal it without conv).
        padding: conv padding.
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None,
                 padding: int = 1) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            if self.out_channels != channels:
                raise ValueError(f"Downsample without conv cannot change channels ({channels} -> {self.out_channels})")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (reads ``cond["emb"]``).

    ``GN-SiLU-conv``, add (or scale/shift by) the projected embedding, ``GN-SiLU-dropout-conv``
    (zero-initialised), plus a skip connection.

    Args:
        channels: input channels.
        emb_channels: embedding features.
        dropout: dropout rate before the last conv.
        out_channels: output channels (default ``channels``).
        use_conv: 3x3 conv (instead of 1x1) on the skip path when channels change.
        use_scale_shift_norm: FiLM-style ``norm(h) * (1 + scale) + shift`` conditioning.
        dims: 1, 2 or 3.
        use_checkpoint: gradient checkpointing.
        up: upsample inside the block.
        down: downsample inside the block.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: Optional[int] = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False) -> None:
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       conv_nd(dims, channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *((1,) * (h.ndim - emb_out.ndim)))
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def qkv_attention(qkv: torch.Tensor, num_heads: int, legacy_order: bool = True) -> torch.Tensor:
    """Multi-head self-attention on a fused ``qkv`` [B, 3*H*C, T] -> [B, H*C, T].

    ``legacy_order``: the channels are grouped per head as [q_h, k_h, v_h] (CompVis
    ``QKVAttentionLegacy``); otherwise as [q (all heads), k, v] (``QKVAttention``). Scores are scaled
    by 1/sqrt(C) and computed with ``scaled_dot_product_attention``.
    """
    return token_qkv_attention(qkv.transpose(1, 2), num_heads, legacy_order).transpose(1, 2)


def token_qkv_attention(qkv: torch.Tensor, num_heads: int, legacy_order: bool = True) -> torch.Tensor:
    """:func:`qkv_attention` in token layout: ``qkv`` [B, T, 3*H*C] -> [B, T, H*C].

    Queries, keys and values reach ``scaled_dot_product_attention`` as [B, H, T, C] views whose last axis is
    contiguous, which lets it use its fused kernels (a channel-major layout falls back to the unfused path).
    """
    b, length, width = qkv.shape
    assert width % (3 * num_heads) == 0
    ch = width // (3 * num_heads)
    grouped = qkv.view(b, length, num_heads, 3, ch) if legacy_order else qkv.view(b, length, 3, num_heads, ch)
    q, k, v = grouped.unbind(3 if legacy_order else 2)  # each [B, T, H, C]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(b, length, num_heads * ch)


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions of a feature map, with a residual connection.

    Args:
        channels: feature channels.
        num_heads: number of heads (used when ``num_head_channels`` is -1).
        num_head_channels: channels per head (overrides ``num_heads`` when not -1).
        use_checkpoint: gradient checkpointing.
        use_new_attention_order: split the fused qkv as [q, k, v] instead of per head (CompVis default: per head).
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, use_checkpoint: bool = False,
                 use_new_attention_order: bool = False) -> None:
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} are not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        if self.num_heads < 1 or channels % self.num_heads:
            raise ValueError(f"cannot split {channels} channels into {self.num_heads} attention heads")
        self.use_checkpoint = use_checkpoint
        self.legacy_order = not use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # The 1x1 Conv1d projections (CompVis parameters, kept) run as matrix products on [B, T, C] tokens: the
        # same numbers as the convolutions, without their im2col path, and in the layout attention wants.
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        tokens = self.norm(x).transpose(1, 2)  # [B, T, C]
        qkv = F.linear(tokens, self.qkv.weight.squeeze(-1), self.qkv.bias)
        h = token_qkv_attention(qkv, self.num_heads, self.legacy_order)
        h = F.linear(h, self.proj_out.weight.squeeze(-1), self.proj_out.bias).transpose(1, 2)
        return (x + h).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """The diffusion UNet with timestep embedding, attention and optional class/cross-attention conditioning.

    Args (CompVis names and defaults):
        image_size: spatial size of the input (informational).
        in_channels, out_channels: channels of input and output.
        model_channels: base channel count.
        num_res_blocks: residual blocks per level.
        attention_resolutions: downsampling factors (1, 2, 4, ...) at which attention is used.
        dropout: dropout in residual blocks.
        channel_mult: channel multiplier per level.
        conv_resample: learned conv in up/downsampling.
        dims: 1, 2 or 3 dimensional signals.
        num_classes: class-conditional with this many classes (``y`` required).
        use_checkpoint: gradient checkpointing in residual, attention and transformer blocks.
        use_fp16: run the blocks in float16 (embeddings and output head stay float32).
        num_heads: attention heads; num_head_channels: channels per head (overrides num_heads if not -1);
        num_heads_upsample: heads in the decoder (default num_heads).
        use_scale_shift_norm: FiLM-style timestep conditioning.
        resblock_updown: residual blocks for up/downsampling.
        use_new_attention_order: [q, k, v] split of the fused qkv instead of per head.
        use_spatial_transformer, transformer_depth, context_dim: cross-attention transformers.
        n_embed: predict codebook ids (``id_predictor``) instead of ``out``.
        legacy: CompVis head-size rule (keep True for CompVis checkpoints).
        mask_condition_classes: ``C`` > 0: the UNet takes ``mask_condition=`` class fractions ``[B, C, h, w]``
            (:mod:`ldm.modules.mask_condition`, keys ``mask_condition.*``); none given, or zeros: unconditional.
        mask_condition_detail: ``d`` >= 1: the fractions come on a grid ``d`` times finer than the latent one,
            each cell's sub-cells stacked as channels (:class:`~ldm.modules.mask_condition.MaskConditionEncoder`).

    Extension point: ``forward_with_state`` runs the network and returns ``(out, state)``;
    subclasses set ``state_type`` to a :class:`UNetState` subclass, override ``prepare_state`` (fill
    their fields) and ``block_hook(info, h, state)`` (act after any block) and use ``block_info`` (one
    :class:`BlockInfo` per block, in call order) to pick the blocks. Conditioned layers inside blocks
    derive from ``ConditionedBlock`` and read their key with ``state.get``.
    """

    state_type: ClassVar[type[UNetState]] = UNetState

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Sequence[int], dropout: float = 0,
                 channel_mult: Sequence[int] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 num_classes: Optional[int] = None, use_checkpoint: bool = False, use_fp16: bool = False,
                 num_heads: int = -1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False, use_spatial_transformer: bool = False,
                 transformer_depth: int = 1, context_dim: Optional[int] = None, n_embed: Optional[int] = None,
                 legacy: bool = True, mask_condition_classes: Optional[int] = None,
                 mask_condition_detail: int = 1) -> None:
        super().__init__()
        if use_spatial_transformer and context_dim is None:
            raise ValueError("use_spatial_transformer=True needs context_dim (the cross-attention conditioning size)")
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError("context_dim is set but use_spatial_transformer is False; set use_spatial_transformer: "
                             "True to use cross-attention conditioning, or remove context_dim")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels (both are -1)")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.dims = int(dims)
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.predict_codebook_ids = n_embed is not None
        self.mask_condition_classes = int(mask_condition_classes or 0)

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(linear(model_channels, time_embed_dim), nn.SiLU(),
                                        linear(time_embed_dim, time_embed_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def res(ch_in: int, ch_out: int, **kw: Any) -> ResBlock:
            return ResBlock(ch_in, time_embed_dim, dropout, out_channels=ch_out, dims=dims,
                            use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attention(ch: int, decoder: bool = False) -> nn.Module:
            # CompVis head rule: with num_head_channels the head count follows the width; with
            # legacy=True an AttentionBlock gets num_head_channels as given (so -1 keeps num_heads).
            heads = num_heads if num_head_channels == -1 else ch // num_head_channels
            dim_head = ch // heads if num_head_channels == -1 else num_head_channels
            if legacy:
                dim_head = ch // heads if use_spatial_transformer else num_head_channels
            if use_spatial_transformer:
                return SpatialTransformer(ch, heads, dim_head, depth=transformer_depth, context_dim=context_dim,
                                          use_checkpoint=use_checkpoint)
            return AttentionBlock(ch, num_heads=num_heads_upsample if decoder else heads, num_head_channels=dim_head,
                                  use_checkpoint=use_checkpoint, use_new_attention_order=use_new_attention_order)

        ch, infos = self._build_blocks(res, attention, dims, resblock_updown)
        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)))
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(normalization(ch), conv_nd(dims, model_channels, n_embed, 1))
        self.block_info: tuple[BlockInfo, ...] = tuple(infos)
        self._reserved_state_names = self.state_type.reserved_names()
        if self.mask_condition_classes:  # class fractions added to the first feature map (ldm.modules.mask_condition)
            with torch.random.fork_rng(devices=[]):  # every other weight is drawn as without it
                self.mask_condition = MaskConditionEncoder(self.mask_condition_classes, model_channels, dims=self.dims,
                                                           detail=mask_condition_detail)
        if use_fp16:
            self.convert_to_fp16()

    def _build_blocks(self, res: Callable[..., ResBlock], attention: Callable[..., nn.Module], dims: int,
                      resblock_updown: bool) -> tuple[int, list[BlockInfo]]:
        """Build ``input_blocks``, ``middle_block`` and ``output_blocks`` in this order with the makers ``res`` and
        ``attention``; returns the channels at the decoder's end and a :class:`BlockInfo` per block, in call order."""
        model_channels = self.model_channels
        infos: list[BlockInfo] = []

        def info(stage: str, index: int, ds: int, channels: int, kind: str) -> None:
            infos.append(BlockInfo(BlockStage(stage), index, BlockKind(kind), ds, channels))

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, self.in_channels, model_channels, 3, padding=1))])
        info("input", 0, 1, model_channels, "conv_in")
        input_block_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                info("input", len(self.input_blocks) - 1, ds, ch, "res")
                input_block_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, self.conv_resample, dims=dims,
                                                                                 out_channels=ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                ds *= 2
                info("input", len(self.input_blocks) - 1, ds, ch, "downsample")
                input_block_chans.append(ch)

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attention(ch), res(ch, ch))
        info("middle", 0, ds, ch, "middle")

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(self.num_res_blocks + 1):
                layers = [res(ch + input_block_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(attention(ch, decoder=True))
                kind = "res"
                if level and i == self.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown
                                  else Upsample(ch, self.conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                    kind = "res_up"
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                info("output", len(self.output_blocks) - 1, ds, ch, kind)
        return ch, infos

    # ----------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """dtype the blocks run in (float16 after ``convert_to_fp16`` / ``use_fp16``)."""
        return self.input_blocks[0][0].weight.dtype

    def convert_to_fp16(self) -> None:
        """Cast the input, middle and output blocks to float16 (embeddings and heads stay float32)."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.half()

    def convert_to_fp32(self) -> None:
        """Cast the input, middle and output blocks back to float32."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.float()

    # ----------------------------------------------------------------------------------------------
    def prepare_state(self, x: torch.Tensor, timesteps: Optional[torch.Tensor], context: Optional[torch.Tensor] = None,
                      y: Optional[torch.Tensor] = None, **extra: Any) -> UNetState:
        """The per-call :class:`UNetState` every block sees.

        Holds ``emb`` (time [+ class] embedding, in the blocks' dtype), ``timesteps``, ``context``, ``y``
        and every extra keyword argument in ``extra``. Subclasses fill their own fields after ``super()``.
        """
        if timesteps is None:
            raise ValueError("UNetModel needs timesteps (a tensor [B] of diffusion steps)")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("class labels y must be given exactly when the model is class-conditional "
                             f"(num_classes={self.num_classes}, y given: {y is not None})")
        if extra:  # the field names are computed once, in __init__ (dataclasses.fields breaks torch.compile graphs)
            clash = sorted(set(extra) & self._reserved_state_names)
            if clash:
                raise ValueError(f"keyword arguments {clash} clash with reserved UNet state fields "
                                 f"{sorted(self._reserved_state_names)}; rename them")
            if extra.get(MASK_CONDITION_KEY) is not None and not self.mask_condition_classes:
                raise ValueError("a mask condition was given, but this UNet has no mask_condition_classes")
        time_dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, repeat_only=False).to(time_dtype))
        if self.num_classes is not None:
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"y has batch size {y.shape[0]} but x has {x.shape[0]}")
            emb = emb + self.label_emb(y)
        if isinstance(context, torch.Tensor) and context.is_floating_point():
            context = context.to(self.dtype)
        return self.state_type(emb=emb.to(self.dtype), timesteps=timesteps, context=context, y=y, extra=extra)

    def block_hook(self, info: BlockInfo, h: torch.Tensor, state: UNetState) -> torch.Tensor:
        """Called after every block with its :class:`BlockInfo` and output; returns the tensor the network
        continues with. Here: the mask condition added after the first block (identity without one)."""
        cond = state.extra.get(MASK_CONDITION_KEY) if self.mask_condition_classes else None
        if cond is not None and info.stage == BlockStage.INPUT and info.index == 0:
            h = h + self.mask_condition(cond, h.shape[2:]).to(h.dtype)
        return h

    def forward_with_state(self, x: torch.Tensor, timesteps: Optional[torch.Tensor] = None,
                           context: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None,
                           **extra: Any) -> tuple[torch.Tensor, UNetState]:
        """Run the UNet; returns ``(output, state)`` where ``state.features`` holds the decoder features
        before the output head."""
        state = self.prepare_state(x, timesteps, context, y, **extra)
        infos = iter(self.block_info)
        h = x.type(self.dtype)
        hs = []
        for block in self.input_blocks:
            h = self.block_hook(next(infos), block(h, state), state)
            hs.append(h)
        h = self.block_hook(next(infos), self.middle_block(h, state), state)
        for block in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = self.block_hook(next(infos), block(h, state), state)
        h = h.type(x.dtype)
        state.features = h
        out = self.id_predictor(h) if self.predict_codebook_ids else self.out(h)
        return out, state

    def forward(self, x: torch.Tensor, timesteps: Optional[torch.Tensor] = None, context: Optional[torch.Tensor] = None,
                y: Optional[torch.Tensor] = None, **kwargs: Any) -> torch.Tensor:
        """Predicted noise (or codebook logits with ``n_embed``) for ``x`` at ``timesteps``."""
        return self.forward_with_state(x, timesteps, context, y, **kwargs)[0]


# compile_unet's old home (imported after UNetModel: no import cycle)
from ldm.modules.diffusionmodules.compile import compile_unet  # noqa: E402,F401
