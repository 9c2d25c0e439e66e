"""Image grids reach every Lightning logger that takes images (TensorBoard add_image, W&B-style log_image)."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pytorch_lightning.loggers import CSVLogger

from ldm.training.callbacks import ImageLogger
from ldm.training.image_logs import log_image_grid

pytest.importorskip("tensorboard")
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402


class LogImageLogger:
    """Duck-typed stand-in for WandbLogger: records ``log_image`` calls."""

    def __init__(self) -> None:
        self.calls = []

    def log_image(self, key, images, step=None):
        self.calls.append((key, [np.asarray(i) for i in images], step))


class BrokenLogger:
    def __init__(self) -> None:
        self.tries = 0

    def log_image(self, key, images, step=None):
        self.tries += 1
        raise ConnectionError("service down")


def _tensorboard_images(log_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    acc.Reload()
    return {tag: acc.Images(tag) for tag in acc.Tags()["images"]}


def test_grid_reaches_tensorboard_and_log_image_loggers_not_csv(tmp_path):
    tb = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    wandb_like = LogImageLogger()
    grid = np.random.default_rng(0).integers(0, 256, (10, 14, 3), dtype=np.uint8)
    got = log_image_grid([CSVLogger(str(tmp_path), name="csv"), tb, wandb_like], "train/samples", grid, 7)
    assert got == ["TensorBoardLogger", "LogImageLogger"]
    tb.experiment.flush()
    images = _tensorboard_images(tb.log_dir)
    assert list(images) == ["train/samples"]
    event = images["train/samples"][0]
    assert (event.step, event.width, event.height) == (7, 14, 10)
    key, sent, step = wandb_like.calls[0]
    assert key == "train/samples" and step == 7 and np.array_equal(sent[0], grid)


def test_a_failing_logger_is_reported_once_and_skipped(caplog):
    broken, ok = BrokenLogger(), LogImageLogger()
    grid = np.zeros((4, 4, 1), np.uint8)
    with caplog.at_level(logging.WARNING):
        for step in range(3):
            assert log_image_grid([broken, ok], "val/x", grid, step) == ["LogImageLogger"]
    assert broken.tries == 1 and len(ok.calls) == 3
    assert ok.calls[0][1][0].shape == (4, 4)  # single-channel grids are sent as 2D images
    assert sum("service down" in r.getMessage() for r in caplog.records) == 1


def test_image_logger_callback_sends_to_every_logger(tmp_path):
    # main.py's default loggers: CSV first, TensorBoard second (trainer.logger is only the first)
    tb = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    wandb_like = LogImageLogger()
    trainer = SimpleNamespace(is_global_zero=True, loggers=[CSVLogger(str(tmp_path), name="csv"), tb, wandb_like],
                              logger=None, default_root_dir=str(tmp_path))
    module = torch.nn.Linear(1, 1)
    module.global_step, module.current_epoch = 4, 0
    module.log_images = lambda batch, split, **kw: {"samples": torch.zeros(2, 1, 8, 8)}
    ImageLogger(batch_frequency=4, max_images=2).log_img(trainer, module, batch=None, batch_idx=0, split="train")
    tb.experiment.flush()
    assert list(_tensorboard_images(tb.log_dir)) == ["train/samples"]
    assert [c[0] for c in wandb_like.calls] == ["train/samples"]
    assert len(list((tmp_path / "images" / "train").glob("samples_gs-000004*.png"))) == 1
