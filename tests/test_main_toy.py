"""A toy LightningModule and dataset for the main.py tests (no diffusion model needed).

Configs name them as ``test_main_toy.ToyModel`` with ``tests/`` on PYTHONPATH (see test_main_cli.py).
"""
from __future__ import annotations

import os
import signal

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset


class ToyDataset(Dataset):
    """Deterministic random images following the data contract's ``image`` key (H, W, 1 in [-1, 1]).

    Args:
        num: number of examples.
        size: image side.
        seed: RNG seed.
    """

    def __init__(self, num: int = 16, size: int = 4, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.images = rng.uniform(-1, 1, size=(num, size, size, 1)).astype(np.float32)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i]}


class ToyModel(pl.LightningModule):
    """A linear auto-encoder with an EMA-like buffer, ``log_images`` and fault injection.

    Args:
        size: image side.
        monitor: checkpoint monitor key (as CompVis models declare it).
        nan_at_step: make the loss NaN at this global step (-1: never).
        fail_at_step: raise RuntimeError at this global step (-1: never).
        signal_at_step: send SIGUSR1 to this process at this global step (-1: never).
        log_val: log ``val/loss`` in validation.
    """

    def __init__(self, size: int = 4, monitor: str | None = None, nan_at_step: int = -1, fail_at_step: int = -1,
                 signal_at_step: int = -1, log_val: bool = True) -> None:
        super().__init__()
        self.net = torch.nn.Linear(size * size, size * size)
        self.register_buffer("ema_updates", torch.tensor(0, dtype=torch.long))
        self.register_buffer("ema_weight", torch.zeros(size * size, size * size))
        self.monitor = monitor
        self.nan_at_step, self.fail_at_step, self.signal_at_step = nan_at_step, fail_at_step, signal_at_step
        self.log_val = log_val
        self.learning_rate = 1e-3

    def _loss(self, batch: dict) -> torch.Tensor:
        x = batch["image"].flatten(1)
        return torch.nn.functional.mse_loss(self.net(x), x)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.global_step == self.fail_at_step:
            raise RuntimeError("injected failure")
        if self.global_step == self.signal_at_step:
            os.kill(os.getpid(), signal.SIGUSR1)
        loss = self._loss(batch)
        if self.global_step == self.nan_at_step:
            loss = loss * float("nan")
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            self.ema_updates += 1
            self.ema_weight.mul_(0.9).add_(0.1 * self.net.weight)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self.log_val:
            self.log("val/loss", self._loss(batch), sync_dist=True)

    def log_images(self, batch: dict, **kwargs) -> dict:
        x = batch["image"].permute(0, 3, 1, 2)
        return {"inputs": x, "reconstructions": self.net(x.flatten(1)).view_as(x)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.learning_rate)
