"""Synthetic abdominal-CT-like phantom with CT-Organ labels: an in-memory dataset and file writers.

``PhantomDataset`` follows the data contract (``image`` float32 H x W x 1 in [-1, 1], ``segmentation``
int64 H x W, ``has_segmentation``, ``file_path_``, ``relative_file_path_``, ``slice_index``) and is
deterministic for ``(seed, split)``; splits draw different patients. ``write_phantom_2d`` and
``write_phantom_nifti`` write the layouts that ``ldm.data.medical_images`` reads. The anatomy is drawn
by ``ldm.data.phantom_render``; ``check_phantom_anatomy`` checks a label map against its rules.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from torch.utils.data import Dataset

from ldm.data.anatomy_check import AnatomyReport, RULES, anatomy_plausibility, check_phantom_anatomy
from ldm.data.intensity import window_ct
from ldm.data.io import display_slices_to_volume
from ldm.data.labels import CTORGAN_CLASSES, CTORGAN_COLOURS, colourise
from ldm.data.phantom_render import PhantomPatient, phantom_slice, sample_patient

__all__ = ["PhantomDataset", "phantom_volume", "write_phantom_2d", "write_phantom_nifti", "check_phantom_anatomy",
           "anatomy_plausibility", "AnatomyReport", "RULES", "CTORGAN_CLASSES", "CTORGAN_COLOURS", "colourise",
           "PHANTOM_WINDOW", "SPLITS"]

logger = logging.getLogger(__name__)

PHANTOM_WINDOW: tuple[float, float] = (40.0, 400.0)  # abdominal window (level, width) in HU
SPLITS: tuple[str, ...] = ("train", "validation", "test")
_PRECOMPUTE_PIXELS = 2 ** 24  # above this many pixels in total, slices are rendered on access


def _split_code(split: str) -> int:
    aliases = {"val": "validation", "valid": "validation"}
    split = aliases.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"unknown phantom split {split!r}; use one of {SPLITS}")
    return SPLITS.index(split)


def _patients(seed: int, split: str, n: int) -> list[PhantomPatient]:
    code = _split_code(split)
    return [sample_patient(np.random.default_rng([seed, code, 1, i])) for i in range(n)]


class PhantomDataset(Dataset):
    """In-memory dataset of phantom slices with CT-Organ labels (0 background ... 5 bone).

    Args:
        size: image side in pixels (square).
        num_samples: number of slices.
        seed: base seed; together with ``split`` it fixes every slice.
        split: "train", "validation" (or "val") or "test"; each split has its own patients.
        num_patients: patients to draw slices from (default: one per 8 slices, at least 1).
        window: CT window (level, width) in HU that maps to [-1, 1].
        z_range: slice heights to sample from (0 lower pelvis, 1 lower chest).
    """

    def __init__(self, size: int = 32, num_samples: int = 64, seed: int = 0, split: str = "train",
                 num_patients: int | None = None, window: tuple[float, float] = PHANTOM_WINDOW,
                 z_range: tuple[float, float] = (0.02, 0.98)) -> None:
        if num_samples < 1:
            raise ValueError(f"PhantomDataset num_samples must be >= 1, got {num_samples}")
        if not 0.0 <= z_range[0] < z_range[1] <= 1.0:
            raise ValueError(f"PhantomDataset z_range must satisfy 0 <= lo < hi <= 1, got {tuple(z_range)}")
        self.size, self.num_samples, self.seed, self.split = int(size), int(num_samples), int(seed), split
        self.window = (float(window[0]), float(window[1]))
        n_pat = num_patients if num_patients is not None else max(1, num_samples // 8)
        if n_pat < 1:
            raise ValueError(f"PhantomDataset num_patients must be >= 1, got {num_patients}")
        self.patients = _patients(self.seed, split, n_pat)
        # Stratified heights so that even a few samples cover pelvis, abdomen and chest.
        rng = np.random.default_rng([self.seed, _split_code(split), 2])
        strata = (rng.permutation(num_samples) + rng.uniform(size=num_samples)) / num_samples
        self.z = z_range[0] + strata * (z_range[1] - z_range[0])
        self._cache: list[tuple[np.ndarray, np.ndarray]] | None = None
        if self.size * self.size * self.num_samples <= _PRECOMPUTE_PIXELS:
            self._cache = [self._render(i) for i in range(num_samples)]

    def _render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, _split_code(self.split), 3, index])
        patient = self.patients[index % len(self.patients)]
        hu, labels = phantom_slice(patient, float(self.z[index]), self.size, rng)
        image = window_ct(hu, *self.window)
        return image.astype(np.float32), labels

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"PhantomDataset index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        image, labels = self._cache[index] if self._cache is not None else self._render(index)
        name = f"{self.split}/patient-{index % len(self.patients):03d}/z{self.z[index]:.3f}-{index:05d}"
        return {"image": image[..., None].copy(), "segmentation": labels.astype(np.int64),
                "has_segmentation": True, "file_path_": f"phantom://{name}", "relative_file_path_": name,
                "slice_index": index}


def phantom_volume(patient: PhantomPatient, size: int, num_slices: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Axial slices bottom (pelvis) to top (chest): (HU N x H x W, labels N x H x W, heights z)."""
    z = np.linspace(0.02, 0.98, num_slices)
    hus, labs = zip(*(phantom_slice(patient, float(zi), size, rng) for zi in z))
    return np.stack(hus), np.stack(labs), z


def _iter_patients(seed: int, counts: dict[str, int]) -> Iterator[tuple[str, int, PhantomPatient]]:
    for split, n in counts.items():
        for i, patient in enumerate(_patients(seed, split, n)):
            yield split, i, patient


def write_phantom_2d(out_dir: str | Path, size: int = 64, slices_per_patient: int = 32,
                     patients: dict[str, int] | None = None, seed: int = 0,
                     window: tuple[float, float] = PHANTOM_WINDOW) -> dict[str, list[str]]:
    """Write windowed 8-bit PNG slices and label PNGs in the 2D layout.

    Layout: ``out_dir/<split>/images/<patient>/<slice>.png`` and the same path under ``masks``,
    plus ``out_dir/split.json`` (patient ids per split). Returns that split dict.
    """
    from PIL import Image

    out = Path(out_dir)
    counts = patients or {"train": 4, "validation": 1, "test": 1}
    split_ids: dict[str, list[str]] = {s: [] for s in counts}
    for split, i, patient in _iter_patients(seed, counts):
        pid = f"phantom-{split}-{i:03d}"
        split_ids[split].append(pid)
        rng = np.random.default_rng([seed, _split_code(split), 4, i])
        hu, labels, _ = phantom_volume(patient, size, slices_per_patient, rng)
        for k in range(slices_per_patient):
            img = np.round((window_ct(hu[k], *window) + 1.0) * 127.5).astype(np.uint8)
            for kind, arr in (("images", img), ("masks", labels[k])):
                path = out / split / kind / pid / f"{k:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(path)
    (out / "split.json").write_text(json.dumps(split_ids, indent=2))
    logger.info("wrote phantom 2D layout to %s", out)
    return split_ids


def write_phantom_nifti(out_dir: str | Path, size: int = 64, slices_per_patient: int = 32,
                        patients: dict[str, int] | None = None, seed: int = 0,
                        spacing: tuple[float, float, float] = (1.5, 1.5, 5.0),
                        layout: str = "split") -> dict[str, list[str]]:
    """Write CT-ORG-style volumes in HU (int16) and label volumes (uint8) with a canonical RAS+ affine.

    ``layout="split"``: ``out_dir/<split>/images/volume-N.nii.gz`` and ``out_dir/<split>/masks/volume-N.nii.gz``
    plus ``out_dir/split.json``. ``layout="ctorg"``: the raw CT-ORG layout, ``volume-N.nii.gz`` and
    ``labels-N.nii.gz`` side by side in ``out_dir`` (the input of ``scripts/prepare_ctorg.py``).
    """
    import nibabel as nib

    if layout not in ("split", "ctorg"):
        raise ValueError(f"write_phantom_nifti layout must be 'split' or 'ctorg', got {layout!r}")
    out = Path(out_dir)
    counts = patients or {"train": 4, "validation": 1, "test": 1}
    affine = np.diag([float(spacing[0]), float(spacing[1]), float(spacing[2]), 1.0])
    split_ids: dict[str, list[str]] = {s: [] for s in counts}
    for number, (split, i, patient) in enumerate(_iter_patients(seed, counts)):
        rng = np.random.default_rng([seed, _split_code(split), 4, i])
        hu, labels, _ = phantom_volume(patient, size, slices_per_patient, rng)
        name = f"volume-{number}.nii.gz"
        split_ids[split].append(name)
        vol = np.clip(np.round(display_slices_to_volume(hu)), -1024, 3071).astype(np.int16)
        lab = display_slices_to_volume(labels).astype(np.uint8)
        if layout == "split":
            paths = (out / split / "images" / name, out / split / "masks" / name)
        else:
            paths = (out / name, out / f"labels-{number}.nii.gz")
        for path, arr in zip(paths, (vol, lab)):
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(arr, affine), str(path))
    if layout == "split":
        (out / "split.json").write_text(json.dumps(split_ids, indent=2))
    logger.info("wrote phantom NIfTI volumes (%s layout) to %s", layout, out)
    return split_ids
