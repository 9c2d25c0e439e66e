"""Learnable anatomical register tokens for the anatomical UNet.

A register bank holds ``K`` learnable tokens per anatomical class (``C`` classes, ``D`` dimensions each),
grouped by class so that the attention mass a feature pixel gives to a class is the sum over that
class's ``K`` tokens. The UNet's features attend to these tokens at every level
(:class:`ldm.modules.diffusionmodules.anatomical_openaimodel.AnatomicalCrossAttention`).

- :class:`AnatomicalRegisterBank`: static tokens, layer-normalised, ``[B, C*K, D]``.
- :class:`TimestepAwareRegisterBank`: the same tokens modulated (scale/shift) by the UNet's time
  embedding; the modulation is zero-initialised so a fresh bank equals the static one.
- :class:`SpatialPositionEncoding`: resolution-agnostic 2D (or 3D) Fourier codes of normalised pixel
  coordinates, added (after a learned projection) to the attention queries so that registers can learn
  where organs lie, at any latent size.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


class SpatialPositionEncoding(nn.Module):
    """Resolution-agnostic position codes for query pixels (voxels in 3D).

    Pixel centres are mapped to ``[-1, 1]`` along every axis, whatever the feature map's size, and
    encoded as ``(x, y, sin(2^k pi x) for every k, sin(2^k pi y) ..., cos(2^k pi x) ..., cos(2^k pi y) ...)`` for
    ``k = 0 .. num_frequencies - 1`` (x along the last axis, y the one before, z the first of three). The same
    physical location gets the same code at every UNet level. There are no learnable parameters; each attention
    layer learns its own projection of the codes.

    Args:
        num_frequencies: number of octaves ``k``; the code has ``dims * (1 + 2 * num_frequencies)`` channels.
        dims: spatial dimensions (2: slices, 3: volumes).
    """

    def __init__(self, num_frequencies: int = 4, dims: int = 2) -> None:
        super().__init__()
        if num_frequencies < 0:
            raise ValueError(f"num_frequencies must be >= 0, got {num_frequencies}")
        if dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
        self.num_frequencies = int(num_frequencies)
        self.dims = int(dims)
        freqs = math.pi * (2.0 ** torch.arange(self.num_frequencies, dtype=torch.float32))
        self.register_buffer("frequencies", freqs, persistent=False)

    @property
    def dim(self) -> int:
        return self.dims * (1 + 2 * self.num_frequencies)

    def forward(self, *sizes: int, device: Optional[torch.device] = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Codes for a grid of ``sizes`` (height, width; or depth, height, width), row-major, shape
        ``[prod(sizes), dim]``."""
        if len(sizes) != self.dims:
            raise ValueError(f"SpatialPositionEncoding(dims={self.dims}) got a grid of {len(sizes)} sizes {sizes}")
        device = self.frequencies.device if device is None else device
        axes = [(torch.arange(int(n), device=device, dtype=torch.float32) + 0.5) / int(n) * 2.0 - 1.0 for n in sizes]
        grids = torch.meshgrid(*axes, indexing="ij")
        coords = torch.stack([g.reshape(-1) for g in reversed(grids)], dim=-1)  # [N, dims]: x, y(, z)
        parts = [coords]
        if self.num_frequencies:
            angles = coords[:, :, None] * self.frequencies.to(device)[None, None, :]  # [N, dims, F]
            parts += [torch.sin(angles).flatten(1), torch.cos(angles).flatten(1)]
        return torch.cat(parts, dim=-1).to(dtype)


class AnatomicalRegisterBank(nn.Module):
    """Class-grouped learnable register tokens.

    Token ``c * K + k`` is the ``k``-th register of class ``c``; :attr:`token_classes` holds that class
    id for every token. The tokens are layer-normalised before use.

    Args:
        num_classes: number of anatomical classes ``C`` (background included).
        num_registers_per_class: registers per class ``K``.
        register_dim: token width ``D``.
        dropout: dropout on the returned tokens (training only).
        use_spatial_encoding: also provide :class:`SpatialPositionEncoding` codes for the query side
            (:meth:`position_codes`); ``None`` is returned when off.
        num_frequencies: octaves of the spatial encoding.
        dims: spatial dimensions of the feature maps whose positions are encoded (2: slices, 3: volumes).
    """

    def __init__(self, num_classes: int, num_registers_per_class: int, register_dim: int,
                 dropout: float = 0.0, use_spatial_encoding: bool = True, num_frequencies: int = 4,
                 dims: int = 2) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("num_registers_per_class", num_registers_per_class),
                            ("register_dim", register_dim)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_classes = int(num_classes)
        self.num_registers_per_class = int(num_registers_per_class)
        self.register_dim = int(register_dim)
        self.registers = nn.Parameter(torch.randn(self.num_classes, self.num_registers_per_class,
                                                  self.register_dim))
        self.norm = nn.LayerNorm(self.register_dim)
        self.dropout = nn.Dropout(float(dropout))
        classes = torch.arange(self.num_classes).repeat_interleave(self.num_registers_per_class)
        self.register_buffer("token_classes", classes, persistent=False)
        # built once: every register layer of every call uses it (a one_hot per layer was 3 kernels each)
        membership = (classes[:, None] == torch.arange(self.num_classes)[None, :]).float()
        self.register_buffer("_class_membership", membership, persistent=False)
        self.spatial_encoding = SpatialPositionEncoding(num_frequencies, dims) if use_spatial_encoding else None

    @property
    def num_tokens(self) -> int:
        return self.num_classes * self.num_registers_per_class

    @property
    def position_dim(self) -> Optional[int]:
        """Width of :meth:`position_codes`, or ``None`` without spatial encoding."""
        return None if self.spatial_encoding is None else self.spatial_encoding.dim

    def class_membership(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One-hot ``[C*K, C]`` matrix: summing attention over tokens with it gives per-class mass."""
        return self._class_membership.to(dtype)

    def position_codes(self, *sizes: int, device: Optional[torch.device] = None,
                       dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
        """Codes ``[prod(sizes), position_dim]`` of a grid of ``sizes`` (height, width; or depth, height, width),
        or ``None`` without spatial encoding."""
        if self.spatial_encoding is None:
            return None
        return self.spatial_encoding(*sizes, device=device, dtype=dtype)

    def base_tokens(self) -> torch.Tensor:
        """Normalised tokens ``[C*K, D]`` before any per-sample modulation."""
        return self.norm(self.registers.reshape(self.num_tokens, self.register_dim))

    def forward(self, batch_size: int, emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens ``[batch_size, C*K, D]``; ``emb`` (the time embedding) is ignored by the static bank."""
        tokens = self.base_tokens().unsqueeze(0).expand(batch_size, -1, -1)
        return self.dropout(tokens)


class TimestepAwareRegisterBank(AnatomicalRegisterBank):
    """Register bank modulated by the UNet's time embedding.

    ``tokens = norm(R) * (1 + scale(emb)) + shift(emb)``, with a separate scale/shift per class; the
    projection is zero-initialised, so at initialisation the tokens equal :class:`AnatomicalRegisterBank`'s.

    Args:
        num_classes, num_registers_per_class, register_dim, dropout, use_spatial_encoding,
        num_frequencies, dims: as :class:`AnatomicalRegisterBank`.
        time_embed_dim: width of the UNet's time embedding (``4 * model_channels`` in UNetModel).
    """

    def __init__(self, num_classes: int, num_registers_per_class: int, register_dim: int, time_embed_dim: int,
                 dropout: float = 0.0, use_spatial_encoding: bool = True, num_frequencies: int = 4,
                 dims: int = 2) -> None:
        super().__init__(num_classes, num_registers_per_class, register_dim, dropout=dropout,
                         use_spatial_encoding=use_spatial_encoding, num_frequencies=num_frequencies, dims=dims)
        if int(time_embed_dim) < 1:
            raise ValueError(f"time_embed_dim must be a positive integer, got {time_embed_dim}")
        self.time_modulation = nn.Sequential(nn.SiLU(), nn.Linear(int(time_embed_dim),
                                                                  2 * self.num_classes * self.register_dim))
        nn.init.zeros_(self.time_modulation[1].weight)
        nn.init.zeros_(self.time_modulation[1].bias)

    def forward(self, batch_size: int, emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        if emb is None:
            return super().forward(batch_size)
        if emb.shape[0] != batch_size:
            raise ValueError(f"time embedding has batch size {emb.shape[0]}, expected {batch_size}")
        mod_dtype = self.time_modulation[1].weight.dtype
        mod = self.time_modulation(emb.to(mod_dtype)).view(batch_size, self.num_classes, 1, 2, self.register_dim)
        scale, shift = mod[:, :, :, 0].to(emb.dtype), mod[:, :, :, 1].to(emb.dtype)
        tokens = self.base_tokens().view(1, self.num_classes, self.num_registers_per_class, self.register_dim)
        tokens = tokens.to(emb.dtype) * (1 + scale) + shift  # [B, C, K, D]
        return self.dropout(tokens.reshape(batch_size, self.num_tokens, self.register_dim))
