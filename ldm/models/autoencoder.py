"""First-stage autoencoders: ``AutoencoderKL`` (and ``VQModel``/``VQModelInterface`` through taming's
``VectorQuantizer2``) as Lightning-2 modules with CompVis configs and state-dict keys.

Both train the generator and the PatchGAN discriminator with two optimisers the Lightning-2 way
(manual optimisation: one autoencoder step, then one discriminator step per batch). Lightning 2
counts every optimiser step in ``global_step`` (two per batch here); the loss schedules
(``disc_start``) count training batches as CompVis did (``batch_step``).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.checkpoints import load_weights
from ldm.models.optim import make_adam
from ldm.data.batch import to_channels_first
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

ADAM_BETAS = (0.5, 0.9)


class _GANAutoencoder(pl.LightningModule):
    """Shared machinery: input conversion, checkpoint loading, two-optimiser training step."""

    # Each backward pass touches only one optimiser's parameters, so multi-GPU training needs
    # strategy "ddp_find_unused_parameters_true" (plain "ddp" stops with an unused-parameter error).
    ddp_find_unused_parameters = True

    encoder: Encoder
    decoder: Decoder
    loss: nn.Module
    image_key: str

    def _setup_common(self, ddconfig: Mapping[str, Any], lossconfig: Mapping[str, Any], image_key: str,
                      colorize_nlabels: Optional[int], monitor: Optional[str]) -> None:
        self.automatic_optimization = False
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        if colorize_nlabels is not None:
            if not isinstance(colorize_nlabels, int) or colorize_nlabels <= 0:
                raise ValueError(f"colorize_nlabels must be a positive int, got {colorize_nlabels!r}")
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor

    # ------------------------------------------------------------------ loading
    def init_from_ckpt(self, path: str, ignore_keys: Iterable[str] = ()) -> tuple[list[str], list[str]]:
        """Load ``path`` (Lightning ``.ckpt``, bare state dict or safetensors), dropping keys that start
        with any of ``ignore_keys``; missing/unexpected keys are logged, wrong shapes raise
        (:func:`ldm.checkpoints.load_weights`). Returns ``(missing, unexpected)``."""
        return load_weights(self, path, ignore_keys=ignore_keys, allow_unexpected=True)

    # ------------------------------------------------------------------ data
    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """``batch[k]`` in [-1, 1] -> contiguous float B,C,H,W; channel-last B,H,W(,C) and channel-first
        B,C,H,W (MONAI) are told apart by the encoder's input channels (:func:`ldm.data.batch.to_channels_first`)."""
        if k not in batch:
            raise ValueError(f"batch has no key {k!r} (image_key); it has {sorted(batch)}")
        channels = self.encoder.conv_in.in_channels if k == self.image_key else None
        return to_channels_first(batch[k], channels, k)

    def get_last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    @property
    def batch_step(self) -> int:
        """Training batches taken so far (``global_step`` counts both optimisers' steps)."""
        return self.global_step // 2

    # ------------------------------------------------------------------ training
    def _learning_rate(self) -> float:
        lr = getattr(self, "learning_rate", None)
        if lr is None:
            raise ValueError(f"{type(self).__name__}.learning_rate is not set; main.py sets it from "
                             "model.base_learning_rate, set it yourself when training without main.py")
        return float(lr)

    def _check_trainable_loss(self) -> None:
        if not hasattr(self.loss, "discriminator"):
            raise ValueError(f"{type(self).__name__} was built with lossconfig target {type(self.loss).__name__}, "
                             "which cannot train it; use ldm.modules.losses.LPIPSWithDiscriminator (KL) or "
                             "VQLPIPSWithDiscriminator (VQ) in lossconfig")

    def _gan_step(self, ae_loss_fn: Callable[[], tuple[torch.Tensor, dict]],
                  disc_loss_fn: Callable[[], tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, dict, torch.Tensor, dict]:
        """One autoencoder step (``ae_loss_fn()``), then one discriminator step (``disc_loss_fn()``)."""
        opt_ae, opt_disc = self.optimizers()
        self.toggle_optimizer(opt_ae)
        aeloss, log_ae = ae_loss_fn()
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(aeloss)
        opt_ae.step()
        self.untoggle_optimizer(opt_ae)

        self.toggle_optimizer(opt_disc)
        discloss, log_disc = disc_loss_fn()
        opt_disc.zero_grad(set_to_none=True)
        self.manual_backward(discloss)
        opt_disc.step()
        self.untoggle_optimizer(opt_disc)

        schedulers = self.lr_schedulers()
        if schedulers is not None:
            for sched in schedulers if isinstance(schedulers, list) else [schedulers]:
                sched.step()

        self.log("aeloss", aeloss.detach(), prog_bar=True, on_step=True, on_epoch=True)
        self.log_dict(log_ae, prog_bar=False, on_step=True, on_epoch=False)
        self.log("discloss", discloss.detach(), prog_bar=True, on_step=True, on_epoch=True)
        self.log_dict(log_disc, prog_bar=False, on_step=True, on_epoch=False)
        return aeloss, log_ae, discloss, log_disc

    def _adam_pair(self, ae_params: list[nn.Parameter], lr_g: float, lr_d: float):
        self._check_trainable_loss()
        opt_ae = make_adam(torch.optim.Adam, ae_params, lr=lr_g, betas=ADAM_BETAS)
        opt_disc = make_adam(torch.optim.Adam, self.loss.discriminator.parameters(), lr=lr_d, betas=ADAM_BETAS)
        return opt_ae, opt_disc

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """Random fixed projection of a many-channel map to RGB in [-1, 1] (``colorize`` buffer)."""
        if not hasattr(self, "colorize"):
            self.register_buffer("colorize", torch.randn(3, x.shape[1], 1, 1).to(x))
        x = F.conv2d(x, weight=self.colorize.to(x))
        return 2.0 * (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12) - 1.0


class AutoencoderKL(_GANAutoencoder):
    """KL-regularised autoencoder (CompVis ``ldm.models.autoencoder.AutoencoderKL``).

    Args:
        ddconfig: Encoder/Decoder config (``double_z`` must be True).
        lossconfig: ``{target, params}`` of the loss (``LPIPSWithDiscriminator``; ``torch.nn.Identity``
            for a frozen first stage).
        embed_dim: latent channels after ``quant_conv``.
        ckpt_path: checkpoint to load at construction.
        ignore_keys: key prefixes dropped from that checkpoint.
        image_key: batch key of the images.
        colorize_nlabels: channels of a segmentation input to colour for logging.
        monitor: metric name for checkpointing (e.g. ``val/rec_loss``).
        learn_logvar: also optimise the loss's output log-variance (CompVis leaves it fixed).
    """

    def __init__(self, ddconfig: Mapping[str, Any], lossconfig: Mapping[str, Any], embed_dim: int,
                 ckpt_path: Optional[str] = None, ignore_keys: Sequence[str] = (), image_key: str = "image",
                 colorize_nlabels: Optional[int] = None, monitor: Optional[str] = None, learn_logvar: bool = False):
        super().__init__()
        ddconfig = dict(ddconfig)
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true (the encoder outputs mean and log-variance)")
        self._setup_common(ddconfig, lossconfig, image_key, colorize_nlabels, monitor)
        z_channels = int(ddconfig["z_channels"])
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim
        self.learn_logvar = learn_logvar
        logvar = getattr(self.loss, "logvar", None)
        if isinstance(logvar, nn.Parameter) and not learn_logvar:
            logvar.requires_grad_(False)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, input: torch.Tensor, sample_posterior: bool = True
                ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        inputs = self.get_input(batch, self.image_key)
        reconstructions, posterior = self(inputs)
        step = self.batch_step

        def ae_loss():
            return self.loss(inputs, reconstructions, posterior, 0, step, last_layer=self.get_last_layer(),
                             split="train")

        def disc_loss():
            return self.loss(inputs, reconstructions.detach(), posterior, 1, step,
                             last_layer=self.get_last_layer(), split="train")

        aeloss, _, _, _ = self._gan_step(ae_loss, disc_loss)
        return aeloss.detach()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        inputs = self.get_input(batch, self.image_key)
        reconstructions, posterior = self(inputs)
        step = self.batch_step
        _, log_ae = self.loss(inputs, reconstructions, posterior, 0, step, last_layer=self.get_last_layer(),
                              split="val")
        _, log_disc = self.loss(inputs, reconstructions, posterior, 1, step, last_layer=self.get_last_layer(),
                                split="val")
        self.log_dict(log_ae, sync_dist=True)
        self.log_dict(log_disc, sync_dist=True)
        return {**log_ae, **log_disc}

    def configure_optimizers(self):
        lr = self._learning_rate()
        params = (list(self.encoder.parameters()) + list(self.decoder.parameters())
                  + list(self.quant_conv.parameters()) + list(self.post_quant_conv.parameters()))
        if self.learn_logvar:
            params.append(self.loss.logvar)
        opt_ae, opt_disc = self._adam_pair(params, lr, lr)
        return [opt_ae, opt_disc], []

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], only_inputs: bool = False, **kwargs: Any) -> dict[str, torch.Tensor]:
        """``inputs`` and, unless ``only_inputs``, ``reconstructions`` and ``samples`` (decoded N(0, I)
        latents), all B,C,H,W in [-1, 1] (RGB-projected for more than 3 channels)."""
        log: dict[str, torch.Tensor] = {}
        x = self.get_input(batch, self.image_key).to(self.device)
        if not only_inputs:
            xrec, posterior = self(x)
            samples = self.decode(torch.randn_like(posterior.sample()))
            if x.shape[1] > 3:
                xrec, samples = self.to_rgb(xrec), self.to_rgb(samples)
            log["samples"] = samples.clamp(-1.0, 1.0)
            log["reconstructions"] = xrec.clamp(-1.0, 1.0)
        if x.shape[1] > 3:
            x = self.to_rgb(x)
        log["inputs"] = x
        return log


class VQModel(_GANAutoencoder):
    """Vector-quantised autoencoder (CompVis ``ldm.models.autoencoder.VQModel``) on taming's
    ``VectorQuantizer2`` (key ``quantize.embedding.weight``).

    Args:
        ddconfig, lossconfig, ckpt_path, ignore_keys, image_key, colorize_nlabels, monitor: as AutoencoderKL.
        n_embed: codebook size.
        embed_dim: code dimension.
        batch_resize_range: (low, high) random training resolution, multiples of 16 (None: off).
        scheduler_config: ``{target, params}`` of a schedule object with ``schedule(step)`` (LambdaLR).
        lr_g_factor: generator learning rate = ``lr_g_factor * learning_rate``.
        remap: ``.npy`` file of used code indices (taming remapping).
        sane_index_shape: return indices as B,H,W.
        use_ema: keep an EMA copy (``model_ema.*``) used for extra validation and logging.
    """

    def __init__(self, ddconfig: Mapping[str, Any], lossconfig: Mapping[str, Any], n_embed: int, embed_dim: int,
                 ckpt_path: Optional[str] = None, ignore_keys: Sequence[str] = (), image_key: str = "image",
                 colorize_nlabels: Optional[int] = None, monitor: Optional[str] = None,
                 batch_resize_range: Optional[Sequence[int]] = None, scheduler_config: Optional[Mapping] = None,
                 lr_g_factor: float = 1.0, remap: Optional[str] = None, sane_index_shape: bool = False,
                 use_ema: bool = False):
        super().__init__()
        from taming.modules.vqvae.quantize import VectorQuantizer2

        ddconfig = dict(ddconfig)
        if ddconfig.get("double_z", True):
            raise ValueError("VQModel needs ddconfig.double_z: false (the encoder outputs the latents themselves)")
        self._setup_common(ddconfig, lossconfig, image_key, colorize_nlabels, monitor)
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=0.25, remap=remap,
                                         sane_index_shape=sane_index_shape)
        z_channels = int(ddconfig["z_channels"])
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        if batch_resize_range is not None:
            batch_resize_range = tuple(int(v) for v in batch_resize_range)
            if len(batch_resize_range) != 2 or batch_resize_range[0] > batch_resize_range[1]:
                raise ValueError(f"batch_resize_range must be (low, high), got {batch_resize_range}")
        self.batch_resize_range = batch_resize_range
        self.use_ema = use_ema
        if use_ema:
            from ldm.modules.ema import LitEma

            self.model_ema = LitEma(self)
        self.scheduler_config = scheduler_config
        self.lr_g_factor = lr_g_factor
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    @contextmanager
    def ema_scope(self, context: Optional[str] = None) -> Iterator[None]:
        """Temporarily swap in the EMA weights (no-op without ``use_ema``)."""
        if not self.use_ema:
            yield
            return
        self.model_ema.store(self.parameters())
        self.model_ema.copy_to(self)
        if context is not None:
            logger.info("%s: switched to EMA weights", context)
        try:
            yield
        finally:
            self.model_ema.restore(self.parameters())
            if context is not None:
                logger.info("%s: restored training weights", context)

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self.use_ema:
            self.model_ema(self)

    def encode(self, x: torch.Tensor):
        """-> (quantised latents, codebook loss, (perplexity, encodings, indices)) as taming returns."""
        return self.quantize(self.quant_conv(self.encoder(x)))

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code_b: torch.Tensor, shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Decode code indices; ``shape`` = (B, H, W, embed_dim) when ``code_b`` is flat."""
        if shape is None:
            if code_b.ndim != 3:
                raise ValueError("decode_code needs indices B,H,W or a shape (B, H, W, embed_dim)")
            shape = (*code_b.shape, self.embed_dim)
        return self.decode(self.quantize.get_codebook_entry(code_b.reshape(-1), shape))

    def forward(self, input: torch.Tensor, return_pred_indices: bool = False):
        quant, diff, (_, _, ind) = self.encode(input)
        dec = self.decode(quant)
        return (dec, diff, ind) if return_pred_indices else (dec, diff)

    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        x = super().get_input(batch, k)
        if self.batch_resize_range is None or not self.training:
            return x
        lower, upper = self.batch_resize_range
        size = upper if self.batch_step <= 4 else int(np.random.choice(np.arange(lower, upper + 16, 16)))
        if size != x.shape[2]:
            x = F.interpolate(x, size=size, mode="bicubic")
        return x.detach()

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        x = self.get_input(batch, self.image_key)
        xrec, qloss, ind = self(x, return_pred_indices=True)
        step = self.batch_step

        def ae_loss():
            return self.loss(qloss, x, xrec, 0, step, last_layer=self.get_last_layer(), split="train",
                             predicted_indices=ind)

        def disc_loss():
            return self.loss(qloss, x, xrec.detach(), 1, step, last_layer=self.get_last_layer(), split="train")

        aeloss, _, _, _ = self._gan_step(ae_loss, disc_loss)
        return aeloss.detach()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        logs = self._validation_step(batch, suffix="")
        if self.use_ema:
            with self.ema_scope():
                logs.update(self._validation_step(batch, suffix="_ema"))
        return logs

    def _validation_step(self, batch: Mapping[str, Any], suffix: str) -> dict[str, torch.Tensor]:
        x = self.get_input(batch, self.image_key)
        xrec, qloss, ind = self(x, return_pred_indices=True)
        split = "val" + suffix
        step = self.batch_step
        _, log_ae = self.loss(qloss, x, xrec, 0, step, last_layer=self.get_last_layer(), split=split,
                              predicted_indices=ind)
        _, log_disc = self.loss(qloss, x, xrec, 1, step, last_layer=self.get_last_layer(), split=split)
        self.log_dict(log_ae, sync_dist=True)
        self.log_dict(log_disc, sync_dist=True)
        return {**log_ae, **log_disc}

    def configure_optimizers(self):
        lr_d = self._learning_rate()
        lr_g = self.lr_g_factor * lr_d
        params = (list(self.encoder.parameters()) + list(self.decoder.parameters())
                  + list(self.quantize.parameters()) + list(self.quant_conv.parameters())
                  + list(self.post_quant_conv.parameters()))
        opt_ae, opt_disc = self._adam_pair(params, lr_g, lr_d)
        if self.scheduler_config is None:
            return [opt_ae, opt_disc], []
        schedule = instantiate_from_config(self.scheduler_config).schedule
        schedulers = [
            {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=schedule), "interval": "step",
             "frequency": 1}
            for opt in (opt_ae, opt_disc)
        ]
        return [opt_ae, opt_disc], schedulers

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], only_inputs: bool = False, plot_ema: bool = False,
                   **kwargs: Any) -> dict[str, torch.Tensor]:
        """``inputs`` and ``reconstructions`` (+ ``reconstructions_ema``), B,C,H,W in [-1, 1]."""
        log: dict[str, torch.Tensor] = {}
        x = self.get_input(batch, self.image_key).to(self.device)
        show = self.to_rgb if x.shape[1] > 3 else (lambda t: t)
        log["inputs"] = show(x)
        if only_inputs:
            return log
        log["reconstructions"] = show(self(x)[0]).clamp(-1.0, 1.0)
        if plot_ema and self.use_ema:
            with self.ema_scope():
                log["reconstructions_ema"] = show(self(x)[0]).clamp(-1.0, 1.0)
        return log


class VQModelInterface(VQModel):
    """``VQModel`` as a latent-diffusion first stage: ``encode`` returns the pre-quantisation latents,
    ``decode`` quantises them (unless ``force_not_quantize``) and decodes.

    Args:
        embed_dim: code dimension; every other argument as :class:`VQModel`.
    """

    def __init__(self, embed_dim: int, *args: Any, **kwargs: Any):
        super().__init__(*args, embed_dim=embed_dim, **kwargs)
        self.embed_dim = embed_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.quant_conv(self.encoder(x))

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, input: torch.Tensor, return_pred_indices: bool = False):
        quant, diff, (_, _, ind) = self.quantize(self.encode(input))
        dec = self.decoder(self.post_quant_conv(quant))
        return (dec, diff, ind) if return_pred_indices else (dec, diff)


class IdentityFirstStage(nn.Module):
    """Pass-through first stage (CompVis ``IdentityFirstStage``) for diffusion in pixel space.

    Args:
        vq_interface: make ``quantize`` return ``(x, None, [None, None, None])`` like a VQ model.
    """

    def __init__(self, *args: Any, vq_interface: bool = False, **kwargs: Any):
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def decode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def quantize(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        if self.vq_interface:
            return x, None, [None, None, None]
        return x

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x
