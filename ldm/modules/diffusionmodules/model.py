"""Convolutional encoder and decoder of the CompVis first-stage autoencoders (KL and VQ).

Module names, parameter shapes and numerics follow the CompVis ``ddconfig`` interface so that
their checkpoints load with ``strict=True``: ``conv_in``, ``down.{i}.block.{j}``, ``down.{i}.attn.{j}``,
``down.{i}.downsample``, ``mid.block_1``, ``mid.attn_1``, ``mid.block_2``, ``up.{i}...``, ``norm_out``,
``conv_out``.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

ATTN_TYPES = ("vanilla", "linear", "none")
_ENCODER_ONLY_KEYS = frozenset({"double_z"})
_DECODER_ONLY_KEYS = frozenset({"give_pre_end", "tanh_out"})


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish / SiLU, ``x * sigmoid(x)``."""
    return F.silu(x)


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with 32 groups and eps 1e-6 (CompVis numbers).

    Channel counts that 32 does not divide (tiny test models) fall back to ``gcd(32, channels)``
    groups; every CompVis configuration uses multiples of 32 and is unaffected.
    """
    groups = num_groups if in_channels % num_groups == 0 else math.gcd(num_groups, in_channels)
    return nn.GroupNorm(num_groups=groups, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, optionally followed by a 3x3 convolution.

    Args:
        in_channels: channels in and out.
        with_conv: add the 3x3 convolution (``conv``).
    """

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """x2 downsampling: a stride-2 3x3 convolution after zero padding of one pixel on the right and
    bottom only (CompVis's asymmetric padding), or 2x2 average pooling without ``with_conv``.

    Args:
        in_channels: channels in and out.
        with_conv: use the strided convolution (``conv``) instead of pooling.
    """

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)
            return self.conv(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: norm, swish, conv, (+ time embedding), norm, swish, dropout, conv.

    Args:
        in_channels: input channels.
        out_channels: output channels (default: ``in_channels``); a shortcut projection is added
            when they differ (``conv_shortcut`` 3x3 if ``conv_shortcut`` else ``nin_shortcut`` 1x1).
        conv_shortcut: use a 3x3 instead of a 1x1 shortcut projection.
        dropout: dropout probability before the second convolution.
        temb_channels: width of an optional time embedding (0: none, as in the autoencoders).
    """

    def __init__(self, *, in_channels: int, out_channels: Optional[int] = None, conv_shortcut: bool = False,
                 dropout: float = 0.0, temb_channels: int = 512):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))
        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 convolutions ``q``, ``k``, ``v``, ``proj_out`` and a
    residual connection, computed by ``scaled_dot_product_attention`` (scale ``channels ** -0.5``).

    Args:
        in_channels: channels of the feature map.
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, height, width = h.shape

        def tokens(t: torch.Tensor) -> torch.Tensor:  # b,c,h,w -> b,1,hw,c
            return t.reshape(b, c, height * width).transpose(1, 2).unsqueeze(1)

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(out)


class LinAttnBlock(nn.Module):
    """CompVis ``attn_type="linear"``: one-head linear attention (softmax over positions of the keys),
    ``to_qkv`` 1x1 conv without bias and ``to_out`` 1x1 conv; no norm and no residual, as in CompVis.

    Args:
        in_channels: channels of the feature map (also the head width).
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.to_qkv = nn.Conv2d(in_channels, in_channels * 3, kernel_size=1, bias=False)
        self.to_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        q, k, v = self.to_qkv(x).reshape(b, 3, c, height * width).unbind(1)
        k = k.softmax(dim=-1)
        context = torch.einsum("bdn,ben->bde", k, v)
        out = torch.einsum("bde,bdn->ben", context, q)
        return self.to_out(out.reshape(b, c, height, width))


def make_attn(in_channels: int, attn_type: str = "vanilla") -> nn.Module:
    """Attention block of the requested CompVis ``attn_type`` ("vanilla", "linear" or "none")."""
    if attn_type not in ATTN_TYPES:
        raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {attn_type!r} (ddconfig.attn_type)")
    if attn_type == "vanilla":
        return AttnBlock(in_channels)
    if attn_type == "linear":
        return LinAttnBlock(in_channels)
    return nn.Identity()


def _resolve_attn_type(attn_type: str, use_linear_attn: bool) -> str:
    return "linear" if use_linear_attn else attn_type


def _check_extra(cls_name: str, extra: dict[str, Any], allowed: frozenset) -> None:
    unknown = sorted(set(extra) - allowed)
    if unknown:
        raise ValueError(
            f"{cls_name} got unknown ddconfig keys {unknown}; known keys are double_z, z_channels, resolution, "
            "in_channels, out_ch, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resamp_with_conv, "
            "give_pre_end, tanh_out, use_linear_attn, attn_type. Fix the model's ddconfig."
        )


def _check_ch_mult(ch_mult: Sequence[int]) -> tuple[int, ...]:
    ch_mult = tuple(int(m) for m in ch_mult)
    if not ch_mult or any(m <= 0 for m in ch_mult):
        raise ValueError(f"ddconfig.ch_mult must be a non-empty list of positive ints, got {list(ch_mult)}")
    return ch_mult


class _Level(nn.Module):
    """Container giving the CompVis key names ``block``, ``attn``, ``downsample``/``upsample``."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    """Middle of encoder and decoder: ``block_1``, ``attn_1``, ``block_2``."""

    def __init__(self, channels: int, dropout: float, temb_channels: int, attn_type: str):
        super().__init__()
        self.block_1 = ResnetBlock(in_channels=channels, out_channels=channels, temb_channels=temb_channels,
                                   dropout=dropout)
        self.attn_1 = make_attn(channels, attn_type)
        self.block_2 = ResnetBlock(in_channels=channels, out_channels=channels, temb_channels=temb_channels,
                                   dropout=dropout)

    def forward(self, h: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h, temb)), temb)


class Encoder(nn.Module):
    """Image -> latent moments (``2 * z_channels`` channels with ``double_z``), downsampling by
    ``2 ** (len(ch_mult) - 1)``.

    Args:
        ch: base channel count.
        out_ch: unused by the encoder (shared ddconfig key).
        ch_mult: channel multiplier per resolution level.
        num_res_blocks: residual blocks per level.
        attn_resolutions: feature-map sizes (relative to ``resolution``) that get self-attention.
        dropout: dropout in the residual blocks.
        resamp_with_conv: strided convolution (True) or average pooling for downsampling.
        in_channels: image channels.
        resolution: nominal image size, used to place attention.
        z_channels: latent channels.
        double_z: output mean and log-variance (``2 * z_channels``).
        use_linear_attn: shorthand for ``attn_type="linear"``.
        attn_type: "vanilla", "linear" or "none".
        **decoder_keys: decoder-only ddconfig keys (``give_pre_end``, ``tanh_out``), ignored here.
    """

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True,
                 use_linear_attn: bool = False, attn_type: str = "vanilla", **decoder_keys: Any):
        super().__init__()
        _check_extra("Encoder", decoder_keys, _DECODER_ONLY_KEYS)
        ch_mult = _check_ch_mult(ch_mult)
        attn_type = _resolve_attn_type(attn_type, use_linear_attn)
        attn_resolutions = {int(r) for r in attn_resolutions}
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1,) + ch_mult
        self.in_ch_mult = in_ch_mult
        self.down = nn.ModuleList()
        curr_res = resolution
        block_in = ch
        for i_level in range(self.num_resolutions):
            level = _Level()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(in_channels=block_in, out_channels=block_out,
                                               temb_channels=self.temb_ch, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(make_attn(block_in, attn_type))
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in, resamp_with_conv)
                curr_res = curr_res // 2
            self.down.append(level)

        self.mid = _Mid(block_in, dropout, self.temb_ch, attn_type)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels,
                                  kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        temb = None
        h = self.conv_in(x)
        for i_level, level in enumerate(self.down):
            for i_block, block in enumerate(level.block):
                h = block(h, temb)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid(h, temb)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image, upsampling by ``2 ** (len(ch_mult) - 1)``; ``num_res_blocks + 1`` residual
    blocks per level, as in CompVis.

    Args:
        ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resamp_with_conv, in_channels,
        resolution, z_channels, use_linear_attn, attn_type: as for :class:`Encoder` (``out_ch``: image
            channels produced; ``in_channels`` is unused here).
        give_pre_end: return the features before ``norm_out``/``conv_out``.
        tanh_out: squash the output with ``tanh``.
        **encoder_keys: encoder-only ddconfig keys (``double_z``), ignored here.
    """

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, give_pre_end: bool = False,
                 tanh_out: bool = False, use_linear_attn: bool = False, attn_type: str = "vanilla",
                 **encoder_keys: Any):
        super().__init__()
        _check_extra("Decoder", encoder_keys, _ENCODER_ONLY_KEYS)
        ch_mult = _check_ch_mult(ch_mult)
        attn_type = _resolve_attn_type(attn_type, use_linear_attn)
        attn_resolutions = {int(r) for r in attn_resolutions}
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        logger.debug("Decoder working on z of shape %s = %d dimensions.", self.z_shape, math.prod(self.z_shape))

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _Mid(block_in, dropout, self.temb_ch, attn_type)

        levels: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            level = _Level()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(in_channels=block_in, out_channels=block_out,
                                               temb_channels=self.temb_ch, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(make_attn(block_in, attn_type))
            if i_level != 0:
                level.upsample = Upsample(block_in, resamp_with_conv)
                curr_res = curr_res * 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        temb = None
        h = self.mid(self.conv_in(z), temb)
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block, block in enumerate(level.block):
                h = block(h, temb)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(nonlinearity(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h
