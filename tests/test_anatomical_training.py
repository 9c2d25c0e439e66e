"""Short trainings of the tiny anatomical LDM on the phantom: what the registers and the head learn.

The first stage is an untrained tiny AutoencoderKL whose posterior variance is set to ~0 (a trained KL
autoencoder has a small one; an untrained one has variance ~1, which would drown the image in noise),
so the latents carry the image and the test measures what the anatomical parts learn from them.
"""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, default_collate

from ldm.data.phantom import PhantomDataset
from ldm.modules.anatomical_losses import mode_downsample
from ldm.util import instantiate_from_config
from test_anatomical_ldm import tiny_config

NUM_CLASSES = 6


def _near_deterministic_first_stage(model) -> None:
    with torch.no_grad():
        qc = model.first_stage_model.quant_conv
        half = qc.out_channels // 2
        qc.weight[half:] = 0.0
        qc.bias[half:] = -20.0  # log-variance of the posterior: std ~ 5e-5


def _dice_per_class(pred: torch.Tensor, mask: torch.Tensor) -> dict[int, float]:
    out = {}
    for c in range(1, NUM_CLASSES):
        p, g = pred == c, mask == c
        if g.sum() > 0:
            out[c] = (2.0 * (p & g).sum() / (p.sum() + g.sum())).item()
    return out


def test_short_training_segments_organs_and_aligns_class_attention():
    """100 AdamW steps (batch 8, t ~ U{0..99}) through the real p_losses on 32 phantom slices.

    Measured when written (CPU, 1 thread, ~20 s): foreground Dice 0.665 on its own slices vs 0.153 against
    other slices' masks; mean attention of each class inside its organ 5.2-18x the mean outside it.
    """
    torch.manual_seed(0)
    model = instantiate_from_config(tiny_config(anatomical_warmup_steps=0, use_ema=False,
                                                anatomical_class_weights=[0.1, 1, 1, 1, 1, 1]))
    _near_deterministic_first_stage(model)
    n = 32
    ds = PhantomDataset(size=32, num_samples=n, seed=0)
    data = default_collate([ds[i] for i in range(n)])
    with torch.no_grad():
        z_all = model.get_input(data, "image")[0]
        model.scale_factor = 1.0 / z_all.std().item()
        z_all = z_all * model.scale_factor
    masks = model.get_anatomy_target(data)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=2e-3)
    model.train()
    g = torch.Generator().manual_seed(0)
    first = last = None
    for step in range(100):
        idx = torch.randperm(n, generator=g)[:8]
        t = torch.randint(0, 100, (8,), generator=g)
        loss, logs = model.p_losses(z_all[idx], None, t, anatomy_target=masks[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = logs["train/anatomical_loss"].item() if first is None else first
        last = logs["train/anatomical_loss"].item()
    assert last < 0.5 * first

    model.eval()
    with torch.no_grad():
        t = torch.full((n,), 10, dtype=torch.long)
        z_t = model.q_sample(z_all, t, torch.randn(z_all.shape, generator=g))
        anatomy = model.predict_anatomy(z_t, t)
    pred = F.interpolate(anatomy.seg_logits, size=(32, 32), mode="bilinear", align_corners=False).argmax(1)
    own = _dice_per_class(pred, masks)
    # chance that knows where organs usually are: the same predictions scored against other slices' masks
    other = _dice_per_class(pred, torch.roll(masks, 1, dims=0))
    own_mean, other_mean = sum(own.values()) / len(own), sum(other.values()) / len(other)
    print(f"foreground Dice own {own_mean:.3f} {own}, other slices {other_mean:.3f} {other}")
    assert len(own) == NUM_CLASSES - 1  # every organ occurs in the training slices
    assert own_mean > 0.4, own
    assert own_mean > other_mean + 0.2, (own, other)

    attention = anatomy.class_attention
    small = mode_downsample(masks, attention.shape[-2:], NUM_CLASSES, model.anatomical_ignore_index)
    for c in range(NUM_CLASSES):
        inside = small == c
        assert inside.any()
        ratio = attention[:, c][inside].mean() / attention[:, c][~inside].mean()
        print(f"class {c}: attention inside / outside = {ratio.item():.1f}")
        assert ratio > 3.0, (c, ratio.item())


def test_lightning_trainer_logs_anatomical_metrics(tmp_path):
    """Two training steps and one validation batch through a real Lightning Trainer."""
    torch.manual_seed(0)
    model = instantiate_from_config(tiny_config(use_ema=True))
    model.learning_rate = 1e-4
    train = DataLoader(PhantomDataset(size=32, num_samples=4, seed=0), batch_size=2)
    val = DataLoader(PhantomDataset(size=32, num_samples=2, seed=0, split="validation"), batch_size=2)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=pl.loggers.CSVLogger(str(tmp_path)), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(model, train, val)
    metrics = trainer.callback_metrics
    for split in ("train", "val"):
        for key in ("loss", "loss_simple", "anatomical_loss", "anatomical_weight", "weighted_anatomical_loss",
                    "anatomical_dice"):
            assert f"{split}/{key}" in metrics, f"{split}/{key}"
    assert "val/anatomical_loss_ema" in metrics
    assert metrics["train/anatomical_weight"].item() == pytest.approx(0.2)  # global_step < warm-up (10)
    assert torch.isfinite(metrics["val/loss"])
    assert trainer.global_step == 2
    # scale_by_std is off here: the first stage stayed frozen and in eval mode
    assert not model.first_stage_model.training
