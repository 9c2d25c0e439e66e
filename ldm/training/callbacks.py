"""Callbacks of the training entry point: run setup, image logging, monitored checkpoints, CUDA stats; the
checkpoint and fault callbacks live in ``ldm.training.faults`` and are re-exported here."""
from __future__ import annotations

import inspect
import logging
import math
import os
import time
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn

from ldm.atomic_io import write_text
from ldm.training.faults import (  # noqa: F401  (main.py and configs import them from here)
    LAST_CKPT,
    ConfiguredLearningRate,
    FaultCheckpoint,
    LastCheckpoint,
    NonFiniteLossError,
    NonFiniteLossGuard,
)

logger = logging.getLogger(__name__)


class SetupCallback(Callback):
    """Create the run directory and save the configs used (``configs/<now>-project.yaml``, ``-lightning.yaml``).

    Args:
        resume: the ``-r`` value ('' for a fresh run).
        now: timestamp used in the config file names.
        logdir, ckptdir, cfgdir: run directory and its checkpoint and config folders.
        config: the merged project config (model, data, ...).
        lightning_config: the merged ``lightning`` section (trainer settings as given by the user).
    """

    def __init__(self, resume: str, now: str, logdir: str, ckptdir: str, cfgdir: str, config: Any,
                 lightning_config: Any) -> None:
        super().__init__()
        self.resume, self.now = resume, now
        self.logdir, self.ckptdir, self.cfgdir = logdir, ckptdir, cfgdir
        self.config, self.lightning_config = config, lightning_config

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save()

    @rank_zero_only
    def save(self) -> None:
        for path in (self.logdir, self.ckptdir, self.cfgdir):
            os.makedirs(path, exist_ok=True)
        project = os.path.join(self.cfgdir, f"{self.now}-project.yaml")
        # atomically (ldm.atomic_io): -r reads these back, so a full disk must not leave a cut-off config
        write_text(project, OmegaConf.to_yaml(self.config))
        write_text(os.path.join(self.cfgdir, f"{self.now}-lightning.yaml"),
                   OmegaConf.to_yaml(OmegaConf.create({"lightning": self.lightning_config})))
        rank_zero_info(f"run directory {self.logdir}; configs saved in {self.cfgdir}")


class ImageLogger(Callback):
    """Call ``pl_module.log_images`` every ``batch_frequency`` batches and write image grids.

    Grids go to ``<save_dir>/images/<split>/<key>_gs-<step>_e-<epoch>_b-<batch>.png`` (rank zero only),
    and to every logger that takes images (TensorBoard, W&B; see ``ldm.training.image_logs``). ``ddim_steps``
    above the model's schedule is clamped to it (one warning); a failure while logging is logged and never ends
    the run.

    Args:
        batch_frequency: log every this many global steps (training; validation logs its first batch when the
            step is due), or batches of the epoch with ``log_on_batch_idx``.
        max_images: at most this many images per key.
        clamp: clamp to [-1, 1] before saving.
        increase_log_steps: also log at steps 1, 2, 4, ... below ``batch_frequency``.
        rescale: map [-1, 1] to [0, 1] for saving.
        disabled: do nothing.
        log_on_batch_idx: count batches of the epoch instead of global steps.
        log_first_step: also log at step 0.
        log_images_kwargs: extra keyword arguments for ``log_images`` (e.g. ``N``, ``ddim_steps``).
        save_dir: the run directory; default the logger's ``save_dir`` or the trainer's ``default_root_dir``.
    """

    def __init__(self, batch_frequency: int, max_images: int, clamp: bool = True, increase_log_steps: bool = True,
                 rescale: bool = True, disabled: bool = False, log_on_batch_idx: bool = False,
                 log_first_step: bool = False, log_images_kwargs: Optional[dict] = None,
                 save_dir: Optional[str] = None) -> None:
        super().__init__()
        if batch_frequency < 1:
            raise ValueError(f"ImageLogger batch_frequency must be >= 1, got {batch_frequency}")
        self.batch_freq = int(batch_frequency)
        self.max_images = int(max_images)
        self.clamp, self.rescale, self.disabled = clamp, rescale, disabled
        self.log_on_batch_idx, self.log_first_step = log_on_batch_idx, log_first_step
        self.log_images_kwargs = dict(log_images_kwargs or {})
        self.save_dir = save_dir
        self.log_steps = [2 ** n for n in range(int(math.log2(self.batch_freq)) + 1)] if increase_log_steps \
            else [self.batch_freq]
        self.clamp_warned = False
        self.failures = 0

    def _root(self, trainer: pl.Trainer) -> str:
        if self.save_dir:
            return self.save_dir
        if trainer.logger is not None and getattr(trainer.logger, "save_dir", None):
            return trainer.logger.save_dir
        return trainer.default_root_dir

    def check_frequency(self, check_idx: int) -> bool:
        """True when images are due at ``check_idx`` (consumes one of the early log steps)."""
        due = check_idx % self.batch_freq == 0 or check_idx in self.log_steps
        if due and (check_idx > 0 or self.log_first_step):
            if self.log_steps and check_idx >= self.log_steps[0]:
                self.log_steps = [s for s in self.log_steps if s > check_idx]
            return True
        return False

    def to_grid(self, images: torch.Tensor) -> np.ndarray:
        """B,C,H,W in [-1,1] -> H,W,3 uint8 grid."""
        import torchvision

        images = images.detach().float().cpu()
        if self.clamp:
            images = images.clamp(-1.0, 1.0)
        if images.shape[1] not in (1, 3):  # e.g. latents: show the first three channels
            images = images[:, :3] if images.shape[1] > 3 else images[:, :1]
        grid = torchvision.utils.make_grid(images, nrow=4)
        if self.rescale:
            grid = (grid + 1.0) / 2.0
        grid = grid.clamp(0.0, 1.0).permute(1, 2, 0).numpy()
        return (grid * 255).round().astype(np.uint8)

    @rank_zero_only
    def save_local(self, root: str, split: str, images: dict[str, torch.Tensor], global_step: int,
                   current_epoch: int, batch_idx: int) -> list[str]:
        from PIL import Image

        folder = os.path.join(root, "images", split)
        os.makedirs(folder, exist_ok=True)
        written = []
        for key, value in images.items():
            grid = self.to_grid(value)
            name = f"{key.replace('/', '_')}_gs-{global_step:06}_e-{current_epoch:06}_b-{batch_idx:06}.png"
            path = os.path.join(folder, name)
            Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(path)
            written.append(path)
        return written

    def images_kwargs(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        """``log_images_kwargs``, with ``ddim_steps`` (given, or the default of ``log_images``) clamped to the
        model's ``num_timesteps`` (CompVis' default of 200 is more than a 100-step schedule has)."""
        kwargs = dict(self.log_images_kwargs)
        limit = getattr(pl_module, "num_timesteps", None)
        steps = kwargs.get("ddim_steps", _parameter_default(pl_module.log_images, "ddim_steps"))
        if isinstance(limit, int) and isinstance(steps, int) and steps > limit:
            if not self.clamp_warned:
                logger.warning("image logging: ddim_steps=%d is more than the model's %d timesteps; sampling "
                               "with %d DDIM steps (set lightning.callbacks.image_logger.params.log_images_kwargs."
                               "ddim_steps to choose)", steps, limit, limit)
                self.clamp_warned = True
            kwargs["ddim_steps"] = limit
        return kwargs

    def log_img(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                split: str = "train") -> None:
        """Log images when due. A failure is logged (the first with its traceback) and training goes on."""
        check_idx = batch_idx if self.log_on_batch_idx else pl_module.global_step
        if self.disabled or self.max_images <= 0 or not callable(getattr(pl_module, "log_images", None)):
            return
        if not trainer.is_global_zero or not self.check_frequency(check_idx):
            return
        try:
            self._log_img(trainer, pl_module, batch, batch_idx, split)
        except Exception as err:  # a logging callback never ends a run
            self.failures += 1
            if self.failures == 1:
                logger.error("image logging failed at global step %d (%s split); training goes on without these "
                             "images (further failures: one line each)", pl_module.global_step, split, exc_info=True)
            else:
                logger.error("image logging failed again at global step %d (%s split): %s: %s",
                             pl_module.global_step, split, type(err).__name__, err)

    def _log_img(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                 split: str) -> None:
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                images = pl_module.log_images(batch, split=split, **self.images_kwargs(pl_module))
        finally:
            pl_module.train(was_training)
        tensors = {k: v[: self.max_images] for k, v in images.items()
                   if isinstance(v, torch.Tensor) and v.ndim == 4}
        self.save_local(self._root(trainer), split, tensors, pl_module.global_step, pl_module.current_epoch,
                        batch_idx)
        from ldm.training.image_logs import log_image_grid

        for key, value in tensors.items():  # TensorBoard, W&B, ...: every logger that takes images
            log_image_grid(trainer.loggers, f"{split}/{key}", self.to_grid(value), pl_module.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.log_img(trainer, pl_module, batch, batch_idx, split="train")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        # one validation batch per check: log_images may sample (hundreds of network calls)
        first = batch_idx == 0 and dataloader_idx == 0
        if not trainer.sanity_checking and pl_module.global_step > 0 and (first or self.log_on_batch_idx):
            self.log_img(trainer, pl_module, batch, batch_idx, split="val")


def _parameter_default(fn: Any, name: str) -> Any:
    """Default of parameter ``name`` of ``fn`` (None when it has none or cannot be inspected)."""
    try:
        parameter = inspect.signature(fn).parameters.get(name)
    except (TypeError, ValueError):
        return None
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


class CUDACallback(Callback):
    """Log peak CUDA memory and time per training epoch; silent on other devices."""

    def __init__(self) -> None:
        super().__init__()
        self.start_time = 0.0

    @staticmethod
    def _cuda(trainer: pl.Trainer) -> Optional[torch.device]:
        device = trainer.strategy.root_device
        return device if device.type == "cuda" else None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = self._cuda(trainer)
        if device is not None:
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.synchronize(device)
        self.start_time = time.time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = self._cuda(trainer)
        if device is None:
            return
        torch.cuda.synchronize(device)
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
        epoch_time = time.time() - self.start_time
        stats = trainer.strategy.reduce(torch.tensor([epoch_time, peak_mib], device=device), reduce_op="mean")
        rank_zero_info(f"epoch {trainer.current_epoch}: {float(stats[0]):.2f} s, "
                       f"peak CUDA memory {float(stats[1]):.0f} MiB (mean over processes)")


class MonitoredCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (top-k on ``monitor``) that, when the key turns out not to be logged, warns once and
    keeps only ``last.ckpt`` instead of failing the run. Same arguments as ``ModelCheckpoint``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.missing_key_warned = False

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        if self.monitor is not None and self.monitor not in monitor_candidates:
            if not trainer.fit_loop.epoch_loop.val_loop._has_run:
                return  # no validation yet: the key may still come
            if not self.missing_key_warned:
                rank_zero_warn(f"checkpoint monitor {self.monitor!r} (model.params.monitor) is not logged by this "
                               f"model (logged: {sorted(k for k in monitor_candidates if k not in ('epoch', 'step'))}"
                               f"); keeping only checkpoints/{LAST_CKPT}")
                self.missing_key_warned = True
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)


class ThreadGovernorCallback(Callback):
    """Steps a :class:`ldm.threads.ThreadGovernor` after every training batch, so a CPU run uses the cores other
    processes leave free as load comes and goes (``main.py --threads auto``, the default on the CPU). The number of
    thread changes is logged at the end."""

    def __init__(self, governor: Any) -> None:
        self.governor = governor

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.governor.step()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank_zero_info(f"CPU threads: {self.governor.threads} at the end, changed {self.governor.changes} times with "
                       "the machine's load")
