"""NIfTI label volumes as labelmaps to sample from (``sample.py --masks VOLUME.nii.gz``), and the samples written
back as volumes in the input's geometry.

A volume is sliced as the training data are (:mod:`ldm.data.medical_images`): canonical RAS+ orientation, slices
along the run's ``slice_axis`` in radiological display orientation, then the dataset's resampling plan (``square``
padding or cropping, ``spacing``, ``size``; masks nearest neighbour, padding background). The output volumes stack
the sampled slices along the same axis with the affine of that plan (:func:`ldm.data.io.display_slice_affine`), so a
viewer shows each generated slice where its labels were.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_label_volume(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(NIFTI_SUFFIXES)


@dataclass
class LabelVolume:
    """A label volume read for sampling: its display slices (native size) and where they lie.

    Args:
        path: the file.
        slices: ``[N, h, w]`` integer display slices along ``slice_axis``.
        affine: canonical voxel-to-world affine; shape: canonical shape.
        slice_axis: the canonical axis the slices are taken along.
    """

    path: str
    slices: np.ndarray
    affine: np.ndarray
    shape: tuple[int, int, int]
    slice_axis: int

    @property
    def names(self) -> list[str]:
        stem = os.path.basename(self.path)
        for suffix in NIFTI_SUFFIXES[::-1]:
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        return [f"{stem}_{i:04d}" for i in range(len(self.slices))]


def read_label_volume(path: str, slice_axis: int = 2, label_map: Optional[dict[int, int]] = None) -> LabelVolume:
    """The display slices of a NIfTI label volume (integer labels; a non-integer volume is an error), its stored ids
    mapped to class ids by ``label_map`` as the training data's are (``{stored id: class id}``)."""
    from ldm.data.io import load_canonical, nifti_info, volume_slice_to_display
    from ldm.data.medical_read import apply_label_map

    if slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis}")
    info = nifti_info(path)
    volume = load_canonical(info)
    if volume.dtype.kind == "f":
        if not np.all(np.isfinite(volume)) or not np.all(volume == np.round(volume)):
            raise ValueError(f"--masks {path}: a label volume must hold integer labels")
    volume = apply_label_map(volume.astype(np.int64), label_map)
    slices = np.stack([volume_slice_to_display(volume, i, slice_axis) for i in range(volume.shape[slice_axis])])
    return LabelVolume(path=str(path), slices=slices, affine=np.asarray(info.affine, dtype=np.float64),
                       shape=tuple(int(s) for s in info.shape), slice_axis=int(slice_axis))


def fit_label_volume(volume: LabelVolume, size: int, square: str = "pad",
                     spacing: Optional[Sequence[float]] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(masks [N, size, size], affine)``: the slices through the training data's resampling plan and the affine of
    the stacked output slices."""
    from ldm.data import intensity as inten
    from ldm.data.io import display_slice_affine, slice_spacing

    src = slice_spacing(volume.affine, volume.slice_axis)
    steps, row_map, col_map, out_hw = inten.resampling_plan(volume.slices.shape[1:], size, square, spacing, src)
    out = []
    for mask in volume.slices:
        for op, arg in steps:
            if op == "fit":
                _, mask, _, _ = inten.fit_to_size(np.zeros(mask.shape, np.float32), mask, arg, -1.0, 0)
            else:
                mask = inten.resize_mask(mask, arg)
        out.append(mask)
    affine = display_slice_affine(volume.affine, volume.shape, volume.slice_axis, 0, out_hw, row_map, col_map)
    return np.stack(out), affine


def stack_volume(slices: np.ndarray, slice_axis: int) -> np.ndarray:
    """Display slices ``[N, H, W]`` as one canonical volume, slice ``i`` at index ``i`` along ``slice_axis``."""
    from ldm.data.io import display_slice_to_canonical

    return np.concatenate([display_slice_to_canonical(s, slice_axis) for s in slices], axis=slice_axis)


def write_volumes(out_dir: str, images: np.ndarray, masks: np.ndarray, affine: np.ndarray, slice_axis: int,
                  per_mask: int, own_masks: Optional[np.ndarray] = None) -> list[str]:
    """``images_<k>.nii.gz`` (float: [-1, 1], or HU; ``images`` ``[N * per_mask, H, W]`` grouped by slice) for every
    ``k < per_mask``, ``condition_masks.nii.gz`` (uint8) and, given the model's own masks ``own_masks`` (grouped as
    the images), ``masks_<k>.nii.gz``, on the grid of ``affine``; returns the file names."""
    from ldm.sample_io import save_nifti

    names = []
    grouped = images.reshape(-1, per_mask, *images.shape[1:])
    own = None if own_masks is None else own_masks.reshape(-1, per_mask, *own_masks.shape[1:])
    for k in range(per_mask):
        name = f"images_{k}.nii.gz"
        save_nifti(os.path.join(out_dir, name), stack_volume(grouped[:, k].astype(np.float32), slice_axis), affine)
        names.append(name)
        if own is not None:
            save_nifti(os.path.join(out_dir, f"masks_{k}.nii.gz"), stack_volume(own[:, k].astype(np.uint8), slice_axis),
                       affine)
            names.append(f"masks_{k}.nii.gz")
    save_nifti(os.path.join(out_dir, "condition_masks.nii.gz"), stack_volume(masks.astype(np.uint8), slice_axis),
               affine)
    return names + ["condition_masks.nii.gz"]
