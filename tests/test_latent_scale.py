"""Latent scaling: the shipped baselines turn scale_by_std on, and a run without it is warned at its first batch
when its scaled latents are far from unit variance."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.training import LATENT_STD_RANGE
from tiny_models import ldm_params

ROOT = Path(__file__).resolve().parents[1]
WARNING = "far from 1"


def _model(**overrides) -> LatentDiffusion:
    params = dict(timesteps=20, log_every_t=5, loss_type="l2", first_stage_key="image")
    params.update(overrides)
    return LatentDiffusion(**ldm_params(**params))


def _batch() -> dict:
    return {"image": torch.rand(4, 16, 16, 1, generator=torch.Generator().manual_seed(0)) * 2 - 1}


def _latent_std(model: LatentDiffusion, batch: dict) -> float:
    z = model.first_stage_model.encode(batch["image"].permute(0, 3, 1, 2)).sample()
    return float(z.flatten().std())


@pytest.mark.parametrize("name", ["ctorgan_unconditional_kl.yaml", "breastmri_unconditional_kl.yaml"])
def test_shipped_baselines_scale_latents_by_std(name):
    params = OmegaConf.load(ROOT / "configs" / "latent-diffusion" / name).model.params
    assert params.scale_by_std is True


def test_warns_when_scaled_latents_are_far_from_unit_variance(caplog):
    data = _batch()
    model = _model(scale_factor=40.0)
    torch.manual_seed(3)
    raw = _latent_std(model, data)
    assert not LATENT_STD_RANGE[0] <= 40.0 * raw <= LATENT_STD_RANGE[1]
    with caplog.at_level(logging.WARNING, logger="ldm.models.diffusion.training"):
        torch.manual_seed(3)
        model.on_train_batch_start(data, 0)
    messages = [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]
    assert len(messages) == 1 and "scale_by_std: true" in messages[0]
    suggested = float(re.search(r"scale_factor: ([0-9.e+-]+)\)", messages[0]).group(1))
    assert suggested == pytest.approx(1.0 / raw, rel=1e-4)  # the scale_factor that gives unit variance
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm.models.diffusion.training"):
        model.on_train_batch_start(data, 1)  # checked once, at the first batch only
    assert not any(WARNING in r.getMessage() for r in caplog.records)


def test_no_warning_near_unit_variance_or_with_scale_by_std(caplog):
    data = _batch()
    probe = _model()
    torch.manual_seed(3)
    raw = _latent_std(probe, data)
    for model in (_model(scale_factor=1.0 / raw), _model(scale_by_std=True)):
        with caplog.at_level(logging.WARNING, logger="ldm.models.diffusion.training"):
            torch.manual_seed(3)
            model.on_train_batch_start(data, 0)
    assert not any(WARNING in r.getMessage() for r in caplog.records)


def test_keep_scale_factor_skips_the_first_batch_estimate():
    """``scale_by_std`` sets ``scale_factor`` from the first batch unless the caller keeps the configured one
    (the benchmark measures it over the whole training set first)."""
    data = _batch()
    estimated = _model(scale_by_std=True, scale_factor=0.5)
    estimated.on_train_batch_start(data, 0)
    assert float(estimated.scale_factor) != 0.5
    kept = _model(scale_by_std=True, scale_factor=0.5)
    kept.keep_scale_factor()
    kept.on_train_batch_start(data, 0)
    assert float(kept.scale_factor) == 0.5
