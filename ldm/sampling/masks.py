"""Sampling from a labelmap: images for given (partial) masks from a mask-conditioned model
(``LatentDiffusion(mask_condition=...)``, :mod:`ldm.modules.mask_condition`), with classifier-free guidance.

    from ldm.sampling import load_model_for_sampling
    from ldm.sampling.masks import sample_from_masks
    model, _ = load_model_for_sampling("logs/<run>")
    images = sample_from_masks(model, masks, ddim_steps=50, guidance_scale=1.0)   # masks [N, H, W], 255 = unknown

Guidance scale ``s``: ``eps = eps_uncond + s (eps_cond - eps_uncond)`` (Ho & Salimans 2022); 1 is the conditional
model alone (one model call per step), 0 the unconditional model (no condition is passed: the same numbers as
sampling the checkpoint without a mask), anything else two calls per step.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ldm.modules.mask_condition import MASK_CONDITION_KEY
from ldm.util import nonnegative_number


def check_guidance_scale(scale: Any) -> float:
    """``scale`` as a float; ValueError unless finite and >= 0."""
    return nonnegative_number(scale, "guidance_scale", " (1: conditional, 0: unconditional)")


def check_autoguided_scale(scale: float) -> None:
    """ValueError unless ``scale`` is 1 (from the masks) or 0 (unconditional): autoguidance takes the place of
    classifier-free guidance."""
    if scale not in (0.0, 1.0):
        raise ValueError(f"autoguidance takes the place of classifier-free guidance: guidance scale 1 (from the "
                         f"masks) or 0 (unconditional), not {scale:g}")


def mask_condition_of(model: torch.nn.Module):
    """The model's :class:`~ldm.modules.mask_condition.MaskCondition`, or a ValueError for a model without one."""
    condition = getattr(model, "mask_condition", None)
    if condition is None:
        raise ValueError(f"sampling from masks needs a mask-conditioned model (model.params.mask_condition and the "
                         f"UNet's mask_condition_classes); this {type(model).__name__} has no mask condition")
    return condition


def as_mask_batch(masks: Any, num_classes: int, ignore_index: int) -> torch.Tensor:
    """``masks`` (array or tensor ``[N, H, W]`` or one ``[H, W]``) as int64 ``[N, H, W]``; labels outside
    ``0..C-1`` other than ``ignore_index`` (unknown) and non-integer values are an error."""
    array = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or 0 in array.shape:
        raise ValueError(f"masks must be [N, H, W] (or one [H, W]) label maps, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise ValueError("masks must hold integer class labels")
    out = torch.from_numpy(array.astype(np.int64))
    bad = (out != ignore_index) & ((out < 0) | (out >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"masks hold labels {sorted(out[bad].unique().tolist())[:10]} outside 0..{num_classes - 1}; "
                         f"mark unknown pixels with {ignore_index}")
    return out


def conditional_denoiser(model: torch.nn.Module, guidance_scale: float, uncond: Any) -> Callable[..., Any]:
    """``make_denoiser(cond, clip_denoised=, noise_cond=)`` of the model's denoiser with classifier-free guidance at
    ``guidance_scale`` against the condition ``uncond``."""
    def make(cond: Any, clip_denoised: bool = False, noise_cond: bool = False) -> Any:
        return model.denoiser(cond, guidance_scale, uncond, clip_denoised=clip_denoised, noise_cond=noise_cond)
    return make


@torch.no_grad()
def sample_from_masks(model: torch.nn.Module, masks: Any, ddim_steps: int = 50, eta: float = 0.0, seed: int = 0,
                      guidance_scale: float = 1.0, per_mask: int = 1, batch_size: Optional[int] = None,
                      sampler: str = "ddim", use_ema: bool = True, return_masks: bool = False,
                      first_index: int = 0, autoguidance: Any = None,
                      noise_indices: Optional[Sequence[int]] = None) -> Any:
    """Images ``[N * per_mask, C, H, W]`` (in [-1, 1], not clamped) for the label maps ``masks`` ``[N, H, W]``
    (``ignore_index`` = unknown: a partial mask), ``per_mask`` samples each (sample ``i`` is mask ``i // per_mask``,
    from the start noise of ``(seed, first_index + i)``, or of ``(seed, noise_indices[i])``). With ``return_masks``
    (anatomical models) also the model's own predicted masks of the samples (its head reads the sample, not the
    condition): ``(images, predicted)``.
    ``autoguidance`` (an :class:`~ldm.models.diffusion.autoguidance.Autoguidance` of this model, e.g. by an earlier
    checkpoint of its run) guides the conditional model by the guide given the same mask, in place of
    classifier-free guidance (``guidance_scale`` 1; 0: both unconditional)."""
    from ldm.sampling import check_sampling_settings, draw_batch, is_anatomical, latent_shape

    condition = mask_condition_of(model)
    scale = check_guidance_scale(guidance_scale)
    if autoguidance is not None:
        check_autoguided_scale(scale)
        if autoguidance.model is not model:
            raise ValueError("the autoguidance was made for another model than the one sampled")
        mask_condition_of(autoguidance.guide)  # the guide must read the same condition
    if int(per_mask) < 1:
        raise ValueError(f"per_mask must be >= 1, got {per_mask}")
    labels = as_mask_batch(masks, condition.num_classes, condition.ignore_index)
    total = labels.shape[0] * int(per_mask)
    noise = list(range(first_index, first_index + total)) if noise_indices is None else [int(i) for i in noise_indices]
    if len(noise) != total:
        raise ValueError(f"noise_indices has {len(noise)} entries for {total} samples")
    size = int(batch_size or total)
    sampler = check_sampling_settings(total, size, ddim_steps, eta, sampler)
    if return_masks and not is_anatomical(model):
        raise ValueError(f"return_masks needs an anatomical model; got a {type(model).__name__}")
    device = next(model.parameters()).device
    grid = latent_shape(model)[1:]
    ema = model.ema_scope("sampling") if use_ema and getattr(model, "use_ema", False) else nullcontext()
    images, predicted = [], []
    with ema:
        for first in range(0, total, size):
            indices = list(range(first, min(total, first + size)))
            batch_masks = labels[[i // int(per_mask) for i in indices]].to(device)
            cond = None if scale == 0 else condition.condition(batch_masks, grid)
            make = None if autoguidance is None else autoguidance.denoiser
            if cond is not None and scale != 1.0:
                make = conditional_denoiser(model, scale,
                                            {MASK_CONDITION_KEY: torch.zeros_like(cond[MASK_CONDITION_KEY])})
            drawn = draw_batch(model, [noise[i] for i in indices], seed, ddim_steps, eta, sampler,
                               masks=return_masks, cond=cond, make_denoiser=make)
            images.append(drawn["images"])
            if return_masks:
                predicted.append(drawn["masks"])
    out = torch.cat(images)
    return (out, torch.cat(predicted)) if return_masks else out


# ---------------------------------------------------------------------------------------------- files
MASK_SUFFIXES = (".png", ".npy")
CONDITION_DIR = "condition_masks"
RECORD = "from_masks.json"
PARTIAL_DIR = ".volume_slices"  # a label-volume session's float images per mask until the volumes are written
#: what a session must share with the folder's earlier one to finish it (``write_from_masks``'s resume)
RESUME_SETTINGS = ("names", "masks_sha256", "per_mask", "seed", "sampler", "ddim_steps", "eta", "guidance_scale",
                   "ema", "own_masks", "formats", "hu", "checkpoint_sha256", "autoguidance_key", "volume_source")


def read_mask_files(path: str) -> tuple[list[str], np.ndarray]:
    """``(names, masks [N, H, W] int64)`` of a mask file (``.png`` class ids, ``.npy`` ``[H, W]`` or ``[N, H, W]``) or
    a folder of them (sorted by name; an ``.npy`` stack gives ``<stem>_<i>``). All masks must share one size."""
    import os

    from ldm.data.io import read_mask_2d

    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(MASK_SUFFIXES))
        if not files:
            raise ValueError(f"--masks {path}: no {'/'.join(MASK_SUFFIXES)} mask files in the folder")
    elif os.path.isfile(path):
        if not path.lower().endswith(MASK_SUFFIXES):
            raise ValueError(f"--masks {path}: a mask must be a {' or '.join(MASK_SUFFIXES)} file of class ids, or "
                             "one NIfTI label volume (.nii / .nii.gz)")
        files = [path]
    else:
        raise FileNotFoundError(f"--masks {path}: no such file or folder")
    names, arrays = [], []
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        if f.lower().endswith(".npy"):  # [H, W] or a stack [N, H, W]
            try:
                array = np.load(f, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise ValueError(f"--masks: {f} is not a readable .npy ({err})") from None
        else:
            array = read_mask_2d(f)  # single-channel (or gray) PNG of class ids; a colour one is an error
        stack = array[None] if array.ndim == 2 else array
        if stack.ndim != 3:
            raise ValueError(f"--masks: {f} has shape {array.shape}; expected [H, W] or [N, H, W]")
        arrays.extend(stack)
        names.extend([stem] if array.ndim == 2 else [f"{stem}_{i}" for i in range(len(stack))])
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--masks: several files give the mask names {repeated[:5]}; rename them")
    sizes = sorted({a.shape for a in arrays})
    if len(sizes) > 1:
        raise ValueError(f"--masks: the masks have different sizes {sizes[:4]}")
    return names, np.stack(arrays)


DATA_PREFIX = "data:"


def is_dataset_masks(spec: str) -> bool:
    """Whether ``--masks`` names the run's own data (``data:SPLIT[:N]``) rather than files."""
    return str(spec).startswith(DATA_PREFIX)


def read_dataset_masks(config: Any, spec: str, progress: bool = False) -> tuple[list[str], np.ndarray]:
    """``(names, masks [N, H, W])`` of ``data:SPLIT[:N]``: the labelmaps of the run config's data split ``SPLIT``
    (``data.params.<SPLIT>``, built as in training, so sliced, resampled and label-mapped as the model saw them),
    the first ``N`` items that have a mask (all without ``N``), named ``<SPLIT>_<index:05d>`` by dataset index."""
    from tqdm import tqdm

    from ldm.sampling.run import resolve_config
    from ldm.util import instantiate_from_config

    parts = spec[len(DATA_PREFIX):].split(":")
    split, count = parts[0], None
    if len(parts) > 2 or not split or (len(parts) == 2 and not parts[1].isdigit()) or \
            (len(parts) == 2 and int(parts[1]) < 1):
        raise ValueError(f"--masks {spec}: expected data:SPLIT or data:SPLIT:N (N >= 1), e.g. data:validation:16")
    if len(parts) == 2:
        count = int(parts[1])
    data = ((resolve_config(config) or {}).get("data") or {}).get("params") or {}
    splits = sorted(k for k, v in data.items() if isinstance(v, dict) and "target" in v)
    if split not in splits:
        raise ValueError(f"--masks {spec}: the run's config has no data split {split!r}"
                         f" (it has {', '.join(splits) if splits else 'no data section'})")
    dataset = instantiate_from_config(data[split])
    names, masks = [], []
    bar = tqdm(total=count or len(dataset), desc=f"reading {split} masks", unit="mask", disable=not progress)
    for index in range(len(dataset)):
        item = dataset[index]
        if item.get("segmentation") is None or not bool(item.get("has_segmentation", True)):
            continue
        mask = item["segmentation"]
        masks.append(np.asarray(mask.numpy() if hasattr(mask, "numpy") else mask).astype(np.int64))
        names.append(f"{split}_{index:05d}")
        bar.update(1)
        if count is not None and len(names) == count:
            break
    bar.close()
    if not masks:
        raise ValueError(f"--masks {spec}: the {split} split ({len(dataset)} items) has no item with a mask")
    return names, np.stack(masks)


def model_image_size(model: torch.nn.Module) -> tuple[int, int]:
    """``(H, W)`` of the model's images: its latent size times the first stage's factor."""
    from ldm.sampling import latent_shape
    from ldm.training.fit_checks import first_stage_factor

    h, w = latent_shape(model)[1:]
    factor = first_stage_factor(model) or 1
    return h * factor, w * factor


def check_mask_size(model: torch.nn.Module, masks: np.ndarray) -> None:
    """ValueError unless the masks have the size of the model's images (latent size x the first stage's factor)."""
    expected = model_image_size(model)
    if tuple(masks.shape[1:]) != expected:
        raise ValueError(f"the masks are {masks.shape[1]}x{masks.shape[2]}, the model draws {expected[0]}x"
                         f"{expected[1]} images; give masks of the training images' size")


def sample_files(name: str, per_mask: int, formats: Any, save_masks: bool, volume: bool = False) -> list[str]:
    """The files (relative to the folder) one mask's samples have when complete; the image PNGs last, as written."""
    image_ext = [e for e, f in ((".npz", "npz"), (".nii.gz", "nii")) if f in formats and not (volume and f == "nii")]
    mask_ext = [".png"] + ([".nii.gz"] if "nii" in formats and not volume else [])
    files = [f"{CONDITION_DIR}/{name}.png"] + ([f"{CONDITION_DIR}/{name}.nii.gz"] if mask_ext[1:] else [])
    for k in range(per_mask):
        stem = f"{name}_{k}"
        if save_masks:
            files += [f"masks/{stem}{e}" for e in mask_ext] + [f"masks_colour/{stem}.png"]
        files += [f"images/{stem}{e}" for e in image_ext]
    if volume:
        files.append(f"{PARTIAL_DIR}/{name}.npy")
    return files + [f"images/{name}_{k}.png" for k in range(per_mask)]


def mask_complete(out_dir: str, name: str, per_mask: int, formats: Any, save_masks: bool, volume: bool = False,
                  staged: bool = True) -> bool:
    """Whether every file of one mask's samples (:func:`sample_files`) is in ``out_dir``; ``staged=False`` leaves out
    a label-volume session's staged float images (removed once its volumes are written)."""
    import os

    return all(os.path.isfile(os.path.join(out_dir, f)) for f in sample_files(name, per_mask, formats, save_masks, volume)
               if staged or not f.startswith(PARTIAL_DIR))


def _masks_sha256(names: list[str], labels: torch.Tensor) -> str:
    import hashlib

    digest = hashlib.sha256("\n".join(names).encode())
    digest.update(np.ascontiguousarray(labels.numpy().astype(np.int64)).tobytes())
    return digest.hexdigest()


def folder_holds_session(out_dir: str) -> bool:
    """Whether ``out_dir`` is empty (but for a lock) or holds an earlier sampling-from-masks session to finish."""
    import os

    from ldm.folder_lock import LOCK_NAME

    if not os.path.isdir(out_dir):
        return True
    return not (set(os.listdir(out_dir)) - {LOCK_NAME}) or os.path.isfile(os.path.join(out_dir, RECORD))


def check_from_masks_folder(out_dir: str) -> None:
    """ValueError unless ``out_dir`` is new, empty or an earlier sampling-from-masks session (to finish)."""
    if not folder_holds_session(out_dir):
        raise ValueError(f"output folder {out_dir} is not empty and holds no {RECORD}: sampling from masks writes into "
                         "a new folder (or finishes its own interrupted session there)")


def _earlier_session(out_dir: str, settings: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The folder's earlier record when it is this session run again (same settings), None for a new folder; a
    ValueError naming what differs otherwise."""
    import json
    import os

    check_from_masks_folder(out_dir)
    path = os.path.join(out_dir, RECORD)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            earlier = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is damaged ({err}); sample into a new folder") from None
    differ = [k for k in RESUME_SETTINGS if earlier.get("settings", {}).get(k) != settings[k]]
    if differ:
        shown = ", ".join(f"{k} {earlier.get('settings', {}).get(k)!r} there, {settings[k]!r} now"
                          for k in differ if k not in ("names", "masks_sha256"))
        what = "other masks" if {"names", "masks_sha256"} & set(differ) else ""
        raise ValueError(f"{out_dir} holds a sampling-from-masks session with {' and '.join(filter(None, [what, shown]))}"
                         f"; run the same command to finish it, or sample into a new folder")
    return earlier


def masks_complete(out_dir: str) -> tuple[int, int]:
    """``(complete, total)`` masks of the sampling-from-masks session recorded in ``out_dir`` (``(0, 0)`` without
    a readable record)."""
    import json
    import os

    try:
        with open(os.path.join(out_dir, RECORD)) as f:
            record = json.load(f)
        settings = record["settings"]
    except (OSError, ValueError, KeyError):
        return 0, 0
    volume = settings.get("volume_source") is not None
    done = sum(mask_complete(out_dir, n, settings["per_mask"], settings["formats"], settings["own_masks"], volume)
               for n in settings["names"])
    return done, len(settings["names"])


def write_from_masks(model: torch.nn.Module, out_dir: str, names: list[str], masks: np.ndarray, per_mask: int,
                     ddim_steps: int, eta: float, seed: int, guidance_scale: float, batch_size: int, sampler: str,
                     use_ema: bool, save_masks: bool, colours: Any = None, info: Optional[dict] = None,
                     progress: bool = True, volume: Optional[dict[str, Any]] = None,
                     autoguidance: Any = None, formats: Any = ("png",), geometry: Any = None,
                     hu: bool = False) -> dict[str, Any]:
    """Sample ``per_mask`` images for every mask into ``out_dir``: ``images/<name>_<k>.png``, the mask each was made
    from (``condition_masks/``, class ids; unknown = the ignore value) and with ``save_masks`` the model's own masks
    (``masks/``, ``masks_colour/``); ``from_masks.json`` records the settings, the files and the session's state.

    ``formats`` adds ``npz`` (the float image in [-1, 1], the own mask) and ``nii`` (per sample: the image, its
    condition and own masks as NIfTI in ``geometry``, :class:`~ldm.sample_geometry.SampleGeometry`, default 1 mm);
    ``hu`` writes CT images in Hounsfield units (``geometry``'s window inverted). ``volume`` (``{"affine",
    "slice_axis", "source"}``: the masks are the slices of a label volume) writes the samples, the condition and own
    masks as volumes on that grid instead of per-sample NIfTI files
    (:func:`ldm.sampling.label_volumes.write_volumes`).

    The folder is new, or holds this session interrupted: run again with the same settings and masks, it keeps the
    masks whose files are all there, redoes the rest (each sample's start noise depends on its index only) and
    ends complete; other settings are a ValueError naming them. ``autoguidance``: see :func:`sample_from_masks`
    (recorded with its weight, guide and calls)."""
    import os
    import time

    from tqdm import tqdm

    from ldm.atomic_io import write_json
    from ldm.folder_lock import FolderLock
    from ldm.sample_geometry import SampleGeometry
    from ldm.sample_io import _SAMPLE_FILE_RE, _save_png, remove_temporary_files, save_nifti, save_samples

    condition = mask_condition_of(model)
    labels = as_mask_batch(masks, condition.num_classes, condition.ignore_index)
    check_mask_size(model, masks)
    formats = list(dict.fromkeys(["png", *formats, *(["nii"] if hu and volume is None else [])]))
    geometry = geometry or SampleGeometry()
    if hu:
        geometry.check_hu()
    settings = {"names": list(names), "masks_sha256": _masks_sha256(list(names), labels), "per_mask": per_mask,
                "seed": seed, "sampler": sampler, "ddim_steps": ddim_steps, "eta": eta,
                "guidance_scale": guidance_scale, "ema": use_ema, "own_masks": save_masks, "formats": formats,
                "hu": bool(hu), "checkpoint_sha256": (info or {}).get("checkpoint_sha256"),
                "autoguidance_key": None if autoguidance is None else [autoguidance.weight, autoguidance.description],
                "volume_source": None if volume is None else volume["source"]}
    with FolderLock(out_dir, purpose="sampling from masks", advice="sample into another folder"):
        earlier = _earlier_session(out_dir, settings)
        if earlier is not None and earlier.get("status") == "complete":
            return {**earlier, "already_complete": True}
        remove_temporary_files(out_dir)
        for sub in ("images", "masks", "masks_colour"):  # numbered files of a batch interrupted before renaming
            folder = os.path.join(out_dir, sub)
            for f in os.listdir(folder) if os.path.isdir(folder) else []:
                if _SAMPLE_FILE_RE.match(f):
                    os.remove(os.path.join(folder, f))
        done = [m for m, name in enumerate(names)
                if mask_complete(out_dir, name, per_mask, formats, save_masks, volume is not None)]
        todo = sorted(set(range(len(names))) - set(done))
        record: dict[str, Any] = {
            "status": "started", "masks": len(names), "per_mask": per_mask, "seed": seed, "sampler": sampler,
            "ddim_steps": ddim_steps, "eta": eta, "guidance_scale": guidance_scale, "ema": use_ema,
            "own_masks": save_masks, "formats": formats, "hu": bool(hu),
            "geometry": geometry.to_dict() if "nii" in formats and volume is None else None,
            "ignore_index": condition.ignore_index,
            "files": [{"mask": n, "images": [f"{n}_{k}" for k in range(per_mask)]} for n in names],
            "checkpoint": (info or {}).get("checkpoint"), "checkpoint_sha256": settings["checkpoint_sha256"],
            "config": (info or {}).get("config"), "config_files": (info or {}).get("config_files"),
            "mask_source": "condition", "volumes": None, "autoguidance": None, "settings": settings,
            "resumed": None if earlier is None else {"kept_masks": len(done), "redone_masks": len(todo)}}
        write_json(os.path.join(out_dir, RECORD), record)
        for sub in (CONDITION_DIR,) + ((PARTIAL_DIR,) if volume is not None else ()):
            os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
        start = time.perf_counter()
        step = max(1, batch_size // per_mask)
        bar = tqdm(total=len(todo) * per_mask, desc="sampling from masks", unit="img", disable=not progress)
        for first in range(0, len(todo), step):
            chunk = todo[first:first + step]
            drawn = sample_from_masks(model, labels[chunk], ddim_steps, eta, seed, guidance_scale, per_mask,
                                      sampler=sampler, use_ema=use_ema, return_masks=save_masks,
                                      autoguidance=autoguidance,
                                      noise_indices=[m * per_mask + k for m in chunk for k in range(per_mask)])
            images, own = drawn if save_masks else (drawn, None)
            for m in chunk:
                _save_png(os.path.join(out_dir, CONDITION_DIR, f"{names[m]}.png"), labels[m].numpy().astype(np.uint8))
                if "nii" in formats and volume is None:
                    cond_volume, affine = _nifti_mask(labels[m].numpy(), geometry)
                    save_nifti(os.path.join(out_dir, CONDITION_DIR, f"{names[m]}.nii.gz"), cond_volume, affine)
            numbered = list(range(len(chunk) * per_mask))
            save_samples(out_dir, numbered, images, own, [f for f in formats if not (volume and f == "nii")],
                         colours=colours, geometry=geometry, hu=hu)
            floats = images.detach().float().clamp(-1, 1).cpu().numpy()[:, 0] if volume is not None else None
            for j, m in enumerate(chunk):  # numbered files -> <mask name>_<k>; the image PNGs last
                if floats is not None:
                    np.save(os.path.join(out_dir, PARTIAL_DIR, f"{names[m]}.npy"),
                            floats[j * per_mask:(j + 1) * per_mask].astype(np.float32))
                moves = [(sub, f"{j * per_mask + k:06d}{ext}", f"{names[m]}_{k}{ext}") for k in range(per_mask)
                         for sub in (("masks", "masks_colour") if save_masks else ()) + ("images",)
                         for ext in (".nii.gz", ".npz", ".png")]
                moves.sort(key=lambda move: move[0] == "images" and move[1].endswith(".png"))  # complete when last
                for sub, source, target in moves:
                    if os.path.isfile(os.path.join(out_dir, sub, source)):
                        os.replace(os.path.join(out_dir, sub, source), os.path.join(out_dir, sub, target))
            bar.update(len(chunk) * per_mask)
        bar.close()
        if volume is not None:
            from ldm.sampling.label_volumes import write_volumes

            kept = np.concatenate([np.load(os.path.join(out_dir, PARTIAL_DIR, f"{n}.npy")) for n in names])
            own_masks = None
            if save_masks:
                from ldm.data.io import read_mask_2d

                own_masks = np.stack([read_mask_2d(os.path.join(out_dir, "masks", f"{n}_{k}.png"))
                                      for n in names for k in range(per_mask)])
            record["volumes"] = {
                "files": write_volumes(out_dir, geometry.to_hu(kept) if hu else kept, labels.numpy(),
                                       volume["affine"], volume["slice_axis"], per_mask, own_masks),
                "source": volume["source"], "slice_axis": volume["slice_axis"], "hu": bool(hu),
                "affine": np.asarray(volume["affine"]).tolist(),
                "label_map": {str(k): v for k, v in (volume.get("label_map") or {}).items()}}
            for n in names:
                os.remove(os.path.join(out_dir, PARTIAL_DIR, f"{n}.npy"))
            os.rmdir(os.path.join(out_dir, PARTIAL_DIR))
        record.update({"status": "complete", "seconds": time.perf_counter() - start,
                       "autoguidance": None if autoguidance is None else autoguidance.summary()})
        write_json(os.path.join(out_dir, RECORD), record)
    return record


def _nifti_mask(mask: np.ndarray, geometry: Any) -> tuple[np.ndarray, np.ndarray]:
    """One display-oriented condition mask as the canonical uint8 volume of a sample (unknown stays the ignore
    value) and its affine."""
    from ldm.sample_geometry import display_to_canonical

    volume = display_to_canonical(mask[None].astype(np.uint8), geometry.slice_axis)
    return volume, geometry.affine(volume.shape)
