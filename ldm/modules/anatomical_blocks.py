"""Layers of the anatomical UNet beyond the feature <- register attention: the register read and the mask decoder.

- :class:`RegisterReadAttention`: the registers read the features (registers are the queries, the
  pooled feature map gives keys and values), so the register stream carries a per-sample state that the
  features then read back. Zero-initialised output: a fresh layer leaves the registers unchanged.
- :class:`AnatomicalMaskDecoder`: segmentation logits from the last decoder features, upsampled by a
  learned nearest-upsample + conv stage per factor 2 (Odena et al. 2016, "Deconvolution and checkerboard
  artifacts"), so that the mask is predicted at image resolution instead of the latent grid.
- :class:`PixelShuffleMaskHead`: the same image-size logits computed at the latent grid: a 1x1 convolution
  predicts the ``f x f`` sub-pixels of every class, rearranged by pixel shuffle (Shi et al. 2016, "Real-time
  single image and video super-resolution using an efficient sub-pixel convolutional neural network"), so no
  convolution runs above the latent resolution (the lean design, ``mask_decoder: pixel_shuffle``).
- :class:`DecoderLevelFusion`: the decoder features of coarser levels projected to the last level's width,
  resized to its grid and added to it, so that the mask head reads several decoder levels (``mask_head_levels``).
  Zero-initialised projections: a fresh fusion leaves the last level's features unchanged.

Every layer takes 1, 2 or 3 spatial dimensions (``dims`` for the mask heads, as ``UNetModel``'s; the register read
pools whatever it is given); the docstrings write the 2D shapes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import adaptive_avg_pool_nd, conv_nd, resize_maps


def check_upsample_factor(value: int, head: str) -> int:
    """``value`` as a mask head's upsampling factor: a power of two >= 2, else a ValueError naming ``head``."""
    factor = int(value)
    if factor < 2 or factor & (factor - 1):
        raise ValueError(f"mask_upsample_factor must be a power of two >= 2 for the {head}, got {value} "
                         f"(1 = the latent-resolution head)")
    return factor


def num_groups(channels: int, preferred: int = 32) -> int:
    """Largest group count <= ``preferred`` that divides ``channels`` (32 for usual UNet widths)."""
    return math.gcd(int(channels), preferred)


class RegisterReadAttention(nn.Module):
    """Registers (queries) attend to a pooled feature map (keys/values) and update themselves.

    ``R <- R + W_o · attention(W_q · LN(R), W_k · LN(pool(h)) [+ W_p · pos], W_v · LN(pool(h)))``,
    ``pool`` = adaptive average pooling to at most ``pool_size x pool_size`` cells, so the cost is ``C*K``
    queries over at most ``pool_size^2`` keys whatever the level's size. The pooled cells are layer-normalised
    as tokens (over channels), not group-normalised over the grid, which would remove each channel's mean over
    the image: the global content the registers should read. ``W_o`` is zero-initialised.

    Args:
        channels: feature channels of the block it follows.
        register_dim: width ``D`` of the register tokens (also the attention width).
        heads: attention heads; must divide ``register_dim``.
        pool_size: largest side of the pooled feature grid (>= 1).
        position_dim: width of the position codes added to the keys (``None``: no codes).
    """

    def __init__(self, channels: int, register_dim: int, heads: int = 8, pool_size: int = 8,
                 position_dim: Optional[int] = None) -> None:
        super().__init__()
        if heads < 1 or register_dim % heads != 0:
            raise ValueError(f"anatomical_attention_heads ({heads}) must be >= 1 and divide anatomical_register_dim "
                             f"({register_dim}) when register_update is 'read'")
        if int(pool_size) < 1:
            raise ValueError(f"register_read_pool must be >= 1, got {pool_size}")
        self.channels = int(channels)
        self.heads = int(heads)
        self.dim_head = register_dim // self.heads
        self.pool_size = int(pool_size)
        self.norm_registers = nn.LayerNorm(register_dim)
        self.norm_features = nn.LayerNorm(channels)
        self.to_q = nn.Linear(register_dim, register_dim, bias=False)
        self.to_k = nn.Linear(channels, register_dim, bias=False)
        self.to_v = nn.Linear(channels, register_dim, bias=False)
        self.pos_proj = nn.Linear(position_dim, register_dim, bias=False) if position_dim else None
        self.to_out = nn.Linear(register_dim, register_dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def pooled_size(self, *sizes: int) -> tuple[int, ...]:
        """Grid the features of spatial size ``sizes`` (height, width; or depth, height, width) are pooled to
        before the registers read them."""
        return tuple(min(int(s), self.pool_size) for s in sizes)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)  # [B, heads, n, dim_head]

    def forward(self, h: torch.Tensor, registers: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Updated registers ``[B, T, D]`` after reading ``h`` [B, ch, H, W]; ``pos``: position codes
        ``[h_p * w_p, position_dim]`` of the pooled grid (:meth:`pooled_size`)."""
        b, ch = h.shape[:2]
        if ch != self.channels:
            raise ValueError(f"RegisterReadAttention built for {self.channels} channels got {ch}")
        pooled = adaptive_avg_pool_nd(h, self.pooled_size(*h.shape[2:]))
        feats = self.norm_features(pooled.flatten(2).transpose(1, 2))  # [B, n, ch]
        k = self.to_k(feats)
        if self.pos_proj is not None:
            if pos is None:
                raise ValueError("this layer was built with position codes; pass pos=[h_p*w_p, position_dim]")
            k = k + self.pos_proj(pos.to(k.dtype)).unsqueeze(0)
        registers = registers.to(k.dtype)
        q = self._split(self.to_q(self.norm_registers(registers)))
        out = F.scaled_dot_product_attention(q, self._split(k), self._split(self.to_v(feats)))
        out = out.transpose(1, 2).reshape(b, registers.shape[1], -1)
        return registers + self.to_out(out)


class AnatomicalMaskDecoder(nn.Module):
    """Segmentation logits at ``upsample_factor`` times the feature resolution.

    ``GN-SiLU-Conv3x3`` on the features, then per factor 2 one ``nearest x2 -> Conv3x3 -> GN -> SiLU`` stage
    (channels halved each stage, at least ``min_channels``), then a 1x1 conv to the classes.

    Args:
        in_channels: channels of the decoder features (the UNet's ``model_channels``).
        num_classes: output classes ``C``.
        upsample_factor: power of two >= 2 (the first stage's downsampling factor for image-size masks).
        min_channels: narrowest stage.
        dims: spatial dimensions (2: slices, 3: volumes).
    """

    def __init__(self, in_channels: int, num_classes: int, upsample_factor: int, min_channels: int = 16,
                 dims: int = 2) -> None:
        super().__init__()
        factor = self.upsample_factor = check_upsample_factor(upsample_factor, "mask decoder")
        self.trunk = nn.Sequential(nn.GroupNorm(num_groups(in_channels), in_channels, eps=1e-6), nn.SiLU(),
                                   conv_nd(dims, in_channels, in_channels, 3, padding=1))
        stages, ch = [], int(in_channels)
        for _ in range(int(math.log2(factor))):
            out_ch = max(ch // 2, int(min_channels))
            stages.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                        conv_nd(dims, ch, out_ch, 3, padding=1),
                                        nn.GroupNorm(num_groups(out_ch), out_ch, eps=1e-6), nn.SiLU()))
            ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.out = conv_nd(dims, ch, int(num_classes), 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C, f*h, f*w]`` for features ``[B, in_channels, h, w]``."""
        return self.out(self.stages(self.trunk(features)))


class PixelShuffleMaskHead(nn.Module):
    """Segmentation logits at ``upsample_factor`` times the feature resolution, every convolution at the features' grid.

    ``GN-SiLU-Conv3x3`` on the features, ``GN-SiLU-Conv1x1`` to ``C * f * f`` channels, then pixel shuffle: the
    ``f x f`` logits of each latent cell come from that cell's features (and, through the 3x3 convolution, its
    neighbours'). The cost is that of the latent-resolution head plus one 1x1 convolution.

    Args:
        in_channels: channels of the decoder features (the UNet's ``model_channels``).
        num_classes: output classes ``C``.
        upsample_factor: power of two >= 2 (the first stage's downsampling factor for image-size masks).
        dims: spatial dimensions (2: slices, 3: volumes; ``C * f**dims`` sub-cell logits per cell).
    """

    def __init__(self, in_channels: int, num_classes: int, upsample_factor: int, dims: int = 2) -> None:
        super().__init__()
        factor = self.upsample_factor = check_upsample_factor(upsample_factor, "pixel-shuffle head")
        ch = int(in_channels)
        self.trunk = nn.Sequential(nn.GroupNorm(num_groups(ch), ch, eps=1e-6), nn.SiLU(),
                                   conv_nd(dims, ch, ch, 3, padding=1),
                                   nn.GroupNorm(num_groups(ch), ch, eps=1e-6), nn.SiLU())
        self.out = conv_nd(dims, ch, int(num_classes) * factor ** dims, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C, f*h, f*w]`` for features ``[B, in_channels, h, w]``."""
        return pixel_shuffle_nd(self.out(self.trunk(features)), self.upsample_factor)


class DecoderLevelFusion(nn.Module):
    """The features the mask head reads: the last decoder level's ``[B, C, h, w]`` plus every coarser level's map
    (``GroupNorm -> SiLU -> 1x1 conv`` to ``C`` channels, resized to ``h x w`` by (bi/tri)linear interpolation).

    Args:
        level_channels: block key -> channels of the coarser level features that block gives (in any order).
        out_channels: the last level's channels ``C``.
        dims: spatial dimensions.
    """

    def __init__(self, level_channels: dict[str, int], out_channels: int, dims: int = 2) -> None:
        super().__init__()
        if not level_channels:
            raise ValueError("DecoderLevelFusion needs at least one coarser level")
        self.proj = nn.ModuleDict()
        for key, ch in level_channels.items():
            conv = conv_nd(dims, int(ch), int(out_channels), 1)
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
            self.proj[key] = nn.Sequential(nn.GroupNorm(num_groups(int(ch)), int(ch), eps=1e-6), nn.SiLU(), conv)

    def forward(self, features: torch.Tensor, levels: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = sorted(set(self.proj) - set(levels))
        if missing:
            raise ValueError(f"DecoderLevelFusion: no features from the blocks {missing}")
        size = tuple(features.shape[2:])
        out = features
        for key, proj in self.proj.items():
            h = proj(levels[key].to(features.dtype))
            out = out + resize_maps(h, size)
        return out


def pixel_shuffle_nd(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``[B, C * f**d, s_1, ..., s_d] -> [B, C, f*s_1, ..., f*s_d]`` for d = 1, 2, 3 spatial dimensions: output
    cell ``(f*s_1 + i_1, ..., f*s_d + i_d)`` of class ``c`` is input channel ``c*f**d + (i_1, ..., i_d)`` read
    row-major (``F.pixel_shuffle`` for d = 2)."""
    d, f = x.dim() - 2, int(factor)
    if d == 2:
        return F.pixel_shuffle(x, f)
    b, cf, *sizes = x.shape
    if d not in (1, 3) or cf % f ** d:
        raise ValueError(f"pixel_shuffle_nd: channels {cf} of a {tuple(x.shape)} input are not C * {f}**{d}")
    x = x.reshape(b, cf // f ** d, *([f] * d), *sizes)  # [B, C, i_1..i_d, s_1..s_d]
    order = [0, 1] + [p for k in range(d) for p in (2 + d + k, 2 + k)]  # s_1, i_1, s_2, i_2, ...
    return x.permute(*order).reshape(b, cf // f ** d, *(f * s for s in sizes))
