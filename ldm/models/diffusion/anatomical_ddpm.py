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
import warnings
from contextlib import nullcontext
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from ldm.data.labels import DEFAULT_IGNORE_INDEX, LabelSet, colourise, generic_label_set, get_label_set
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.joint import MASK_SOURCE_JOINT, JointMaskLatents, check_joint_channels
from ldm.modules.anatomical_losses import check_choice
from ldm.modules.anatomical_objective import (DEFAULT_ANATOMICAL_LOSS_WEIGHT, AnatomicalObjective, batch_masks,
                                              check_mask_labels, shipped_terms)
from ldm.modules.diffusionmodules.anatomical_openaimodel import AnatomyOutput
from ldm.modules.dice import class_argmax

logger = logging.getLogger(__name__)

MASK_SOURCES = ("latents", "reencoded")
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


class AnatomicalLatentDiffusion(LatentDiffusion):
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
            (2w at step 0 falling to w at 2W along a half cosine, then w), ``"ramp"`` (0 at step 0, linear to w
            at W, then w) or ``"constant"``.
        attention_alignment_weight: weight of the class-attention alignment cross-entropy.
        anatomical_ignore_index: mask value excluded from the loss.
        anatomical_class_weights: optional per-class weights of the mask CE and of the majority-vote alignment CE
            (length C).
        alignment_target: ``"majority"`` (default; the first version): CE of the layer-averaged class attention
            against the mask majority-voted to latent size. ``"soft"``: per register layer, soft CE against the
            class area fractions at the layer's resolution (no class deleted), averaged over layers.
        segmentation_loss: ``"ce"`` (default) or ``"ce_dice"`` (CE + ``1 - soft Dice`` over foreground classes;
            meant without class weights).
        anatomical_loss_terms: ``{name: weight}`` of the terms in :data:`ldm.modules.anatomical_objective.LOSS_TERMS`,
            in place of the ones ``segmentation_loss``, ``alignment_target`` and ``attention_alignment_weight`` name
            (``None``, the default: those).
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
                 anatomical_loss_terms: Optional[Mapping[str, float]] = None,
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
        if anatomical_loss_weight is None:
            anatomical_loss_weight = getattr(unet, "anatomical_loss_weight", None)
        loss_weight = float(DEFAULT_ANATOMICAL_LOSS_WEIGHT if anatomical_loss_weight is None else anatomical_loss_weight)
        if loss_weight < 0 or attention_alignment_weight < 0:
            raise ValueError("anatomical_loss_weight and attention_alignment_weight must be >= 0")
        self.anatomical_mask_key = anatomical_mask_key
        self.anatomical_ignore_index = int(anatomical_ignore_index)
        self.use_anatomical_inference = bool(use_anatomical_inference)
        self.num_anatomical_classes = int(getattr(unet, "num_anatomical_classes", 0))
        self.label_set: LabelSet = (get_label_set(label_set) if label_set is not None
                                    else generic_label_set(max(self.num_anatomical_classes, 1)))
        if label_set is not None and self.use_anatomy:
            self.label_set.check_num_classes(self.num_anatomical_classes, "the UNet (num_anatomical_classes)")
        terms = shipped_terms(segmentation_loss, alignment_target, attention_alignment_weight)
        if anatomical_loss_terms is not None and terms != shipped_terms():
            raise ValueError(f"anatomical_loss_terms {dict(anatomical_loss_terms)} names the terms itself; remove "
                             f"segmentation_loss, alignment_target and attention_alignment_weight (they name {terms}), "
                             "or anatomical_loss_terms")
        self.objective = AnatomicalObjective(
            self.num_anatomical_classes if self.use_anatomy else 0, self.anatomical_ignore_index,
            terms if anatomical_loss_terms is None else anatomical_loss_terms, anatomical_class_weights,
            anatomical_timestep_weighting, loss_weight, anatomical_schedule, anatomical_warmup_steps,
            progressive_anatomical_training)
        self.anatomical_logit_adjustment = bool(anatomical_logit_adjustment)
        self.mask_from = check_choice("mask_from", mask_from, MASK_SOURCES)
        weights = self.objective.class_weights
        if self.anatomical_logit_adjustment and (weights is None or (weights <= 0).any()):
            raise ValueError("anatomical_logit_adjustment needs anatomical_class_weights, all > 0 (it subtracts "
                             "their log from the logits); set the weights or anatomical_logit_adjustment: false")
        if self.use_anatomy:
            self._check_mask_upsample_factor()
        self.joint_mask: Optional[JointMaskLatents] = None
        if joint_mask_config is not None:
            self._build_joint(joint_mask_config, mask_scale_factor, mask_scale_by_std, joint_mask_loss_weight)
        if ckpt_path is not None:  # after the joint mode's modules exist, so that their keys load too
            self.init_from_ckpt(ckpt_path, ignore_keys)

    def _build_joint(self, config: Mapping[str, Any], scale_factor: float, scale_by_std: bool,
                     loss_weight: float) -> None:
        """The joint mode's mask first stage (:class:`~ldm.models.diffusion.joint.JointMaskLatents`), its channel
        and class checks, and the label set the mask autoencoder's classes name without registers."""
        image_channels = getattr(self.first_stage_model, "embed_dim", None)
        if image_channels is None:
            raise ValueError("the joint mode needs a first stage with embed_dim (AutoencoderKL)")
        self.joint_mask = JointMaskLatents(config, int(image_channels), float(scale_factor), scale_by_std, loss_weight)
        check_joint_channels(self.joint_mask, self.channels, self.unet)
        classes = self.joint_mask.num_classes
        if self.use_anatomy and self.num_anatomical_classes != classes:
            raise ValueError(f"the UNet has num_anatomical_classes={self.num_anatomical_classes} but the mask "
                             f"autoencoder num_classes={classes}; they must be the same label set")
        if not self.use_anatomy:  # masks come from the mask autoencoder only: its classes name the label set
            self.num_anatomical_classes = classes
            if self.label_set.name == "generic":
                self.label_set = generic_label_set(classes)
            else:
                self.label_set.check_num_classes(classes, "the mask autoencoder (num_classes)")
        logger.info("joint mode: denoising %d image + %d mask latent channels (%d classes)", image_channels,
                    self.joint_mask.mask_channels, classes)

    @property
    def is_joint(self) -> bool:
        """Whether the model generates masks jointly (``joint_mask_config`` set)."""
        return self.joint_mask is not None

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
        return self.objective.weight(self.global_step if step is None else step)

    # ---- a batch's masks -------------------------------------------------------------------------
    def get_anatomy_target(self, batch: Mapping[str, Any], bs: Optional[int] = None,
                           labelled_only: bool = False) -> Optional[torch.Tensor]:
        """Masks [B, H, W] (int64, on the model's device) with unlabelled examples set to the ignore index; ``None``
        if absent, and with ``labelled_only`` also when the host knows that no pixel is labelled (the training step
        then adds its exact 0 without statistics, as for a batch without masks).

        Labels outside ``0..C-1`` raise a ValueError. Both are decided while the mask is on the CPU (here, or in
        :meth:`on_before_batch_transfer` before Lightning copies the batch, which records the second in the
        batch), never on the device, so that the training step reads nothing back from the device.
        """
        mask = batch_masks(batch, self.anatomical_mask_key, self.anatomical_ignore_index, bs)
        if mask is None:
            return None
        labelled = batch.get(HOST_LABELLED_KEY) if bs is None else None
        if mask.device.type == "cpu":
            labelled = self._check_labels(mask)
        if labelled_only and labelled is False:
            return None
        return mask.to(self.device)

    def _check_labels(self, mask: torch.Tensor) -> bool:
        return check_mask_labels(mask, self.num_anatomical_classes, self.anatomical_ignore_index,
                                 self.anatomical_mask_key)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning hook, on the host batch: check the masks' labels there and record in the batch whether any pixel
        is labelled (see :meth:`get_anatomy_target`)."""
        batch = super().on_before_batch_transfer(batch, dataloader_idx)
        if self.use_anatomy and isinstance(batch, Mapping):
            mask = batch_masks(batch, self.anatomical_mask_key, self.anatomical_ignore_index)
            if mask is not None and mask.device.type == "cpu":
                batch = {**batch, HOST_LABELLED_KEY: self._check_labels(mask)}
        return batch

    @torch.no_grad()
    def get_input(self, batch: Mapping[str, Any], k: str, *args: Any, bs: Optional[int] = None,
                  **kwargs: Any) -> list[Any]:
        """LatentDiffusion's ``get_input``; in joint mode ``z`` is ``concat(image latents, mask latents)``."""
        out = super().get_input(batch, k, *args, bs=bs, **kwargs)
        if self.is_joint and k == self.first_stage_key:
            z_mask = self.joint_mask.batch_latents(batch, self.anatomical_mask_key, bs, self.device)
            out[0] = torch.cat([out[0], z_mask.to(out[0].dtype)], dim=1)
        return out

    def decode_first_stage(self, z: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Images of (joint or image-only) latents: the image channels through the image first stage."""
        if self.is_joint and z.shape[1] == self.joint_mask.channels:
            z = z[:, :self.joint_mask.image_channels]
        return super().decode_first_stage(z, *args, **kwargs)

    # ---- training --------------------------------------------------------------------------------
    def shared_step(self, batch: Mapping[str, Any], **kwargs: Any):
        """One training/validation step: the batch's latents and, as values for :meth:`p_losses`, the masks
        (``anatomy_target``, with registers) and which examples have one (``labelled``, joint mode)."""
        x, c = self.get_input(batch, self.first_stage_key)
        routed = {}
        if self.is_joint:
            routed["labelled"] = self.joint_mask.present(batch, self.anatomical_mask_key, device=self.device)
        if self.use_anatomy:
            routed["anatomy_target"] = self.get_anatomy_target(batch, labelled_only=True)
        if self.representation_alignment is not None:
            align = self.representation_alignment
            routed["alignment_masks"] = align.batch_masks(batch, self.device, required=self.training)
        return self(x, c, **routed)

    def p_losses(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor, noise: Optional[torch.Tensor] = None,
                 anatomy_target: Optional[torch.Tensor] = None, labelled: Optional[torch.Tensor] = None,
                 alignment_masks: Optional[torch.Tensor] = None):
        """The diffusion loss (in joint mode over the image and mask channel groups, the mask channels of the
        examples not ``labelled`` [B] pure noise) plus ``w(step)`` times the anatomical objective on
        ``anatomy_target``, plus the representation alignment to ``alignment_masks`` when configured."""
        return self.with_alignment(lambda: self.anatomical_losses(x_start, cond, t, noise, anatomy_target, labelled),
                                   alignment_masks)

    def anatomical_losses(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor, noise: Optional[torch.Tensor],
                          anatomy_target: Optional[torch.Tensor], labelled: Optional[torch.Tensor]):
        """:meth:`p_losses` without the representation alignment."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        groups = ()
        if self.is_joint and x_start.shape[1] == self.joint_mask.channels:
            x_noisy = self.joint_mask.hide_unlabelled(x_noisy, noise, labelled)
            groups = (self.joint_mask.loss_group(labelled, x_start.shape[0], x_start.device),)
        if not self.use_anatomy:
            return self.diffusion_loss(self.apply_model(x_noisy, t, cond), x_start, t, noise, groups)
        anatomy = self.apply_model_with_anatomy(x_noisy, t, cond)
        loss, loss_dict = self.diffusion_loss(anatomy.prediction, x_start, t, noise, groups)
        prefix = "train" if self.training else "val"
        # the layer average is formed only where a term reads it (majority alignment); soft alignment reads the layers
        average = anatomy.class_attention if self.objective.needs_average else None
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

    @torch.no_grad()
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """The image ``scale_by_std``, then, with ``mask_scale_by_std``, the mask scale from the first batch (over
        all ranks) that holds a mask (:meth:`~ldm.models.diffusion.joint.JointMaskLatents.fit_scale`)."""
        super().on_train_batch_start(batch, batch_idx)
        if not self.is_joint or self.joint_mask.scale_fixed:
            return
        present = self.joint_mask.present(batch, self.anatomical_mask_key, device=self.device)
        mask = batch_masks(batch, self.anatomical_mask_key, self.joint_mask.ignore_index).to(self.device)
        trainer = getattr(self, "_trainer", None)
        reduce = None if trainer is None else (lambda v: trainer.strategy.reduce(v, reduce_op="sum"))
        self.joint_mask.fit_scale(mask, present, reduce)

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
        """The anatomical objective before ``w(step)`` (:meth:`~ldm.modules.anatomical_objective.AnatomicalObjective.forward`
        with this model's ``alphas_cumprod`` for the timestep weighting): the loss (0 with a graph when nothing is
        labelled) and its statistics, among them the Dice of the argmax per class (``anatomical_dice_<c>``; a class
        absent from the batch's labels scores 1 if it is not predicted either) and ``anatomical_dice`` (mean over the
        foreground classes present in the labels). Nothing is read back to the host."""
        return self.objective(seg_logits, class_attention, mask, layer_class_attention=layer_class_attention, t=t,
                              alphas_cumprod=self.alphas_cumprod, statistics=statistics)

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
        return self.encode_mean(images.clamp(-1, 1).to(z.dtype))

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

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, n_row: int = 4, sample: bool = True,
                   ddim_steps: int = 200, ddim_eta: float = 1.0, **kwargs: Any) -> dict:
        """LatentDiffusion's images; anatomical samples replace ``samples`` and add masks/attention maps.

        Added keys (RGB in [-1, 1]): ``inputs_mask`` (the batch's masks), ``inputs_predicted_mask`` and
        ``inputs_class_attention`` (model on the clean input latents), ``samples_mask`` and
        ``samples_class_attention`` (for the samples, which need no mask); a mask-conditioned model also
        ``samples_from_masks`` (drawn from the inputs' masks).
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
            log.update(self.log_samples_from_masks(batch, n, ddim_steps, ddim_eta))
        return log

    def _argmax_at(self, seg_logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Masks [B, H, W] at ``size``: logits resized bilinearly (when needed), logit-adjusted when configured."""
        logits = seg_logits.float()
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        if self.anatomical_logit_adjustment:
            logits = logits - torch.log(self.objective.class_weights.to(logits)).view(1, -1, 1, 1)
        return class_argmax(logits)

    def _attention_image(self, class_attention: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return colourise_probabilities(F.interpolate(class_attention.float(), size=tuple(size), mode="nearest"),
                                       self.label_set)

