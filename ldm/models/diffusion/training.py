"""Lightning behaviour shared by the diffusion models: training/validation steps with the CompVis log
keys, the EMA update and ``ema_scope``, the optimiser with its step-wise LambdaLR schedule, and the image
grids of ``log_images``.

The host class provides ``shared_step(batch) -> (loss, loss_dict)``, ``model``, ``use_ema`` /
``model_ema``, ``use_scheduler`` / ``scheduler_config``, ``first_stage_key``, ``trainable_parameters()``
and ``learning_rate`` (set by main.py from ``base_learning_rate``).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

from ldm.models.optim import make_adam
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)


class DiffusionLightningMixin:
    """Training/validation steps, EMA handling and optimisers for :class:`~ldm.models.diffusion.ddpm.DDPM`.

    Args: none (a mixin; see the module docstring for what the host class provides).
    """

    #: loss-dict entries (name after the "train/" prefix) shown on the progress bar; everything is logged
    progress_bar_keys: tuple[str, ...] = ("loss_simple", "loss")

    def _batch_size(self, batch: Mapping[str, Any]) -> Optional[int]:
        value = batch.get(self.first_stage_key) if isinstance(batch, Mapping) else None
        return int(value.shape[0]) if hasattr(value, "shape") else None

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, loss_dict = self.shared_step(batch)
        bs = self._batch_size(batch)
        on_bar = {key: value for key, value in loss_dict.items() if key.split("/", 1)[-1] in self.progress_bar_keys}
        rest = {key: value for key, value in loss_dict.items() if key not in on_bar}
        self.log_dict(on_bar, prog_bar=True, logger=True, on_step=True, on_epoch=True, batch_size=bs)
        if rest:
            self.log_dict(rest, prog_bar=False, logger=True, on_step=True, on_epoch=True, batch_size=bs)
        self.log("global_step", float(self.global_step), prog_bar=False, logger=True, on_step=True,
                 on_epoch=False, batch_size=bs)
        if self.use_scheduler:
            lr = self.optimizers().param_groups[0]["lr"]
            self.log("lr_abs", lr, prog_bar=True, logger=True, on_step=True, on_epoch=False, batch_size=bs)
        return loss

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        bs = self._batch_size(batch)
        _, loss_dict_no_ema = self.shared_step(batch)
        with self.ema_scope():
            _, loss_dict_ema = self.shared_step(batch)
        loss_dict_ema = {f"{key}_ema": value for key, value in loss_dict_ema.items()}
        for logged in (loss_dict_no_ema, loss_dict_ema):  # synced across ranks: "val/..." drives checkpointing
            self.log_dict(logged, prog_bar=False, logger=True, on_step=False, on_epoch=True, batch_size=bs,
                          sync_dist=True)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.use_ema:
            self.model_ema(self.model)

    @contextmanager
    def ema_scope(self, context: Optional[str] = None) -> Iterator[None]:
        """Swap the EMA weights into ``self.model`` for the duration of the block (no-op without EMA)."""
        if self.use_ema:
            self.model_ema.store(self.model.parameters())
            self.model_ema.copy_to(self.model)
            if context is not None:
                logger.info("%s: switched to EMA weights", context)
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.model.parameters())
                if context is not None:
                    logger.info("%s: restored training weights", context)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, n_row: int = 2, sample: bool = True,
                   return_keys: Optional[Sequence[str]] = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Pixel-space DDPM images: the inputs, the forward diffusion of a few, and EMA samples with their
        denoising rows (``LatentDiffusion`` overrides it with decoded latents)."""
        x = self.get_input(batch, self.first_stage_key).to(self.device)
        N, n_row = min(x.shape[0], N), min(x.shape[0], n_row)
        log = {"inputs": x[:N], "diffusion_row": diffusion_row(self, x[:n_row], lambda z: z)}
        if sample:
            with self.ema_scope("Plotting"):
                samples, denoise_row = self.sample(batch_size=N, return_intermediates=True, verbose=False)
            log["samples"] = samples
            log["denoise_row"] = denoise_grid(lambda z: z, denoise_row)
        return {k: v for k, v in log.items() if k in return_keys} if return_keys else log

    def configure_optimizers(self) -> Any:
        lr = getattr(self, "learning_rate", None)
        if lr is None:
            raise ValueError("learning_rate is not set on the model: main.py sets it from model.base_learning_rate; "
                             "set model.learning_rate yourself when training without main.py")
        opt = make_adam(torch.optim.AdamW, self.trainable_parameters(), lr=lr)
        if not self.use_scheduler:
            return opt
        multiplier = instantiate_from_config(self.scheduler_config)
        logger.info("Setting up LambdaLR scheduler (step-wise) from %s", self.scheduler_config.get("target"))
        scheduler = {"scheduler": LambdaLR(opt, lr_lambda=multiplier.schedule), "interval": "step", "frequency": 1}
        return [opt], [scheduler]


def denoise_grid(decode: Callable[[torch.Tensor], torch.Tensor], samples: Sequence[torch.Tensor]) -> torch.Tensor:
    """An image grid for ``log_images``: one row per sample, one column per intermediate, each decoded."""
    from torchvision.utils import make_grid

    rows = torch.stack([decode(s) for s in samples])  # n_steps, B, C, H, W
    n_steps = rows.shape[0]
    rows = rows.transpose(0, 1).reshape(-1, *rows.shape[2:])  # B*n_steps, C, H, W (sample-major)
    return make_grid(rows, nrow=n_steps)


def diffusion_row(model: Any, x_start: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Grid of ``x_start`` noised to every ``log_every_t``-th step (and the last), decoded."""
    frames = []
    for t in range(model.num_timesteps):
        if t % model.log_every_t == 0 or t == model.num_timesteps - 1:
            ts = torch.full((x_start.shape[0],), t, device=x_start.device, dtype=torch.long)
            frames.append(model.q_sample(x_start, ts, torch.randn_like(x_start)))
    return denoise_grid(decode, frames)


LATENT_STD_RANGE = (0.5, 2.0)  # scaled latents with a std outside this are "far from unit variance"


class ScaleByStdMixin:
    """``scale_by_std`` of :class:`~ldm.models.diffusion.ddpm.LatentDiffusion`: ``scale_factor = 1 / std(z)`` from
    the first training batch of a fresh run (rank 0's value on every rank), kept once set or loaded.

    Args: none (a mixin placed before ``DDPM``; the host provides ``scale_by_std``, a ``scale_factor`` buffer,
    ``_scale_factor_fixed``, ``encode_first_stage`` and ``_raw_latent``).
    """

    def keep_scale_factor(self) -> None:
        """Keep the configured ``scale_factor`` (no first-batch estimate), e.g. when it was measured over the whole
        training set beforehand."""
        self._scale_factor_fixed = True

    @staticmethod
    def note_loaded_scale_factor(module: Any, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        """A ``load_state_dict`` pre-hook: a loaded ``scale_factor`` is kept, not recomputed."""
        if prefix + "scale_factor" in state_dict:
            module._scale_factor_fixed = True

    @torch.no_grad()
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """With ``scale_by_std``, set ``scale_factor = 1 / std(z)`` from the first batch of a fresh run; without
        it, warn when that batch's scaled latents are far from unit variance."""
        if not self.scale_by_std and self.global_step == 0 and batch_idx == 0:
            self._warn_latent_scale(batch)
        if not self.scale_by_std or self._scale_factor_fixed or self.global_step != 0 or batch_idx != 0:
            return
        if float(self.scale_factor) != 1.0:
            logger.warning("scale_by_std: replacing the configured scale_factor %s", float(self.scale_factor))
        x = super().get_input(batch, self.first_stage_key).to(self.device)  # DDPM's: the images, not latents
        z = self._raw_latent(self.encode_first_stage(x)).detach().float()
        std = z.flatten().std()
        trainer = getattr(self, "_trainer", None)
        if trainer is not None:
            std = trainer.strategy.broadcast(std, src=0)  # every rank uses rank 0's value
        self.scale_factor.copy_(1.0 / std)
        self._scale_factor_fixed = True
        logger.info("scale_by_std: set scale_factor = %.6g (1 / std of the first batch's latents)",
                    float(self.scale_factor))

    def _warn_latent_scale(self, batch: Any) -> float:
        """Warn when ``scale_factor * z`` of ``batch`` has a std outside ``LATENT_STD_RANGE`` (the diffusion schedule
        assumes unit-variance data: CompVis' 0.18215 fits only its own f8 autoencoder). Returns the std."""
        x = super().get_input(batch, self.first_stage_key).to(self.device)
        z = self._raw_latent(self.encode_first_stage(x)).detach().float()
        std = float((float(self.scale_factor) * z).flatten().std())
        low, high = LATENT_STD_RANGE
        if not low <= std <= high:
            logger.warning("the scaled latents of the first batch have std %.3g (scale_factor %.6g), far from 1: the "
                           "noise schedule assumes unit variance. Set model.params.scale_by_std: true (or "
                           "scale_factor: %.6g) for this first stage", std, float(self.scale_factor),
                           float(self.scale_factor) / std if std > 0 else float("nan"))
        return std
