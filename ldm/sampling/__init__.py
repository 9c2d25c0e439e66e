"""Sampling: loading a trained run (:mod:`ldm.sampling.run`), seeded per-sample noise (:mod:`ldm.sampling.noise`),
the sampling calls and the session loop (here), an output folder's checks, scan and resume
(:mod:`ldm.sampling.session`). The public names of the submodules are re-exported here.

``scripts/sample.py`` is a thin command line around these functions. A run is a log directory
(``logs/<timestamp>_<name>/{checkpoints/last.ckpt, configs/*-project.yaml}``), a checkpoint file inside one, a
CompVis model folder (``model.ckpt`` + ``config.yaml``) or a ``scripts/export.py`` folder (``model.safetensors`` +
``config.yaml``); a bare state dict or a safetensors file is accepted too when the config is given. Files are
written by :mod:`ldm.sample_io` (atomic, resumable); NIfTI geometry comes from :mod:`ldm.sample_geometry`.
Three lines of Python::

    from ldm.sampling import load_model_for_sampling, sample_images
    model, info = load_model_for_sampling("exported/")   # a run, a CompVis folder or an export
    images = sample_images(model, 4, ddim_steps=50, seed=0)  # [4, C, H, W] in [-1, 1]
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ldm.models.diffusion.autoguidance import Autoguidance
from ldm.models.diffusion.guidance import AnatomyGuidance, check_guidance_scale
from ldm.models.diffusion.samplers import generator_noise, sample_model, sampler_spec, sampler_timesteps
from ldm.checkpoints import locate_run as resolve_run  # noqa: F401
from ldm.folder_lock import FolderLock, check_unlocked
from ldm.sample_geometry import SampleGeometry
from ldm.sample_io import (IMAGE_DIR, MASK_COLOUR_DIR, MASK_DIR, begin_session, end_session,  # noqa: F401
                           next_index, read_manifest, remove_temporary_files, save_samples, scan_samples, to_uint8,
                           write_stack)
from ldm.sampling.noise import SampleNoise, initial_noise, sample_seed  # noqa: F401
from ldm.sampling.run import (COMPVIS_CONFIG, is_anatomical, is_joint, load_config, load_model_for_sampling,  # noqa: F401
                              locate_model, read_run_config, resolve_config, run_config_paths, sampling_extra_key,
                              sha256_file, shareable_config, strip_checkpoint_paths)
from ldm.sampling.session import (RESUME_SETTINGS, _canonical_shape, _resume_unfinished, _scan_folder,  # noqa: F401
                                  _session_timings, resumable_session)

Guidance = AnatomyGuidance | Autoguidance
"""What steers every sampler step through its denoiser: mask-free anatomy guidance or autoguidance."""
logger = logging.getLogger(__name__)

LOCK_ADVICE = "sample into another folder (scripts/sample.py -l DIR)"  # said to a second session of a folder


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
                   noise: Optional[SampleNoise] = None, sampler: str = "ddim",
                   guidance: Optional[Guidance] = None, cond: Any = None,
                   make_denoiser: Optional[Callable[..., Any]] = None) -> torch.Tensor:
    """Final latents from ``x_T`` with the registry sampler ``sampler`` (``ddim_steps`` model calls, unless it is
    the every-step ancestral loop; ``eta`` where the sampler takes one, DDIM). Step noise comes from ``noise``
    (per sample), else from one generator seeded 0 (per batch). ``guidance``: mask-free anatomy guidance
    (:class:`~ldm.models.diffusion.guidance.AnatomyGuidance`) or autoguidance
    (:class:`~ldm.models.diffusion.autoguidance.Autoguidance`) of every step. ``cond``: the conditioning (e.g. a
    mask condition, :mod:`ldm.sampling.masks`), with its own ``make_denoiser`` for classifier-free guidance."""
    spec = sampler_spec(sampler)
    if noise is None:
        noise = generator_noise(torch.Generator(device=x_T.device).manual_seed(0))
    if guidance is not None and make_denoiser is not None:
        raise ValueError("guidance and a conditional denoiser (classifier-free guidance) steer the same denoiser; "
                         "use one of them")
    z, _ = sample_model(model, spec.name, x_T, None if spec.ddpm_loop else ddim_steps, cond=cond,
                        eta=eta if spec.takes_eta else None, noise_fn=noise,
                        make_denoiser=make_denoiser if guidance is None else guidance.denoiser)
    return z


def check_sampling_settings(num_samples: int, batch_size: int, ddim_steps: int, eta: float, sampler: str = "ddim",
                            vanilla: bool = False, anatomy_guidance: float = 0.0) -> str:
    """Validate the settings of a sampling session without a model (a command line checks them before loading);
    returns the sampler's registry name."""
    spec = sampler_spec("ancestral" if vanilla else sampler)
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"-n and --batch_size must be >= 1, got {num_samples} and {batch_size}")
    if not spec.ddpm_loop and ddim_steps < 1:
        raise ValueError(f"-c (sampler steps) must be >= 1, got {ddim_steps}")
    if not math.isfinite(eta) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"-e (DDIM eta) must be a number in [0, 1] (0: deterministic, 1: DDPM-like), got {eta}")
    if not vanilla and not spec.takes_eta and eta != 0:
        raise ValueError(f"--sampler {spec.name} takes no eta; eta applies to DDIM only (got -e {eta})")
    check_guidance_scale(anatomy_guidance)
    return spec.name


def check_output_dir(out_dir: str) -> None:
    """Refuse an output folder that cannot be one (a file, below a file, not writable), whose ``samples.json``
    is damaged or that another live session holds (its lock), before any model is loaded."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"output folder {out_dir} is a file; pass a folder with -l (it is created if missing)")
    parent = os.path.abspath(out_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"output folder {out_dir} cannot be created: {parent} is a file; pass another -l folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {out_dir}: {parent} is not writable; pass another -l folder")
    if os.path.isdir(out_dir):
        check_unlocked(out_dir, advice=LOCK_ADVICE)
        read_manifest(out_dir)


@torch.no_grad()
@torch.no_grad()
def draw_batch(model: torch.nn.Module, indices: Sequence[int], seed: int, ddim_steps: int, eta: float = 0.0,
               sampler: str = "ddim", guidance: Optional[Guidance] = None, masks: bool = False,
               timers: Optional[Sequence["Timer"]] = None, cond: Any = None,
               make_denoiser: Optional[Callable[..., Any]] = None) -> dict[str, Optional[torch.Tensor]]:
    """The samples ``indices`` of ``seed`` in memory, as :func:`generate` draws them (the weights in use: wrap the
    call in ``model.ema_scope()`` for EMA): ``{"latents": [B, c, h, w], "images": [B, C, H, W] (decoded, not
    clamped), "masks": [B, H, W] int64 with ``masks`` (anatomical or joint models), else None}``. ``timers``: the
    sampling and the decoding timers. ``cond``/``make_denoiser``: a condition of these samples and the denoiser
    that reads it (:func:`ldm.sampling.masks.sample_from_masks`)."""
    from contextlib import nullcontext

    sample_timer, decode_timer = timers if timers is not None else (nullcontext(), nullcontext())
    device = next(model.parameters()).device
    x_T = initial_noise(latent_shape(model), seed, indices, device=device)
    with sample_timer:
        z = sample_latents(model, x_T, ddim_steps, eta, SampleNoise(seed, indices), sampler=sampler,
                           guidance=guidance, cond=cond, make_denoiser=make_denoiser)
    with decode_timer:
        if masks:
            decoded = model.decode_with_anatomy(z)
            return {"latents": z, "images": decoded["images"], "masks": decoded["masks"]}
        return {"latents": z, "images": model.decode_first_stage(z), "masks": None}


def _sample_batch(model: torch.nn.Module, indices: Sequence[int], seed: int, ddim_steps: int, eta: float,
                  sampler: str, guidance: Optional[Guidance], save_masks: bool,
                  timers: Sequence["Timer"]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Images ``[B, C, H, W]`` (and masks) of the samples ``indices`` (:func:`draw_batch`); refuses non-finite
    images."""
    drawn = draw_batch(model, indices, seed, ddim_steps, eta, sampler, guidance, save_masks, timers)
    images, masks = drawn["images"], drawn["masks"]
    finite = torch.isfinite(images.flatten(1)).all(dim=1)
    if not bool(finite.all()):
        bad = [int(i) for i, ok in zip(indices, finite.tolist()) if not ok]
        raise ValueError(f"samples {bad[:10]} came out non-finite (NaN/Inf) and were not written: the checkpoint "
                         "holds non-finite weights, or the settings (-e, -c) broke the sampler")
    return images, masks


def sample_images(model: torch.nn.Module, num_samples: int, ddim_steps: int = 50, eta: float = 0.0, seed: int = 0,
                  sampler: str = "ddim", use_ema: bool = True, start_index: int = 0, batch_size: Optional[int] = None,
                  masks: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Samples ``start_index .. start_index + num_samples - 1`` as ``[N, C, H, W]`` in ``[-1, 1]``, the same
    images :func:`generate` (``scripts/sample.py``) writes for this seed and these settings; with ``masks``
    (anatomical and joint models) ``(images, masks [N, H, W])``."""
    from contextlib import nullcontext

    size = batch_size or num_samples
    sampler = check_sampling_settings(num_samples, size, ddim_steps, eta, sampler)
    if masks and not (is_anatomical(model) or is_joint(model)):
        raise ValueError(f"masks=True needs an anatomical or joint model; got a {type(model).__name__}")
    with_masks = bool(masks) or is_joint(model)  # a joint model's latents decode through its mask path
    indices = list(range(start_index, start_index + num_samples))
    ema = model.ema_scope("sampling") if use_ema and getattr(model, "use_ema", False) else nullcontext()
    timers = (Timer(), Timer())
    with ema:
        out = [_sample_batch(model, indices[k:k + size], seed, ddim_steps, eta, sampler, None, with_masks, timers)
               for k in range(0, num_samples, size)]
    images = torch.cat([o[0] for o in out])
    return (images, torch.cat([o[1] for o in out])) if masks else images


def generate(model: torch.nn.Module, out_dir: str, num_samples: int, batch_size: int, ddim_steps: int = 50,
             eta: float = 0.0, seed: int = 0, vanilla: bool = False, use_ema: bool = True, save_masks: bool = False,
             formats: Sequence[str] = ("png",), colours: Optional[Sequence[Sequence[int]]] = None,
             progress: bool = True, sampler: str = "ddim", anatomy_guidance: float = 0.0,
             geometry: Optional[SampleGeometry] = None, hu: bool = False, stack: bool = False,
             manifest_info: Optional[dict[str, Any]] = None,
             on_batch: Optional[Callable[[], Any]] = None,
             autoguidance: Optional[Autoguidance] = None) -> dict[str, Any]:
    """Sample ``num_samples`` more images into ``out_dir``, continuing its numbering; returns the session record.

    ``sampler`` is a registry name (``ddim``, ``dpmpp2m``, ``ancestral``; ``vanilla`` means ``ancestral``, with
    any ``eta`` ignored as CompVis). Sample ``i`` starts from noise seeded by ``(seed, i)`` and its step noise
    (DDIM with ``eta > 0``, ancestral) is drawn per sample too, so a sample is the same whatever the batch size and
    whether the run was resumed. Anatomical models with ``save_masks`` also write each sample's predicted mask;
    joint models always write their generated masks (same layout; ``mask_source: joint`` in the record).
    ``anatomy_guidance`` > 0 (anatomical models) steers every step with the model's own segmentation head
    (:mod:`ldm.models.diffusion.guidance`); 0 samples exactly as without it. The record's ``timings`` hold the
    sampling time per step (``sampling_per_step_s``) and, when guided, ``guidance`` its calls and energies.
    ``autoguidance`` (:class:`~ldm.models.diffusion.autoguidance.Autoguidance` of this model) guides every step
    with a weaker model (not together with ``anatomy_guidance``); the record's ``autoguidance`` holds its weight and
    guide.

    Files are written atomically (:mod:`ldm.sample_io`); samples an interrupted session left incomplete are
    redone first (``redone`` in the record). When the folder's last session was interrupted (Ctrl-C, a full disk,
    a kill) and this one has the same ``num_samples`` and settings, it is the same command run again: it finishes
    that session (``resumes``: its id; ``count``: the samples still missing) instead of adding ``num_samples`` more,
    so the folder ends with the count that was asked for (:func:`resumable_session`). NIfTI files (``formats``
    with ``nii``; ``hu`` and ``stack`` imply it) use ``geometry`` (:mod:`ldm.sample_geometry`; default 1 mm RAS+),
    ``hu`` writes CT samples in HU and ``stack`` also writes every complete sample of the folder as one volume. With ``manifest_info`` (the ``info``
    of :func:`load_model_for_sampling`) the session is recorded in ``samples.json`` as it starts and as it ends.
    ``on_batch`` is called after every batch (``scripts/sample.py``: the CPU thread governor's step).

    One session writes into a folder at a time: the session holds ``out_dir/.lock`` (:mod:`ldm.folder_lock`) from
    reading the folder to its last write, and a second one stops before reading it with
    :class:`~ldm.folder_lock.FolderLockedError` naming the holder; the lock of a killed session is taken over.
    """
    sampler, guidance_scale, guidance, save_masks, formats, geometry = _check_generate_settings(
        model, num_samples, batch_size, ddim_steps, eta, sampler, vanilla, anatomy_guidance, save_masks, formats,
        geometry, hu, stack, autoguidance)
    check_output_dir(out_dir)
    with FolderLock(out_dir, purpose="sampling", advice=LOCK_ADVICE):  # one session per folder at a time
        manifest, complete, redo, start = _scan_folder(out_dir, formats, save_masks, geometry, hu, stack)
        run = _session_record(model, seed, sampler, ddim_steps, eta, guidance_scale, use_ema, batch_size, start,
                              num_samples, redo, save_masks, formats, hu, geometry)
        run["autoguidance"] = None if autoguidance is None else {"weight": autoguidance.weight,
                                                                 "guide": autoguidance.description,
                                                                 "guide_ema": autoguidance.guide_ema}
        _resume_unfinished(out_dir, manifest.get("sessions", []), run, complete, redo)
        todo = redo + list(range(start, start + run["count"]))
        if manifest_info is not None:
            begin_session(out_dir, manifest_info, run)
        timers = _write_batches(model, out_dir, todo, run, seed, ddim_steps, eta, sampler, guidance, save_masks,
                                formats, colours, geometry, hu, progress, on_batch)
        if stack:
            complete, _, _ = scan_samples(out_dir, formats, save_masks, read_manifest(out_dir).get("sessions", []))
            run["stack"] = write_stack(out_dir, complete, geometry, save_masks)
        run.update({"timings": _session_timings(timers, len(todo), batch_size, sampler, ddim_steps,
                                                model.alphas_cumprod),
                    "guidance": None if guidance is None else guidance.summary()})
        if manifest_info is not None:
            if "load_s" in manifest_info:
                run["timings"]["load_s"] = manifest_info["load_s"]
            end_session(out_dir, run)
        return run


def _check_generate_settings(model: torch.nn.Module, num_samples: int, batch_size: int, ddim_steps: int, eta: float,
                             sampler: str, vanilla: bool, anatomy_guidance: float, save_masks: bool,
                             formats: Sequence[str], geometry: Optional[SampleGeometry], hu: bool, stack: bool,
                             autoguidance: Optional[Autoguidance] = None
                             ) -> tuple[str, float, Optional[Guidance], bool, list[str], SampleGeometry]:
    """:func:`generate`'s settings checked against the model: ``(sampler, guidance scale, guidance or None,
    save_masks, formats, geometry)``, masks on for joint models, ``nii`` added for ``hu``/``stack``."""
    sampler = check_sampling_settings(num_samples, batch_size, ddim_steps, eta, sampler, vanilla, anatomy_guidance)
    guidance_scale = check_guidance_scale(anatomy_guidance, model)
    guidance: Optional[Guidance] = AnatomyGuidance(model, guidance_scale) if guidance_scale > 0 else None
    if autoguidance is not None:
        if guidance is not None:
            raise ValueError("anatomy guidance and autoguidance steer the same denoiser; use one of them")
        if autoguidance.model is not model:
            raise ValueError("the autoguidance was built for another model than the one sampled")
        guidance = autoguidance
    save_masks = bool(save_masks) or is_joint(model)
    if save_masks and not (is_anatomical(model) or is_joint(model)):
        raise ValueError("--save_masks needs an anatomical model (AnatomicalUNetModel with registers); this run is "
                         f"a {type(model).__name__} with {type(model.unet).__name__}")
    formats = list(dict.fromkeys([*formats, *(["nii"] if hu or stack else [])]))
    geometry = geometry or SampleGeometry()
    if hu:
        geometry.check_hu()
    return sampler, guidance_scale, guidance, save_masks, formats, geometry


def _session_record(model: torch.nn.Module, seed: int, sampler: str, ddim_steps: int, eta: float,
                    guidance_scale: float, use_ema: bool, batch_size: int, start: int, num_samples: int,
                    redo: list[int], save_masks: bool, formats: list[str], hu: bool,
                    geometry: SampleGeometry) -> dict[str, Any]:
    """The record of a new session writing ``num_samples`` from ``start`` (and redoing ``redo``), as it starts."""
    import uuid

    ancestral = sampler_spec(sampler).ddpm_loop
    use_ema = bool(use_ema and getattr(model, "use_ema", False))
    return {
        "id": uuid.uuid4().hex[:12], "seed": seed, "sampler": sampler,
        "ddim_steps": None if ancestral else ddim_steps,
        "eta": None if ancestral else eta, "vanilla_sample": ancestral, "anatomy_guidance": guidance_scale,
        "ema": use_ema, "batch_size": batch_size, "start_index": start, "count": num_samples, "redone": redo,
        "requested": num_samples, "ends_at": start + num_samples,
        "masks": bool(save_masks),
        "mask_source": ("joint" if is_joint(model) else "segmentation_head") if save_masks else None,
        # what the segmentation head read: the sampled latents or the decoded samples encoded again
        "mask_from": getattr(model, "mask_from", None) if save_masks and not is_joint(model) else None,
        "formats": formats, "hu": bool(hu), "geometry": geometry.to_dict() if "nii" in formats else None,
        "device": str(next(model.parameters()).device), "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _write_batches(model: torch.nn.Module, out_dir: str, todo: list[int], run: dict[str, Any], seed: int,
                   ddim_steps: int, eta: float, sampler: str, guidance: Optional[Guidance], save_masks: bool,
                   formats: list[str], colours: Optional[Sequence[Sequence[int]]], geometry: SampleGeometry,
                   hu: bool, progress: bool, on_batch: Optional[Callable[[], Any]]) -> tuple[Timer, Timer, Timer]:
    """Sample and write the samples ``todo`` in batches of ``run["batch_size"]`` (EMA weights when ``run["ema"]``);
    fills ``run["geometry"]``'s grid from the first batch; returns the sampling, decoding and writing timers."""
    from contextlib import nullcontext

    from tqdm import tqdm

    ancestral = sampler_spec(sampler).ddpm_loop
    batch_size = run["batch_size"]
    timer_sample, timer_decode, timer_write = Timer(), Timer(), Timer()
    ema = model.ema_scope("sampling") if run["ema"] else nullcontext()
    bar = tqdm(total=len(todo), desc="sampling", unit="img", disable=not progress)
    with ema, torch.no_grad():
        for k in range(0, len(todo), batch_size):
            indices = todo[k:k + batch_size]
            images, masks = _sample_batch(model, indices, seed, ddim_steps, 0.0 if ancestral else eta, sampler,
                                          guidance, save_masks, (timer_sample, timer_decode))
            with timer_write:
                save_samples(out_dir, indices, images, masks, formats, colours, geometry, hu)
            if run["geometry"] is not None and "affine" not in run["geometry"]:
                run["geometry"] = geometry.to_dict(_canonical_shape(images.shape[-2:], geometry.slice_axis))
            bar.update(len(indices))
            if on_batch is not None:
                on_batch()
    bar.close()
    return timer_sample, timer_decode, timer_write


def palette_for(model: torch.nn.Module) -> np.ndarray:
    """Mask preview colours of the model's label set (``label_set`` in its config; generic colours without one)."""
    from ldm.data.labels import label_set_of

    return label_set_of(model, getattr(getattr(model, "unet", None), "num_anatomical_classes", None)).palette()
