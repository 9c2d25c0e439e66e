"""A Lightning ``Trainer`` for runs driven from Python rather than ``main.py`` (benchmarks, notebooks): one device,
a fixed number of steps, no logger and no automatic checkpoints, with ``main.py``'s atomic checkpoint writes, so a
checkpoint a callback saves with ``trainer.save_checkpoint`` is either whole or absent."""
from __future__ import annotations

from typing import Any, Sequence

import pytorch_lightning as pl
import torch

from ldm.training.checkpoint_io import with_atomic_checkpoint_io


def scripted_trainer_kwargs(device: torch.device, max_steps: int, progress: bool = True) -> dict[str, Any]:
    """The ``Trainer`` settings of :func:`scripted_trainer`: ``device``'s accelerator, one device, ``max_steps``,
    no validation, bf16 mixed precision on CUDA and float32 elsewhere."""
    return {"accelerator": "gpu" if device.type == "cuda" else "cpu", "devices": 1, "max_steps": int(max_steps),
            "logger": False, "enable_checkpointing": False, "enable_model_summary": False,
            "enable_progress_bar": bool(progress), "num_sanity_val_steps": 0, "limit_val_batches": 0,
            "precision": "bf16-mixed" if device.type == "cuda" else "32-true"}


def scripted_trainer(device: torch.device, max_steps: int, callbacks: Sequence[pl.Callback] = (),
                     progress: bool = True) -> pl.Trainer:
    """A ``Trainer`` with :func:`scripted_trainer_kwargs`, ``callbacks`` and atomic checkpoint writes
    (:class:`~ldm.training.checkpoint_io.AtomicCheckpointIO`)."""
    return pl.Trainer(callbacks=list(callbacks), plugins=with_atomic_checkpoint_io(None),
                      **scripted_trainer_kwargs(device, max_steps, progress))
