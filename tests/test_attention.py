"""CrossAttention, BasicTransformerBlock and SpatialTransformer (ldm.modules.attention)."""
from __future__ import annotations

import pytest
import torch

from ldm.modules.attention import BasicTransformerBlock, CrossAttention, FeedForward, SpatialTransformer


def _reference_attention(attn: CrossAttention, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention written out with einsum, for comparison."""
    h, d = attn.heads, attn.dim_head
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    b = x.shape[0]
    q, k, v = (t.reshape(b, -1, h, d).permute(0, 2, 1, 3) for t in (q, k, v))
    w = torch.einsum("bhnd,bhmd->bhnm", q, k) * d ** -0.5
    out = torch.einsum("bhnm,bhmd->bhnd", w.softmax(-1), v)
    return attn.to_out(out.permute(0, 2, 1, 3).reshape(b, -1, h * d))


def test_cross_attention_matches_softmax_reference():
    attn = CrossAttention(query_dim=24, context_dim=10, heads=3, dim_head=8)
    x, ctx = torch.randn(2, 7, 24), torch.randn(2, 5, 10)
    out = attn(x, context=ctx)
    assert out.shape == (2, 7, 24)
    torch.testing.assert_close(out, _reference_attention(attn, x, ctx), rtol=1e-5, atol=1e-5)
    assert attn.to_k.weight.shape == (24, 10) and attn.to_q.bias is None
    assert set(attn.state_dict()) == {"to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight",
                                      "to_out.0.bias"}
    # self-attention when no context is given
    selfattn = CrossAttention(query_dim=16, heads=2, dim_head=4)
    torch.testing.assert_close(selfattn(x[..., :16]), _reference_attention(selfattn, x[..., :16], x[..., :16]),
                               rtol=1e-5, atol=1e-5)


def test_cross_attention_mask_ignores_masked_tokens():
    attn = CrossAttention(query_dim=16, context_dim=6, heads=2, dim_head=8)
    x, ctx = torch.randn(2, 4, 16), torch.randn(2, 5, 6)
    mask = torch.tensor([[True, True, False, True, False]] * 2)
    masked = attn(x, context=ctx, mask=mask)
    dropped = attn(x, context=ctx[:, mask[0]])
    torch.testing.assert_close(masked, dropped, rtol=1e-5, atol=1e-5)
    assert (masked - attn(x, context=ctx)).abs().max() > 1e-3


def test_feedforward_keys():
    ff = FeedForward(8, glu=True)
    assert {k: tuple(v.shape) for k, v in ff.state_dict().items()} == {
        "net.0.proj.weight": (64, 8), "net.0.proj.bias": (64,), "net.2.weight": (8, 32), "net.2.bias": (8,)}
    assert "net.0.0.weight" in FeedForward(8, glu=False).state_dict()


def test_basic_transformer_block_keys_and_checkpoint():
    block = BasicTransformerBlock(16, n_heads=2, d_head=8, context_dim=12)
    keys = set(block.state_dict())
    for k in ("attn1.to_q.weight", "attn2.to_k.weight", "attn2.to_out.0.bias", "ff.net.0.proj.weight",
              "ff.net.2.weight", "norm1.weight", "norm2.bias", "norm3.weight"):
        assert k in keys
    assert block.attn2.to_k.weight.shape == (16, 12) and block.attn1.to_k.weight.shape == (16, 16)
    x, ctx = torch.randn(2, 6, 16, requires_grad=True), torch.randn(2, 3, 12)
    out_plain = block(x, ctx)
    g_plain = torch.autograd.grad(out_plain.square().sum(), [x, *block.parameters()])
    block.checkpoint = True
    out_ckpt = block(x, ctx)
    g_ckpt = torch.autograd.grad(out_ckpt.square().sum(), [x, *block.parameters()])
    torch.testing.assert_close(out_plain, out_ckpt)
    for a, b in zip(g_plain, g_ckpt):
        torch.testing.assert_close(a, b)


def test_spatial_transformer_identity_at_init_then_uses_context():
    st = SpatialTransformer(32, n_heads=2, d_head=8, depth=2, context_dim=12)
    sd = {k: tuple(v.shape) for k, v in st.state_dict().items()}
    assert sd["proj_in.weight"] == (16, 32, 1, 1) and sd["proj_out.weight"] == (32, 16, 1, 1)
    assert sd["norm.weight"] == (32,) and st.norm.eps == 1e-6
    assert sd["transformer_blocks.1.attn2.to_k.weight"] == (16, 12)
    assert sd["transformer_blocks.0.ff.net.0.proj.weight"] == (128, 16)
    x = torch.randn(2, 32, 4, 6)
    ctx = torch.randn(2, 3, 12)
    torch.testing.assert_close(st(x, ctx), x)  # zero-initialised proj_out: residual only
    torch.nn.init.normal_(st.proj_out.weight, std=0.2)
    out_a, out_b = st(x, ctx), st(x, torch.randn(2, 3, 12))
    assert out_a.shape == x.shape
    assert (out_a - x).abs().max() > 1e-2 and (out_a - out_b).abs().max() > 1e-3
    assert st.forward_cond(x, {"context": ctx, "emb": None}).equal(out_a)


def test_spatial_transformer_rejects_non_2d_input():
    st = SpatialTransformer(32, n_heads=1, d_head=8)
    with pytest.raises(ValueError, match="dims=2"):
        st(torch.randn(1, 32, 8))
