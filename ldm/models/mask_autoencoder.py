"""Mask first stage of the joint image + mask mode: a small KL autoencoder of one-hot label maps.

``MaskAutoencoderKL`` encodes a one-hot mask ``[B, C, H, W]`` (ignored pixels: all-zero vectors) to a latent
with the image autoencoder's spatial factor, and decodes a latent to mask logits ``[B, C, H, W]`` at image
resolution. It trains through ``main.py`` like the image autoencoder, with cross-entropy + soft Dice (+ a small
KL term) over the labelled pixels, one optimiser, and is then frozen inside
:class:`~ldm.models.diffusion.anatomical_ddpm.AnatomicalLatentDiffusion` (``joint_mask_config``).
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.checkpoints import load_weights
from ldm.data.batch import masks_from_batch  # noqa: F401  (importable from here as before)
from ldm.models.optim import make_adam
from ldm.data.labels import DEFAULT_IGNORE_INDEX, colourise, generic_label_set, get_label_set
from ldm.modules.anatomical_losses import class_onehot, soft_dice_loss
from ldm.modules.dice import class_argmax, dice_counts, dice_from_counts
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)


def one_hot_mask(mask: torch.Tensor, num_classes: int, ignore_index: int = DEFAULT_IGNORE_INDEX) -> torch.Tensor:
    """Integer mask ``[B, H, W]`` -> float one-hot ``[B, C, H, W]`` (:func:`ldm.modules.anatomical_losses.
    class_onehot`); ``ignore_index`` pixels are all zeros; a label outside ``0..C-1`` is a ``ValueError``."""
    valid = mask != ignore_index
    if valid.any():
        low, high = int(mask[valid].min()), int(mask[valid].max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"mask holds class ids {low}..{high} outside 0..{num_classes - 1} (ignore index "
                             f"{ignore_index}); set num_classes of the mask autoencoder to the label count")
    return class_onehot(mask, num_classes, ignore_index).float()


def hard_dice(pred: torch.Tensor, mask: torch.Tensor, num_classes: int, ignore_index: int) -> dict[int, torch.Tensor]:
    """Dice per class (pooled over the batch, labelled pixels only) for the classes present in ``mask``
    (:func:`ldm.modules.dice.dice_counts`)."""
    inter, predicted, truth = dice_counts(pred, mask, num_classes, ignore_index)
    scores = dice_from_counts(inter, predicted, truth, dtype=torch.float32)
    return {c: scores[c] for c in range(num_classes) if bool(truth[c] > 0)}


class MaskAutoencoderKL(pl.LightningModule):
    """KL autoencoder for one-hot segmentation masks (the joint mode's mask first stage).

    Args:
        ddconfig: :class:`~ldm.modules.diffusionmodules.model.Encoder`/``Decoder`` config (``double_z: true``);
            ``in_channels`` and ``out_ch`` are set to ``num_classes`` (a different value raises).
        num_classes: label classes C (background 0 included).
        embed_dim: latent channels.
        mask_key: batch key of the integer masks; ``has_segmentation`` false marks an example as unlabelled.
        ignore_index: mask value excluded from the loss (encoded as an all-zero one-hot vector).
        kl_weight: weight of the KL term (small: the posterior stays nearly deterministic).
        dice_weight: weight of the soft Dice loss beside the cross-entropy.
        class_weights: optional per-class cross-entropy weights (length C).
        label_set: name in :mod:`ldm.data.labels` (preview colours); ``None``: generic colours.
        sample_posterior: train on posterior samples (``True``, as the image autoencoder) or on the posterior mode
            (``False``: a plain autoencoder whose latent means carry the KL term; converges faster).
        scheduler_config: ``{target, params}`` of an :mod:`ldm.lr_scheduler` multiplier, applied per optimiser
            step (``LambdaLR``); ``None``: a constant learning rate.
        ckpt_path, ignore_keys: weights to load after construction.
        monitor: metric name for checkpointing.
    """

    def __init__(self, ddconfig: Mapping[str, Any], num_classes: int, embed_dim: int,
                 mask_key: str = "segmentation", ignore_index: int = DEFAULT_IGNORE_INDEX, kl_weight: float = 1e-6,
                 dice_weight: float = 1.0, class_weights: Optional[Sequence[float]] = None,
                 label_set: Optional[str] = None, sample_posterior: bool = True,
                 scheduler_config: Optional[Mapping[str, Any]] = None, ckpt_path: Optional[str] = None,
                 ignore_keys: Sequence[str] = (), monitor: Optional[str] = "val/rec_loss") -> None:
        super().__init__()
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2 (background and at least one class), got {num_classes}")
        if int(embed_dim) < 1:
            raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
        if kl_weight < 0 or dice_weight < 0:
            raise ValueError(f"kl_weight and dice_weight must be >= 0, got {kl_weight} and {dice_weight}")
        if 0 <= int(ignore_index) < int(num_classes):
            raise ValueError(f"ignore_index {ignore_index} is a class id (0..{num_classes - 1}); use e.g. 255")
        ddconfig = dict(ddconfig)
        if not ddconfig.get("double_z", True):
            raise ValueError("MaskAutoencoderKL needs ddconfig.double_z: true (mean and log-variance)")
        for key in ("in_channels", "out_ch"):
            if ddconfig.get(key, num_classes) != num_classes:
                raise ValueError(f"ddconfig.{key} is {ddconfig[key]} but num_classes is {num_classes}: the mask "
                                 f"autoencoder reads and writes one channel per class")
            ddconfig[key] = int(num_classes)
        self.num_classes = int(num_classes)
        self.embed_dim = int(embed_dim)
        self.mask_key = mask_key
        self.ignore_index = int(ignore_index)
        self.kl_weight = float(kl_weight)
        self.dice_weight = float(dice_weight)
        self.sample_posterior = bool(sample_posterior)
        self.lr_multiplier = None
        if scheduler_config is not None:
            multiplier = instantiate_from_config(scheduler_config)
            if not callable(getattr(multiplier, "schedule", None)):
                raise ValueError(f"scheduler_config target {scheduler_config.get('target')!r} has no schedule(step) "
                                 "method (use one of ldm.lr_scheduler's classes)")
            self.lr_multiplier = multiplier
        self.label_set = get_label_set(label_set) if label_set is not None else generic_label_set(self.num_classes)
        if label_set is not None:
            self.label_set.check_num_classes(self.num_classes, "the mask autoencoder (num_classes)")
        weights = None
        if class_weights is not None:
            weights = torch.as_tensor(list(class_weights), dtype=torch.float32)
            if weights.numel() != self.num_classes or (weights < 0).any():
                raise ValueError(f"class_weights must be {self.num_classes} values >= 0, got {list(class_weights)}")
        self.register_buffer("class_weights", weights, persistent=False)
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z_channels = int(ddconfig["z_channels"])
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * self.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(self.embed_dim, z_channels, 1)
        self.downsampling_factor = 2 ** (len(ddconfig.get("ch_mult", (1, 2, 4, 8))) - 1)
        if monitor is not None:
            self.monitor = monitor
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def init_from_ckpt(self, path: str, ignore_keys: Iterable[str] = ()) -> tuple[list[str], list[str]]:
        """Load ``path`` (Lightning ``.ckpt``, bare state dict or safetensors; :func:`ldm.checkpoints.load_weights`)."""
        return load_weights(self, path, ignore_keys=tuple(ignore_keys), allow_unexpected=True)

    # ------------------------------------------------------------------ the autoencoder
    def one_hot(self, mask: torch.Tensor) -> torch.Tensor:
        """Integer mask ``[B, H, W]`` -> the encoder's input ``[B, C, H, W]``."""
        return one_hot_mask(mask, self.num_classes, self.ignore_index)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """One-hot masks ``[B, C, H, W]`` -> posterior over latents ``[B, embed_dim, H/f, W/f]``."""
        if x.ndim != 4 or x.shape[1] != self.num_classes:
            raise ValueError(f"encode expects one-hot masks [B, {self.num_classes}, H, W], got {tuple(x.shape)}; "
                             "use encode_mask for integer masks")
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def encode_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Integer masks ``[B, H, W]`` -> deterministic latents (the posterior mode)."""
        return self.encode(self.one_hot(mask)).mode()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> mask logits ``[B, C, H, W]``."""
        return self.decoder(self.post_quant_conv(z))

    def decode_mask(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> integer masks ``[B, H, W]`` (argmax of the logits)."""
        return class_argmax(self.decode(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True
                ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    # ------------------------------------------------------------------ losses and steps
    def reconstruction_loss(self, logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``CE + dice_weight * (1 - soft Dice)`` on the labelled pixels; exactly 0 (graph kept) with none."""
        valid = mask != self.ignore_index
        if not valid.any():
            zero = (logits * 0.0).sum()
            return zero, {"ce": zero.detach(), "dice_loss": zero.detach()}
        ce = F.cross_entropy(logits.float(), mask, weight=self.class_weights, ignore_index=self.ignore_index)
        dice = soft_dice_loss(logits.float().softmax(1), mask, self.ignore_index, pooled=True)
        return ce + self.dice_weight * dice, {"ce": ce.detach(), "dice_loss": dice.detach()}

    def shared_step(self, batch: Mapping[str, Any], split: str = "train"
                    ) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
        """``(loss, logged values, logits, masks)`` of one batch (``split`` "train" samples the posterior when
        ``sample_posterior``); a manual training loop calls this and steps its own optimiser."""
        mask = masks_from_batch(batch, self.mask_key, self.ignore_index).to(self.device)
        logits, posterior = self(self.one_hot(mask), sample_posterior=self.sample_posterior and split == "train")
        rec, parts = self.reconstruction_loss(logits, mask)
        kl = posterior.kl().mean()
        loss = rec + self.kl_weight * kl
        log = {f"{split}/rec_loss": rec.detach(), f"{split}/kl_loss": kl.detach(), f"{split}/loss": loss.detach()}
        log.update({f"{split}/{k}": v for k, v in parts.items()})
        return loss, log, logits, mask

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, log, _, mask = self.shared_step(batch, "train")
        bs = len(mask)
        self.log("train/loss", log.pop("train/loss"), prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        self.log_dict(log, prog_bar=False, on_step=True, on_epoch=False, batch_size=bs)
        return loss

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        _, log, logits, mask = self.shared_step(batch, "val")
        dice = hard_dice(class_argmax(logits), mask, self.num_classes, self.ignore_index)
        log.update({f"val/dice_{c}": v for c, v in dice.items()})
        fg = [v for c, v in dice.items() if c > 0]
        if fg:
            log["val/dice"] = torch.stack(fg).mean()
        self.log_dict(log, sync_dist=True, batch_size=len(mask))
        return log

    def configure_optimizers(self) -> Any:
        lr = getattr(self, "learning_rate", None)
        if lr is None:
            raise ValueError("MaskAutoencoderKL.learning_rate is not set; main.py sets it from "
                             "model.base_learning_rate, set it yourself when training without main.py")
        opt = make_adam(torch.optim.Adam, self.parameters(), lr=float(lr))
        if self.lr_multiplier is None:
            return opt
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=self.lr_multiplier.schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], only_inputs: bool = False, **kwargs: Any) -> dict[str, torch.Tensor]:
        """``inputs`` and (unless ``only_inputs``) ``reconstructions`` and ``samples`` (decoded N(0, I) latents) as
        colour previews ``[B, 3, H, W]`` in [-1, 1]."""
        mask = masks_from_batch(batch, self.mask_key, self.ignore_index).to(self.device)
        log = {"inputs": self._colour(mask)}
        if not only_inputs:
            logits, posterior = self(self.one_hot(mask), sample_posterior=False)
            log["reconstructions"] = self._colour(class_argmax(logits))
            log["samples"] = self._colour(self.decode_mask(torch.randn_like(posterior.mode())))
        return log

    def _colour(self, mask: torch.Tensor) -> torch.Tensor:
        rgb = torch.from_numpy(colourise(mask, self.label_set, self.ignore_index)).to(mask.device)
        return rgb.permute(0, 3, 1, 2).float() / 127.5 - 1.0
