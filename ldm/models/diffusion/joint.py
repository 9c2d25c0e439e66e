"""Joint image + mask generation: the diffusion model denoises ``concat(image latent, mask latent)``.

The joint mode of :class:`~ldm.models.diffusion.anatomical_ddpm.AnatomicalLatentDiffusion` (``joint_mask_config``)
adds a frozen mask first stage (:class:`~ldm.models.mask_autoencoder.MaskAutoencoderKL`). One training step:

    z = [scale_factor * E_img(image), mask_scale_factor * E_mask(one_hot(mask))]   (channels concatenated)
    x_t = q_sample(z, t, noise)     with the mask channels of examples without a mask replaced by pure noise
    loss = L_image + joint_mask_loss_weight * L_mask (+ the anatomical loss when the UNet has registers)

``L_image`` is the usual diffusion loss on the image channels; ``L_mask`` the same loss on the mask channels,
averaged over the examples with ``has_segmentation`` only (exactly 0 when no example has a mask). Sampling draws
joint latents from noise like any LDM (no input mask); :meth:`JointMaskMixin.decode_first_stage` decodes the image
channels, :meth:`JointMaskMixin.joint_masks` the mask channels (argmax of the mask decoder at image resolution).
Joint image-label diffusion as in SatSynth (Toker et al., CVPR 2024).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.data.batch import masks_from_batch
from ldm.data.labels import generic_label_set
from ldm.modules.dice import class_argmax
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
    """

    def __init__(self, mask_config: Mapping[str, Any], image_channels: int, scale_factor: float = 1.0) -> None:
        super().__init__()
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


class JointMaskMixin:
    """The joint image + mask mode of ``AnatomicalLatentDiffusion`` (placed before ``LatentDiffusion`` in its bases).

    Args: none (a mixin); :meth:`setup_joint` takes the config: ``joint_mask_config`` (``{target, params}`` of the
    mask autoencoder; ``None``: joint mode off), ``mask_scale_factor``, ``mask_scale_by_std`` (set the mask scale to
    ``1 / std`` of the first training batch's labelled mask latents) and ``joint_mask_loss_weight``.
    """

    def setup_joint(self, joint_mask_config: Optional[Mapping[str, Any]], mask_scale_factor: float = 1.0,
                    mask_scale_by_std: bool = False, joint_mask_loss_weight: float = 1.0) -> None:
        """Build the mask first stage and check the channel counts (call after ``LatentDiffusion.__init__``)."""
        self._joint_present: Optional[torch.Tensor] = None
        if joint_mask_config is None:
            self.joint_mask = None
            return
        if float(joint_mask_loss_weight) < 0:
            raise ValueError(f"joint_mask_loss_weight must be >= 0, got {joint_mask_loss_weight}")
        if not mask_scale_by_std and float(mask_scale_factor) <= 0:
            raise ValueError(f"mask_scale_factor must be > 0, got {mask_scale_factor}")
        image_channels = getattr(self.first_stage_model, "embed_dim", None)
        if image_channels is None:
            raise ValueError("the joint mode needs a first stage with embed_dim (AutoencoderKL)")
        self.joint_mask = JointMaskLatents(joint_mask_config, int(image_channels), float(mask_scale_factor))
        self.joint_mask_loss_weight = float(joint_mask_loss_weight)
        self.mask_scale_by_std = bool(mask_scale_by_std)
        self._mask_scale_fixed = not self.mask_scale_by_std
        if self.mask_scale_by_std:
            self.joint_mask.register_load_state_dict_pre_hook(self._note_loaded_mask_scale)
        joint = self.joint_mask.channels
        unet = self.unet
        found = {"channels": self.channels, "unet_config in_channels": getattr(unet, "in_channels", joint),
                 "unet_config out_channels": getattr(unet, "out_channels", joint)}
        wrong = {k: v for k, v in found.items() if int(v) != joint}
        if wrong:
            raise ValueError(f"joint mode: {wrong} must equal the joint latent channels {joint} (image latent "
                             f"{image_channels} + mask latent {self.joint_mask.mask_channels}); fix the config")
        classes = int(getattr(unet, "num_anatomical_classes", 0) or 0)
        if self.use_anatomy and classes != self.joint_mask.num_classes:
            raise ValueError(f"the UNet has num_anatomical_classes={classes} but the mask autoencoder "
                             f"num_classes={self.joint_mask.num_classes}; they must be the same label set")
        if not self.use_anatomy:  # masks come from the mask autoencoder only: its classes name the label set
            self.num_anatomical_classes = self.joint_mask.num_classes
            if self.label_set.name == "generic":
                self.label_set = generic_label_set(self.joint_mask.num_classes)
            else:
                self.label_set.check_num_classes(self.joint_mask.num_classes, "the mask autoencoder (num_classes)")
        logger.info("joint mode: denoising %d image + %d mask latent channels (%d classes)", image_channels,
                    self.joint_mask.mask_channels, self.joint_mask.num_classes)

    @property
    def is_joint(self) -> bool:
        """Whether the model generates masks jointly (``joint_mask_config`` set)."""
        return getattr(self, "joint_mask", None) is not None

    def _note_loaded_mask_scale(self, module: Any, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        if prefix + "scale_factor" in state_dict:
            self._mask_scale_fixed = True

    # ------------------------------------------------------------------ latents
    def joint_mask_present(self, batch: Mapping[str, Any], bs: Optional[int] = None) -> torch.Tensor:
        """Which examples have a mask ``[B]`` (``has_segmentation``; all when the key is absent)."""
        self._check_mask_key(batch)
        n = len(batch[self.anatomical_mask_key])
        has = batch.get("has_segmentation")
        present = (torch.ones(n, dtype=torch.bool) if has is None
                   else torch.as_tensor(has).bool().view(-1).cpu())
        return (present[:bs] if bs is not None else present).to(self.device)

    def _check_mask_key(self, batch: Mapping[str, Any]) -> None:
        if self.anatomical_mask_key not in batch:
            raise ValueError(f"joint mode: the batch has no {self.anatomical_mask_key!r} masks; load them "
                             "(dataset param load_segmentations: true) or set anatomical_mask_key")

    def joint_mask_latents(self, batch: Mapping[str, Any], bs: Optional[int] = None) -> torch.Tensor:
        """Scaled mask latents of the batch's masks (zeros for examples without one)."""
        self._check_mask_key(batch)
        mask = masks_from_batch(batch, self.anatomical_mask_key, self.joint_mask.ignore_index)
        mask = (mask[:bs] if bs is not None else mask).to(self.device)
        return self.joint_mask.encode(mask, self.joint_mask_present(batch, bs))

    @torch.no_grad()
    def get_input(self, batch: Mapping[str, Any], k: str, *args: Any, bs: Optional[int] = None,
                  **kwargs: Any) -> list[Any]:
        """LatentDiffusion's ``get_input``; in joint mode ``z`` is ``concat(image latents, mask latents)``."""
        out = super().get_input(batch, k, *args, bs=bs, **kwargs)
        if self.is_joint and k == self.first_stage_key:
            out[0] = torch.cat([out[0], self.joint_mask_latents(batch, bs).to(out[0].dtype)], dim=1)
        return out

    def decode_first_stage(self, z: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Images of (joint or image-only) latents: the image channels through the image first stage."""
        if self.is_joint and z.shape[1] == self.joint_mask.channels:
            z = z[:, :self.joint_mask.image_channels]
        return super().decode_first_stage(z, *args, **kwargs)

    def joint_mask_logits(self, z: torch.Tensor, image_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Mask logits ``[B, C, H, W]`` decoded from the mask channels of joint latents ``z``."""
        if not self.is_joint:
            raise ValueError("joint_mask_logits needs a joint model (joint_mask_config set)")
        return self.joint_mask.decode_logits(self.joint_mask.split(z)[1], image_size)

    @torch.no_grad()
    def joint_masks(self, z: torch.Tensor, image_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Generated masks ``[B, H, W]`` (int64): argmax of the mask decoder on the mask channels of ``z``."""
        return class_argmax(self.joint_mask_logits(z, image_size))

    @torch.no_grad()
    def decode_joint(self, latents: torch.Tensor, cond: Any = None) -> dict:
        """``{"images", "masks" (generated), "mask_logits", "latents", "mask_source": "joint"}``; with registers
        also the segmentation head's ``seg_logits``, ``class_attention`` and ``head_masks``."""
        images = self.decode_first_stage(latents)
        logits = self.joint_mask_logits(latents, images.shape[-2:])
        out = {"images": images, "masks": class_argmax(logits), "mask_logits": logits, "latents": latents,
               "mask_source": MASK_SOURCE_JOINT}
        if self.use_anatomy:
            anatomy = self.predict_anatomy(latents, cond=cond)
            out.update(seg_logits=anatomy.seg_logits, class_attention=anatomy.class_attention,
                       head_masks=self._argmax_at(anatomy.seg_logits, images.shape[-2:]))
        return out

    @torch.no_grad()
    def sample_images_and_masks(self, x_T: torch.Tensor, ddim_steps: Optional[int] = 50, eta: float = 0.0,
                                sampler: Optional[str] = None, use_ema: bool = True, **sampler_kwargs: Any) -> dict:
        """Sample joint latents from the given noise ``x_T`` ``[B, channels, h, w]`` and decode them
        (:meth:`decode_joint`): images ``[B, ch, H, W]`` in [-1, 1] and generated masks ``[B, H, W]``."""
        if not self.is_joint:
            raise ValueError("sample_images_and_masks needs a joint model (joint_mask_config set)")
        if x_T.ndim != 4 or x_T.shape[1] != self.joint_mask.channels:
            raise ValueError(f"x_T must be [B, {self.joint_mask.channels}, h, w] joint noise, got {tuple(x_T.shape)}")
        scope = self.ema_scope() if use_ema else nullcontext()
        with scope:
            latents, _ = self.sample_log(cond=None, batch_size=x_T.shape[0], ddim=ddim_steps is not None,
                                         ddim_steps=ddim_steps, eta=eta, x_T=x_T, sampler=sampler, **sampler_kwargs)
            return self.decode_joint(latents)

    # ------------------------------------------------------------------ training
    @contextmanager
    def _labelled(self, present: torch.Tensor) -> Iterator[None]:
        """Within the block, :meth:`q_sample` and :meth:`diffusion_loss` know which examples have a mask."""
        self._joint_present = present
        try:
            yield
        finally:
            self._joint_present = None

    def joint_shared_step(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict]:
        """One joint training/validation step (``shared_step`` in joint mode)."""
        x, c = self.get_input(batch, self.first_stage_key)
        with self._labelled(self.joint_mask_present(batch)):
            if self.use_anatomy:
                return self(x, c, anatomy_target=self.get_anatomy_target(batch, labelled_only=True))
            return self(x, c)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``q_sample``; in a joint step the mask channels of examples without a mask are pure noise (no mask
        information), so the image channels learn to denoise with the mask unknown."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = super().q_sample(x_start, t, noise)
        present = self._joint_present if self.is_joint else None
        if present is None or bool(present.all()) or x_start.shape[1] != self.joint_mask.channels:
            return x_t
        ci = self.joint_mask.image_channels
        keep = present.to(x_t.dtype)[:, None, None, None]
        return torch.cat([x_t[:, :ci], keep * x_t[:, ci:] + (1.0 - keep) * noise[:, ci:]], dim=1)

    def diffusion_loss(self, model_output: torch.Tensor, x_start: torch.Tensor, t: torch.Tensor,
                       noise: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``L_image + joint_mask_loss_weight * L_mask`` in joint mode (``loss_simple``: the image part, comparable
        with a plain LDM's); otherwise the parent's loss."""
        if not self.is_joint or x_start.shape[1] != self.joint_mask.channels:
            return super().diffusion_loss(model_output, x_start, t, noise)
        prefix = "train" if self.training else "val"
        present = self._joint_present
        if present is None:
            present = torch.ones(x_start.shape[0], dtype=torch.bool, device=x_start.device)
        ci = self.joint_mask.image_channels
        target = noise if self.parameterization == "eps" else x_start
        per_element = self.get_loss(model_output, target, mean=False)
        image_simple = per_element[:, :ci].mean(dim=(1, 2, 3))
        mask_simple = per_element[:, ci:].mean(dim=(1, 2, 3))
        logvar_t = self.logvar[t].to(image_simple.device)
        image_loss = (image_simple / torch.exp(logvar_t) + logvar_t).mean()
        weights = present.to(mask_simple.dtype)
        n_masks = weights.sum()
        mask_loss = (weights * mask_simple / torch.exp(logvar_t)).sum() / n_masks.clamp_min(1.0)
        loss = self.l_simple_weight * (image_loss + self.joint_mask_loss_weight * mask_loss)
        loss_vlb = (self.lvlb_weights[t] * (image_simple + weights * mask_simple)).mean()
        loss = loss + self.original_elbo_weight * loss_vlb
        loss_dict = {f"{prefix}/loss_simple": image_simple.mean().detach(),
                     f"{prefix}/mask_loss_simple": mask_loss.detach(),
                     f"{prefix}/mask_fraction": (n_masks / len(weights)).detach(),
                     f"{prefix}/loss_vlb": loss_vlb.detach(), f"{prefix}/loss": loss}
        return loss, loss_dict

    @torch.no_grad()
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """The image ``scale_by_std``, then, with ``mask_scale_by_std``, the mask scale from the first batch (over
        all ranks) that holds a mask: ``1 / std`` of its mask latents."""
        super().on_train_batch_start(batch, batch_idx)
        if not self.is_joint or self._mask_scale_fixed:
            return
        present = self.joint_mask_present(batch)
        mask = masks_from_batch(batch, self.anatomical_mask_key, self.joint_mask.ignore_index).to(self.device)
        z = self.joint_mask.raw_latents(mask[present]).double() if present.any() else None
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)
        if z is not None:
            stats += torch.stack([z.sum(), (z * z).sum(), z.new_tensor(float(z.numel()))])
        trainer = getattr(self, "_trainer", None)
        if trainer is not None:
            stats = trainer.strategy.reduce(stats, reduce_op="sum")
        total, total_sq, count = (float(v) for v in stats)
        if count < 2:
            return  # no mask in this batch on any rank: try the next one
        std = max((total_sq - total * total / count) / (count - 1), 0.0) ** 0.5
        if std <= 0:
            raise ValueError("mask_scale_by_std: the mask latents of the first labelled batch have zero spread; set "
                             "mask_scale_factor instead")
        self.joint_mask.scale_factor.fill_(1.0 / std)
        self._mask_scale_fixed = True
        logger.info("mask_scale_by_std: set the mask scale factor to %.6g", 1.0 / std)
