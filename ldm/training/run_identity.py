"""Which run a checkpoint belongs to: a run id in ``<run>/run.json`` and in every checkpoint the run writes.

A ``last.ckpt`` copied from another run of the same architecture fits the model, so ``main.py -r`` would resume from
it without a word: the global step jumps, and the top-k files of two runs mix in one folder. Each run therefore gets a
random id when it starts (``run.json``: ``run_id``, ``created``); :class:`RunIdentity` stores it in every checkpoint
(top-level key :data:`CHECKPOINT_KEY`: ``last.ckpt``, top-k, emergency saves), and :func:`check_same_run` refuses to
resume a run from a checkpoint that carries another run's id, unless ``--allow-other-run`` (then one loud warning).
``--resume_from_checkpoint`` starts a new run from any checkpoint on purpose and is not checked. Checkpoints written
before run ids existed carry none: they resume with a warning that they could not be checked; a run directory
without ``run.json`` (an older run) gets one on its first resume, with the id of the checkpoint it resumes from.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from typing import Any, Optional

from pytorch_lightning.callbacks import Callback

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
CHECKPOINT_KEY = "ldm_run_id"
RUN_ID_ENV = "LDM_MAIN_RUN_ID"  # handed from rank 0 to the DDP processes it launches
ALLOW_FLAG = "--allow-other-run"


class OtherRunError(ValueError):
    """The checkpoint to resume from was written by another run; nothing was loaded."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def read_run_id(logdir: str) -> Optional[str]:
    """The id in ``<logdir>/run.json``; None when there is no such file. A damaged file is a ``ValueError``."""
    path = os.path.join(logdir, RUN_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        run_id = record["run_id"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a readable run record ({type(err).__name__}: {err}); repair or delete "
                         "it (deleting it turns off the check that a resumed checkpoint belongs to this run once)"
                         ) from err
    if not isinstance(run_id, str) or not run_id:
        raise ValueError(f"{path} holds no run_id string; repair or delete it")
    return run_id


def write_run_id(logdir: str, run_id: str) -> None:
    """``<logdir>/run.json`` with ``run_id`` (atomically; an existing file is kept)."""
    from ldm.atomic_io import write_json

    path = os.path.join(logdir, RUN_FILE)
    if os.path.exists(path):
        return
    os.makedirs(logdir, exist_ok=True)
    write_json(path, {"run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})


def checkpoint_run_id(checkpoint: Any) -> Optional[str]:
    """The run id stored in a loaded checkpoint dict, None when it has none."""
    value = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    return value if isinstance(value, str) and value else None


def check_same_run(ckpt_path: str, ckpt_run_id: Optional[str], logdir: str, run_id: Optional[str],
                   allow_other: bool = False) -> str:
    """The run id to continue with when ``main.py -r`` resumes ``logdir`` (whose ``run.json`` holds ``run_id``, or
    None) from ``ckpt_path`` (which carries ``ckpt_run_id``). Raises :class:`OtherRunError` when they differ, unless
    ``allow_other`` (one warning)."""
    if ckpt_run_id is None:
        if run_id is not None:
            logger.warning("%s records no run id (written before run ids existed, or not by main.py), so it cannot "
                           "be checked that it belongs to the run %s (%s)", ckpt_path, logdir, run_id)
        return run_id or new_run_id()
    if run_id is None or ckpt_run_id == run_id:
        return ckpt_run_id
    if not allow_other:
        raise OtherRunError(
            f"{ckpt_path} was written by another run (run id {ckpt_run_id}) than {logdir} (run id {run_id}, "
            f"{os.path.join(logdir, RUN_FILE)}): resuming would continue that run's step count and mix its top-k "
            f"checkpoints with this run's. Resume the run it belongs to, start a new run from it with -n NAME "
            f"--resume_from_checkpoint {ckpt_path}, or pass {ALLOW_FLAG} to resume this run from it anyway")
    logger.warning("%s: resuming %s (run id %s) from %s, a checkpoint of ANOTHER run (run id %s); its global step, "
                   "optimiser state and top-k record now continue here", ALLOW_FLAG, logdir, run_id, ckpt_path,
                   ckpt_run_id)
    return run_id


class RunIdentity(Callback):
    """Store ``run_id`` in every checkpoint (top-level :data:`CHECKPOINT_KEY`) and write ``<logdir>/run.json`` at
    fit start (rank zero; an existing file is kept).

    Args:
        run_id: this run's id.
        logdir: the run directory.
    """

    def __init__(self, run_id: str, logdir: str) -> None:
        super().__init__()
        self.run_id, self.logdir = run_id, logdir

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            write_run_id(self.logdir, self.run_id)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.run_id
