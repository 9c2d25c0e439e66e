"""Loading a trained run for sampling, seeded per-sample noise, and writing samples to disk.

``scripts/sample.py`` is a thin command line around these functions. A run is a log directory
(``logs/<timestamp>_<name>/{checkpoints/last.ckpt, configs/*-project.yaml}``) or a checkpoint file inside one;
a bare state dict or a safetensors file is accepted too when the config is given.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ldm.models.diffusion.guidance import AnatomyGuidance, check_guidance_scale
from ldm.models.diffusion.samplers import check_sampler, generator_noise, sample_model
from ldm.modules.diffusionmodules.util import sampler_timesteps
from ldm.checkpoints import load_weights, read_state_dict
from ldm.checkpoints import locate_run as resolve_run
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

IMAGE_DIR, MASK_DIR, MASK_COLOUR_DIR = "images", "masks", "masks_colour"
_INDEX_RE = re.compile(r"^(\d{6,})\.png$")


# ------------------------------------------------------------------------------------------- run loading
def run_config_paths(run_dir: Optional[str]) -> list[str]:
    """The run's ``configs/*-project.yaml`` files (sorted, later ones override earlier ones)."""
    if run_dir is None:
        return []
    paths = sorted(glob.glob(os.path.join(run_dir, "configs", "*-project.yaml")))
    return paths or sorted(glob.glob(os.path.join(run_dir, "configs", "*.yaml")))


def load_config(config_paths: Sequence[str]) -> Any:
    """Merge YAML configs left to right into one OmegaConf node that has a ``model`` section."""
    from omegaconf import OmegaConf

    if not config_paths:
        raise FileNotFoundError("no config: the checkpoint is not inside a run directory with configs/, "
                                "so pass the model config with -b CONFIG.yaml")
    for p in config_paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"config file not found: {p}")
    config = OmegaConf.merge(*[OmegaConf.load(p) for p in config_paths])
    if "model" not in config:
        raise ValueError(f"config {list(config_paths)} has no 'model' section (target/params of the LDM)")
    return config


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _strip_checkpoint_paths(model_config: Any) -> Any:
    """Copy of the model config without ``ckpt_path`` entries: the checkpoint already holds every weight."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(model_config, resolve=True)

    def strip(node: Any) -> None:
        if isinstance(node, dict):
            params = node.get("params")
            if isinstance(params, dict) and params.get("ckpt_path"):
                params["ckpt_path"] = None
            for value in node.values():
                strip(value)
        elif isinstance(node, list):
            for value in node:
                strip(value)

    strip(cfg)
    return cfg


def load_model_for_sampling(path: str, config_paths: Sequence[str] = (), unsafe_load: bool = False,
                            device: Optional[torch.device] = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the run's model from its config, load the checkpoint, move to ``device``, eval mode.

    Returns ``(model, info)`` with ``checkpoint``, ``checkpoint_sha256``, ``config`` (a plain dict),
    ``config_files`` and ``has_ema``.
    """
    from omegaconf import OmegaConf

    ckpt_path, run_dir = resolve_run(path)
    files = run_config_paths(run_dir) + list(config_paths)
    config = load_config(files)
    state_dict = read_state_dict(ckpt_path, weights_only=not unsafe_load)
    model = instantiate_from_config(_strip_checkpoint_paths(config.model))
    missing, _ = load_weights(model, state_dict, allow_unexpected=True, source=ckpt_path,
                              required=lambda key: not key.startswith("model_ema."))
    has_ema = bool(getattr(model, "use_ema", False)) and not any(k.startswith("model_ema.") for k in missing)
    if getattr(model, "use_ema", False) and not has_ema:
        logger.warning("%s has no EMA weights; sampling with the live weights.", ckpt_path)
    model.eval()
    if device is not None:
        model.to(device)
    info = {"checkpoint": os.path.abspath(ckpt_path), "checkpoint_sha256": sha256_file(ckpt_path),
            "config": OmegaConf.to_container(config, resolve=True), "config_files": [os.path.abspath(p) for p in files],
            "has_ema": has_ema}
    return model, info


def is_anatomical(model: torch.nn.Module) -> bool:
    """Whether the model predicts masks (an AnatomicalLatentDiffusion whose UNet has registers on)."""
    return bool(getattr(model, "use_anatomy", False))


def is_joint(model: torch.nn.Module) -> bool:
    """Whether the model generates each sample's mask with the image (joint mode, ``joint_mask_config``)."""
    return bool(getattr(model, "is_joint", False))


# ------------------------------------------------------------------------------------------------- noise
def sample_seed(seed: int, index: int, stream: int = 0) -> int:
    """A 63-bit seed for sample ``index`` of a run seeded with ``seed`` (independent streams, no overlap)."""
    return int(np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(1, np.uint64)[0] >> 1)


def initial_noise(shape: Sequence[int], seed: int, indices: Sequence[int], device: Optional[torch.device] = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x_T`` for the samples ``indices``: each drawn on the CPU from its own seed, so a sample does not depend
    on the batch it is in, nor on the device."""
    noise = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(sample_seed(seed, i)))
             for i in indices]
    return torch.stack(noise).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------- writing
def next_index(out_dir: str) -> int:
    """First free sample index in ``out_dir`` (resuming continues the numbering)."""
    folder = os.path.join(out_dir, IMAGE_DIR)
    if not os.path.isdir(folder):
        return 0
    indices = [int(m.group(1)) for m in (_INDEX_RE.match(n) for n in os.listdir(folder)) if m]
    return max(indices) + 1 if indices else 0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, C, H, W]`` in ``[-1, 1]`` -> ``[B, H, W]`` (C == 1) or ``[B, H, W, C]`` uint8."""
    arr = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).cpu().numpy()
    arr = arr.transpose(0, 2, 3, 1)
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def save_samples(out_dir: str, start: int, images: torch.Tensor, masks: Optional[torch.Tensor] = None,
                 formats: Sequence[str] = ("png",), colours: Optional[Sequence[Sequence[int]]] = None) -> list[str]:
    """Write one batch: 8-bit PNGs (always), NIfTI/NPZ on request, masks and their colour previews.

    File names are ``{index:06d}``; returns the image PNG paths. NIfTI/NPZ hold the float image in ``[-1, 1]``
    (``H, W`` or ``H, W, C``) and the mask as uint8.
    """
    from PIL import Image

    os.makedirs(os.path.join(out_dir, IMAGE_DIR), exist_ok=True)
    pixels = to_uint8(images)
    floats = images.detach().float().clamp(-1, 1).cpu().numpy().transpose(0, 2, 3, 1)
    mask_np = masks.detach().cpu().numpy().astype(np.uint8) if masks is not None else None
    if mask_np is not None:
        os.makedirs(os.path.join(out_dir, MASK_DIR), exist_ok=True)
        os.makedirs(os.path.join(out_dir, MASK_COLOUR_DIR), exist_ok=True)
    paths = []
    for j in range(pixels.shape[0]):
        name = f"{start + j:06d}"
        path = os.path.join(out_dir, IMAGE_DIR, name + ".png")
        Image.fromarray(pixels[j]).save(path)
        paths.append(path)
        image_f = floats[j][..., 0] if floats.shape[-1] == 1 else floats[j]
        if mask_np is not None:
            Image.fromarray(mask_np[j]).save(os.path.join(out_dir, MASK_DIR, name + ".png"))
            Image.fromarray(_colourise(mask_np[j], colours)).save(os.path.join(out_dir, MASK_COLOUR_DIR, name + ".png"))
        if "npz" in formats:
            extra = {"mask": mask_np[j]} if mask_np is not None else {}
            np.savez_compressed(os.path.join(out_dir, IMAGE_DIR, name + ".npz"), image=image_f, **extra)
        if "nii" in formats:
            import nibabel as nib

            nib.save(nib.Nifti1Image(image_f.astype(np.float32), np.eye(4)),
                     os.path.join(out_dir, IMAGE_DIR, name + ".nii.gz"))
            if mask_np is not None:
                nib.save(nib.Nifti1Image(mask_np[j], np.eye(4)), os.path.join(out_dir, MASK_DIR, name + ".nii.gz"))
    return paths


def _colourise(mask: np.ndarray, colours: Optional[Sequence[Sequence[int]]]) -> np.ndarray:
    from ldm.data.labels import colourise

    return colourise(mask, colours) if colours is not None else colourise(mask)


def update_manifest(out_dir: str, info: dict[str, Any], run: dict[str, Any]) -> str:
    """Create or extend ``samples.json``: checkpoint hash, config, and one entry per sampling session."""
    path = os.path.join(out_dir, "samples.json")
    manifest: dict[str, Any] = {}
    if os.path.isfile(path):
        with open(path) as f:
            manifest = json.load(f)
        if manifest.get("checkpoint_sha256") not in (None, info["checkpoint_sha256"]):
            logger.warning("%s already holds samples of another checkpoint (sha256 %s...); the folder now mixes "
                           "two models.", out_dir, str(manifest.get("checkpoint_sha256"))[:12])
        changed = [k for k in ("seed", "sampler", "ddim_steps", "eta", "vanilla_sample", "ema", "anatomy_guidance",
                               "mask_source")
                   if k in manifest and k in run and manifest[k] != run[k]]
        if changed:
            logger.warning("%s: this session's %s differ from the earlier sessions' (%s); see 'sessions' in "
                           "samples.json for which samples used which settings.", out_dir, changed,
                           {k: manifest[k] for k in changed})
    manifest.update({k: info[k] for k in ("checkpoint", "checkpoint_sha256", "config", "config_files")})
    manifest.update({k: run[k] for k in ("seed", "sampler", "ddim_steps", "eta", "vanilla_sample", "ema",
                                         "anatomy_guidance")
                     if k in run})
    if run.get("mask_source") is not None:  # "joint": generated with the image; "segmentation_head": predicted after
        manifest.update(mask_source=run["mask_source"], masks_generated_jointly=run["mask_source"] == "joint")
    manifest.setdefault("sessions", []).append(run)
    manifest["num_samples"] = next_index(out_dir)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, default=str)
    os.replace(tmp, path)
    return path


class Timer:
    """Accumulating wall-clock timer (``with timer: ...``; ``timer.seconds``)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> "Timer":
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds += time.perf_counter() - self._t0


# ---------------------------------------------------------------------------------------------- sampling
def latent_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    size = model.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(model.channels), int(h), int(w)


@torch.no_grad()
def predict_masks(model: torch.nn.Module, z: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
    """Masks ``[B, H, W]`` (int64) for final latents ``z``
    (:meth:`~ldm.models.diffusion.anatomical_ddpm.AnatomicalLatentDiffusion.predict_masks`): the segmentation head's,
    or for a joint model the generated masks (the mask channels of the joint latents ``z`` decoded)."""
    if not (is_anatomical(model) or is_joint(model)):
        raise ValueError(f"predicting masks needs an anatomical model (AnatomicalLatentDiffusion with "
                         f"use_anatomical_registers: true); got a {type(model).__name__}")
    return model.predict_masks(z, image_size)


class SampleNoise:
    """Per-sample step noise: one CPU generator per sample, seeded by ``(seed, index)``, so a sample's noise does
    not depend on the batch it is in, nor on the device. It is a registry sampler's ``noise_fn``; the
    generators advance with every draw, so use a fresh one per sampling call.

    Args:
        seed: the run's seed.
        indices: global sample indices of the batch rows.
    """

    def __init__(self, seed: int, indices: Sequence[int]) -> None:
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, i, stream=1)) for i in indices]
        self._last_step = -1

    def __call__(self, like: torch.Tensor, step: int) -> torch.Tensor:
        if like.shape[0] != len(self.generators):
            raise ValueError(f"SampleNoise was made for {len(self.generators)} samples but asked for a batch of "
                             f"{like.shape[0]}; build it with the indices of exactly this batch")
        if step <= self._last_step:
            raise ValueError(f"SampleNoise asked for step {step} after step {self._last_step}: its generators only "
                             "move forward, so build a new SampleNoise for every sampling call")
        self._last_step = step
        noise = [torch.randn(tuple(like.shape[1:]), generator=g) for g in self.generators]
        return torch.stack(noise).to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def ddim_trajectory(model: torch.nn.Module, x_T: torch.Tensor, ddim_steps: int, eta: float = 0.0,
                    noise: Optional[SampleNoise] = None,
                    callback: Optional[Callable[[int, int, torch.Tensor], None]] = None) -> torch.Tensor:
    """Final latents of the registry's DDIM sampler from ``x_T``, its step noise (``eta > 0``) drawn by ``noise``.

    ``callback(i, t, x_t)`` sees step ``i``'s input latents ``x_t`` at DDIM timestep ``t``.
    """
    if eta != 0.0 and noise is None:
        raise ValueError("eta > 0 needs a SampleNoise for the step noise")
    grid = sampler_timesteps("ddim", ddim_steps, model.alphas_cumprod)
    hook = None if callback is None else (lambda i, x_t, x0_pred: callback(i, int(grid[i]), x_t))
    z, _ = sample_model(model, "ddim", x_T, ddim_steps, eta=eta, noise_fn=noise, callback=hook)
    return z


@torch.no_grad()
def sample_latents(model: torch.nn.Module, x_T: torch.Tensor, ddim_steps: int, eta: float,
                   noise: Optional[SampleNoise] = None, vanilla: bool = False, generator_seed: int = 0,
                   sampler: str = "ddim", guidance: Optional[AnatomyGuidance] = None) -> torch.Tensor:
    """Final latents from ``x_T`` with the registry sampler ``sampler`` (``ddim_steps`` model calls; ``eta``
    for DDIM) or, with ``vanilla`` (or ``sampler="ancestral"``), the full ancestral DDPM loop. Step noise comes
    from ``noise`` (per sample), else from a generator seeded by ``generator_seed`` (per batch). ``guidance``:
    mask-free anatomy guidance (:class:`~ldm.models.diffusion.guidance.AnatomyGuidance`) of every step."""
    name = "ancestral" if vanilla else check_sampler(sampler)
    if noise is None:
        noise = generator_noise(torch.Generator(device=x_T.device).manual_seed(generator_seed))
    z, _ = sample_model(model, name, x_T, None if name == "ancestral" else ddim_steps,
                        eta=eta if name == "ddim" else None, noise_fn=noise,
                        make_denoiser=None if guidance is None else guidance.denoiser)
    return z


def generate(model: torch.nn.Module, out_dir: str, num_samples: int, batch_size: int, ddim_steps: int = 50,
             eta: float = 0.0, seed: int = 0, vanilla: bool = False, use_ema: bool = True, save_masks: bool = False,
             formats: Sequence[str] = ("png",), colours: Optional[Sequence[Sequence[int]]] = None,
             progress: bool = True, sampler: str = "ddim", anatomy_guidance: float = 0.0) -> dict[str, Any]:
    """Sample ``num_samples`` more images into ``out_dir``, continuing its numbering; returns the session record.

    ``sampler`` is a registry name (``ddim``, ``dpmpp2m``, ``ancestral``; ``vanilla`` means ``ancestral``, with
    any ``eta`` ignored as CompVis). Sample ``i`` starts from noise seeded by ``(seed, i)`` and its step noise
    (DDIM with ``eta > 0``, ancestral) is drawn per sample too, so a sample is the same whatever the batch size and
    whether the run was resumed. Anatomical models with ``save_masks`` also write each sample's predicted mask;
    joint models always write their generated masks (same layout; ``mask_source: joint`` in the record).
    ``anatomy_guidance`` > 0 (anatomical models) steers every step with the model's own segmentation head
    (:mod:`ldm.models.diffusion.guidance`); 0 samples exactly as without it. The record's ``timings`` hold the
    sampling time per step (``sampling_per_step_s``) and, when guided, ``guidance`` its calls and energies.
    """
    from contextlib import nullcontext

    from tqdm import tqdm

    sampler = "ancestral" if vanilla else check_sampler(sampler)
    if not vanilla and sampler != "ddim" and eta != 0:
        raise ValueError(f"--sampler {sampler} takes no eta; eta applies to DDIM only (got -e {eta})")
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"-n and --batch_size must be >= 1, got {num_samples} and {batch_size}")
    guidance_scale = check_guidance_scale(anatomy_guidance, model)
    guidance = AnatomyGuidance(model, guidance_scale) if guidance_scale > 0 else None
    save_masks = bool(save_masks) or is_joint(model)
    if save_masks and not (is_anatomical(model) or is_joint(model)):
        raise ValueError("--save_masks needs an anatomical model (AnatomicalUNetModel with registers); this run is "
                         f"a {type(model).__name__} with {type(model.unet).__name__}")
    os.makedirs(out_dir, exist_ok=True)
    start = next_index(out_dir)
    device = next(model.parameters()).device
    shape = latent_shape(model)
    timer_sample, timer_decode, timer_write = Timer(), Timer(), Timer()
    written: list[str] = []
    ema = model.ema_scope("sampling") if use_ema and getattr(model, "use_ema", False) else nullcontext()
    bar = tqdm(total=num_samples, desc="sampling", unit="img", disable=not progress)
    with ema, torch.no_grad():
        for first in range(start, start + num_samples, batch_size):
            indices = list(range(first, min(first + batch_size, start + num_samples)))
            x_T = initial_noise(shape, seed, indices, device=device)
            with timer_sample:
                z = sample_latents(model, x_T, ddim_steps, 0.0 if vanilla else eta, SampleNoise(seed, indices),
                                   sampler=sampler, guidance=guidance)
                masks = None
            with timer_decode:
                if save_masks:
                    decoded = model.decode_with_anatomy(z)
                    images, masks = decoded["images"], decoded["masks"]
                else:
                    images = model.decode_first_stage(z)
            with timer_write:
                written += save_samples(out_dir, first, images, masks, formats, colours)
            bar.update(len(indices))
    bar.close()
    total = timer_sample.seconds + timer_decode.seconds + timer_write.seconds
    ancestral = sampler == "ancestral"
    steps = len(sampler_timesteps(sampler, None if ancestral else ddim_steps, model.alphas_cumprod)) - 1
    batches = -(-num_samples // batch_size)
    return {"seed": seed, "sampler": sampler, "ddim_steps": None if ancestral else ddim_steps,
            "eta": None if ancestral else eta, "vanilla_sample": ancestral, "anatomy_guidance": guidance_scale,
            "ema": bool(use_ema and getattr(model, "use_ema", False)),
            "batch_size": batch_size, "start_index": start, "count": num_samples, "masks": bool(save_masks),
            "mask_source": ("joint" if is_joint(model) else "segmentation_head") if save_masks else None,
            "formats": list(formats), "device": str(device), "torch": torch.__version__,
            "timings": {"sampling_s": timer_sample.seconds, "decode_and_masks_s": timer_decode.seconds,
                        "writing_s": timer_write.seconds, "per_sample_s": total / num_samples,
                        "sampling_per_step_s": timer_sample.seconds / (batches * steps)},
            "guidance": None if guidance is None else guidance.summary(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def palette_for(model: torch.nn.Module) -> np.ndarray:
    """Mask preview colours of the model's label set (``label_set`` in its config; generic colours without one)."""
    from ldm.data.labels import label_set_of

    return label_set_of(model, getattr(getattr(model, "unet", None), "num_anatomical_classes", None)).palette()
