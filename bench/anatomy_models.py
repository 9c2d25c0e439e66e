"""What the anatomy benchmark trains: presets, arms (model configs), the phantom data, training and sampling.

Every arm is a ``model:`` config built here from the benchmark's UNet size, so arms differ only in what the
arm is about. The ``anatomical`` arm takes its anatomical parameters from the shipped CT-Organ config
(``configs/latent-diffusion/anatomical_ctorgan_kl.yaml``) at run time, so the benchmark always measures the
shipped method. Models are trained by a real Lightning ``Trainer`` (as ``main.py`` would), with the same
frozen autoencoder, latent scale, data order, optimiser and step count for every arm.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, Sampler

from ldm.checkpoints import load_weights
from ldm.data.phantom import PhantomDataset
from ldm.training.scripted import scripted_trainer
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE_CONFIG = os.path.join(ROOT, "configs", "latent-diffusion", "ctorgan_unconditional_kl.yaml")
ANATOMICAL_CONFIG = os.path.join(ROOT, "configs", "latent-diffusion", "anatomical_ctorgan_kl.yaml")
NUM_CLASSES = 6  # CT-Organ ids of the phantom


# ------------------------------------------------------------------------------------------------ presets
@dataclass(frozen=True)
class Preset:
    """Sizes and budgets of one benchmark scale (all arms share them).

    Args:
        size: image side (px); the f4 autoencoder gives ``size / 4`` latents.
        train_slices, test_slices: phantom slices of the training and the held-out test split.
        ldm_train_slices: if set, the diffusion models (and the train-on-real reference, and the memorisation
            check) see only this many training slices, drawn from ``ldm_train_slices // 8`` patients of the
            training split (a data-scarce run); the autoencoder and the independent segmenter, the measuring
            instrument, are still trained on all ``train_slices``.
        ae_steps, ae_batch, ae_ch: autoencoder training batches, batch size and base width.
        mask_ae_steps: training batches of the joint arm's mask autoencoder (default: ``ae_steps``).
        seg_steps: steps of the independent segmenter (real training split).
        unet: UNet size (model_channels, channel_mult, num_res_blocks, ...).
        steps, batch, lr: LDM optimiser steps, batch size and AdamW learning rate.
        fractions: training fractions with a checkpoint (pass rate against step).
        samples: samples per trained model at the final (and equal-time) checkpoint.
        curve_samples: samples at the intermediate checkpoints.
        sampler_steps: DDIM steps (eta 0).
        seeds: training seeds per arm.
        tstr_pairs, tstr_steps: train-on-synthetic/test-on-real set size and segmenter steps.
        bootstrap: bootstrap replicates.
    """

    size: int
    train_slices: int
    test_slices: int
    ae_steps: int
    ae_batch: int
    ae_ch: int
    seg_steps: int
    unet: dict = field(default_factory=dict)
    steps: int = 2000
    batch: int = 32
    lr: float = 3e-4
    fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    samples: int = 1000
    curve_samples: int = 250
    sampler_steps: int = 25
    seeds: int = 3
    tstr_pairs: int = 512
    tstr_steps: int = 600
    bootstrap: int = 2000
    ldm_train_slices: Optional[int] = None
    mask_ae_steps: Optional[int] = None


PRESETS: dict[str, Preset] = {
    # every stage at toy size: what the test suite runs (well under a minute on 2 CPU cores)
    "quick": Preset(size=32, train_slices=64, test_slices=32, ae_steps=30, ae_batch=8, ae_ch=16, seg_steps=30,
                    unet={"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "num_heads": 4},
                    steps=12, batch=8, fractions=(0.5, 1.0), samples=24, curve_samples=8, sampler_steps=4,
                    seeds=2, tstr_pairs=16, tstr_steps=10, bootstrap=200),
    # the default: 2 arms x 3 seeds in about an hour on 2 idle CPU cores
    "cpu": Preset(size=64, train_slices=2048, test_slices=512, ae_steps=1000, ae_batch=16, ae_ch=32, seg_steps=1200,
                  unet={"model_channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "num_heads": 4},
                  steps=1000, batch=32),
    # used automatically on CUDA: larger images and UNet, longer training
    "gpu": Preset(size=128, train_slices=8192, test_slices=1024, ae_steps=6000, ae_batch=32, ae_ch=64,
                  seg_steps=4000,
                  unet={"model_channels": 128, "channel_mult": [1, 2, 4], "num_res_blocks": 2, "num_heads": 8},
                  steps=20000, batch=64, lr=1e-4, samples=2000, curve_samples=500, sampler_steps=50,
                  tstr_pairs=1024, tstr_steps=2000),
}


# ------------------------------------------------------------------------------------------------ data
def phantom_split(preset: Preset, split: str, n: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Images ``[N, 1, H, W]`` in [-1, 1] and masks ``[N, H, W]`` of one phantom split (seed 0); ``n`` slices
    (default: the preset's size of the split) from ``n // 8`` patients."""
    if n is None:
        n = preset.train_slices if split == "train" else preset.test_slices
    ds = PhantomDataset(size=preset.size, num_samples=n, seed=0, split=split)
    images = torch.stack([torch.from_numpy(ds[i]["image"]) for i in range(n)]).permute(0, 3, 1, 2).contiguous()
    masks = torch.stack([torch.from_numpy(ds[i]["segmentation"]) for i in range(n)])
    return {"image": images, "segmentation": masks}


class TensorSlices(Dataset):
    """The data contract (``image`` H x W x 1, ``segmentation``, ``has_segmentation``) over in-memory tensors."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i].permute(1, 2, 0), "segmentation": self.masks[i], "has_segmentation": True}


class StreamSampler(Sampler):
    """Indices from a seeded stream of permutations, starting at position ``start`` (for resumed runs), so
    every arm trained with the same seed sees the same batches in the same order."""

    def __init__(self, n: int, total: int, seed: int, start: int = 0) -> None:
        self.n, self.total, self.seed, self.start = n, total, seed, start

    def _stream(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed)
        while True:
            yield from torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        stream = self._stream()
        for _ in range(self.start):
            next(stream)
        for _ in range(self.total - self.start):
            yield next(stream)

    def __len__(self) -> int:
        return self.total - self.start


def derangement(n: int, seed: int) -> torch.Tensor:
    """A permutation with no fixed point (for the shuffled-mask ablation: no image keeps its own mask)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    return torch.roll(perm, 1)[torch.argsort(perm)] if n > 1 else perm


# ------------------------------------------------------------------------------------------------ configs
def autoencoder_config(preset: Preset) -> dict[str, Any]:
    """The shared 1-channel f4 KL autoencoder (no LPIPS, no discriminator: nothing to download)."""
    return {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
        "embed_dim": 3, "monitor": None,
        "lossconfig": {"target": "ldm.modules.losses.LPIPSWithDiscriminator",
                       "params": {"disc_start": 10 ** 9, "kl_weight": 1e-6, "disc_weight": 0.5,
                                  "disc_in_channels": 1, "disc_num_layers": 2, "perceptual_weight": 0.0}},
        "ddconfig": {"double_z": True, "z_channels": 3, "resolution": preset.size, "in_channels": 1, "out_ch": 1,
                     "ch": preset.ae_ch, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [],
                     "dropout": 0.0}}}


MASK_AE_CONFIG = os.path.join(ROOT, "configs", "autoencoder", "mask_ae_phantom.yaml")
JOINT_CONFIG = os.path.join(ROOT, "configs", "latent-diffusion", "anatomical_joint_ctorgan_kl.yaml")


def mask_autoencoder_config(preset: Preset) -> dict[str, Any]:
    """The joint arm's mask first stage: the shipped phantom mask autoencoder at the benchmark's image size; its
    learning-rate schedule, if it has one, is stretched to the benchmark's mask-autoencoder steps."""
    params = _yaml_model_params(MASK_AE_CONFIG)
    params["ddconfig"]["resolution"] = preset.size
    schedule = (params.get("scheduler_config") or {}).get("params")
    if schedule is not None and "max_decay_steps" in schedule:
        schedule["max_decay_steps"] = max(int(schedule.get("warm_up_steps", 0)) + 1,
                                          preset.mask_ae_steps or preset.ae_steps)
    params.pop("monitor", None)
    return {"target": OmegaConf.load(MASK_AE_CONFIG).model.target, "params": params}


def _yaml_model_params(path: str) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(path).model.params, resolve=False)


def baseline_config(preset: Preset, ae_ckpt: str, scale_factor: float) -> dict[str, Any]:
    """The plain LDM: the shipped baseline's diffusion settings at the benchmark's size, ``scale_by_std``."""
    shipped = _yaml_model_params(BASELINE_CONFIG)
    latent = preset.size // 4
    unet = {"image_size": latent, "in_channels": 3, "out_channels": 3, "attention_resolutions": [],
            **copy.deepcopy(preset.unet)}
    ae = autoencoder_config(preset)
    ae["params"]["lossconfig"] = {"target": "torch.nn.Identity"}
    ae["params"].pop("monitor")
    ae["params"].update(ckpt_path=ae_ckpt, ignore_keys=["loss"])
    params = {k: shipped[k] for k in ("linear_start", "linear_end", "timesteps", "loss_type", "first_stage_key")}
    params.update(image_size=latent, channels=3, cond_stage_config="__is_unconditional__", scale_by_std=True,
                  scale_factor=float(scale_factor), log_every_t=100, use_ema=True,
                  unet_config={"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
                  first_stage_config=ae)
    return {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}


def shipped_anatomical_params(steps: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(ldm_params, unet_params)`` that the shipped anatomical CT-Organ config adds to the plain one.

    Its warm-up length is in absolute steps of a long GPU run; the benchmark keeps its share of training
    (``anatomical_warmup_steps`` becomes 10 % of the benchmark's steps).
    """
    plain, anat = _yaml_model_params(BASELINE_CONFIG), _yaml_model_params(ANATOMICAL_CONFIG)
    ldm = {k: v for k, v in anat.items() if k not in plain and k not in ("unet_config", "scale_by_std")}
    base_unet = plain["unet_config"]["params"]
    unet = {k: v for k, v in anat["unet_config"]["params"].items() if k not in base_unet}
    if "anatomical_warmup_steps" in ldm:
        ldm["anatomical_warmup_steps"] = max(1, int(round(0.1 * steps)))
    return ldm, unet


# The first implementation's anatomical parameters (constant class-grouped registers, segmentation head at latent
# resolution, majority-vote alignment), as shipped in anatomical_ctorgan_kl.yaml until the register issue: the
# ``anatomical_v1`` arm keeps measuring it after the shipped config moves on.
V1_LDM_PARAMS: dict[str, Any] = {
    "anatomical_mask_key": "segmentation", "anatomical_loss_weight": 0.1, "progressive_anatomical_training": True,
    "anatomical_schedule": "warmup_decay", "attention_alignment_weight": 0.5, "anatomical_ignore_index": 255,
    "anatomical_class_weights": None, "use_anatomical_inference": True}
V1_UNET_PARAMS: dict[str, Any] = {
    "use_anatomical_registers": True, "num_anatomical_classes": 6, "anatomical_register_dim": 256,
    "num_registers_per_class": 4, "anatomical_attention_heads": 8, "anatomical_attention_dim": 256,
    "use_timestep_aware_registers": True, "anatomical_attention_resolutions": [1, 2, 4],
    "use_spatial_encoding": True}


def arm_config(arm: str, preset: Preset, ae_ckpt: str, scale_factor: float,
               mask_ae: Optional[tuple[str, float]] = None) -> dict[str, Any]:
    """The ``model:`` config of one arm (see ``ARMS``); ``joint`` needs ``mask_ae = (checkpoint, latent scale)``."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; arms: {', '.join(ARMS)}")
    mask_from = "reencoded" if arm in REENCODED else None
    if arm in SAME_MODELS:
        arm = SAME_MODELS[arm]  # the same trained models, sampled or labelled differently
    cfg = baseline_config(preset, ae_ckpt, scale_factor)
    if arm == "baseline":
        return cfg
    if arm == "anatomical_v1":
        ldm = {**V1_LDM_PARAMS, "anatomical_warmup_steps": max(1, int(round(0.1 * preset.steps)))}
        unet = copy.deepcopy(V1_UNET_PARAMS)
    else:
        ldm, unet = shipped_anatomical_params(preset.steps)
    cfg["target"] = "ldm.models.diffusion.anatomical_ddpm.AnatomicalLatentDiffusion"
    cfg["params"].update(ldm)
    cfg["params"]["unet_config"]["target"] = \
        "ldm.modules.diffusionmodules.anatomical_openaimodel.AnatomicalUNetModel"
    unet_params = cfg["params"]["unet_config"]["params"]
    unet_params.update(unet)
    levels = {2 ** i for i in range(len(unet_params["channel_mult"]))}
    if unet_params.get("anatomical_attention_resolutions") is not None:  # keep the levels this UNet has
        unet_params["anatomical_attention_resolutions"] = [
            r for r in unet_params["anatomical_attention_resolutions"] if r in levels]
    if arm == "joint":
        if mask_ae is None:
            raise ValueError("the joint arm needs the mask autoencoder (checkpoint, scale)")
        mask_cfg = mask_autoencoder_config(preset)
        mask_cfg["params"].update(ckpt_path=mask_ae[0])
        mask_channels = int(mask_cfg["params"]["embed_dim"])
        shipped = _yaml_model_params(JOINT_CONFIG)
        cfg["params"].update(joint_mask_config=mask_cfg, mask_scale_by_std=False, mask_scale_factor=float(mask_ae[1]),
                             joint_mask_loss_weight=float(shipped.get("joint_mask_loss_weight", 1.0)),
                             channels=3 + mask_channels)
        unet_params.update(in_channels=3 + mask_channels, out_channels=3 + mask_channels)
    if arm == "registers_no_loss":
        cfg["params"]["anatomical_loss_weight"] = 0.0
    if arm == "anatomical_stopgrad":
        unet_params["segmentation_stop_gradient"] = True
        cfg["params"]["attention_alignment_weight"] = 0.0
    if mask_from is not None:
        cfg["params"]["mask_from"] = mask_from
    return cfg


ARMS: dict[str, str] = {
    "baseline": "plain LatentDiffusion + UNetModel (no masks)",
    "anatomical": "the shipped anatomical configuration (registers + segmentation head + anatomical loss)",
    "anatomical_v1": "the first implementation (constant registers, latent-resolution head, majority-vote alignment)",
    "anatomical_guided": "the anatomical arm's models sampled with mask-free anatomy guidance (--guidance scale)",
    "anatomical_reencoded": "the anatomical arm's models and samples; own masks from the decoded samples encoded "
                            "again (mask_from: reencoded) instead of from the sampled latents",
    "joint": "the shipped anatomical configuration in joint mode: image and mask latents generated together",
    "registers_no_loss": "anatomical UNet, anatomical loss weight 0 (registers as extra capacity only)",
    "shuffled_masks": "anatomical, but every image is trained with another image's mask",
    "anatomical_stopgrad": "anatomical, but the mask head reads the UNet's features through a stop-gradient and the "
                           "alignment loss is off: the masks cannot pull on the denoiser",
    "anatomical_stopgrad_reencoded": "the anatomical_stopgrad arm's models and samples; own masks from the decoded "
                                     "samples encoded again (mask_from: reencoded)",
}
# arms that reuse another arm's trained models (trained once, under that arm's directory)
SAME_MODELS: dict[str, str] = {"anatomical_guided": "anatomical", "anatomical_reencoded": "anatomical",
                               "anatomical_stopgrad_reencoded": "anatomical_stopgrad"}
# arms whose own masks come from the decoded samples encoded again: arm -> the arm with the same images
REENCODED: dict[str, str] = {"anatomical_reencoded": "anatomical",
                             "anatomical_stopgrad_reencoded": "anatomical_stopgrad"}
MASK_ARMS = ("anatomical", "anatomical_guided", "anatomical_reencoded", "anatomical_v1", "joint", "registers_no_loss",
             "shuffled_masks", "anatomical_stopgrad", "anatomical_stopgrad_reencoded")


# ------------------------------------------------------------------------------------------------ training
class _Clock(pl.Callback):
    """Training time (batch start to batch end, so data and logging between runs do not count), checkpoints at
    given steps and once the elapsed time reaches ``equal_time_s`` (kept in the checkpoint on resume)."""

    def __init__(self, save_at: dict[int, str], equal_time_s: Optional[float], equal_time_path: str) -> None:
        self.save_at, self.equal_time_s, self.equal_time_path = save_at, equal_time_s, equal_time_path
        self.seconds, self.equal_time_step = 0.0, None
        self._t0 = 0.0

    def _maybe_save(self, trainer: pl.Trainer) -> None:
        step = trainer.global_step
        if step in self.save_at and not os.path.isfile(self.save_at[step]):
            trainer.save_checkpoint(self.save_at[step])  # atomic (scripted_trainer)
        if (self.equal_time_s is not None and self.equal_time_step is None and self.seconds >= self.equal_time_s):
            self.equal_time_step = step
            trainer.save_checkpoint(self.equal_time_path)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._maybe_save(trainer)  # EMA has seen every finished step here
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:
        self.seconds += time.perf_counter() - self._t0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_save(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "equal_time_step": self.equal_time_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seconds, self.equal_time_step = float(state["seconds"]), state["equal_time_step"]


def train_ldm(config: dict[str, Any], data: dict[str, torch.Tensor], preset: Preset, seed: int, out_dir: str,
              device: torch.device, equal_time_s: Optional[float] = None, progress: bool = True) -> dict[str, Any]:
    """Train one arm for one seed; checkpoints ``step<K>.ckpt`` at ``preset.fractions`` (resumable).

    Returns ``{"train_seconds", "checkpoints": {step: path}, "equal_time": {"step", "path"}}``.
    """
    os.makedirs(out_dir, exist_ok=True)
    steps = preset.steps
    save_at = {max(1, int(round(f * steps))): os.path.join(out_dir, f"step{max(1, int(round(f * steps))):06d}.ckpt")
               for f in preset.fractions}
    final = save_at[steps]
    eq_path = os.path.join(out_dir, "equal_time.ckpt")
    info_path = os.path.join(out_dir, "train.json")
    if os.path.isfile(final) and os.path.isfile(info_path):
        import json
        with open(info_path) as f:
            return json.load(f)
    done = sorted(s for s, p in save_at.items() if os.path.isfile(p))
    resume = save_at[done[-1]] if done else None
    start = done[-1] if done else 0
    logger.info("training %s from step %d to %d (seed %d)", os.path.basename(os.path.dirname(out_dir)), start,
                steps, seed)
    pl.seed_everything(seed, workers=True, verbose=False)
    model = instantiate_from_config(config)
    model.learning_rate = preset.lr
    # scale_by_std: the benchmark already measured 1/std over the whole training set (the config's
    # scale_factor), the same for every arm, so the first-batch estimate must not replace it
    model.keep_scale_factor()
    clock = _Clock(save_at, equal_time_s, eq_path)
    loader = DataLoader(TensorSlices(data["image"], data["segmentation"]), batch_size=preset.batch,
                        sampler=StreamSampler(len(data["image"]), steps * preset.batch, seed, start * preset.batch),
                        drop_last=True, num_workers=0)
    trainer = scripted_trainer(device, steps, [clock], progress)
    trainer.fit(model, loader, ckpt_path=resume)
    info = {"train_seconds": clock.seconds, "resumed_from_step": start,
            "checkpoints": {str(s): p for s, p in sorted(save_at.items())},
            "equal_time": {"step": clock.equal_time_step if clock.equal_time_step is not None else steps,
                           "path": eq_path if clock.equal_time_step is not None else final,
                           "target_seconds": equal_time_s}}
    import json
    with open(info_path, "w") as f:
        json.dump(info, f, indent=1)
    return info


def load_autoencoder(ckpt: str, preset: Preset, device: torch.device) -> torch.nn.Module:
    """The benchmark's trained autoencoder (strict load), in eval mode on ``device``."""
    model = instantiate_from_config(autoencoder_config(preset))
    load_weights(model, ckpt, strict=True)
    return model.to(device).eval()


def load_trained(config: dict[str, Any], ckpt: str, device: torch.device) -> torch.nn.Module:
    """An arm's model with the weights of ``ckpt`` (strict), in eval mode on ``device``."""
    cfg = copy.deepcopy(config)
    cfg["params"]["first_stage_config"]["params"].pop("ckpt_path", None)
    if "joint_mask_config" in cfg["params"]:
        cfg["params"]["joint_mask_config"]["params"].pop("ckpt_path", None)
    model = instantiate_from_config(cfg)
    load_weights(model, ckpt, strict=True)
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------------ sampling
@torch.no_grad()
def draw_samples(model: torch.nn.Module, n: int, sampler_steps: int, noise_seed: int, batch: int,
                 device: torch.device, own_masks: bool, progress: Optional[Callable[[int], None]] = None,
                 guidance: float = 0.0, sampler: str = "ddim", eta: float = 0.0,
                 autoguidance: Optional[Any] = None) -> dict[str, torch.Tensor]:
    """``n`` samples (EMA weights; the benchmark's DDIM eta 0 unless ``sampler``/``eta`` say otherwise) from the
    start noise of indices ``0..n-1`` of ``noise_seed`` (shared by every arm), decoded to images ``[n, 1, H, W]``,
    and each sample's image-latent RMS (``latent_rms``, in the model's scaled latent space); with ``own_masks``
    the model's own masks; ``guidance`` > 0 steers every step with the model's mask-free anatomy guidance,
    ``autoguidance`` (an :class:`~ldm.models.diffusion.autoguidance.Autoguidance` of this model) with a weaker model.
    A stochastic sampler (DDIM eta > 0, ``ancestral``) draws its step noise per sample from ``noise_seed``, so a
    sample does not depend on the batch it is in."""
    from ldm.models.diffusion.guidance import AnatomyGuidance
    from ldm.sampling import draw_batch, latent_shape

    del device  # the samples are drawn where the model is (ldm.sampling.draw_batch)
    images, masks, spreads = [], [], []
    image_channels = int(getattr(model.first_stage_model, "embed_dim", latent_shape(model)[0]))
    with model.ema_scope():
        for first in range(0, n, batch):
            idx = list(range(first, min(n, first + batch)))
            steer = autoguidance if autoguidance is not None else (
                AnatomyGuidance(model, guidance) if guidance > 0 else None)
            drawn = draw_batch(model, idx, noise_seed, sampler_steps, eta, sampler, steer, masks=own_masks)
            z, img = drawn["latents"], drawn["images"].clamp(-1, 1)
            images.append(img.float().cpu())
            spreads.append(z[:, :image_channels].float().flatten(1).pow(2).mean(1).sqrt().cpu())
            if own_masks:
                masks.append(drawn["masks"].cpu())
            if progress is not None:
                progress(len(idx))
    out = {"image": torch.cat(images), "latent_rms": torch.cat(spreads)}
    if own_masks:
        out["own_mask"] = torch.cat(masks)
    return out


def step_seconds_ratio(times: dict[str, float]) -> dict[str, float]:
    """Each arm's training time over the baseline's."""
    base = times.get("baseline")
    return {k: (v / base if base else math.nan) for k, v in times.items()}
