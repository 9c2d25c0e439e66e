"""Spatial dimensions as a parameter of the anatomical parts: the loss functions, the register read, the mask
heads and the position codes take volumes ``[B, C, D, H, W]`` as they take slices, and a volume one voxel deep
gives the slice's numbers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ldm.modules import anatomical_losses as L
from ldm.modules.anatomical_blocks import (AnatomicalMaskDecoder, PixelShuffleMaskHead, RegisterReadAttention,
                                           pixel_shuffle_nd)
from ldm.modules.anatomical_registers import SpatialPositionEncoding
from ldm.modules.diffusionmodules.util import adaptive_avg_pool_nd

IGNORE = 255


def _mask(*shape: int, classes: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, classes, shape, generator=g)
    mask[torch.rand(shape, generator=g) < 0.1] = IGNORE
    return mask


def test_losses_on_a_one_voxel_deep_volume_equal_the_slice():
    mask2 = _mask(2, 8, 8)
    mask3 = mask2.unsqueeze(1)  # [B, 1, H, W]
    t2, l2 = L.soft_class_targets(mask2, (4, 4), 4, IGNORE)
    t3, l3 = L.soft_class_targets(mask3, (1, 4, 4), 4, IGNORE)
    assert t3.shape == (2, 4, 1, 4, 4) and torch.equal(t3[:, :, 0], t2) and torch.equal(l3[:, 0], l2)
    assert torch.equal(L.mode_downsample(mask3, (1, 2, 2), 4, IGNORE)[:, 0], L.mode_downsample(mask2, (2, 2), 4, IGNORE))
    g = torch.Generator().manual_seed(1)
    probs2 = torch.softmax(torch.randn(2, 4, 8, 8, generator=g), 1)
    w = torch.tensor([0.3, 1.0])
    for pooled, weights in ((False, w), (True, None)):
        d2 = L.soft_dice_loss(probs2, mask2, IGNORE, sample_weights=weights, pooled=pooled)
        d3 = L.soft_dice_loss(probs2.unsqueeze(2), mask3, IGNORE, sample_weights=weights, pooled=pooled)
        assert torch.allclose(d2, d3, rtol=1e-6, atol=0) and 0 < float(d2) < 1
    att2 = [torch.softmax(torch.randn(2, 4, 4, 4, generator=g), 1), torch.softmax(torch.randn(2, 4, 2, 2, generator=g), 1)]
    a2 = L.mean_soft_alignment_loss(att2, mask2, 4, IGNORE, sample_weights=w)
    a3 = L.mean_soft_alignment_loss([a.unsqueeze(2) for a in att2], mask3, 4, IGNORE, sample_weights=w)
    assert torch.allclose(a2, a3, rtol=1e-6, atol=0) and float(a2) > 0


def test_volume_targets_are_class_shares_of_each_cell():
    mask = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    mask[0, :2] = 1  # the upper half of the depth is class 1
    mask[0, 0, 0, 0] = 2
    target, labelled = L.soft_class_targets(mask, (2, 2, 2), 3, IGNORE)
    assert torch.equal(labelled, torch.ones(1, 2, 2, 2))
    assert torch.allclose(target.sum(1), torch.ones(1, 2, 2, 2))
    assert float(target[0, 2, 0, 0, 0]) == pytest.approx(1 / 8)  # one voxel of the cell's 2 x 2 x 2
    assert float(target[0, 1, 0, 0, 0]) == pytest.approx(7 / 8) and float(target[0, 0, 1, 1, 1]) == 1.0
    assert torch.equal(L.mode_downsample(mask, (2, 1, 1), 3, IGNORE).flatten(), torch.tensor([1, 0]))
    assert L.class_onehot(mask, 3, IGNORE).shape == (1, 3, 4, 4, 4)
    perfect = L.class_onehot(mask, 3, IGNORE).float()
    assert float(L.soft_dice_loss(perfect, mask, IGNORE)) == pytest.approx(0.0, abs=1e-6)


def test_register_read_pools_volumes():
    torch.manual_seed(0)
    read = RegisterReadAttention(channels=8, register_dim=16, heads=2, pool_size=2, position_dim=4)
    torch.nn.init.normal_(read.to_out.weight)  # a trained layer: the output is not zero
    regs = torch.randn(2, 6, 16)
    h2 = torch.randn(2, 8, 4, 4)
    pos = torch.randn(4, 4)
    assert read.pooled_size(1, 4, 4) == (1, 2, 2) and read.pooled_size(4, 4) == (2, 2)
    out2 = read(h2, regs, pos)
    out3 = read(h2.unsqueeze(2), regs, pos)  # [B, ch, 1, H, W]
    assert out3.shape == regs.shape and torch.allclose(out2, out3, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out2, regs)
    deep = read(torch.randn(2, 8, 4, 4, 4), regs, torch.randn(8, 4))  # 2 x 2 x 2 pooled cells
    assert deep.shape == regs.shape and torch.isfinite(deep).all()
    with pytest.raises(ValueError, match="size"):
        adaptive_avg_pool_nd(h2, (2, 2, 2))


@pytest.mark.parametrize("head", [AnatomicalMaskDecoder, PixelShuffleMaskHead])
def test_mask_heads_in_3d(head):
    torch.manual_seed(0)
    net = head(16, 5, 4, dims=3)
    out = net(torch.randn(2, 16, 2, 3, 3))
    assert out.shape == (2, 5, 8, 12, 12) and torch.isfinite(out).all()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and not any(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    if head is PixelShuffleMaskHead:
        assert net.out.out_channels == 5 * 4 ** 3


def test_pixel_shuffle_nd():
    g = torch.Generator().manual_seed(0)
    x2 = torch.randn(2, 3 * 4, 5, 6, generator=g)
    assert torch.equal(pixel_shuffle_nd(x2, 2), F.pixel_shuffle(x2, 2))
    f, c = 2, 3
    x3 = torch.randn(1, c * f ** 3, 2, 3, 4, generator=g)
    y = pixel_shuffle_nd(x3, f)
    assert y.shape == (1, c, 4, 6, 8)
    for cls, i, j, k, d, h, w in ((0, 0, 0, 0, 0, 0, 0), (2, 1, 0, 1, 1, 2, 3), (1, 1, 1, 0, 0, 1, 2)):
        channel = cls * f ** 3 + i * f * f + j * f + k
        assert y[0, cls, d * f + i, h * f + j, w * f + k] == x3[0, channel, d, h, w]
    x1 = torch.randn(1, c * f, 5, generator=g)
    assert torch.equal(pixel_shuffle_nd(x1, f)[0, 1, 2 * 3 + 1], x1[0, 1 * f + 1, 3])
    with pytest.raises(ValueError, match="are not C"):
        pixel_shuffle_nd(torch.randn(1, 7, 2, 2, 2), 2)


def test_position_codes_in_2d_and_3d():
    enc2 = SpatialPositionEncoding(2)
    codes = enc2(2, 3)
    assert codes.shape == (6, enc2.dim) and enc2.dim == 2 + 4 * 2
    # row-major: the second code is row 0, column 1; x = column centre, y = row centre in [-1, 1]
    assert codes[1, :2].tolist() == pytest.approx([0.0, -0.5])
    assert float(codes[1, 2]) == pytest.approx(math.sin(math.pi * 0.0)) and float(codes[1, 4]) == pytest.approx(
        math.sin(math.pi * -0.5))
    enc3 = SpatialPositionEncoding(2, dims=3)
    codes3 = enc3(2, 2, 4)
    assert codes3.shape == (16, 3 * (1 + 2 * 2))
    # voxel (d=1, h=0, w=3): x = 0.75, y = -0.5, z = 0.5
    assert codes3[1 * 8 + 0 * 4 + 3, :3].tolist() == pytest.approx([0.75, -0.5, 0.5])
    with pytest.raises(ValueError, match="dims=3"):
        enc3(4, 4)


def test_volume_masks_from_a_batch():
    from ldm.data.batch import masks_from_batch
    from ldm.modules.anatomical_objective import batch_masks

    vol = torch.randint(0, 3, (2, 3, 4, 5))
    batch = {"segmentation": vol.unsqueeze(-1).int(), "has_segmentation": torch.tensor([True, False])}
    mask = masks_from_batch(batch, "segmentation", IGNORE, dims=3)
    assert mask.shape == (2, 3, 4, 5) and mask.dtype == torch.long
    assert torch.equal(mask[0], vol[0]) and bool((mask[1] == IGNORE).all())
    assert torch.equal(batch_masks(batch, "segmentation", IGNORE, bs=1, dims=3), vol[:1])
    with pytest.raises(ValueError, match=r"\[B, D, H, W\]"):
        masks_from_batch({"segmentation": vol[:, 0]}, "segmentation", IGNORE, dims=3)
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        masks_from_batch({"segmentation": vol}, "segmentation", IGNORE)


def test_register_bank_codes_volumes():
    from ldm.modules.anatomical_registers import TimestepAwareRegisterBank

    bank = TimestepAwareRegisterBank(3, 2, 8, time_embed_dim=16, num_frequencies=1, dims=3)
    assert bank.position_dim == 9 and bank.position_codes(2, 3, 4).shape == (24, 9)
    assert torch.equal(bank.position_codes(2, 3, 4), SpatialPositionEncoding(1, dims=3)(2, 3, 4))
    assert bank(2, torch.randn(2, 16)).shape == (2, 6, 8)


@pytest.mark.parametrize("head", [{"mask_upsample_factor": 1},
                                  {"mask_upsample_factor": 2, "register_update": "read"},
                                  {"mask_upsample_factor": 2, "mask_decoder": "pixel_shuffle",
                                   "register_placement": "per_level"}])
def test_anatomical_unet_on_volumes(head):
    """``dims: 3``: the register UNet reads volume latents ``[B, C, D, H, W]``, predicts volume masks and class
    attention, and the objective trains it from volume masks (every term, gradients into the registers)."""
    from ldm.modules.anatomical_objective import AnatomicalObjective
    from ldm.modules.diffusionmodules.anatomical_openaimodel import AnatomicalUNetModel
    from tiny_models import anatomical_params, unet_params

    torch.manual_seed(0)
    unet = AnatomicalUNetModel(**{**unet_params(2, 2, 8, two_level=True, dims=3),
                                  **anatomical_params(num_classes=3, **head)})
    assert not any(isinstance(m, torch.nn.Conv2d) for m in unet.modules())
    x = torch.randn(2, 2, 4, 8, 8)
    out = unet.forward_with_anatomy(x, torch.tensor([5, 500]))
    f = head["mask_upsample_factor"]
    assert out.prediction.shape == x.shape
    assert out.seg_logits.shape == (2, 3, 4 * f, 8 * f, 8 * f)
    assert out.class_attention.shape == (2, 3, 4, 8, 8)
    assert torch.allclose(out.class_attention.sum(1), torch.ones(2, 4, 8, 8), atol=1e-5)
    assert {tuple(a.shape[2:]) for a in out.layer_class_attention.values()} == {(4, 8, 8), (4, 4, 4)}  # depth kept
    mask = _mask(2, 4 * f, 8 * f, 8 * f, classes=3)
    abar = torch.linspace(0.999, 0.01, 1000)
    for terms in ({"segmentation_ce": 1.0, "segmentation_dice": 1.0, "alignment_soft": 0.5},
                  {"segmentation_ce": 1.0, "alignment_majority": 0.5}):
        objective = AnatomicalObjective(3, IGNORE, terms, timestep_weighting="alpha_bar")
        unet.zero_grad()
        out = unet.forward_with_anatomy(x, torch.tensor([5, 500]))
        loss, stats = objective(out.seg_logits, out.class_attention, mask,
                                layer_class_attention=out.layer_class_attention, t=torch.tensor([5, 500]),
                                alphas_cumprod=abar)
        assert torch.isfinite(loss) and float(loss.detach()) > 0 and 0.0 <= float(stats["anatomical_dice"]) <= 1.0
        loss.backward()
        assert unet.register_bank.registers.grad is not None and unet.register_bank.registers.grad.abs().sum() > 0
