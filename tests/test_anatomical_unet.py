"""AnatomicalCrossAttention and AnatomicalUNetModel against the base UNetModel (tiny, CPU)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from ldm import deprecation
from ldm.modules.diffusionmodules.anatomical_openaimodel import (ANATOMICAL_KEY_PREFIXES, AnatomicalCrossAttention,
                                                                 AnatomicalUNetModel, AnatomyOutput)
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from tiny_models import anatomical_params, unet_params

BASE = unet_params(in_channels=3, out_channels=3, image_size=16, two_level=True)
ANAT = anatomical_params(num_classes=4, register_dim=16, registers_per_class=2, heads=4)


def _randomise(module: torch.nn.Module, std: float = 0.05) -> None:
    """No zero parameters (UNetModel zero-initialises its output conv, which would hide differences)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _inputs(b: int = 2, size: int = 16):
    g = torch.Generator().manual_seed(2)
    return torch.randn(b, 3, size, size, generator=g), torch.tensor([3, 777][:b] + [10] * max(0, b - 2))


# ---- AnatomicalCrossAttention ---------------------------------------------------------------------
def test_cross_attention_is_identity_at_init_and_paths_agree():
    attn = AnatomicalCrossAttention(channels=16, register_dim=8, heads=4, position_dim=6)
    x, regs, pos = torch.randn(2, 16, 4, 5), torch.randn(2, 6, 8), torch.randn(20, 6)
    membership = F.one_hot(torch.tensor([0, 0, 1, 1, 2, 2]), 3).float()
    out, mass = attn(x, regs, pos)
    assert mass is None and torch.equal(out, x)  # zero-initialised output projection
    with torch.no_grad():
        attn.to_out.weight.normal_()
    sdpa, _ = attn(x, regs, pos)
    explicit, mass = attn(x, regs, pos, membership)
    assert (sdpa - x).abs().max() > 1e-2
    assert torch.allclose(sdpa, explicit, atol=1e-5)  # SDPA and the explicit attention give the same output
    assert mass.shape == (2, 3, 4, 5) and mass.dtype == torch.float32
    assert torch.allclose(mass.sum(1), torch.ones(2, 4, 5), atol=1e-5)
    assert (mass >= 0).all()


def test_cross_attention_rejects_bad_heads_and_missing_positions():
    with pytest.raises(ValueError, match="anatomical_attention_heads"):
        AnatomicalCrossAttention(channels=10, register_dim=8, heads=4)
    attn = AnatomicalCrossAttention(channels=8, register_dim=8, heads=2, position_dim=4)
    with pytest.raises(ValueError, match="pos"):
        attn(torch.randn(1, 8, 2, 2), torch.randn(1, 3, 8))


# ---- AnatomicalUNetModel ---------------------------------------------------------------------------
def test_base_state_dict_loads_with_only_anatomical_keys_missing_and_output_is_equal():
    torch.manual_seed(0)
    base = UNetModel(**BASE)
    _randomise(base)
    model = AnatomicalUNetModel(**BASE, **ANAT)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert unexpected == []
    assert missing and all(k.startswith(ANATOMICAL_KEY_PREFIXES) for k in missing)
    assert set(missing) == set(model.state_dict()) - set(base.state_dict())
    assert any(k.startswith("register_bank.") for k in missing)
    assert any(k.startswith("segmentation_head.") for k in missing)
    assert sum(k.startswith("anatomical_attention.") for k in missing) > 0
    x, t = _inputs()
    base.eval(), model.eval()
    with torch.no_grad():
        ref = base(x, t)
        out = model(x, t)
        out2, anatomy = model(x, t, return_anatomy=True)
    assert ref.abs().mean() > 1e-3  # the randomised base gives a non-trivial output
    assert torch.allclose(out, ref, atol=1e-6) and torch.allclose(out2, ref, atol=1e-6)
    # once the register attention is trained (here: perturbed) the output does depend on it
    with torch.no_grad():
        for layer in model.anatomical_attention.values():
            layer.to_out.weight.normal_(0, 0.1)
        assert (model(x, t) - ref).abs().max() > 1e-3


def test_anatomy_switched_off_is_exactly_the_base_unet():
    torch.manual_seed(0)
    base = UNetModel(**BASE)
    _randomise(base)
    off = AnatomicalUNetModel(**BASE, **ANAT, use_anatomical_registers=False)
    assert set(off.state_dict()) == set(base.state_dict())
    off.load_state_dict(base.state_dict(), strict=True)
    x, t = _inputs()
    with torch.no_grad():
        assert torch.equal(off(x, t), base(x, t))
    with pytest.raises(ValueError, match="use_anatomical_registers"):
        off(x, t, return_anatomy=True)
    with pytest.raises(ValueError, match="use_anatomical_registers"):
        off.forward_with_anatomy(x, t)


@pytest.mark.parametrize("timestep_aware, spatial", [(True, True), (False, False)])
def test_return_anatomy_shapes_and_dtypes(timestep_aware, spatial):
    model = AnatomicalUNetModel(**BASE, **ANAT, use_timestep_aware_registers=timestep_aware,
                                use_spatial_encoding=spatial)
    x, t = _inputs(3)
    eps, anatomy = model(x, t, return_anatomy=True)
    assert eps.shape == x.shape and eps.dtype == torch.float32
    assert set(anatomy) == {"seg_logits", "class_attention"}
    assert anatomy["seg_logits"].shape == (3, 4, 16, 16) and anatomy["seg_logits"].dtype == torch.float32
    ca = anatomy["class_attention"]
    assert ca.shape == (3, 4, 16, 16)
    assert torch.allclose(ca.sum(1), torch.ones(3, 16, 16), atol=1e-5) and (ca >= 0).all()
    assert torch.equal(model(x, t), eps)  # the plain call returns the same prediction tensor


def test_attention_levels_follow_anatomical_attention_resolutions():
    every = AnatomicalUNetModel(**BASE, **ANAT)
    ds = {i.key: i.ds for i in every.block_info}
    # default: every level (ds 1 and 2) and the middle block, after res/middle blocks only
    assert {ds[k] for k in every.anatomical_attention_keys} == {1, 2}
    assert "middle_0" in every.anatomical_attention_keys
    assert "input_0" not in every.anatomical_attention_keys  # conv_in
    kinds = {i.key: i.kind for i in every.block_info}
    assert all(kinds[k] in ("res", "middle", "res_up") for k in every.anatomical_attention_keys)
    fine = AnatomicalUNetModel(**BASE, **ANAT, anatomical_attention_resolutions=[1])
    assert fine.anatomical_attention_keys and all(ds[k] == 1 for k in fine.anatomical_attention_keys)
    assert len(fine.anatomical_attention_keys) < len(every.anatomical_attention_keys)
    with pytest.raises(ValueError, match="anatomical_attention_resolutions"):
        AnatomicalUNetModel(**BASE, **ANAT, anatomical_attention_resolutions=[8])
    with pytest.raises(ValueError, match="num_anatomical_classes"):
        AnatomicalUNetModel(**BASE, **{**ANAT, "num_anatomical_classes": 1})


def test_gradients_reach_registers_heads_and_unet():
    model = AnatomicalUNetModel(**BASE, **ANAT)
    x, t = _inputs()
    mask = torch.randint(0, 4, (2, 16, 16))
    anatomy = model.forward_with_anatomy(x, t)
    loss = (anatomy.prediction - torch.randn_like(x)).abs().mean() + F.cross_entropy(anatomy.seg_logits, mask) \
        + F.nll_loss(torch.log(anatomy.class_attention), mask)
    loss.backward()

    def grad_norm(prefix: str) -> float:
        return sum(p.grad.abs().sum().item() for n, p in model.named_parameters()
                   if n.startswith(prefix) and p.grad is not None)

    assert grad_norm("register_bank.registers") > 0
    assert grad_norm("segmentation_head.") > 0
    assert grad_norm("anatomical_attention.") > 0  # queries/keys through the alignment term, to_out via eps
    assert all(layer.to_out.weight.grad.abs().sum() > 0 for layer in model.anatomical_attention.values())
    assert grad_norm("input_blocks.") > 0 and grad_norm("output_blocks.") > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = AnatomicalUNetModel(**BASE, **ANAT)
    ckpt = AnatomicalUNetModel(**BASE, **ANAT, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t = _inputs()
    for model in (plain, ckpt):
        model.train()
        anatomy = model.forward_with_anatomy(x, t)
        (anatomy.prediction.square().mean() + anatomy.class_attention[:, 1].mean()
         + anatomy.seg_logits.mean()).backward()
    g1 = plain.register_bank.registers.grad
    g2 = ckpt.register_bank.registers.grad
    assert g1.abs().sum() > 0 and torch.allclose(g1, g2, atol=1e-6)


def test_narrow_register_attention_width():
    """anatomical_attention_dim caps the attention width per level: fewer parameters at wide levels, still the
    base UNet's output when fresh, and all paths (SDPA, explicit with class mass) agree."""
    attn = AnatomicalCrossAttention(channels=32, register_dim=8, heads=2, position_dim=6, inner_dim=8)
    assert attn.to_q.weight.shape == (8, 32) and attn.to_out.weight.shape == (32, 8)
    x, regs, pos = torch.randn(2, 32, 3, 3), torch.randn(2, 6, 8), torch.randn(9, 6)
    with torch.no_grad():
        attn.to_out.weight.normal_()
    membership = F.one_hot(torch.tensor([0, 0, 1, 1, 2, 2]), 3).float()
    sdpa, _ = attn(x, regs, pos)
    explicit, mass = attn(x, regs, pos, membership)
    assert torch.allclose(sdpa, explicit, atol=1e-5) and torch.allclose(mass.sum(1), torch.ones(2, 3, 3), atol=1e-5)
    with pytest.raises(ValueError, match="attention width"):
        AnatomicalCrossAttention(channels=32, register_dim=8, heads=3, inner_dim=8)

    torch.manual_seed(0)
    base = UNetModel(**BASE)
    _randomise(base)
    full = AnatomicalUNetModel(**BASE, **ANAT)
    narrow = AnatomicalUNetModel(**BASE, **ANAT, anatomical_attention_dim=16)
    widths = {k: layer.inner_dim for k, layer in narrow.anatomical_attention.items()}
    channels = {i.key: i.channels for i in narrow.block_info}
    assert widths == {k: min(16, channels[k]) for k in widths} and set(widths.values()) == {16}
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in full.parameters())
    narrow.load_state_dict(base.state_dict(), strict=False)
    x, t = _inputs()
    base.eval(), narrow.eval()
    with torch.no_grad():
        assert torch.allclose(narrow(x, t), base(x, t), atol=1e-6)


# ---- the explicit anatomy call -------------------------------------------------------------------------
def test_forward_returns_a_tensor_and_forward_with_anatomy_equals_the_deprecated_tuple_path(monkeypatch):
    torch.manual_seed(0)
    model = AnatomicalUNetModel(**BASE, **ANAT).eval()
    _randomise(model)
    x, t = _inputs()
    with torch.no_grad():
        plain = model(x, t)
        anatomy = model.forward_with_anatomy(x, t)
        monkeypatch.setattr(deprecation, "_warned", set())
        with pytest.warns(DeprecationWarning, match="forward_with_anatomy"):
            eps, legacy = model(x, t, return_anatomy=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(x, t, return_anatomy=True)  # warned once only
    assert isinstance(plain, torch.Tensor) and plain.shape == x.shape
    assert isinstance(anatomy, AnatomyOutput)
    # the plain call attends through SDPA, the anatomy call forms the attention explicitly: equal up to rounding
    torch.testing.assert_close(anatomy.prediction, plain, rtol=1e-5, atol=1e-6)
    assert torch.equal(eps, anatomy.prediction)
    assert torch.equal(anatomy.seg_logits, legacy["seg_logits"])
    assert torch.equal(anatomy.class_attention, legacy["class_attention"])
    # per-layer masses: one per register layer, in block order, at the layer's own resolution
    infos = {info.key: info for info in model.block_info}
    assert list(anatomy.layer_class_attention) == model.anatomical_attention_keys
    for key, mass in anatomy.layer_class_attention.items():
        assert mass.shape == (2, 4, 16 // infos[key].ds, 16 // infos[key].ds)
        assert torch.allclose(mass.sum(1), torch.ones_like(mass[:, 0]), atol=1e-5)
    resized = [F.interpolate(m, size=(16, 16), mode="bilinear", align_corners=False) if m.shape[-1] != 16 else m
               for m in anatomy.layer_class_attention.values()]
    torch.testing.assert_close(torch.stack(resized).mean(0), anatomy.class_attention)
    assert anatomy.registers.shape == (2, 4 * 2, 16)



def test_deprecate_warns_once_naming_the_removal_and_the_replacement(monkeypatch):
    monkeypatch.setattr(deprecation, "_warned", set())
    with pytest.warns(DeprecationWarning) as caught:
        assert deprecation.deprecate("old_name", "0.3.0", "use new_name", stacklevel=2) is True
    assert str(caught[0].message) == "old_name is deprecated and will be removed in version 0.3.0; use new_name"
    assert caught[0].filename == __file__  # stacklevel points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert deprecation.deprecate("old_name", "0.3.0", "use new_name") is False
