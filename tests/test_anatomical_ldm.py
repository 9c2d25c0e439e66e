"""AnatomicalLatentDiffusion: schedule, anatomical loss, masks-free batches, sampling, logging (tiny, CPU)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from ldm.data.phantom import PhantomDataset
from ldm.models.diffusion.anatomical_ddpm import AnatomicalLatentDiffusion
from ldm.modules.anatomical_losses import mode_downsample
from ldm.util import instantiate_from_config
from tiny_models import anatomical_params, first_stage_config, ldm_config, unet_config


def tiny_config(anatomical: bool = True, unet: dict | None = None, **params) -> dict:
    """A tiny unconditional (anatomical) LDM on 32x32 1-channel images with 16x16x3 latents."""
    anatomy = anatomical_params(num_classes=6, register_dim=32, registers_per_class=2, heads=4) if anatomical else None
    base = {"timesteps": 1000, "loss_type": "l1", "first_stage_key": "image", "image_size": 16, "channels": 3,
            "log_every_t": 100, "conditioning_key": "None"}
    if anatomical:
        base.update({"anatomical_warmup_steps": 10, "anatomical_loss_weight": 0.1})
    base.update(params)
    return ldm_config(anatomical, first_stage=first_stage_config(ch=32, embed_dim=3, resolution=32),
                      unet=unet_config(3, 3, 16, anatomy=anatomy, two_level=True, **(unet or {})), **base)


def tiny_model(**params) -> AnatomicalLatentDiffusion:
    torch.manual_seed(0)
    return instantiate_from_config(tiny_config(**params))


def phantom_batch(n: int = 4, seed: int = 0) -> dict:
    ds = PhantomDataset(size=32, num_samples=n, seed=seed)
    return default_collate([ds[i] for i in range(n)])


# ---- schedule ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule, expected", [
    ("warmup_decay", {0: 0.2, 9: 0.2, 10: 0.2, 15: 0.15, 19: 0.11, 20: 0.1, 1000: 0.1}),
    ("cosine", {0: 0.2, 10: 0.15, 20: 0.1, 1000: 0.1}),
    ("constant", {0: 0.1, 15: 0.1, 1000: 0.1}),
    ("ramp", {0: 0.0, 5: 0.05, 9: 0.09, 10: 0.1, 15: 0.1, 1000: 0.1}),
])
def test_schedule_values(schedule, expected):
    model = tiny_model(anatomical_schedule=schedule)
    for step, weight in expected.items():
        assert model.get_anatomical_loss_weight(step) == pytest.approx(weight, abs=1e-9), (schedule, step)


def test_schedule_follows_global_step_and_progressive_switch():
    model = tiny_model()
    assert model.get_anatomical_loss_weight() == pytest.approx(0.2)  # no trainer: global_step 0
    model._trainer = SimpleNamespace(global_step=15)  # what a resumed trainer reports
    assert model.global_step == 15
    assert model.get_anatomical_loss_weight() == pytest.approx(0.15)
    model._trainer = None
    flat = tiny_model(progressive_anatomical_training=False)
    assert [flat.get_anatomical_loss_weight(s) for s in (0, 15, 50)] == [0.1, 0.1, 0.1]


def test_loss_weight_falls_back_to_the_unet_config_and_bad_values_raise():
    cfg = tiny_config(unet={"anatomical_loss_weight": 0.3})
    del cfg["params"]["anatomical_loss_weight"]
    assert instantiate_from_config(cfg).objective.loss_weight == pytest.approx(0.3)
    with pytest.raises(ValueError, match="anatomical_schedule"):
        tiny_model(anatomical_schedule="linear")
    with pytest.raises(ValueError, match="anatomical_class_weights"):
        tiny_model(anatomical_class_weights=[1.0, 2.0])


# ---- the anatomical loss on controlled inputs ------------------------------------------------------
def test_mode_downsample_majority_and_ignore():
    mask = torch.tensor([[[1, 1, 2, 2],
                          [1, 0, 2, 255],
                          [255, 255, 3, 3],
                          [255, 0, 3, 0]]])
    small = mode_downsample(mask, (2, 2), num_classes=4, ignore_index=255)
    assert small.tolist() == [[[1, 2], [255, 3]]]
    assert torch.equal(mode_downsample(mask, (4, 4), 4, 255), mask)


def test_anatomical_loss_counts_only_labelled_examples_and_is_exact():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 16, 16, generator=g)
    attention = torch.softmax(torch.randn(2, 6, 16, 16, generator=g), 1)
    mask = torch.randint(0, 6, (2, 32, 32), generator=g)
    unlabelled = mask.clone()
    unlabelled[1] = 255
    loss_both, _ = model.anatomical_loss(logits, attention, unlabelled)
    loss_one, stats = model.anatomical_loss(logits[:1], attention[:1], mask[:1])
    assert loss_both.item() == pytest.approx(loss_one.item(), rel=1e-6)
    # the value is CE(upsampled logits) + alignment_weight * CE(class attention vs mode-pooled mask)
    up = F.interpolate(logits[:1], size=(32, 32), mode="bilinear", align_corners=False)
    ce = F.cross_entropy(up, mask[:1])
    small = mode_downsample(mask[:1], (16, 16), 6, 255)
    align = F.nll_loss(torch.log(attention[:1]), small)
    assert loss_one.item() == pytest.approx((ce + 0.5 * align).item(), rel=1e-5)
    assert stats["anatomical_seg_ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    # a perfect segmentation: CE near 0 and Dice 1
    perfect = F.one_hot(mask[:1], 6).permute(0, 3, 1, 2).float() * 50.0
    loss_p, stats_p = model.anatomical_loss(perfect, attention[:1], mask[:1])
    assert stats_p["anatomical_seg_ce"].item() < 1e-6
    assert stats_p["anatomical_dice"].item() == pytest.approx(1.0)
    assert all(stats_p[f"anatomical_dice_{c}"].item() == pytest.approx(1.0) for c in range(6))


def test_class_weights_remove_a_class_from_the_loss():
    model = tiny_model(anatomical_class_weights=[1, 1, 1, 1, 1, 0])
    logits = torch.zeros(1, 6, 16, 16)
    logits[:, 1] = 5.0  # predicts class 1 everywhere
    attention = torch.full((1, 6, 16, 16), 1 / 6)
    only_bone = torch.full((1, 32, 32), 5)
    loss, _ = model.anatomical_loss(logits, attention, only_bone)
    assert loss.item() == 0.0  # every labelled pixel has weight 0
    only_liver = torch.full((1, 32, 32), 1)
    loss, _ = model.anatomical_loss(logits, attention, only_liver)
    assert loss.item() > 0.5  # log(6) * 0.5 from the uniform attention alone


def test_labels_out_of_range_raise():
    model = tiny_model()
    batch = phantom_batch(2)
    batch["segmentation"][0, 0, 0] = 7
    with pytest.raises(ValueError, match="num_anatomical_classes"):
        model.shared_step(batch)


# ---- shared_step ------------------------------------------------------------------------------------
def test_shared_step_loss_and_log_keys():
    model = tiny_model()
    model.train()
    loss, logs = model.shared_step(phantom_batch(4))
    for key in ("loss_simple", "loss_vlb", "loss", "diffusion_loss", "anatomical_loss", "anatomical_weight",
                "weighted_anatomical_loss", "anatomical_dice", "anatomical_seg_ce", "anatomical_alignment_ce"):
        assert f"train/{key}" in logs, key
    assert torch.isfinite(loss)
    assert logs["train/anatomical_weight"].item() == pytest.approx(0.2)  # step 0 of warmup_decay
    assert logs["train/anatomical_loss"].item() > 0.5  # untrained head: CE near log(6)
    assert logs["train/weighted_anatomical_loss"].item() == pytest.approx(0.2 * logs["train/anatomical_loss"].item())
    assert loss.item() == pytest.approx(logs["train/diffusion_loss"].item()
                                        + logs["train/weighted_anatomical_loss"].item(), rel=1e-5)
    assert 0.0 <= logs["train/anatomical_dice"].item() <= 1.0
    model.eval()
    _, val_logs = model.shared_step(phantom_batch(2))
    assert "val/anatomical_loss" in val_logs and "val/anatomical_dice" in val_logs


@pytest.mark.parametrize("how", ["has_segmentation_false", "no_mask_key"])
def test_batch_without_masks_adds_exactly_zero(how):
    model = tiny_model()
    batch = phantom_batch(3)
    if how == "no_mask_key":
        del batch["segmentation"]
    else:
        batch["has_segmentation"] = torch.zeros(3, dtype=torch.bool)
    loss, logs = model.shared_step(batch)
    assert logs["train/anatomical_loss"].item() == 0.0
    assert logs["train/weighted_anatomical_loss"].item() == 0.0
    assert loss.item() == logs["train/diffusion_loss"].item()
    assert "train/anatomical_dice" not in logs
    loss.backward()
    head_grads = [p.grad for p in model.model.diffusion_model.segmentation_head.parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in head_grads)  # in the graph, zero
    assert all(torch.isfinite(p.grad).all() for p in model.model.parameters() if p.grad is not None)


def test_gradients_reach_registers_heads_and_unet_but_not_the_first_stage():
    model = tiny_model()
    model.train()
    assert not model.first_stage_model.training
    assert not any(p.requires_grad for p in model.first_stage_model.parameters())
    loss, _ = model.shared_step(phantom_batch(4))
    loss.backward()
    unet = model.model.diffusion_model
    assert unet.register_bank.registers.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in unet.segmentation_head.parameters())
    assert all(layer.to_k.weight.grad.abs().sum() > 0 for layer in unet.anatomical_attention.values())
    # the UNet itself: conv_in, and the (zero-initialised) last conv of every residual block
    assert unet.input_blocks[0][0].weight.grad.abs().sum() > 0
    assert unet.input_blocks[1][0].out_layers[-1].weight.grad.abs().sum() > 0
    assert unet.output_blocks[0][0].out_layers[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.first_stage_model.parameters())


# ---- compatibility with the plain LDM ----------------------------------------------------------------
def test_plain_ldm_checkpoint_loads_with_only_anatomical_keys_missing(tmp_path):
    torch.manual_seed(0)
    plain = instantiate_from_config(tiny_config(anatomical=False))
    with torch.no_grad():
        for p in plain.model.parameters():
            p.normal_(0, 0.05)
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": plain.state_dict()}, path)
    model = instantiate_from_config(tiny_config(ckpt_path=str(path)))
    missing = set(model.state_dict()) - set(plain.state_dict())
    assert missing and not set(plain.state_dict()) - set(model.state_dict())
    prefixes = ("register_bank.", "anatomical_attention.", "segmentation_head.")
    assert all(any(("model.diffusion_model." + p) in k or ("model_ema.diffusion_model" + p.replace(".", "")) in k
                   for p in prefixes) for k in missing)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([5, 500])
    with torch.no_grad():
        assert torch.allclose(model.apply_model(x, t, None), plain.apply_model(x, t, None), atol=1e-6)


# ---- sampling -----------------------------------------------------------------------------------------
def test_ddim_sampling_needs_no_mask_and_calls_the_unet_plainly():
    model = tiny_model()
    model.eval()
    unet = model.model.diffusion_model
    calls = []
    original = unet.forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("return_anatomy", False))
        return original(*args, **kwargs)

    unet.forward = spy
    samples, _ = model.sample_log(cond=None, batch_size=2, ddim=True, ddim_steps=4, eta=0.0)
    assert samples.shape == (2, 3, 16, 16) and torch.isfinite(samples).all()
    assert len(calls) == 4 and not any(calls)


def test_sample_with_anatomy_shapes():
    model = tiny_model()
    model.eval()
    res = model.sample_with_anatomy(batch_size=2, ddim_steps=3, eta=0.0)
    assert res["images"].shape == (2, 1, 32, 32) and res["images"].dtype == torch.float32
    assert res["masks"].shape == (2, 32, 32) and res["masks"].dtype == torch.int64
    assert 0 <= res["masks"].min() and res["masks"].max() < 6
    assert res["seg_logits"].shape == (2, 6, 16, 16)
    assert res["class_attention"].shape == (2, 6, 16, 16)
    assert torch.allclose(res["class_attention"].sum(1), torch.ones(2, 16, 16), atol=1e-5)
    assert res["latents"].shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="batch_size"):
        model.sample_with_anatomy(batch_size=0)


def test_log_images_adds_colour_coded_masks_and_attention():
    model = tiny_model()
    model.eval()
    batch = phantom_batch(3)
    log = model.log_images(batch, N=2, ddim_steps=2, plot_progressive_rows=False, plot_diffusion_rows=False)
    for key in ("inputs", "samples", "inputs_mask", "inputs_predicted_mask", "inputs_class_attention",
                "samples_mask", "samples_class_attention"):
        assert key in log, key
    for key in ("inputs_mask", "inputs_predicted_mask", "inputs_class_attention", "samples_mask",
                "samples_class_attention"):
        img = log[key]
        assert img.shape == (2, 3, 32, 32), key
        assert img.min() >= -1.0 and img.max() <= 1.0
    # the input mask preview uses one colour per class: as many colours as classes in the masks
    colours = torch.unique(log["inputs_mask"].permute(0, 2, 3, 1).reshape(-1, 3), dim=0)
    assert len(colours) == len(torch.unique(batch["segmentation"][:2]))


def test_registers_switched_off_trains_as_a_plain_ldm():
    model = tiny_model(unet={"use_anatomical_registers": False})
    assert not model.use_anatomy
    loss, logs = model.shared_step(phantom_batch(2))
    assert torch.isfinite(loss) and "train/loss_simple" in logs
    assert not any("anatomical" in k for k in logs)
    with pytest.raises(ValueError, match="use_anatomical_registers"):
        model.predict_anatomy(torch.randn(1, 3, 16, 16))
