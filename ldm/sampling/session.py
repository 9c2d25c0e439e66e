"""The output folder side of a sampling session (:func:`ldm.sampling.generate`): the folder's checks and scan,
resuming an interrupted session and the session's timings. ``ldm.sampling`` re-exports the public names."""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch

from ldm.models.diffusion.samplers import sampler_spec
from ldm.sample_geometry import SampleGeometry
from ldm.sample_io import IMAGE_DIR, read_manifest, remove_temporary_files, scan_samples

if TYPE_CHECKING:
    from ldm.sampling import Timer

logger = logging.getLogger("ldm.sampling")  # these are messages of ldm.sampling's sessions

RESUME_SETTINGS = ("seed", "sampler", "ddim_steps", "eta", "vanilla_sample", "anatomy_guidance", "ema", "masks",
                   "mask_from", "hu", "autoguidance")


def _check_nifti_folder(manifest: dict[str, Any], geometry: dict[str, Any], hu: bool, stack: bool) -> None:
    """Earlier NIfTI sessions of the folder in other units or geometry: refused with ``stack`` (one volume needs
    one grid), else a warning."""
    keys = ("directions", "slice_axis", "fov_mm", "thickness_mm", "centre_mm")
    for session in manifest.get("sessions", []):
        before = session.get("geometry")
        if "nii" not in (session.get("formats") or ()) or not before:
            continue
        same = bool(session.get("hu", False)) == hu and all(
            np.allclose(np.asarray(before.get(k), dtype=float), np.asarray(geometry.get(k), dtype=float))
            if before.get(k) is not None and geometry.get(k) is not None else before.get(k) == geometry.get(k)
            for k in keys)
        if not same:
            message = (f"NIfTI samples of an earlier session (started {session.get('time')}) in this folder have "
                       f"another geometry or intensity unit (hu={session.get('hu', False)}, geometry from "
                       f"{before.get('source')}); ")
            if stack:
                raise ValueError(message + "--stack needs one grid: sample into another -l folder")
            logger.warning(message + "the folder mixes them")
            return


def _scan_folder(out_dir: str, formats: list[str], save_masks: bool, geometry: SampleGeometry, hu: bool,
                 stack: bool) -> tuple[dict[str, Any], list[int], list[int], int]:
    """Create ``out_dir`` if missing, check it against the session's NIfTI settings, remove an interrupted
    session's temporary files and scan it: ``(manifest, complete, redo, start)``
    (:func:`ldm.sample_io.scan_samples`)."""
    os.makedirs(out_dir, exist_ok=True)
    manifest = read_manifest(out_dir)
    if "nii" in formats:
        _check_nifti_folder(manifest, geometry.to_dict(), hu, stack)
    if remove_temporary_files(out_dir):
        logger.info("%s: removed the temporary files of an interrupted session", out_dir)
    complete, redo, start = scan_samples(out_dir, formats, save_masks, manifest.get("sessions", []))
    flat = [i for i in complete if not os.path.isfile(os.path.join(out_dir, IMAGE_DIR, f"{i:06d}.nii.gz"))]
    if stack and flat:
        raise ValueError(f"--stack: {out_dir} holds {len(flat)} samples without NIfTI files (first: {flat[0]:06d}, "
                         "written without --format nii); stack into a folder whose samples all have them")
    if redo:
        logger.warning("%s: samples %s are incomplete (an interrupted session); redoing them first", out_dir,
                       redo if len(redo) <= 10 else f"{redo[:10]}... ({len(redo)})")
    return manifest, complete, redo, start


def resumable_session(sessions: Sequence[dict[str, Any]], run: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The folder's last session when ``run`` is the same command run again after it was interrupted (it never
    ended: ``started``/``interrupted``; same ``-n`` and the same settings and formats), else None. Such a run
    finishes that session instead of adding ``-n`` more, so an interrupted ``-n 40`` ends with 40 samples."""
    if not sessions or sessions[-1].get("status") == "complete":
        return None
    last = sessions[-1]
    if not isinstance(last.get("start_index"), int) or not isinstance(last.get("count"), int):
        return None
    if last.get("requested", last["count"]) != run["requested"]:
        return None
    if sorted(last.get("formats") or ("png",)) != sorted(run["formats"]):
        return None
    return last if all(last.get(k) == run.get(k) for k in RESUME_SETTINGS) else None


def _resume_unfinished(out_dir: str, sessions: Sequence[dict[str, Any]], run: dict[str, Any], complete: list[int],
                       redo: list[int]) -> None:
    """When ``run`` is the same command as the folder's interrupted last session (:func:`resumable_session`),
    make it finish that session: ``count`` becomes the samples still missing, ``resumes`` that session's id."""
    unfinished = resumable_session(sessions, run)
    if unfinished is None:
        return
    start = run["start_index"]
    end = int(unfinished.get("ends_at", unfinished["start_index"] + unfinished["count"]))
    run.update(count=max(0, end - start), ends_at=max(end, start), resumes=unfinished.get("id"))
    logger.warning("%s: resuming the interrupted session %s (-n %d from sample %d): %d samples are complete, "
                   "%d to write%s", out_dir, unfinished.get("id"), run["requested"], unfinished["start_index"],
                   len([i for i in complete if unfinished["start_index"] <= i < end]), run["count"],
                   f", {len(redo)} to redo" if redo else "")


def _canonical_shape(image_hw: Sequence[int], slice_axis: int) -> list[int]:
    """Canonical shape of one display image ``H, W`` written as a single slice (see ``display_to_canonical``)."""
    h, w = (int(v) for v in image_hw)
    shape = [w, h]
    shape.insert(slice_axis, 1)
    return shape


def _session_timings(timers: Sequence["Timer"], num_written: int, batch_size: int, sampler: str, ddim_steps: int,
                     alphas_cumprod: torch.Tensor) -> dict[str, float]:
    """The record's ``timings`` from the sampling, decoding and writing timers of ``num_written`` samples."""
    timer_sample, timer_decode, timer_write = timers
    total = timer_sample.seconds + timer_decode.seconds + timer_write.seconds
    spec = sampler_spec(sampler)
    steps = len(spec.timesteps(None if spec.ddpm_loop else ddim_steps, alphas_cumprod)) - 1
    batches = -(-num_written // batch_size)
    return {"sampling_s": timer_sample.seconds, "decode_and_masks_s": timer_decode.seconds,
            "writing_s": timer_write.seconds, "per_sample_s": total / max(num_written, 1),
            "sampling_per_step_s": timer_sample.seconds / max(batches * steps, 1)}
