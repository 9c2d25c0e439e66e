"""``segmentation_stop_gradient``: the mask head reads the UNet's features through a stop-gradient, so the mask loss
trains the head alone (the benchmark's ``anatomical_stopgrad`` arm)."""
from __future__ import annotations

import pytest
import torch

from ldm.util import instantiate_from_config
from tiny_models import anatomical_params, unet_config


def _unet(stop: bool, **anatomy):
    torch.manual_seed(0)
    params = anatomical_params(register_update="read", mask_upsample_factor=2, segmentation_stop_gradient=stop,
                               **anatomy)
    return instantiate_from_config(unet_config(anatomy=params, two_level=True))


def _grads(unet, x, t):
    unet.zero_grad(set_to_none=True)
    out = unet.forward_with_anatomy(x, t)
    out.seg_logits.square().mean().backward()  # a loss on the mask only
    trunk = [p.grad for n, p in unet.named_parameters() if n.startswith(("input_blocks.", "middle_block."))]
    head = [p.grad for n, p in unet.named_parameters() if n.startswith("mask_decoder.")]
    return out, trunk, head


def test_mask_loss_reaches_only_the_head_with_the_stop_gradient():
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([3, 700])
    free, stopped = _unet(False), _unet(True)
    stopped.load_state_dict(free.state_dict())
    out_free, trunk_free, head_free = _grads(free, x, t)
    out_stop, trunk_stop, head_stop = _grads(stopped, x, t)
    # the forward pass is the same function: identical prediction and logits
    assert torch.equal(out_free.prediction, out_stop.prediction)
    assert torch.equal(out_free.seg_logits, out_stop.seg_logits)
    assert out_stop.seg_logits.shape[-2:] == (16, 16)
    # without it the mask loss pulls on the denoiser; with it the trunk gets no gradient at all
    assert sum(float(g.abs().sum()) for g in trunk_free if g is not None) > 0
    assert all(g is None for g in trunk_stop)
    for a, b in zip(head_free, head_stop):  # the head's own gradients are unchanged
        torch.testing.assert_close(a, b)
    assert sum(float(g.abs().sum()) for g in head_stop) > 0


def test_the_flag_is_off_by_default_and_keeps_the_state_dict():
    default, stopped = _unet(False), _unet(True)
    assert default.segmentation_stop_gradient is False and stopped.segmentation_stop_gradient is True
    assert list(default.state_dict()) == list(stopped.state_dict())  # checkpoints interchange


@pytest.mark.parametrize("arm", ["anatomical_stopgrad"])
def test_benchmark_arm_uses_the_stop_gradient_without_alignment(arm):
    import os
    import sys

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import anatomy_models as am

    shipped = am.arm_config("anatomical", am.PRESETS["quick"], "ae.ckpt", 1.0)
    cfg = am.arm_config(arm, am.PRESETS["quick"], "ae.ckpt", 1.0)
    assert cfg["params"]["unet_config"]["params"]["segmentation_stop_gradient"] is True
    assert cfg["params"]["attention_alignment_weight"] == 0.0
    assert cfg["params"]["anatomical_loss_weight"] == shipped["params"]["anatomical_loss_weight"] > 0
    # everything else is the shipped configuration
    for key in ("segmentation_stop_gradient",):
        cfg["params"]["unet_config"]["params"].pop(key)
    cfg["params"]["attention_alignment_weight"] = shipped["params"]["attention_alignment_weight"]
    assert cfg == shipped


def test_benchmark_arm_stopgrad_reencoded_is_the_stopgrad_models_with_reencoded_masks():
    import os
    import sys

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import anatomy_models as am

    stopgrad = am.arm_config("anatomical_stopgrad", am.PRESETS["quick"], "ae.ckpt", 1.0)
    cfg = am.arm_config("anatomical_stopgrad_reencoded", am.PRESETS["quick"], "ae.ckpt", 1.0)
    assert cfg["params"]["mask_from"] == "reencoded"
    # the same models, trained once under the stop-gradient arm (which the shipped config, mask_from: reencoded,
    # already makes reencode: the separate arm scores runs whose stop-gradient rows took masks from the latents)
    assert cfg == stopgrad
    assert am.SAME_MODELS["anatomical_stopgrad_reencoded"] == "anatomical_stopgrad"
    assert am.REENCODED["anatomical_stopgrad_reencoded"] == "anatomical_stopgrad"
    assert "anatomical_stopgrad_reencoded" in am.MASK_ARMS
