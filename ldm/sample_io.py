"""The files of a sample folder: atomic writes, which samples are complete, and ``samples.json``.

Layout (``{index:06d}`` names)::

    images/000000.png            8-bit image (always)
    images/000000.nii.gz, .npz   on request (``formats``); NIfTI in the training data's geometry
    masks/000000.png (.nii.gz)   class ids, for models that give masks
    masks_colour/000000.png      colour preview of the mask
    stack.nii.gz, stack_masks.nii.gz   every complete sample as one volume (``stack``)
    samples.json                 checkpoint, config, geometry, one record per session
    .lock                        while a session writes: its PID, host and start time (ldm.folder_lock)

Every file is written under a hidden temporary name beside it, fsynced, checked (NIfTI files read back) and renamed
into place (:mod:`ldm.atomic_io`), so a file that exists is whole; a full disk raises
:class:`~ldm.atomic_io.WriteError` naming the file. A
sample is complete when all the files its session asked for exist (non-empty); :func:`scan_samples` finds the
incomplete ones (an interrupted session) so the next session redoes them. Sessions are recorded in
``samples.json`` when they start (``status: started``) and updated when they end (``complete``); a session that
never ended is marked ``interrupted`` by the next one.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from ldm.atomic_io import TMP_PREFIX, WriteError, atomic_write, atomic_write_stream, default_file_mode  # noqa: F401
from ldm.atomic_io import remove_staging_files, save_nifti_file, verify_json
from ldm.sample_geometry import SampleGeometry, display_to_canonical

logger = logging.getLogger(__name__)

IMAGE_DIR, MASK_DIR, MASK_COLOUR_DIR = "images", "masks", "masks_colour"
MANIFEST = "samples.json"
STACK, STACK_MASKS = "stack.nii.gz", "stack_masks.nii.gz"
_SAMPLE_FILE_RE = re.compile(r"^(\d{6,})\.(png|npz|nii\.gz)$")
_SETTINGS = ("seed", "sampler", "ddim_steps", "eta", "vanilla_sample", "ema", "anatomy_guidance")


# ----------------------------------------------------------------------------------------- atomic writes
# One helper writes every file (ldm.atomic_io): staged beside its target, fsynced, checked, renamed; a failure
# (a full disk) raises WriteError naming the file and leaves no partial file. ``atomic_write`` stays importable here.
_default_file_mode = default_file_mode


def remove_temporary_files(out_dir: str) -> int:
    """Delete leftovers of interrupted writes (hidden temporary files); returns how many."""
    return sum(remove_staging_files(os.path.join(out_dir, sub)) for sub in ("", IMAGE_DIR, MASK_DIR, MASK_COLOUR_DIR))


def _save_png(path: str, array: np.ndarray) -> None:
    from PIL import Image

    atomic_write_stream(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


def save_nifti(path: str, volume: np.ndarray, affine: np.ndarray) -> None:
    """``volume`` as a NIfTI with ``affine`` as its sform and qform (mm; integer volumes with slope 1, intercept 0),
    atomically: header and voxels are read back before the rename (:func:`ldm.atomic_io.save_nifti_file`)."""
    import nibabel as nib

    img = nib.Nifti1Image(volume, affine)
    img.set_sform(affine, code="aligned")
    img.set_qform(affine, code="aligned")
    img.header.set_xyzt_units("mm")
    if volume.dtype.kind in "iu":
        img.header.set_slope_inter(1.0, 0.0)
    save_nifti_file(path, lambda tmp: nib.save(img, tmp))  # header and voxels read back before the rename


def _save_npz(path: str, **arrays: np.ndarray) -> None:
    atomic_write_stream(path, lambda f: np.savez_compressed(f, **arrays))


# ----------------------------------------------------------------------------------------- sample files
def expected_files(index: int, formats: Iterable[str], masks: bool) -> list[str]:
    """Paths (relative to the sample folder) that make sample ``index`` complete."""
    name = f"{index:06d}"
    formats = set(formats)
    files = [f"{IMAGE_DIR}/{name}.png"]
    files += [f"{IMAGE_DIR}/{name}.npz"] if "npz" in formats else []
    files += [f"{IMAGE_DIR}/{name}.nii.gz"] if "nii" in formats else []
    if masks:
        files += [f"{MASK_DIR}/{name}.png", f"{MASK_COLOUR_DIR}/{name}.png"]
        files += [f"{MASK_DIR}/{name}.nii.gz"] if "nii" in formats else []
    return files


def present_files(out_dir: str) -> dict[int, set[str]]:
    """Sample index -> its non-empty files (relative paths) in the folder."""
    found: dict[int, set[str]] = {}
    for sub in (IMAGE_DIR, MASK_DIR, MASK_COLOUR_DIR):
        folder = os.path.join(out_dir, sub)
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            match = _SAMPLE_FILE_RE.match(name)
            if match and os.path.getsize(os.path.join(folder, name)) > 0:
                found.setdefault(int(match.group(1)), set()).add(f"{sub}/{name}")
    return found


def _session_expectations(sessions: Sequence[Mapping[str, Any]]) -> dict[int, tuple[tuple[str, ...], bool]]:
    """Index -> (formats, masks) of the last recorded session that wrote it."""
    out: dict[int, tuple[tuple[str, ...], bool]] = {}
    for s in sessions:
        indices = list(s.get("redone") or [])
        if isinstance(s.get("start_index"), int) and isinstance(s.get("count"), int):
            indices += range(s["start_index"], s["start_index"] + s["count"])
        for i in indices:
            out[int(i)] = (tuple(s.get("formats") or ("png",)), bool(s.get("masks")))
    return out


def scan_samples(out_dir: str, formats: Iterable[str] = ("png",), masks: bool = False,
                 sessions: Sequence[Mapping[str, Any]] = ()) -> tuple[list[int], list[int], int]:
    """``(complete, incomplete, next_index)`` of a sample folder.

    A sample below ``next_index`` (one past the highest index with any file) is incomplete when a file its
    session recorded in ``sessions`` asked for (else: ``formats``/``masks``) is missing or empty.
    """
    found = present_files(out_dir)
    expect = _session_expectations(sessions)
    complete, incomplete = [], []
    nxt = max(found) + 1 if found else 0
    for i in range(nxt):
        fmt, msk = expect.get(i, (tuple(formats), masks))
        if found.get(i, set()) >= set(expected_files(i, fmt, msk)):
            complete.append(i)
        else:
            incomplete.append(i)
    return complete, incomplete, nxt


def next_index(out_dir: str) -> int:
    """First sample index after every sample with a file in ``out_dir`` (a new session continues there)."""
    return scan_samples(out_dir)[2]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, C, H, W]`` in ``[-1, 1]`` -> ``[B, H, W]`` (C == 1) or ``[B, H, W, C]`` uint8."""
    arr = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).cpu().numpy()
    arr = arr.transpose(0, 2, 3, 1)
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def _colourise(mask: np.ndarray, colours: Optional[Sequence[Sequence[int]]]) -> np.ndarray:
    from ldm.data.labels import colourise

    return colourise(mask, colours) if colours is not None else colourise(mask)


def nifti_volumes(image: np.ndarray, mask: Optional[np.ndarray], geometry: SampleGeometry,
                  hu: bool = False) -> tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
    """One display-oriented sample (``H, W`` float in [-1, 1]; ``mask`` ``H, W``) -> canonical volumes (a single
    slice along the geometry's slice axis; HU with ``hu``), mask as uint8, and their affine."""
    if image.ndim != 2:
        raise ValueError(f"NIfTI output needs one-channel images; got an image of shape {image.shape}")
    axis = geometry.slice_axis
    volume = display_to_canonical(image[None].astype(np.float32), axis)
    if hu:
        volume = geometry.to_hu(volume)
    volume_mask = None if mask is None else display_to_canonical(mask[None].astype(np.uint8), axis)
    return volume, volume_mask, geometry.affine(volume.shape)


def save_samples(out_dir: str, indices: Sequence[int] | int, images: torch.Tensor,
                 masks: Optional[torch.Tensor] = None, formats: Sequence[str] = ("png",),
                 colours: Optional[Sequence[Sequence[int]]] = None, geometry: Optional[SampleGeometry] = None,
                 hu: bool = False) -> list[str]:
    """Write one batch, every file atomically: 8-bit PNGs (always), NIfTI/NPZ on request, masks and previews.

    ``indices``: the samples' indices (or the first of consecutive ones). NPZ holds the float image in
    ``[-1, 1]`` (``H, W`` or ``H, W, C``) and the mask; NIfTI holds the image (HU with ``hu``) and an integer mask
    volume in canonical orientation with the affine of ``geometry`` (default: 1 mm RAS+). The image PNG is
    written last, so a sample with its image is complete. Returns the image PNG paths.
    """
    if isinstance(indices, int):
        indices = list(range(indices, indices + images.shape[0]))
    if len(indices) != images.shape[0]:
        raise ValueError(f"save_samples got {images.shape[0]} images for {len(indices)} indices")
    geometry = geometry or SampleGeometry()
    for sub in (IMAGE_DIR,) + ((MASK_DIR, MASK_COLOUR_DIR) if masks is not None else ()):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    pixels = to_uint8(images)
    floats = images.detach().float().clamp(-1, 1).cpu().numpy().transpose(0, 2, 3, 1)
    mask_np = masks.detach().cpu().numpy().astype(np.uint8) if masks is not None else None
    paths = []
    for j, index in enumerate(indices):
        name = f"{index:06d}"
        image_f = floats[j][..., 0] if floats.shape[-1] == 1 else floats[j]
        if mask_np is not None:
            _save_png(os.path.join(out_dir, MASK_DIR, name + ".png"), mask_np[j])
            _save_png(os.path.join(out_dir, MASK_COLOUR_DIR, name + ".png"), _colourise(mask_np[j], colours))
        if "npz" in formats:
            extra = {"mask": mask_np[j]} if mask_np is not None else {}
            _save_npz(os.path.join(out_dir, IMAGE_DIR, name + ".npz"), image=image_f, **extra)
        if "nii" in formats:
            volume, volume_mask, affine = nifti_volumes(image_f, None if mask_np is None else mask_np[j],
                                                        geometry, hu)
            save_nifti(os.path.join(out_dir, IMAGE_DIR, name + ".nii.gz"), volume, affine)
            if volume_mask is not None:
                save_nifti(os.path.join(out_dir, MASK_DIR, name + ".nii.gz"), volume_mask, affine)
        path = os.path.join(out_dir, IMAGE_DIR, name + ".png")
        _save_png(path, pixels[j])
        paths.append(path)
    return paths


def write_stack(out_dir: str, indices: Sequence[int], geometry: SampleGeometry, masks: bool) -> dict[str, Any]:
    """Every sample of ``indices`` (their NIfTI files, in index order) as one volume along the slice axis;
    returns the record for ``samples.json``."""
    import nibabel as nib

    if not indices:
        raise ValueError(f"--stack: {out_dir} holds no complete NIfTI samples to stack")
    axis = geometry.slice_axis
    record: dict[str, Any] = {"indices": [int(i) for i in indices], "slice_axis": axis}
    for sub, name in ((IMAGE_DIR, STACK), (MASK_DIR, STACK_MASKS)) if masks else ((IMAGE_DIR, STACK),):
        slices = []
        for i in indices:
            path = os.path.join(out_dir, sub, f"{i:06d}.nii.gz")
            if not os.path.isfile(path):
                raise ValueError(f"--stack: sample {i} has no NIfTI file {path} (it was written without "
                                 "--format nii); stack a folder whose samples all have NIfTI files")
            slices.append(np.asanyarray(nib.load(path).dataobj))
        shapes = {s.shape for s in slices}
        if len(shapes) != 1:
            raise ValueError(f"--stack: the NIfTI samples in {out_dir} differ in shape {sorted(shapes)}")
        volume = np.concatenate(slices, axis=axis)
        affine = geometry.affine(volume.shape)
        save_nifti(os.path.join(out_dir, name), volume, affine)
        record["masks" if sub == MASK_DIR else "file"] = name
        record["shape"], record["affine"] = list(volume.shape), affine.round(8).tolist()
    return record


# -------------------------------------------------------------------------------------------- manifest
def read_manifest(out_dir: str) -> dict[str, Any]:
    """``samples.json`` of a sample folder (``{}`` when there is none); a damaged one is a ValueError naming it."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not readable JSON ({err}); the samples beside it are intact: repair the file, "
                         "or move it away to start a new record (the numbering continues from the files)") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sessions", []), list):
        raise ValueError(f"{path} is not a samples.json (expected an object with a 'sessions' list); repair it or "
                         "move it away")
    return manifest


def _write_manifest(out_dir: str, manifest: Mapping[str, Any]) -> str:
    path = os.path.join(out_dir, MANIFEST)
    text = json.dumps(manifest, indent=2, default=str)
    atomic_write_stream(path, lambda f: f.write(text.encode("utf-8")), verify=verify_json)
    return path


def begin_session(out_dir: str, info: Mapping[str, Any], run: dict[str, Any]) -> str:
    """Record a session as it starts: checkpoint, config and settings at the top, ``run`` appended to
    ``sessions`` with ``status: started`` (earlier sessions still ``started`` become ``interrupted``)."""
    manifest = read_manifest(out_dir)
    if manifest.get("checkpoint_sha256") not in (None, info["checkpoint_sha256"]):
        logger.warning("%s already holds samples of another checkpoint (sha256 %s...); the folder now mixes "
                       "two models.", out_dir, str(manifest.get("checkpoint_sha256"))[:12])
    changed = [k for k in _SETTINGS + ("mask_source", "mask_from")
               if k in manifest and k in run and manifest[k] != run[k]]
    if changed:
        logger.warning("%s: this session's %s differ from the earlier sessions' (%s); see 'sessions' in "
                       "samples.json for which samples used which settings.", out_dir, changed,
                       {k: manifest[k] for k in changed})
    for session in manifest.get("sessions", []):
        if session.get("status") == "started":
            session["status"] = "interrupted"
    manifest.update({k: info[k] for k in ("checkpoint", "checkpoint_sha256", "config", "config_files") if k in info})
    manifest.update({k: run[k] for k in _SETTINGS if k in run})
    if run.get("mask_source") is not None:  # "joint": generated with the image; "segmentation_head": predicted after
        manifest.update(mask_source=run["mask_source"], masks_generated_jointly=run["mask_source"] == "joint")
    if run.get("mask_from") is not None:
        manifest["mask_from"] = run["mask_from"]
    if run.get("geometry") is not None:
        manifest["geometry"] = run["geometry"]
    run["status"] = "started"
    manifest.setdefault("sessions", []).append(run)
    return _write_manifest(out_dir, manifest)


def end_session(out_dir: str, run: dict[str, Any]) -> str:
    """Replace the session's record (matched by ``run["id"]``) with the finished one; update the counts."""
    manifest = read_manifest(out_dir)
    sessions = manifest.setdefault("sessions", [])
    run["status"] = "complete"
    for k, session in enumerate(sessions):
        if session.get("id") == run.get("id"):
            sessions[k] = run
            break
    else:
        sessions.append(run)
    if run.get("stack") is not None:
        manifest["stack"] = run["stack"]
    if run.get("geometry") is not None:
        manifest["geometry"] = run["geometry"]
    complete, incomplete, _ = scan_samples(out_dir, sessions=sessions)
    manifest["num_samples"] = len(complete)
    manifest["incomplete"] = incomplete
    return _write_manifest(out_dir, manifest)
