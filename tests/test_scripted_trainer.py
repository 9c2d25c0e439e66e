"""ldm.training.scripted: the one-device Trainer that runs driven from Python (the benchmark) train with."""
from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader

from ldm.checkpoints import read_checkpoint
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.training.checkpoint_io import AtomicCheckpointIO
from ldm.training.scripted import scripted_trainer, scripted_trainer_kwargs
from tiny_models import ldm_params


def test_scripted_trainer_trains_the_steps_asked_and_saves_atomically(tmp_path):
    kwargs = scripted_trainer_kwargs(torch.device("cpu"), 3, progress=False)
    assert kwargs["max_steps"] == 3 and kwargs["precision"] == "32-true" and kwargs["logger"] is False
    assert scripted_trainer_kwargs(torch.device("cuda"), 3)["precision"] == "bf16-mixed"
    torch.manual_seed(0)
    model = LatentDiffusion(**ldm_params(timesteps=20, first_stage_key="image", use_ema=False))
    model.learning_rate = 1e-4
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    trainer = scripted_trainer(torch.device("cpu"), 3, progress=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    g = torch.Generator().manual_seed(0)
    images = [{"image": torch.rand(16, 16, 1, generator=g) * 2 - 1} for _ in range(8)]
    trainer.fit(model, DataLoader(images, batch_size=2))
    assert trainer.global_step == 3
    assert any(not torch.equal(before[k], v) for k, v in model.model.state_dict().items())
    path = str(tmp_path / "step3.ckpt")
    trainer.save_checkpoint(path)
    assert os.listdir(tmp_path) == ["step3.ckpt"]  # no staging file left beside it
    ckpt = read_checkpoint(path)
    assert ckpt["global_step"] == 3
    assert torch.equal(ckpt["state_dict"]["model.diffusion_model.out.2.weight"],
                       model.state_dict()["model.diffusion_model.out.2.weight"])
