"""Transformer layers of the latent-diffusion UNet: cross-attention, the transformer block and the
spatial transformer, with CompVis parameter names and ``scaled_dot_product_attention`` kernels."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import ConditionedBlock, checkpoint, zero_module


def Normalize(in_channels: int) -> nn.GroupNorm:  # noqa: N802 - CompVis name
    """The spatial transformer's input norm: 32-group GroupNorm with eps 1e-6."""
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): ``a * gelu(b)`` where ``[a, b] = proj(x)``.

    Args:
        dim_in: input features.
        dim_out: output features (the projection has ``2 * dim_out`` outputs).
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP ``Linear(dim, mult*dim) -> GELU (or GEGLU) -> Dropout -> Linear(.., dim_out)``.

    Args:
        dim: input features.
        dim_out: output features (default ``dim``).
        mult: hidden width multiplier.
        glu: use a GEGLU input projection.
        dropout: dropout after the activation.
    """

    def __init__(self, dim: int, dim_out: Optional[int] = None, mult: int = 4, glu: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` [B, N, query_dim] over ``context`` [B, M, context_dim].

    Without ``context`` it is self-attention. Scores are scaled by ``dim_head ** -0.5``.

    Args:
        query_dim: features of ``x`` (and of the output).
        context_dim: features of ``context`` (default ``query_dim``).
        heads: number of heads.
        dim_head: features per head.
        dropout: dropout after the output projection.
    """

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``mask``: optional bool [B, M] (or [B, ...] flattened to M), True where a context token may be attended."""
        context = x if context is None else context
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(context))
        v = self._split_heads(self.to_v(context))
        attn_mask = None
        if mask is not None:
            attn_mask = mask.reshape(mask.shape[0], 1, 1, -1).to(torch.bool)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to ``context``, gated feed-forward.

    Args:
        dim: token features.
        n_heads: attention heads.
        d_head: features per head.
        dropout: dropout in attention outputs and feed-forward.
        context_dim: features of the cross-attention context (``None``: the second attention is
            self-attention too, as CompVis).
        gated_ff: GEGLU feed-forward.
        checkpoint: recompute activations in backward (``torch.utils.checkpoint``).
    """

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0,
                 context_dim: Optional[int] = None, gated_ff: bool = True, checkpoint: bool = False) -> None:
        super().__init__()
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head,
                                    dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context=context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(ConditionedBlock):
    """Transformer over the pixels of a feature map [B, C, H, W], conditioned on ``context`` [B, M, D].

    GroupNorm, 1x1 conv to ``n_heads * d_head`` features, ``depth`` transformer blocks over the H*W
    tokens, zero-initialised 1x1 conv back to ``in_channels``, residual. Inside a
    ``TimestepEmbedSequential`` it reads ``cond["context"]``.

    Args:
        in_channels: channels of the feature map.
        n_heads: attention heads.
        d_head: features per head.
        depth: number of transformer blocks.
        dropout: dropout inside the blocks.
        context_dim: features of the context tokens (``None``: self-attention only).
        use_checkpoint: gradient checkpointing in the transformer blocks.
    """

    cond_key = "context"

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: Optional[int] = None, use_checkpoint: bool = False) -> None:
        super().__init__()
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = Normalize(in_channels)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim,
                                  checkpoint=use_checkpoint)
            for _ in range(depth)
        ])
        self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"SpatialTransformer expects a 2D feature map [B, C, H, W], got shape {tuple(x.shape)}; "
                             "use_spatial_transformer needs dims=2")
        b, c, h, w = x.shape
        residual = x
        x = self.proj_in(self.norm(x))
        x = x.flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            x = block(x, context=context)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        return self.proj_out(x) + residual
