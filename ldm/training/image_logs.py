"""Image grids to every Lightning logger that takes images (used by :class:`ldm.training.callbacks.ImageLogger`).

TensorBoard takes them through ``experiment.add_image`` (``tensorboard --logdir logs`` shows them under Images),
Weights & Biases (and any logger with the same method) through ``log_image(key=..., images=[...], step=...)``.
Loggers that take no images (CSV) are skipped. A logger that fails is reported once and skipped afterwards, so
a broken logging back end never stops a training run.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

import numpy as np

logger = logging.getLogger(__name__)

_FAILED = "_ldm_image_logging_failed"


def log_image_grid(loggers: Iterable[Any], tag: str, grid: np.ndarray, step: int) -> list[str]:
    """Send one ``H x W x C`` uint8 grid to every logger in ``loggers`` that takes images.

    Returns the class names of the loggers that received it.
    """
    received = []
    for target in loggers:
        if getattr(target, _FAILED, False):
            continue
        try:
            experiment = getattr(target, "experiment", None)
            if callable(getattr(experiment, "add_image", None)):
                experiment.add_image(tag, grid, step, dataformats="HWC")
            elif callable(getattr(target, "log_image", None)):
                image = grid[..., 0] if grid.shape[-1] == 1 else grid
                target.log_image(key=tag, images=[image], step=step)
            else:
                continue
        except Exception as err:  # noqa: BLE001 (logging, or starting a logger's back end, must not end training)
            setattr(target, _FAILED, True)
            logger.warning("image logging to %s failed (%s: %s); images go to the run's images/ folder only",
                           type(target).__name__, type(err).__name__, err)
            continue
        received.append(type(target).__name__)
    return received
