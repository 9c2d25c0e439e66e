"""The mask head reading several decoder levels (``mask_head_levels``, an audit fix of issue 29) and the ``ramp``
schedule's use in training: a fresh multi-level head computes the one-level head's masks, its projections learn,
the stop-gradient covers every level, and bad values are refused."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import default_collate

from ldm.data.phantom import PhantomDataset
from ldm.modules.diffusionmodules.anatomical_openaimodel import ANATOMICAL_KEY_PREFIXES, AnatomicalUNetModel
from ldm.util import instantiate_from_config
from tiny_models import anatomical_params, first_stage_config, ldm_config, unet_config, unet_params


def _unet(**extra) -> AnatomicalUNetModel:
    torch.manual_seed(0)
    params = {**unet_params(3, 3, 8, channel_mult=[1, 2, 2], num_heads=2),
              **anatomical_params(num_classes=4, register_dim=16), "register_update": "read",
              "mask_upsample_factor": 4, "mask_decoder": "pixel_shuffle", **extra}
    return AnatomicalUNetModel(**params)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 8, 8, generator=g), torch.tensor([10, 700])


def test_a_fresh_multi_level_head_gives_the_one_level_heads_masks():
    one, three = _unet(), _unet(mask_head_levels=3)
    # the last block of the ds-2 and the ds-4 decoder level (before their upsampling blocks)
    assert three.mask_level_keys == ("output_2", "output_0")
    assert [i.ds for i in three.block_info if i.key in three.mask_level_keys] == [4, 2]
    missing, unexpected = three.load_state_dict(one.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("mask_levels.") for k in missing)
    assert all(k.startswith(ANATOMICAL_KEY_PREFIXES) for k in missing)
    x, t = _inputs()
    a, b = one.forward_with_anatomy(x, t), three.forward_with_anatomy(x, t)
    assert b.seg_logits.shape == (2, 4, 32, 32)
    assert torch.equal(a.seg_logits, b.seg_logits) and torch.equal(a.prediction, b.prediction)
    # once the projections are non-zero the masks change and the prediction does not
    with torch.no_grad():
        for p in three.mask_levels.parameters():
            p.add_(0.05 * torch.randn_like(p))
    c = three.forward_with_anatomy(x, t)
    assert (c.seg_logits - a.seg_logits).abs().max() > 1e-3
    assert torch.equal(c.prediction, a.prediction)


def test_the_coarse_levels_get_gradients_and_the_stop_gradient_covers_them():
    x, t = _inputs()
    model = _unet(mask_head_levels=2)
    with torch.no_grad():
        for p in model.mask_levels.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.forward_with_anatomy(x, t).seg_logits.square().mean().backward()
    proj = model.mask_levels.proj["output_2"]
    assert proj[2].weight.grad is not None and proj[2].weight.grad.abs().sum() > 0
    encoder = model.input_blocks[0][0].weight
    assert encoder.grad is not None and encoder.grad.abs().sum() > 0  # the mask loss reaches the UNet

    frozen = _unet(mask_head_levels=2, segmentation_stop_gradient=True)
    frozen.load_state_dict(model.state_dict())
    frozen.forward_with_anatomy(x, t).seg_logits.square().mean().backward()
    assert frozen.mask_levels.proj["output_2"][2].weight.grad.abs().sum() > 0  # the head still learns
    unet_grads = [p.grad for name, p in frozen.named_parameters()
                  if not name.startswith(("mask_decoder.", "mask_levels.", "segmentation_head."))]
    assert all(g is None or g.abs().sum() == 0 for g in unet_grads)


@pytest.mark.parametrize("levels", [0, 4, 1.5, -1])
def test_bad_level_counts_are_refused(levels):
    with pytest.raises(ValueError, match="mask_head_levels must be an integer from 1 to the UNet's 3 levels"):
        _unet(mask_head_levels=levels)


def test_the_audit_fixed_objective_trains_a_step():
    """``ramp`` + uniform timestep weighting + alignment off + a two-level head, through the real training step:
    at step 0 the ramp gives the mask loss weight 0, later the head's fusion learns from it."""
    anatomy = anatomical_params(num_classes=6, register_dim=32, registers_per_class=2, heads=4, mask_head_levels=2)
    cfg = ldm_config(True, first_stage=first_stage_config(ch=32, embed_dim=3, resolution=32),
                     unet=unet_config(3, 3, 16, anatomy=anatomy, two_level=True),
                     timesteps=1000, loss_type="l1", first_stage_key="image", image_size=16, channels=3,
                     anatomical_warmup_steps=10, anatomical_loss_weight=0.1, anatomical_schedule="ramp",
                     anatomical_timestep_weighting="none", attention_alignment_weight=0.0)
    torch.manual_seed(0)
    model = instantiate_from_config(cfg)
    model.train()
    ds = PhantomDataset(size=32, num_samples=4, seed=0)
    batch = default_collate([ds[i] for i in range(4)])
    loss, logs = model.shared_step(batch)
    assert logs["train/anatomical_weight"].item() == 0.0
    assert loss.item() == pytest.approx(logs["train/diffusion_loss"].item(), rel=1e-6)
    model._trainer = SimpleNamespace(global_step=5)  # half-way up the ramp
    assert model.get_anatomical_loss_weight() == pytest.approx(0.05)
    fusion = model.model.diffusion_model.mask_levels
    loss, logs = model.shared_step(batch)
    assert logs["train/anatomical_weight"].item() == pytest.approx(0.05)
    assert logs["train/anatomical_loss"].item() > 0.5  # untrained head: CE near log(6)
    loss.backward()
    assert fusion.proj[model.model.diffusion_model.mask_level_keys[0]][2].weight.grad.abs().sum() > 0
