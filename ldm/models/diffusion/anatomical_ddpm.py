"""Anatomical latent diffusion: LatentDiffusion plus segmentation supervision of anatomical registers.

Training (one step): ``z = scale_factor * E(image)`` (frozen first stage), ``x_t = q_sample(z, t)``, the
:class:`~ldm.modules.diffusionmodules.anatomical_openaimodel.AnatomicalUNetModel` returns eps and its
anatomy outputs, and

    loss = diffusion loss + w(step) * lambda(t) * [seg_loss(seg_logits, mask) + attention_alignment_weight * align]

over the labelled pixels of the examples with ``has_segmentation``; a batch without masks adds exactly 0.
``seg_loss``: CE (``segmentation_loss: ce``) or CE + soft Dice (``ce_dice``; the CE class-weighted in both
when ``anatomical_class_weights`` is set), on logits brought to the mask's size. ``align``: CE between the
layer-averaged class attention and the majority-vote mask at latent size (``alignment_target: majority``, the
first version), or the mean over register layers of the soft CE between each layer's class attention and the
class area fractions at that layer's own resolution (``soft``, :mod:`ldm.modules.anatomical_losses`).
``lambda(t)``: 1, ``alpha_bar_t`` or ``min(SNR_t, 1)`` per sample (``anatomical_timestep_weighting``).
Sampling needs no mask: the UNet is called as a plain UNet; :meth:`sample_with_anatomy` adds one call
at the end that predicts a mask for each sample.
"""
from __future__ import annotations

import logging
import math
import warnings
from contextlib import nullcontext
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from ldm.data.batch import masks_from_batch
from ldm.data.labels import DEFAULT_IGNORE_INDEX, LabelSet, colourise, generic_label_set, get_label_set
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.joint import JointMaskMixin
from ldm.modules.anatomical_losses import (ALIGNMENT_TARGETS, SEGMENTATION_LOSSES, TIMESTEP_WEIGHTINGS, check_choice,
                                           class_onehot, mean_soft_alignment_loss, mode_downsample, soft_dice_loss,
                                           timestep_weights)
from ldm.modules.diffusionmodules.anatomical_openaimodel import AnatomyOutput
from ldm.modules.dice import class_argmax, dice_counts, dice_from_counts

logger = logging.getLogger(__name__)

ANATOMICAL_SCHEDULES = ("warmup_decay", "constant", "cosine")
MASK_SOURCES = ("latents", "reencoded")
DEFAULT_ANATOMICAL_LOSS_WEIGHT = 0.1
# batch key set by AnatomicalLatentDiffusion.on_before_batch_transfer: whether the host batch has a labelled pixel
HOST_LABELLED_KEY = "_anatomy_any_labelled"
# Lightning says that this model's on_before_batch_transfer is used with main.py's LightningDataModule: intended
warnings.filterwarnings("ignore", message=r"You have overridden `on_before_batch_transfer` in `LightningModule`")


def colourise_labels(mask: torch.Tensor, label_set: LabelSet, ignore_index: int = DEFAULT_IGNORE_INDEX) -> torch.Tensor:
    """Integer mask [B, H, W] -> RGB [B, 3, H, W] in [-1, 1] with :func:`ldm.data.labels.colourise` (``ignore_index``
    grey, other ids outside the palette magenta), so previews and saved masks agree."""
    rgb = torch.from_numpy(colourise(mask, label_set, ignore_index)).to(mask.device)
    return rgb.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def colourise_probabilities(probs: torch.Tensor, label_set: LabelSet) -> torch.Tensor:
    """Per-class maps [B, C, H, W] (summing to 1 over C) -> RGB [B, 3, H, W] in [-1, 1], mixing class colours."""
    palette = torch.from_numpy(label_set.palette(probs.shape[1])[: probs.shape[1]]).to(probs.device, probs.dtype)
    rgb = torch.einsum("bchw,cd->bdhw", probs, palette / 255.0)
    return rgb.clamp(0, 1) * 2.0 - 1.0


class AnatomicalLatentDiffusion(JointMaskMixin, LatentDiffusion):
    """LatentDiffusion whose AnatomicalUNetModel is supervised by segmentation masks.

    Args:
        *args, **kwargs: LatentDiffusion's parameters (``unet_config`` should target
            ``AnatomicalUNetModel``).
        anatomical_mask_key: batch key of the integer masks [B, H, W] (``has_segmentation`` in the batch
            says which examples have one; absent key: every example has one).
        anatomical_loss_weight: base weight ``w`` of the anatomical loss; ``None`` takes the UNet config's
            ``anatomical_loss_weight`` (original implementation), else 0.1.
        progressive_anatomical_training: follow ``anatomical_schedule``; ``False``: constant ``w``.
        anatomical_warmup_steps: warm-up length ``W`` of the schedule, in global steps.
        anatomical_schedule: ``"warmup_decay"`` (2w until W, linear to w at 2W, then w), ``"cosine"``
            (2w at step 0 falling to w at 2W along a half cosine, then w) or ``"constant"``.
        attention_alignment_weight: weight of the class-attention alignment cross-entropy.
        anatomical_ignore_index: mask value excluded from the loss.
        anatomical_class_weights: optional per-class weights of the mask CE and of the majority-vote alignment CE
            (length C).
        alignment_target: ``"majority"`` (default; the first version): CE of the layer-averaged class attention
            against the mask majority-voted to latent size. ``"soft"``: per register layer, soft CE against the
            class area fractions at the layer's resolution (no class deleted), averaged over layers.
        segmentation_loss: ``"ce"`` (default) or ``"ce_dice"`` (CE + ``1 - soft Dice`` over foreground classes;
            meant without class weights).
        anatomical_timestep_weighting: per-sample weight of the anatomical losses by noise level: ``"none"``
            (default), ``"alpha_bar"`` (``alpha_bar_t``) or ``"snr"`` (``min(SNR_t, 1)``).
        anatomical_logit_adjustment: when predicting masks, subtract ``log(anatomical_class_weights)`` from the
            logits before the argmax (a class-weighted CE is minimised at ``q_c ~ w_c p_c``; logit adjustment,
            Menon et al. 2021, recovers the argmax of ``p``). Needs positive class weights. Default ``False``.
        use_anatomical_inference: ``log_images`` also samples masks (seg head) and class-attention maps.
        label_set: name of the masks' label set in :mod:`ldm.data.labels` (``ctorgan``, ``breastmri``): class
            names and colours of previews and saved masks, and the rule checker; its class count must equal
            ``num_anatomical_classes``. ``None``: unnamed classes with generic colours.
        joint_mask_config: ``{target, params}`` of a frozen mask autoencoder
            (:class:`~ldm.models.mask_autoencoder.MaskAutoencoderKL`): joint mode, the model denoises
            ``concat(image latent, mask latent)`` and generates the mask with the image (:mod:`ldm.models.diffusion.joint`).
            ``channels`` and the UNet's in/out channels must be the sum of both latents' channels. ``None``: off.
        mask_scale_factor: scale of the mask latents (joint mode). mask_scale_by_std: set it to ``1 / std`` of the
            first training batch's mask latents instead (kept in the checkpoint).
        joint_mask_loss_weight: weight of the mask channels' diffusion loss (joint mode; examples with a mask only).
        mask_from: what the segmentation head reads when masks are predicted for final latents (inference only):
            ``"latents"`` (default) the sampled latents themselves; ``"reencoded"`` the decoded image encoded
            again (posterior mean times ``scale_factor``), i.e. encoder latents as in training. They differ when
            sampled latents are off the encoder's manifold (a model early in training samples latents with
            several times the real latents' spread that still decode to plausible images; see bench/ANATOMY_v1.md).
            Costs one encoder pass.
    """

    progress_bar_keys = ("loss", "diffusion_loss", "anatomical_loss", "anatomical_dice")

    def __init__(self, *args: Any, anatomical_mask_key: str = "segmentation",
                 anatomical_loss_weight: Optional[float] = None, progressive_anatomical_training: bool = True,
                 anatomical_warmup_steps: int = 5000, anatomical_schedule: str = "warmup_decay",
                 attention_alignment_weight: float = 0.5, anatomical_ignore_index: int = 255,
                 anatomical_class_weights: Optional[Sequence[float]] = None, use_anatomical_inference: bool = True,
                 label_set: Optional[str] = None, alignment_target: str = "majority", segmentation_loss: str = "ce",
                 anatomical_timestep_weighting: str = "none", anatomical_logit_adjustment: bool = False,
                 joint_mask_config: Optional[Mapping[str, Any]] = None, mask_scale_factor: float = 1.0,
                 mask_scale_by_std: bool = False, joint_mask_loss_weight: float = 1.0, mask_from: str = "latents",
                 **kwargs: Any) -> None:
        ckpt_path, ignore_keys = kwargs.pop("ckpt_path", None), kwargs.pop("ignore_keys", ())
        super().__init__(*args, **kwargs)
        unet = self.unet
        self.use_anatomy = bool(getattr(unet, "use_anatomical_registers", False))
        if not self.use_anatomy:
            logger.warning("AnatomicalLatentDiffusion: the UNet (%s) has no anatomical registers; it trains as a "
                           "plain LatentDiffusion. Use AnatomicalUNetModel with use_anatomical_registers: true.",
                           type(unet).__name__)
        if anatomical_schedule not in ANATOMICAL_SCHEDULES:
            raise ValueError(f"anatomical_schedule must be one of {ANATOMICAL_SCHEDULES}, got {anatomical_schedule!r}")
        if int(anatomical_warmup_steps) < 0:
            raise ValueError(f"anatomical_warmup_steps must be >= 0, got {anatomical_warmup_steps}")
        if anatomical_loss_weight is None:
            anatomical_loss_weight = getattr(unet, "anatomical_loss_weight", None)
        self.anatomical_loss_weight = float(DEFAULT_ANATOMICAL_LOSS_WEIGHT if anatomical_loss_weight is None
                                            else anatomical_loss_weight)
        if self.anatomical_loss_weight < 0 or attention_alignment_weight < 0:
            raise ValueError("anatomical_loss_weight and attention_alignment_weight must be >= 0")
        self.anatomical_mask_key = anatomical_mask_key
        self.progressive_anatomical_training = bool(progressive_anatomical_training)
        self.anatomical_warmup_steps = int(anatomical_warmup_steps)
        self.anatomical_schedule = anatomical_schedule
        self.attention_alignment_weight = float(attention_alignment_weight)
        self.anatomical_ignore_index = int(anatomical_ignore_index)
        self.use_anatomical_inference = bool(use_anatomical_inference)
        self.num_anatomical_classes = int(getattr(unet, "num_anatomical_classes", 0))
        self.label_set: LabelSet = (get_label_set(label_set) if label_set is not None
                                    else generic_label_set(max(self.num_anatomical_classes, 1)))
        if label_set is not None and self.use_anatomy:
            self.label_set.check_num_classes(self.num_anatomical_classes, "the UNet (num_anatomical_classes)")
        weights = None
        if anatomical_class_weights is not None:
            weights = torch.as_tensor(list(anatomical_class_weights), dtype=torch.float32)
            if self.use_anatomy and weights.numel() != self.num_anatomical_classes:
                raise ValueError(f"anatomical_class_weights has {weights.numel()} entries; the UNet has "
                                 f"num_anatomical_classes={self.num_anatomical_classes}")
            if (weights < 0).any():
                raise ValueError("anatomical_class_weights must be >= 0")
        self.register_buffer("anatomical_class_weights", weights, persistent=False)
        self.alignment_target = check_choice("alignment_target", alignment_target, ALIGNMENT_TARGETS)
        self.segmentation_loss = check_choice("segmentation_loss", segmentation_loss, SEGMENTATION_LOSSES)
        self.anatomical_timestep_weighting = check_choice("anatomical_timestep_weighting",
                                                          anatomical_timestep_weighting, TIMESTEP_WEIGHTINGS)
        self.anatomical_logit_adjustment = bool(anatomical_logit_adjustment)
        self.mask_from = check_choice("mask_from", mask_from, MASK_SOURCES)
        if self.anatomical_logit_adjustment and (weights is None or (weights <= 0).any()):
            raise ValueError("anatomical_logit_adjustment needs anatomical_class_weights, all > 0 (it subtracts "
                             "their log from the logits); set the weights or anatomical_logit_adjustment: false")
        if self.use_anatomy:
            self._check_mask_upsample_factor()
        self.setup_joint(joint_mask_config, mask_scale_factor, mask_scale_by_std, joint_mask_loss_weight)
        if ckpt_path is not None:  # after the joint mode's modules exist, so that their keys load too
            self.init_from_ckpt(ckpt_path, ignore_keys)

    def first_stage_downsampling_factor(self) -> Optional[int]:
        """Image size / latent size of the first stage (``2 ** (len(ch_mult) - 1)``), ``None`` if unknown."""
        levels = getattr(getattr(self.first_stage_model, "encoder", None), "num_resolutions", None)
        return None if levels is None else 2 ** (int(levels) - 1)

    def _check_mask_upsample_factor(self) -> None:
        factor = int(getattr(self.unet, "mask_upsample_factor", 1))
        first = self.first_stage_downsampling_factor()
        if first is None or factor == first:
            return
        if factor > first:
            raise ValueError(f"the UNet's mask_upsample_factor ({factor}) exceeds the first stage's downsampling "
                             f"factor ({first}): masks would be larger than the images; set mask_upsample_factor: "
                             f"{first} (image-size masks) or 1 (latent-size head)")
        logger.info("mask_upsample_factor %d < first-stage factor %d: seg logits are upsampled bilinearly to the "
                    "image size", factor, first)

    # ---- schedule --------------------------------------------------------------------------------
    def get_anatomical_loss_weight(self, step: Optional[int] = None) -> float:
        """Weight of the anatomical loss at ``step`` (default: ``global_step``, so resuming restores it)."""
        step = int(self.global_step if step is None else step)
        w, warm = self.anatomical_loss_weight, self.anatomical_warmup_steps
        if not self.progressive_anatomical_training or self.anatomical_schedule == "constant" or warm == 0:
            return w
        if self.anatomical_schedule == "warmup_decay":
            if step < warm:
                return 2.0 * w
            if step < 2 * warm:
                return w * (2.0 - (step - warm) / warm)
            return w
        progress = min(max(step, 0) / (2.0 * warm), 1.0)  # cosine
        return w * (1.0 + 0.5 * (1.0 + math.cos(math.pi * progress)))

    # ---- training --------------------------------------------------------------------------------
    def get_anatomy_target(self, batch: Mapping[str, Any], bs: Optional[int] = None,
                           labelled_only: bool = False) -> Optional[torch.Tensor]:
        """Masks [B, H, W] (int64, on the model's device) with unlabelled examples set to the ignore index; ``None``
        if absent, and with ``labelled_only`` also when the host knows that no pixel is labelled (the training step
        then adds its exact 0 without statistics, as for a batch without masks).

        Labels outside ``0..C-1`` raise a ValueError. Both are decided while the mask is on the CPU (here, or in
        :meth:`on_before_batch_transfer` before Lightning copies the batch, which records the second in the
        batch), never on the device, so that the training step reads nothing back from the device.
        """
        mask = self._host_mask(batch, bs)
        if mask is None:
            return None
        labelled = batch.get(HOST_LABELLED_KEY) if bs is None else None
        if mask.device.type == "cpu":
            labelled = self.check_anatomy_labels(mask)
        if labelled_only and labelled is False:
            return None
        return mask.to(self.device)

    def _host_mask(self, batch: Mapping[str, Any], bs: Optional[int] = None) -> Optional[torch.Tensor]:
        """The batch's masks [B, H, W] as int64 on the device they came on, unlabelled examples ignored."""
        if self.anatomical_mask_key not in batch:
            return None
        mask = masks_from_batch(batch, self.anatomical_mask_key, self.anatomical_ignore_index)
        return mask if bs is None else mask[:bs]

    def check_anatomy_labels(self, mask: torch.Tensor) -> bool:
        """Whether ``mask`` has a labelled pixel; ValueError if it holds a label outside ``0..C-1`` other than the
        ignore index. Reads the results back: call it on CPU masks."""
        valid = mask != self.anatomical_ignore_index
        bad = valid & ((mask < 0) | (mask >= self.num_anatomical_classes))
        if bool(bad.any()):
            raise ValueError(f"batch['{self.anatomical_mask_key}'] holds labels outside 0..{self.num_anatomical_classes - 1}"
                             f" (and ignore index {self.anatomical_ignore_index}): found "
                             f"{sorted(mask[valid].unique().tolist())[:10]}; set num_anatomical_classes in the UNet config")
        return bool(valid.any())

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning hook, on the host batch: check the masks' labels there and record in the batch whether any pixel
        is labelled (see :meth:`get_anatomy_target`)."""
        batch = super().on_before_batch_transfer(batch, dataloader_idx)
        if self.use_anatomy and isinstance(batch, Mapping):
            mask = self._host_mask(batch)
            if mask is not None and mask.device.type == "cpu":
                batch = {**batch, HOST_LABELLED_KEY: self.check_anatomy_labels(mask)}
        return batch

    def shared_step(self, batch: Mapping[str, Any], **kwargs: Any):
        if self.is_joint:
            return self.joint_shared_step(batch)
        x, c = self.get_input(batch, self.first_stage_key)
        if not self.use_anatomy:
            return self(x, c)
        return self(x, c, anatomy_target=self.get_anatomy_target(batch, labelled_only=True))

    def p_losses(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor, noise: Optional[torch.Tensor] = None,
                 anatomy_target: Optional[torch.Tensor] = None):
        if not self.use_anatomy:
            return super().p_losses(x_start, cond, t, noise=noise)
        noise = torch.randn_like(x_start) if noise is None else noise
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        anatomy = self.apply_model_with_anatomy(x_noisy, t, cond)
        loss, loss_dict = self.diffusion_loss(anatomy.prediction, x_start, t, noise)
        prefix = "train" if self.training else "val"
        # the layer average is formed only where the loss reads it (majority alignment); soft alignment reads the layers
        average = anatomy.class_attention if self.alignment_target == "majority" else None
        anat_loss, stats = self.anatomical_loss(anatomy.seg_logits, average, anatomy_target,
                                                layer_class_attention=anatomy.layer_class_attention, t=t,
                                                statistics=self.statistics_due())
        weight = self.get_anatomical_loss_weight()
        weighted = weight * anat_loss
        loss_dict[f"{prefix}/diffusion_loss"] = loss.detach()
        loss = loss + weighted
        loss_dict[f"{prefix}/loss"] = loss.detach()
        loss_dict[f"{prefix}/anatomical_loss"] = anat_loss.detach()
        loss_dict[f"{prefix}/anatomical_weight"] = torch.full((), weight, device=loss.device)  # no host copy
        loss_dict[f"{prefix}/weighted_anatomical_loss"] = weighted.detach()
        for name, value in stats.items():
            loss_dict[f"{prefix}/{name}"] = value
        return loss, loss_dict

    def _weighted_ce(self, log_probs: torch.Tensor, target: torch.Tensor,
                     sample_weights: Optional[torch.Tensor] = None, class_weighted: bool = True) -> torch.Tensor:
        """Mean NLL over non-ignored pixels (class-weighted unless ``class_weighted=False``), each sample's
        pixels scaled by ``sample_weights[b]`` (the normaliser stays unscaled); exactly 0 (graph kept) with none.
        Nothing is read back to the host."""
        valid = target != self.anatomical_ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        nll = F.nll_loss(log_probs, safe, reduction="none")  # [B, H, W]: -log_probs at the target class
        weights = valid.to(nll.dtype)
        if class_weighted and self.anatomical_class_weights is not None:
            weights = weights * self.anatomical_class_weights.to(nll.dtype)[safe]
        total = weights.sum()
        total = torch.where(total > 0, total, 1.0)  # nothing weighted: the sums below are 0, and 0 / 1 = 0
        if sample_weights is not None:
            return (nll * weights * sample_weights.to(nll.dtype).view(-1, 1, 1)).sum() / total
        return (nll * weights).sum() / total

    def apply_model_with_anatomy(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None) -> AnatomyOutput:
        """:meth:`apply_model` through the UNet's ``forward_with_anatomy``: prediction and anatomy outputs."""
        x, routed = self.model.route(x_noisy, **self.conditioning_kwargs(cond))
        return self.unet.forward_with_anatomy(x, t, **routed)

    def statistics_due(self) -> bool:
        """Whether this step's anatomical statistics (the Dice of the argmax) are wanted: always outside training and
        without a trainer; in training on the steps the trainer logs (``log_every_n_steps``) and an epoch's last batch,
        the only ones whose values are seen (the argmax and confusion matrix of a [B, C, H, W] mask cost 5-20 ms a
        step on the CPU). The epoch means of the statistics are over those steps."""
        trainer = getattr(self, "_trainer", None)
        if not self.training or trainer is None:
            return True
        every = int(getattr(trainer, "log_every_n_steps", 1) or 1)
        # Lightning logs a training step when (optimizer steps so far + 1) is a multiple of log_every_n_steps; the
        # epoch's last batch too, so that the epoch means (on_epoch) have a value however short the epoch
        return every <= 1 or (int(self.global_step) + 1) % every == 0 or bool(getattr(trainer, "is_last_batch", False))

    def anatomical_loss(self, seg_logits: torch.Tensor, class_attention: Optional[torch.Tensor],
                        mask: Optional[torch.Tensor], *,
                        layer_class_attention: Optional[Mapping[str, torch.Tensor]] = None,
                        t: Optional[torch.Tensor] = None, statistics: bool = True) -> tuple[torch.Tensor, dict]:
        """``lambda(t) * [seg_loss(seg_logits, mask) + alignment_weight * align]`` (see the module docstring).

        ``seg_logits`` may be at latent or image size (resized bilinearly to the mask's size when they differ);
        ``layer_class_attention`` (block key -> [B, C, h_l, w_l]) feeds the soft alignment (``class_attention``
        alone is used when it is not given; ``class_attention`` may be ``None`` when the layers are given and the
        alignment is soft); ``t`` [B] the timestep weighting (none without ``t``).
        Returns the loss (0 with a graph when nothing is labelled) and statistics (detached tensors, the same keys
        for every batch with a mask): the loss parts and (with ``statistics``) the Dice of the argmax at mask resolution over the
        labelled pixels, ``anatomical_dice_<c>`` for every class ``c`` (a class absent from the batch's labels
        scores 1 if it is not predicted either, else 0) and ``anatomical_dice`` (mean over the foreground classes
        present in the labels; over all foreground classes when none is).
        Nothing is read back to the host: no device synchronisation, no data-dependent Python branch.
        """
        layers = list((layer_class_attention or {}).values())
        if class_attention is None and (self.alignment_target == "majority" or not layers):
            raise ValueError("anatomical_loss needs class_attention for alignment_target 'majority' or without "
                             "layer_class_attention")
        attentions = layers if class_attention is None else [class_attention, *layers]
        if mask is None:
            zero = (seg_logits * 0.0).sum() + sum((a * 0.0).sum() for a in attentions)
            return zero, {}
        weights = (None if t is None else
                   timestep_weights(self.alphas_cumprod, t, self.anatomical_timestep_weighting))
        logits = seg_logits.float()
        if logits.shape[-2:] != mask.shape[-2:]:
            logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
        log_probs = F.log_softmax(logits, dim=1)
        seg_ce = self._weighted_ce(log_probs, mask, weights)
        stats = {"anatomical_seg_ce": seg_ce.detach()}
        seg = seg_ce
        # one one-hot of the mask per step, shared by the soft Dice and the soft alignment targets
        onehot = (class_onehot(mask, self.num_anatomical_classes, self.anatomical_ignore_index)
                  if self.segmentation_loss == "ce_dice" or self.alignment_target == "soft" else None)
        if self.segmentation_loss == "ce_dice":
            dice = soft_dice_loss(log_probs.exp(), mask, self.anatomical_ignore_index, weights, onehot=onehot)
            stats["anatomical_dice_loss"] = dice.detach()
            seg = seg + dice
        if self.alignment_target == "majority":
            small = mode_downsample(mask, class_attention.shape[-2:], self.num_anatomical_classes,
                                    self.anatomical_ignore_index)
            align_ce = self._weighted_ce(torch.log(class_attention.float().clamp_min(1e-6)), small, weights)
        else:
            align_ce = mean_soft_alignment_loss(layers or [class_attention], mask, self.num_anatomical_classes,
                                                self.anatomical_ignore_index, sample_weights=weights, onehot=onehot)
        loss = seg + self.attention_alignment_weight * align_ce
        stats["anatomical_alignment_ce"] = align_ce.detach()
        if weights is not None:
            stats["anatomical_timestep_weight"] = weights.detach().mean()
        if statistics:
            stats.update(self._dice_stats(class_argmax(logits.detach()), mask))
        return loss, stats

    @torch.no_grad()
    def _dice_stats(self, pred: torch.Tensor, mask: torch.Tensor) -> dict:
        """Dice of ``pred`` against ``mask`` over the labelled pixels, per class and averaged over the foreground
        classes present (see :meth:`anatomical_loss`), as tensors on the device: counts for every class at once,
        no Python loop over classes and nothing read back to the host."""
        num_classes = self.num_anatomical_classes
        inter, p_count, g_count = dice_counts(pred, mask, num_classes, self.anatomical_ignore_index)
        present = g_count > 0
        dice = dice_from_counts(inter, p_count, g_count, empty=1.0, dtype=torch.float32)  # [C]
        fg, fg_present = dice[1:], present[1:].float()
        mean_present = (fg * fg_present).sum() / fg_present.sum().clamp_min(1.0)
        stats = {f"anatomical_dice_{c}": dice[c] for c in range(num_classes)}
        stats["anatomical_dice"] = torch.where(fg_present.sum() > 0, mean_present, fg.mean())
        return stats

    # ---- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_anatomy(self, z: torch.Tensor, t: Optional[torch.Tensor] = None, cond: Any = None) -> AnatomyOutput:
        """Seg logits and class attention for latents ``z`` at timestep ``t`` (default 0, a clean latent)."""
        if not self.use_anatomy:
            raise ValueError("predict_anatomy needs an AnatomicalUNetModel with use_anatomical_registers: true")
        if t is None:
            t = torch.zeros(z.shape[0], device=z.device, dtype=torch.long)
        return self.apply_model_with_anatomy(z, t, cond)

    @torch.no_grad()
    def predict_masks(self, z: torch.Tensor, image_size: Sequence[int], cond: Any = None) -> torch.Tensor:
        """Masks ``[B, H, W]`` (int64) for final latents ``z``: one UNet call at ``t = 0``, the seg logits
        upsampled to ``image_size``, argmax over classes. A joint model returns its generated masks instead
        (the mask channels of ``z`` through the mask decoder, :meth:`joint_masks`)."""
        if self.is_joint:
            return self.joint_masks(z, image_size)
        return self._argmax_at(self.predict_anatomy(self.head_latents(z), cond=cond).seg_logits, image_size)

    @torch.no_grad()
    def head_latents(self, z: torch.Tensor, images: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What the segmentation head reads for final latents ``z`` (``mask_from``): ``z``, or the decoded image
        (``images`` if already decoded) encoded again, posterior mean times ``scale_factor``."""
        if self.mask_from == "latents":
            return z
        if images is None:
            images = self.decode_first_stage(z)
        posterior = self.encode_first_stage(images.clamp(-1, 1).to(z.dtype))
        return self.scale_factor * (posterior.mode() if hasattr(posterior, "mode") else self._raw_latent(posterior))

    @torch.no_grad()
    def decode_with_anatomy(self, latents: torch.Tensor, cond: Any = None) -> dict:
        """The one "then predict masks" step after sampling: ``{"images": [B, ch, H, W] in [-1, 1] (decoded),
        "masks": [B, H, W] int64 (argmax of the seg logits upsampled to the image size), "seg_logits",
        "class_attention": [B, C, h, w], "latents": [B, c, h, w]}``. A joint model: :meth:`decode_joint`."""
        if self.is_joint:
            return self.decode_joint(latents, cond)
        images = self.decode_first_stage(latents)
        anatomy = self.predict_anatomy(self.head_latents(latents, images), cond=cond)
        return {"images": images, "masks": self._argmax_at(anatomy.seg_logits, images.shape[-2:]),
                "seg_logits": anatomy.seg_logits, "class_attention": anatomy.class_attention, "latents": latents}

    @torch.no_grad()
    def sample_with_anatomy(self, batch_size: int, ddim_steps: Optional[int] = 50, eta: float = 0.0,
                            cond: Any = None, x_T: Optional[torch.Tensor] = None, use_ema: bool = True,
                            **sampler_kwargs: Any) -> dict:
        """Sample without any mask (:meth:`sample_log`: DDIM, ancestral for ``ddim_steps=None``, or
        ``sampler=`` any registry name), then :meth:`decode_with_anatomy`."""
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        scope = self.ema_scope("sample_with_anatomy") if use_ema else nullcontext()
        with scope:
            latents, _ = self.sample_log(cond=cond, batch_size=int(batch_size), ddim=ddim_steps is not None,
                                         ddim_steps=ddim_steps, eta=eta, x_T=x_T, **sampler_kwargs)
            return self.decode_with_anatomy(latents, cond)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, n_row: int = 4, sample: bool = True,
                   ddim_steps: int = 200, ddim_eta: float = 1.0, **kwargs: Any) -> dict:
        """LatentDiffusion's images; anatomical samples replace ``samples`` and add masks/attention maps.

        Added keys (RGB in [-1, 1]): ``inputs_mask`` (the batch's masks), ``inputs_predicted_mask`` and
        ``inputs_class_attention`` (model on the clean input latents), ``samples_mask`` and
        ``samples_class_attention`` (for the samples, which need no mask).
        """
        anatomical = (self.use_anatomy or self.is_joint) and self.use_anatomical_inference
        log = super().log_images(batch, N=N, n_row=n_row, sample=sample and not anatomical,
                                 ddim_steps=ddim_steps, ddim_eta=ddim_eta, **kwargs)
        if not anatomical:
            return log
        n = min(int(N), len(batch[self.first_stage_key]))
        image_size = tuple(torch.as_tensor(batch[self.first_stage_key]).shape[1:3])
        mask = self.get_anatomy_target(batch, bs=n)
        if mask is not None:
            log["inputs_mask"] = colourise_labels(mask, self.label_set, self.anatomical_ignore_index)
        z = self.get_input(batch, self.first_stage_key, bs=n)[0]
        if self.use_anatomy:
            anatomy = self.predict_anatomy(z)
            log["inputs_predicted_mask"] = colourise_labels(self._argmax_at(anatomy.seg_logits, image_size),
                                                            self.label_set)
            log["inputs_class_attention"] = self._attention_image(anatomy.class_attention, image_size)
        if sample:
            res = self.sample_with_anatomy(n, ddim_steps=ddim_steps, eta=ddim_eta)
            log["samples"] = res["images"]
            log["samples_mask"] = colourise_labels(res["masks"], self.label_set)
            if "class_attention" in res:
                log["samples_class_attention"] = self._attention_image(res["class_attention"], image_size)
        return log

    def _argmax_at(self, seg_logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Masks [B, H, W] at ``size``: logits resized bilinearly (when needed), logit-adjusted when configured."""
        logits = seg_logits.float()
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        if self.anatomical_logit_adjustment:
            logits = logits - torch.log(self.anatomical_class_weights.to(logits)).view(1, -1, 1, 1)
        return class_argmax(logits)

    def _attention_image(self, class_attention: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return colourise_probabilities(F.interpolate(class_attention.float(), size=tuple(size), mode="nearest"),
                                       self.label_set)

