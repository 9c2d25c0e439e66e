"""UNetModel: CompVis keys and numbers, options, checkpointing and the extension point."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ldm.modules.diffusionmodules.openaimodel import (AttentionBlock, BlockInfo, ResBlock, TimestepEmbedSequential,
                                                      UNetModel, UNetState, qkv_attention)
from ldm.modules.diffusionmodules.util import ConditionedBlock
from ldm.util import instantiate_from_config
from tiny_models import unet_params

PREFIX = "model.diffusion_model."


def _tiny(**kw) -> dict:
    return unet_params(in_channels=3, out_channels=3, image_size=16, two_level=True, **kw)


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero values everywhere (zero-initialised output convs included), as the golden weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.1 if p.ndim > 1 else 0.05
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if p.ndim == 1 and "norm" in name else 0.0))


@pytest.fixture(scope="module")
def golden(compat_dir):
    return torch.load(compat_dir / "compvis_golden_visible.pt", weights_only=True)


def _golden_unet(golden, **overrides) -> UNetModel:
    cfg = dict(golden["config"]["params"]["unet_config"])
    cfg["params"] = {**cfg["params"], **overrides}
    model = instantiate_from_config(cfg).eval()
    sd = {k[len(PREFIX):]: v for k, v in golden["state_dict"].items() if k.startswith(PREFIX)}
    model.load_state_dict(sd, strict=True)
    return model


# ---------------------------------------------------------------------------------------------- CompVis
def test_golden_unet_eps(golden):
    model = _golden_unet(golden)
    with torch.no_grad():
        out = model(golden["inputs"]["x"], golden["inputs"]["t"])
    ref = golden["outputs"]["unet_eps"]
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, rel
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_golden_distinguishes_head_order(golden):
    """The golden check is sharp: the non-legacy qkv split of the same weights is far off."""
    model = _golden_unet(golden, use_new_attention_order=True)
    with torch.no_grad():
        out = model(golden["inputs"]["x"], golden["inputs"]["t"])
    ref = golden["outputs"]["unet_eps"]
    assert ((out - ref).norm() / ref.norm()).item() > 1e-3


@pytest.mark.parametrize("entry", ["lsun_churches_ldm_kl8", "ldm_ctorgan_uncond"])
def test_compvis_state_dict_keys(compat_dir, entry):
    ref = json.loads((compat_dir / "compvis_state_dict_keys.json").read_text())[entry]
    expected = {k[len(PREFIX):]: tuple(v) for k, v in ref["keys"].items() if k.startswith(PREFIX)}
    assert len(expected) > 200
    with torch.device("meta"):
        model = instantiate_from_config(ref["config"]["params"]["unet_config"])
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(expected) - set(got)) == [] and sorted(set(got) - set(expected)) == []
    assert {k: v for k, v in got.items() if expected[k] != v} == {}


def test_legacy_qkv_head_order():
    """Legacy: channels per head are [q_h, k_h, v_h]; new order: [q (all heads), k, v]."""
    b, heads, ch, length = 2, 2, 4, 5
    q, k, v = (torch.randn(b, heads, ch, length) for _ in range(3))

    def ref(qh, kh, vh):
        w = torch.einsum("bct,bcs->bts", qh, kh) / ch ** 0.5
        return torch.einsum("bts,bcs->bct", w.softmax(-1), vh)

    expected = torch.cat([ref(q[:, i], k[:, i], v[:, i]) for i in range(heads)], dim=1)
    legacy = torch.cat([torch.cat([q[:, i], k[:, i], v[:, i]], 1) for i in range(heads)], dim=1)
    new = torch.cat([q.reshape(b, -1, length), k.reshape(b, -1, length), v.reshape(b, -1, length)], dim=1)
    torch.testing.assert_close(qkv_attention(legacy, heads, True), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv_attention(new, heads, False), expected, rtol=1e-5, atol=1e-5)


def test_head_counts_follow_compvis_rules():
    m = UNetModel(**_tiny(attention_resolutions=[1, 2], num_heads=-1, num_head_channels=16))
    assert m.input_blocks[1][1].num_heads == 2 and m.input_blocks[3][1].num_heads == 4
    assert m.middle_block[1].num_heads == 4 and m.output_blocks[-1][1].num_heads == 2
    m = UNetModel(**_tiny(num_heads=2, num_heads_upsample=4))
    assert m.input_blocks[3][1].num_heads == 2 and m.middle_block[1].num_heads == 2
    assert m.output_blocks[0][1].num_heads == 4


# ---------------------------------------------------------------------------------------------- options
def test_spatial_transformer_unet_keys_and_context():
    model = UNetModel(**_tiny(attention_resolutions=[1, 2], use_spatial_transformer=True, context_dim=16,
                              transformer_depth=2))
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sd["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (32, 16)
    assert sd["input_blocks.1.1.transformer_blocks.1.attn1.to_q.weight"] == (32, 32)
    assert sd["input_blocks.3.1.proj_in.weight"] == (64, 64, 1, 1)
    assert sd["middle_block.1.transformer_blocks.0.ff.net.0.proj.weight"] == (512, 64)
    assert sd["output_blocks.0.1.transformer_blocks.0.ff.net.2.weight"] == (64, 256)
    assert sd["output_blocks.2.1.norm.weight"] == (32,)
    assert model.input_blocks[3][1].transformer_blocks[0].attn1.heads == 2  # legacy: d_head = ch // num_heads
    _randomise(model)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    ctx = torch.randn(2, 5, 16)
    out = model(x, t, context=ctx)
    assert out.shape == (2, 3, 16, 16)
    assert (out - model(x, t, context=torch.randn(2, 5, 16))).abs().max() > 1e-4


def test_class_conditional_unet():
    model = UNetModel(**_tiny(num_classes=5))
    assert model.state_dict()["label_emb.weight"].shape == (5, 128)
    _randomise(model)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 3])
    assert (model(x, t, y=torch.tensor([0, 1])) - model(x, t, y=torch.tensor([2, 4]))).abs().max() > 1e-4
    with pytest.raises(ValueError, match="class labels"):
        model(x, t)


@pytest.mark.parametrize("kw", [
    dict(use_spatial_transformer=True),
    dict(context_dim=8),
    dict(num_heads=-1, num_head_channels=-1),
])
def test_constructor_errors(kw):
    with pytest.raises(ValueError):
        UNetModel(**_tiny(**kw))


def test_forward_errors():
    model = UNetModel(**_tiny())
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="timesteps"):
        model(x)
    with pytest.raises(ValueError, match="reserved"):
        model(x, torch.tensor([1]), emb=torch.zeros(1))


def test_resblock_updown_scale_shift_dims_and_codebook():
    model = UNetModel(**_tiny(resblock_updown=True, use_scale_shift_norm=True, conv_resample=False))
    assert isinstance(model.input_blocks[2][0], ResBlock) and model.input_blocks[2][0].updown
    assert model.state_dict()["input_blocks.1.0.emb_layers.1.weight"].shape == (64, 128)
    _randomise(model)
    assert model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2])).shape == (2, 3, 16, 16)
    m1 = UNetModel(**_tiny(dims=1, n_embed=7))
    assert m1(torch.randn(2, 3, 16), torch.tensor(5)).shape == (2, 7, 16)  # scalar t broadcast
    m3 = UNetModel(**_tiny(dims=3, conv_resample=False))
    assert m3(torch.randn(1, 3, 2, 8, 8), torch.tensor([4])).shape == (1, 3, 2, 8, 8)


def test_use_fp16_runs_blocks_in_half():
    model = UNetModel(**_tiny(use_fp16=True))
    _randomise(model)
    assert model.dtype == torch.float16 and model.time_embed[0].weight.dtype == torch.float32
    x = torch.randn(2, 3, 16, 16)
    out, state = model.forward_with_state(x, torch.tensor([5, 50]))
    assert out.dtype == torch.float32 and state.emb.dtype == torch.float16
    ref = UNetModel(**_tiny())
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    expected = ref(x, torch.tensor([5, 50]))
    assert ((out - expected).norm() / expected.norm()) < 2e-2


def test_use_checkpoint_same_output_and_gradients():
    cfg = _tiny(attention_resolutions=[1, 2], use_spatial_transformer=True, context_dim=8, resblock_updown=True)
    plain, ckpt = UNetModel(**cfg), UNetModel(**cfg, use_checkpoint=True)
    _randomise(plain)
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx = torch.randn(2, 3, 16, 16), torch.tensor([7, 600]), torch.randn(2, 4, 8)
    results = []
    for model in (plain, ckpt):
        out = model(x, t, context=ctx)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], msg=name)
    assert results[0][1]["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].abs().sum() > 0


# ---------------------------------------------------------------------------------------------- extension point
def test_block_info_concrete():
    model = UNetModel(**_tiny(num_res_blocks=2, channel_mult=[1, 2, 2]))
    got = [(b.stage, b.index, b.ds, b.channels, b.kind) for b in model.block_info]
    assert got == [
        ("input", 0, 1, 32, "conv_in"), ("input", 1, 1, 32, "res"), ("input", 2, 1, 32, "res"),
        ("input", 3, 2, 32, "downsample"), ("input", 4, 2, 64, "res"), ("input", 5, 2, 64, "res"),
        ("input", 6, 4, 64, "downsample"), ("input", 7, 4, 64, "res"), ("input", 8, 4, 64, "res"),
        ("middle", 0, 4, 64, "middle"),
        ("output", 0, 4, 64, "res"), ("output", 1, 4, 64, "res"), ("output", 2, 2, 64, "res_up"),
        ("output", 3, 2, 64, "res"), ("output", 4, 2, 64, "res"), ("output", 5, 1, 64, "res_up"),
        ("output", 6, 1, 32, "res"), ("output", 7, 1, 32, "res"), ("output", 8, 1, 32, "res"),
    ]


class _RecordingUNet(UNetModel):
    """Records each hooked block's output shape; adds 1 at the chosen blocks."""

    def __init__(self, *args, add_at=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.add_at = set(add_at)
        self.seen = []

    def block_hook(self, info, h, state):
        self.seen.append((info.stage, info.index, tuple(h.shape)))
        return h + 1 if (info.stage, info.index) in self.add_at else h


def test_block_hook_identity_by_default_and_changes_output_when_overridden():
    base = UNetModel(**_tiny())
    _randomise(base)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 999])
    out, state = base.forward_with_state(x, t, marker="kept")
    assert torch.equal(out, base(x, t))
    assert state.extra["marker"] == "kept" and state.features.shape == (2, 32, 16, 16)
    assert state.emb.shape == (2, 128) and state.context is None and state.timesteps.tolist() == [1, 999]

    rec = _RecordingUNet(**_tiny())
    rec.load_state_dict(base.state_dict())
    torch.testing.assert_close(rec(x, t), out)  # no additions: same network
    expected = [(b.stage, b.index, (2, b.channels, 16 // b.ds, 16 // b.ds)) for b in rec.block_info]
    assert rec.seen == expected
    rec.add_at = {("middle", 0), ("output", 1)}
    changed = rec(x, t)
    assert (changed - out).abs().max() > 1e-3


class _RegisterReader(ConditionedBlock):
    cond_key = "registers"

    def forward(self, x, registers):
        return x + registers[:, :, None, None]


def test_timestep_embed_sequential_conditioning():
    res = ResBlock(32, 16, 0.0, out_channels=32)
    _randomise(res)
    seq = TimestepEmbedSequential(res, _RegisterReader(), AttentionBlock(32, num_heads=2))
    x, emb, reg = torch.randn(2, 32, 4, 4), torch.randn(2, 16), torch.randn(2, 32)
    via_dict = seq(x, {"emb": emb, "context": None, "registers": reg})
    expected = seq[2](res(x, emb) + reg[:, :, None, None])
    torch.testing.assert_close(via_dict, expected)
    plain = TimestepEmbedSequential(res, AttentionBlock(32, num_heads=2))
    torch.testing.assert_close(plain(x, emb), plain(x, {"emb": emb}))  # CompVis-style call
    nested = TimestepEmbedSequential(TimestepEmbedSequential(res), _RegisterReader())
    torch.testing.assert_close(nested(x, {"emb": emb, "registers": reg}), res(x, emb) + reg[:, :, None, None])


@pytest.mark.parametrize("kw", [dict(), dict(num_res_blocks=2, channel_mult=[1, 2, 2]), dict(resblock_updown=True)])
def test_block_info_keys_are_unique_and_name_the_blocks(kw):
    model = UNetModel(**_tiny(**kw))
    keys = [b.key for b in model.block_info]
    assert len(keys) == len(set(keys)) == len(model.input_blocks) + 1 + len(model.output_blocks)
    assert keys[0] == "input_0" and f"output_{len(model.output_blocks) - 1}" == keys[-1] and "middle_0" in keys
    assert all(isinstance(b, BlockInfo) and b.key == f"{b.stage}_{b.index}" for b in model.block_info)
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.block_info[0].ds = 2


def test_state_subclass_adds_typed_fields_and_extras_cannot_shadow_them():
    @dataclasses.dataclass
    class CountingState(UNetState):
        hooked: int = 0

    class Counting(UNetModel):
        state_type = CountingState

        def block_hook(self, info, h, state):
            state.hooked += 1
            return h

    model = Counting(**_tiny())
    out, state = model.forward_with_state(torch.randn(1, 3, 16, 16), torch.tensor([3]), note="x")
    assert isinstance(state, CountingState) and state.hooked == len(model.block_info)
    assert state.get("note") == "x" and state.get("emb") is state.emb and state.get("missing", 7) == 7
    with pytest.raises(ValueError, match="reserved"):
        model(torch.randn(1, 3, 16, 16), torch.tensor([3]), hooked=1)
