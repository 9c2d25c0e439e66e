"""Joint image + mask generation: the diffusion model denoises ``concat(image latent, mask latent)``.

The joint mode of :class:`~ldm.models.diffusion.anatomical_ddpm.AnatomicalLatentDiffusion` (``joint_mask_config``)
adds a frozen mask first stage (:class:`~ldm.models.mask_autoencoder.MaskAutoencoderKL`). One training step:

    z = [scale_factor * E_img(image), mask_scale_factor * E_mask(one_hot(mask))]   (channels concatenated)
    x_t = q_sample(z, t, noise)     with the mask channels of examples without a mask replaced by pure noise
    loss = L_image + joint_mask_loss_weight * L_mask (+ the anatomical loss when the UNet has registers)

``L_image`` is the usual diffusion loss on the image channels; ``L_mask`` the same loss on the mask channels,
averaged over the examples with ``has_segmentation`` only (exactly 0 when no example has a mask): one
:class:`~ldm.models.diffusion.ddpm.LossGroup` of the diffusion loss. Sampling draws joint latents from noise like
any LDM (no input mask); the model decodes the image channels through its image first stage and the mask
channels through :meth:`JointMaskLatents.decode_logits` (argmax at image resolution).
Joint image-label diffusion as in SatSynth (Toker et al., CVPR 2024).

:class:`JointMaskLatents` is a part the model holds (``model.joint_mask``), not a mixin: every method receives the
batch, the mask key and which examples are labelled as arguments.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.data.batch import masks_from_batch
from ldm.models.diffusion.losses import LossGroup
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

MASK_SOURCE_JOINT = "joint"


class JointMaskLatents(nn.Module):
    """The joint mode's frozen mask first stage, its latent scale and the channel split of joint latents.

    Args:
        mask_config: ``{target, params}`` of the mask autoencoder (``encode_mask``, ``decode``, ``num_classes``,
            ``embed_dim``, ``ignore_index``; usually :class:`~ldm.models.mask_autoencoder.MaskAutoencoderKL` with
            its ``ckpt_path``).
        image_channels: latent channels of the image first stage (the first channels of a joint latent).
        scale_factor: mask latent scaling (``mask_scale_factor``).
        scale_by_std: set the scale to ``1 / std`` of the first labelled training batch's mask latents instead
            (:meth:`fit_scale`; kept in the checkpoint).
        loss_weight: weight of the mask channels' diffusion loss (``joint_mask_loss_weight``).
    """

    def __init__(self, mask_config: Mapping[str, Any], image_channels: int, scale_factor: float = 1.0,
                 scale_by_std: bool = False, loss_weight: float = 1.0) -> None:
        super().__init__()
        if float(loss_weight) < 0:
            raise ValueError(f"joint_mask_loss_weight must be >= 0, got {loss_weight}")
        if not scale_by_std and float(scale_factor) <= 0:
            raise ValueError(f"mask_scale_factor must be > 0, got {scale_factor}")
        autoencoder = instantiate_from_config(mask_config)
        for attr in ("encode_mask", "decode", "num_classes", "embed_dim", "ignore_index"):
            if not hasattr(autoencoder, attr):
                raise ValueError(f"joint_mask_config target {type(autoencoder).__name__} has no {attr!r}; use "
                                 "ldm.models.mask_autoencoder.MaskAutoencoderKL")
        autoencoder.eval()
        for param in autoencoder.parameters():
            param.requires_grad = False
        self.autoencoder = autoencoder
        self.image_channels = int(image_channels)
        self.mask_channels = int(autoencoder.embed_dim)
        self.num_classes = int(autoencoder.num_classes)
        self.ignore_index = int(autoencoder.ignore_index)
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        self.loss_weight = float(loss_weight)
        self.scale_by_std = bool(scale_by_std)
        self.scale_fixed = not self.scale_by_std  # a checkpoint's scale (loaded) or the configured one
        if self.scale_by_std:
            self.register_load_state_dict_pre_hook(self._note_loaded_scale)

    def _note_loaded_scale(self, module: Any, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        if prefix + "scale_factor" in state_dict:
            self.scale_fixed = True

    def train(self, mode: bool = True) -> "JointMaskLatents":
        """The mask autoencoder stays in eval mode."""
        super().train(mode)
        self.autoencoder.eval()
        return self

    @property
    def channels(self) -> int:
        """Channels of a joint latent (image + mask)."""
        return self.image_channels + self.mask_channels

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint latents -> ``(image latents, mask latents)``."""
        if z.shape[1] != self.channels:
            raise ValueError(f"joint latents need {self.channels} channels ({self.image_channels} image + "
                             f"{self.mask_channels} mask), got {z.shape[1]}")
        return z[:, :self.image_channels], z[:, self.image_channels:]

    @torch.no_grad()
    def raw_latents(self, mask: torch.Tensor) -> torch.Tensor:
        """Unscaled mask latents of integer masks ``[B, H, W]`` (the posterior mode)."""
        return self.autoencoder.encode_mask(mask)

    @torch.no_grad()
    def encode(self, mask: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Scaled mask latents; zeros for examples without a mask (``present`` false)."""
        z = self.scale_factor * self.raw_latents(mask)
        return z * present.to(z.dtype)[:, None, None, None]

    def decode_logits(self, z_mask: torch.Tensor, image_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Scaled mask latents -> mask logits ``[B, C, H, W]`` (resized to ``image_size`` when it differs)."""
        logits = self.autoencoder.decode(z_mask / self.scale_factor)
        if image_size is not None and tuple(logits.shape[-2:]) != tuple(image_size):
            logits = F.interpolate(logits.float(), size=tuple(int(s) for s in image_size), mode="bilinear",
                                   align_corners=False)
        return logits

    # ------------------------------------------------------------------ a batch's masks
    @staticmethod
    def check_mask_key(batch: Mapping[str, Any], key: str) -> None:
        """ValueError when the batch has no ``key`` masks."""
        if key not in batch:
            raise ValueError(f"joint mode: the batch has no {key!r} masks; load them "
                             "(dataset param load_segmentations: true) or set anatomical_mask_key")

    def present(self, batch: Mapping[str, Any], key: str, bs: Optional[int] = None,
                device: Optional[torch.device] = None) -> torch.Tensor:
        """Which examples have a mask ``[B]`` (``has_segmentation``; all when the key is absent), on ``device``."""
        self.check_mask_key(batch, key)
        n = len(batch[key])
        has = batch.get("has_segmentation")
        present = (torch.ones(n, dtype=torch.bool) if has is None
                   else torch.as_tensor(has).bool().view(-1).cpu())
        return (present[:bs] if bs is not None else present).to(device)

    def batch_latents(self, batch: Mapping[str, Any], key: str, bs: Optional[int] = None,
                      device: Optional[torch.device] = None) -> torch.Tensor:
        """Scaled mask latents of the batch's masks (zeros for examples without one)."""
        self.check_mask_key(batch, key)
        mask = masks_from_batch(batch, key, self.ignore_index)
        mask = (mask[:bs] if bs is not None else mask).to(device)
        return self.encode(mask, self.present(batch, key, bs, device))

    # ------------------------------------------------------------------ the training step's parts
    def hide_unlabelled(self, x_t: torch.Tensor, noise: torch.Tensor, present: Optional[torch.Tensor]) -> torch.Tensor:
        """Noised joint latents with the mask channels of examples without a mask replaced by pure ``noise`` (no mask
        information), so the image channels learn to denoise with the mask unknown."""
        if present is None or bool(present.all()):
            return x_t
        ci = self.image_channels
        keep = present.to(x_t.dtype)[:, None, None, None]
        return torch.cat([x_t[:, :ci], keep * x_t[:, ci:] + (1.0 - keep) * noise[:, ci:]], dim=1)

    def loss_group(self, present: Optional[torch.Tensor], batch_size: int, device: torch.device) -> LossGroup:
        """The mask channels as a group of the diffusion loss: examples with a mask only, weighted by ``loss_weight``."""
        if present is None:
            present = torch.ones(batch_size, dtype=torch.bool, device=device)
        return LossGroup("mask", self.image_channels, present, self.loss_weight)

    @torch.no_grad()
    def fit_scale(self, mask: torch.Tensor, present: torch.Tensor,
                  reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> bool:
        """With ``scale_by_std`` and no scale fixed yet: set the scale to ``1 / std`` of the labelled masks' latents
        (summed over ranks by ``reduce``); returns whether the scale is fixed afterwards (False: no mask in this
        batch on any rank, try the next one)."""
        if self.scale_fixed:
            return True
        z = self.raw_latents(mask[present]).double() if present.any() else None
        stats = torch.zeros(3, dtype=torch.float64, device=mask.device)
        if z is not None:
            stats += torch.stack([z.sum(), (z * z).sum(), z.new_tensor(float(z.numel()))])
        if reduce is not None:
            stats = reduce(stats)
        total, total_sq, count = (float(v) for v in stats)
        if count < 2:
            return False
        std = max((total_sq - total * total / count) / (count - 1), 0.0) ** 0.5
        if std <= 0:
            raise ValueError("mask_scale_by_std: the mask latents of the first labelled batch have zero spread; set "
                             "mask_scale_factor instead")
        self.scale_factor.fill_(1.0 / std)
        self.scale_fixed = True
        logger.info("mask_scale_by_std: set the mask scale factor to %.6g", 1.0 / std)
        return True


def check_joint_channels(joint: JointMaskLatents, channels: int, unet: Any) -> None:
    """ValueError unless the model's ``channels`` and the UNet's in/out channels equal the joint latent channels."""
    found = {"channels": channels, "unet_config in_channels": getattr(unet, "in_channels", joint.channels),
             "unet_config out_channels": getattr(unet, "out_channels", joint.channels)}
    wrong = {k: v for k, v in found.items() if int(v) != joint.channels}
    if wrong:
        raise ValueError(f"joint mode: {wrong} must equal the joint latent channels {joint.channels} (image latent "
                         f"{joint.image_channels} + mask latent {joint.mask_channels}); fix the config")
