"""Checkpoints and faults of a training run: ``last.ckpt``, the NaN guard, interruptions (exceptions, SIGINT,
SIGTERM, SIGUSR1) and the learning rate on resume. Used by main.py through ``ldm.training.callbacks``."""
from __future__ import annotations

import logging
import math
import os
import signal
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, Checkpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from ldm.atomic_io import WriteError, remove_staging_files

logger = logging.getLogger(__name__)

LAST_CKPT = "last.ckpt"
PREVIOUS_CKPT = "last-previous.ckpt"


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss is NaN or infinite; the run stops and keeps its last good checkpoint."""


class ConfiguredLearningRate(Callback):
    """On resume, train with the learning rate of the config, not the one in the checkpoint's optimiser state.

    Lightning restores the optimiser and scheduler state after ``configure_optimizers`` used the configured rate,
    which would silently bring the old rate back (while the log and the saved config show the new one). Here each
    parameter group's rate is scaled by new/old configured rate, so a warm-up, decay or plateau reduction keeps
    its place, and schedulers' ``base_lrs`` follow; the change is logged. The configured rates are kept in the
    checkpoint; for checkpoints without them, the restored ``initial_lr`` (or ``lr``) stands for the old rate.
    """

    def __init__(self) -> None:
        super().__init__()
        self.configured: Optional[list[list[float]]] = None
        self.restored: Optional[list[list[float]]] = None

    def state_dict(self) -> dict[str, Any]:
        return {"learning_rates": self.configured} if self.configured is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restored = state_dict.get("learning_rates")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.configured = [[float(_base_lr(group)) for group in opt.param_groups] for opt in trainer.optimizers]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is None or self.configured is None:
            return
        changes = []
        for i, (opt, configured) in enumerate(zip(trainer.optimizers, self.configured)):
            old_rates = self.restored[i] if self.restored is not None and i < len(self.restored) \
                else [float(_base_lr(group)) for group in opt.param_groups]
            if len(old_rates) != len(opt.param_groups) or len(configured) != len(opt.param_groups):
                continue
            for j, (group, old, new) in enumerate(zip(opt.param_groups, old_rates, configured)):
                if math.isclose(old, new, rel_tol=1e-9) or old <= 0.0:
                    continue
                group["lr"] = group["lr"] * new / old
                if "initial_lr" in group:
                    group["initial_lr"] = group["initial_lr"] * new / old
                changes.append(f"optimiser {i} group {j}: {old:.3g} -> {new:.3g}")
        if not changes:
            return
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            groups = scheduler.optimizer.param_groups
            if hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [float(_base_lr(group)) for group in groups]
            if hasattr(scheduler, "_last_lr"):
                scheduler._last_lr = [group["lr"] for group in groups]
        current = ", ".join(f"{group['lr']:.3g}" for opt in trainer.optimizers for group in opt.param_groups)
        rank_zero_info(f"resuming with the configured learning rate instead of the checkpoint's "
                       f"({'; '.join(changes)}); the current rate is now {current}")


def _base_lr(group: dict[str, Any]) -> float:
    """The rate a parameter group was configured with (``initial_lr`` once a scheduler has set it)."""
    return group.get("initial_lr", group["lr"])


class LastCheckpoint(Checkpoint):
    """Keep ``<dirpath>/last.ckpt`` current: at each training epoch end, every ``every_n_train_steps`` steps,
    and at the end of fit.

    Guarantees: the file is written to a temporary name beside it and renamed (``main.py`` writes every checkpoint
    through :class:`~ldm.training.checkpoint_io.AtomicCheckpointIO`: staged in the same folder, fsynced, read back),
    so it is never half-written, and a failed write (a full disk) leaves the previous file; a state whose
    weights or buffers hold NaN/inf is never written; a step-N save is written once the whole step is done (the
    model's ``on_train_batch_end``, where the EMA is updated, included). Until the weights of the newest file have
    produced one finite training loss, the file it replaced is kept as ``last-previous.ckpt``; when they produce a
    non-finite loss instead, :meth:`discard_unproven` puts the previous file back.

    Args:
        dirpath: the run's ``checkpoints`` folder.
        every_n_train_steps: also save every this many optimiser steps (0: only at epoch ends).
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 0) -> None:
        super().__init__()
        self.dirpath = dirpath
        self.every_n_train_steps = int(every_n_train_steps or 0)
        self.last_saved_step = -1
        self.has_file = False  # last.ckpt exists (this run saved it, or the run resumed from it)
        self.resumed_from: Optional[str] = None
        self.previous_step: Optional[int] = None  # step of last-previous.ckpt while it exists
        self.unproven = False  # last.ckpt's weights have not yet given a finite loss
        self.save_due = False

    @property
    def path(self) -> str:
        return os.path.join(self.dirpath, LAST_CKPT)

    @property
    def previous_path(self) -> str:
        return os.path.join(self.dirpath, PREVIOUS_CKPT)

    def save(self, trainer: pl.Trainer, keep_previous: bool = True) -> None:
        """Collective: every rank must call it (Lightning's save_checkpoint has a barrier). Without
        ``keep_previous`` no last-previous.ckpt remains."""
        if trainer.global_step == self.last_saved_step:
            return
        finite = trainer.strategy.reduce_boolean_decision(_all_finite(trainer.lightning_module.state_dict()),
                                                          all=True)
        if not finite:
            self._warn_not_finite(trainer.global_step)
            return
        tmp = self.path + ".tmp"
        try:
            trainer.save_checkpoint(tmp)
        except OSError as err:  # a full disk: say which file, and that the previous one is unchanged
            _remove(tmp)
            raise self._write_error(err) from err
        except BaseException:
            _remove(tmp)
            raise
        self._install(tmp, trainer.global_step, keep_previous, trainer.is_global_zero)

    def _write_error(self, err: OSError) -> WriteError:
        reason = getattr(err, "reason", None) or err.strerror or str(err)
        kept = f"{self.path} of global step {self.last_saved_step} is unchanged" if self.has_file else \
            "no checkpoint of this run was written yet"
        return WriteError(self.path, f"{reason}; {kept}", err.errno or None)

    def write(self, trainer: pl.Trainer, checkpoint: dict[str, Any]) -> bool:
        """Write a dumped checkpoint from this process alone (no barrier: emergency saves on rank zero; the run
        ends, so no last-previous.ckpt remains). Returns False when its state is not finite (nothing written)."""
        if not _all_finite(checkpoint.get("state_dict", {})):
            self._warn_not_finite(trainer.global_step)
            return False
        os.makedirs(self.dirpath, exist_ok=True)
        tmp = self.path + ".tmp"
        try:
            trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, tmp)
        except OSError as err:
            _remove(tmp)
            raise self._write_error(err) from err
        except BaseException:
            _remove(tmp)
            raise
        self._install(tmp, trainer.global_step, False, True)
        return True

    def _warn_not_finite(self, step: int) -> None:
        kept = f"keeping {self.path} of global step {self.last_saved_step}" if self.has_file \
            else "no checkpoint is written"
        logger.warning("not saving %s at global step %d: the weights or buffers hold NaN/inf; %s", LAST_CKPT, step,
                       kept)

    def _install(self, tmp: str, step: int, keep_previous: bool, global_zero: bool) -> None:
        """Rename ``tmp`` (written by rank zero) to last.ckpt; with ``keep_previous`` a proven last.ckpt becomes
        last-previous.ckpt. Bookkeeping on every rank, files on rank zero."""
        if keep_previous and self.has_file and not self.unproven:
            if global_zero:
                os.replace(self.path, self.previous_path)
            self.previous_step = self.last_saved_step
        if global_zero:
            os.replace(tmp, self.path)
        if not keep_previous:
            self._drop_previous(global_zero)
        self.last_saved_step, self.has_file, self.unproven, self.save_due = step, True, True, False

    def _drop_previous(self, global_zero: bool) -> None:
        if self.previous_step is not None:
            if global_zero:
                _remove(self.previous_path)
            self.previous_step = None

    def loss_was_finite(self, trainer: pl.Trainer) -> None:
        """The weights of last.ckpt gave a finite loss: last-previous.ckpt is no longer needed."""
        self.unproven = False
        self._drop_previous(trainer.is_global_zero)

    def discard_unproven(self, trainer: pl.Trainer) -> str:
        """The current weights gave a non-finite loss. When last.ckpt holds them (saved after the last finite
        loss), put last-previous.ckpt back in its place. Returns what remains, for the message."""
        if self.unproven and self.previous_step is not None:
            if trainer.is_global_zero:
                os.replace(self.previous_path, self.path)
            bad, self.last_saved_step, self.previous_step = self.last_saved_step, self.previous_step, None
            self.unproven = False
            return (f"the last good checkpoint is {self.path} (global step {self.last_saved_step}; the one of step "
                    f"{bad}, whose weights gave this loss, was discarded)")
        if not self.has_file:
            if self.resumed_from:
                return f"the run resumed from {self.resumed_from} (global step {self.last_saved_step}), which remains"
            return "no checkpoint had been written yet"
        if self.unproven:
            return (f"{self.path} (global step {self.last_saved_step}) holds the weights that gave this loss and no "
                    f"earlier checkpoint exists: start again with a lower learning rate")
        return f"the last good checkpoint is {self.path} (global step {self.last_saved_step})"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.last_saved_step = trainer.global_step  # a resumed run's state is already on disk
        self.resumed_from = trainer.ckpt_path
        self.has_file = trainer.ckpt_path is not None and os.path.realpath(trainer.ckpt_path) == \
            os.path.realpath(self.path)
        self.unproven, self.previous_step, self.save_due = False, None, False
        if trainer.is_global_zero:
            _remove(self.path + ".tmp")  # left by a process killed while writing
            remove_staging_files(self.dirpath)  # a checkpoint's .tmp-* staging file (ldm.atomic_io), likewise

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # the model's own on_train_batch_end (the EMA update) runs after this hook: save when the next one starts
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self.save_due = True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.save_due:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer, keep_previous=False)
        self._drop_previous(trainer.is_global_zero)  # when the state of this step was saved already

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        settle_batch_progress(checkpoint)


def settle_batch_progress(checkpoint: dict[str, Any]) -> None:
    """Record a training batch that was fetched or started but not trained as not begun.

    Checkpoints written between steps (the next batch's start, an interruption inside a step) would otherwise
    make Lightning count one more logged step on resume, every time (its restart treats them as mid-batch).
    """
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
    if not progress:
        return
    for part in ("total", "current"):
        counts = progress.get(part)
        if counts and counts.get("ready", 0) > counts.get("processed", 0):
            counts["ready"] = counts["started"] = counts["processed"]


def _all_finite(state: dict[str, Any]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values()
               if isinstance(v, torch.Tensor) and v.is_floating_point())


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class NonFiniteLossGuard(Callback):
    """Stop training before a NaN/inf loss reaches the weights (checked before every backward, on all ranks).

    Raises ``NonFiniteLossError`` naming the step and the checkpoint that remains: the newest ``last.ckpt`` whose
    weights gave a finite loss (see :class:`LastCheckpoint`).

    Args:
        last: the run's ``LastCheckpoint``.
    """

    def __init__(self, last: LastCheckpoint) -> None:
        super().__init__()
        self.last = last

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            self.last.loss_was_finite(trainer)
            return
        keep = self.last.discard_unproven(trainer)
        value = float(loss.detach().float().flatten()[0]) if loss.numel() else float("nan")
        raise NonFiniteLossError(
            f"non-finite training loss ({value}) at global step {trainer.global_step}, epoch "
            f"{trainer.current_epoch}; training stopped before the update, {keep}. Lower the learning rate "
            f"(model.base_learning_rate; a new rate is applied on resume), set --gradient_clip_val, or use "
            f"--precision 32, then resume with -r."
        )


class FaultCheckpoint(Callback):
    """Save ``last.ckpt`` when training is interrupted: by an exception, Ctrl-C (SIGINT), SIGTERM, or SIGUSR1
    (where the platform has it). A ``NonFiniteLossError`` saves nothing.

    SIGUSR1 stops the run after the current step; ``LastCheckpoint`` then saves at the end of fit. ``stop_signal``
    names the signal that ended the run (``None`` otherwise), for the exit status. A failing emergency save is
    logged and leaves no temporary file; the original exception goes on.

    Args:
        last: the ``LastCheckpoint`` whose file is written.
        handle_sigusr1: install a SIGUSR1 handler (main thread only). Lightning then leaves SIGUSR1 alone, so
            under SLURM the job saves and ends instead of Lightning's auto-requeue; resubmit with ``-r``.
    """

    def __init__(self, last: LastCheckpoint, handle_sigusr1: bool = True) -> None:
        super().__init__()
        self.last = last
        self.start_step: Optional[int] = None
        self.signal_received = False
        self.stop_signal: Optional[signal.Signals] = None
        if handle_sigusr1 and hasattr(signal, "SIGUSR1"):
            try:
                signal.signal(signal.SIGUSR1, self._on_signal)
            except ValueError:  # not in the main thread
                logger.debug("SIGUSR1 handler not installed (not in the main thread)")

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signal_received = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.signal_received, all=False):
            return
        self.signal_received = False
        self.stop_signal = signal.Signals.SIGUSR1
        rank_zero_info(f"SIGUSR1 at global step {trainer.global_step}: stopping after this step; {self.last.path} "
                       f"is saved at the end of fit. Continue with -r {os.path.dirname(self.last.dirpath)}")
        trainer.should_stop = True

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.stop_signal = signal.Signals.SIGINT
        elif isinstance(exception, SIGTERMException):
            self.stop_signal = signal.Signals.SIGTERM
        if isinstance(exception, NonFiniteLossError) or self.start_step is None:
            return
        if trainer.global_step <= self.start_step:
            return  # nothing new since the checkpoint on disk (or since a fresh start)
        # no barrier here: other ranks may be dead or stuck, so rank zero writes on its own
        if not trainer.is_global_zero:
            return
        try:
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            written = self.last.write(trainer, checkpoint)
        except Exception:  # the original exception matters more: Lightning re-raises it after this hook
            logger.exception("training stopped (%s) at global step %d and saving %s failed as well; %s",
                             type(exception).__name__, trainer.global_step, self.last.path, self._kept())
            return
        if written:
            logger.error("training stopped (%s) at global step %d; saved %s", type(exception).__name__,
                         trainer.global_step, self.last.path)

    def _kept(self) -> str:
        if self.last.has_file:
            return f"{self.last.path} of global step {self.last.last_saved_step} is unchanged"
        return "no checkpoint of this run was written"
