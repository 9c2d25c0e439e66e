"""Phantom v2: a harder, variant-bearing abdominal-CT phantom for the anatomy benchmark v2.

v1 (``ldm.data.phantom``) stays as it is. v2 differs where v1 saturated: per patient the organs vary in
size by +-30 %, the whole body is rotated (+-15 deg about the body axis), shifted and zoomed in the field
(at least 3 % margin), thin to obese habitus (fat thickness, body aspect), larger shape harmonics, three
contrast phases (the spleen is 10-45 HU darker than the liver without contrast and brighter with it; the
aorta bright with contrast and in a rim of fat without), and anatomical variants with known prevalence
(``VARIANTS``), the same in every slice of a patient. Labels (``PHANTOM_V2_CLASSES``): 0 background, 1 liver,
2 spleen, 3 kidney, 4 bladder, 5 lungs, 6 aorta, 7 vertebra, 8 ribs, 9 pelvis. Body levels, variants and the
rule thresholds are defined once in ``ldm.data.anatomy_check_v2`` (read by the renderer and the checker).

API:

- ``sample_patient_v2(rng, variant=None) -> PatientV2``; ``render_slice_v2(patient, z, size) -> (hu, labels)``.
- ``PhantomV2Dataset``: the data contract of ``PhantomDataset`` plus ``variant`` and ``z``; few slices per
  patient (default 2) so that a split holds many patients and so some rare variants.
- ``phantom_v2_arrays(size, n, seed, split)``: the same slices as tensors, for the benchmark. Speed: about
  3 ms a slice at 64 px on one core (2048 slices in ~7 s, measured on the 2-core CI machine;
  ``tests/test_phantom_v2.py`` asserts < 30 s).
- ``CORRUPTIONS`` / ``corrupt_slice``: corrupted images with consistent masks, for the judge's sensitivity;
  ``CORRUPTION_RULES`` names the rule(s) each kind must break; ``corrupted_arrays`` draws batches of them.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from ldm.data.anatomy_check_v2 import (LEVELS, NUM_CLASSES_V2, ORGANS, RULES_V2, THRESHOLDS, VARIANTS,
                                       AnatomyReportV2, RuleThresholds, anatomy_plausibility_v2, check_anatomy_v2)
from ldm.data.intensity import window_ct
from ldm.data.labels import PHANTOM_V2_CLASSES, PHANTOM_V2_COLOURS
from ldm.data.phantom import PHANTOM_WINDOW, SPLITS, _split_code
from ldm.data.phantom_v2_render import (Edit, NO_EDIT, PatientV2, bump, add_noise, downsample, draw_variant,
                                        render_clean, render_factor, sample_patient_v2, slice_rng)

__all__ = ["PhantomV2Dataset", "PatientV2", "sample_patient_v2", "render_slice_v2", "phantom_v2_arrays",
           "patients_v2", "patient_variants", "shows_variant",
           "corrupt_slice", "corruption_z", "corrupted_arrays", "CORRUPTIONS", "CORRUPTION_RULES", "VARIANTS",
           "LEVELS", "PHANTOM_V2_CLASSES", "PHANTOM_V2_COLOURS", "NUM_CLASSES_V2", "check_anatomy_v2",
           "anatomy_plausibility_v2", "AnatomyReportV2", "RULES_V2", "RuleThresholds", "THRESHOLDS",
           "draw_variant", "PHANTOM_WINDOW"]

_PRECOMPUTE_PIXELS = 2 ** 24


def patients_v2(seed: int, split: str, n: int) -> list[PatientV2]:
    """The ``n`` patients of a split (deterministic for (seed, split); splits draw different patients)."""
    code = _split_code(split)
    return [sample_patient_v2(np.random.default_rng([seed, code, 11, i])) for i in range(n)]


def patient_variants(seed: int, split: str, n: int) -> list[str]:
    """The variants of ``patients_v2(seed, split, n)`` without drawing the rest of each patient (cheap: the
    variant is each patient's first draw)."""
    code = _split_code(split)
    return [draw_variant(float(np.random.default_rng([seed, code, 11, i]).uniform())) for i in range(n)]


def _finish(hu_hi: np.ndarray, labels_hi: np.ndarray, size: int, patient: PatientV2,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    hu, labels = downsample(hu_hi, labels_hi, size)
    return add_noise(hu, patient, rng), labels


def render_slice_v2(patient: PatientV2, z: float, size: int, rng: Optional[np.random.Generator] = None,
                    edit: Edit = NO_EDIT, min_render: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """One finished slice ``size x size``: (HU float32, labels uint8). Rendered at ``>= min_render`` pixels and
    reduced (area mean, majority label); ``rng`` (bowel loops, noise) defaults to one fixed by patient and z."""
    if size < 8:
        raise ValueError(f"phantom size must be at least 8 pixels, got {size}")
    rng = slice_rng(patient, z) if rng is None else rng
    hu, labels = render_clean(patient, float(z), size * render_factor(size, min_render), rng, edit)
    return _finish(hu, labels, size, patient, rng)


def _stratified_z(rng: np.random.Generator, n: int, z_range: tuple[float, float]) -> np.ndarray:
    strata = (rng.permutation(n) + rng.uniform(size=n)) / n
    return z_range[0] + strata * (z_range[1] - z_range[0])


class PhantomV2Dataset(Dataset):
    """In-memory dataset of phantom-v2 slices (labels ``PHANTOM_V2_CLASSES``).

    Args:
        size: image side in pixels. num_samples: number of slices.
        seed, split: fix every slice; "train", "validation" (or "val") or "test" have their own patients.
        num_patients: patients to draw slices from (default ``ceil(num_samples / slices_per_patient)``).
        slices_per_patient: default 2, so that a split has many patients and so its share of rare variants.
        window: CT window (level, width) in HU mapped to [-1, 1]. z_range: slice heights (stratified).
    """

    def __init__(self, size: int = 64, num_samples: int = 64, seed: int = 0, split: str = "train",
                 num_patients: Optional[int] = None, slices_per_patient: int = 2,
                 window: tuple[float, float] = PHANTOM_WINDOW, z_range: tuple[float, float] = (0.02, 0.98)) -> None:
        if num_samples < 1:
            raise ValueError(f"PhantomV2Dataset num_samples must be >= 1, got {num_samples}")
        if slices_per_patient < 1:
            raise ValueError(f"PhantomV2Dataset slices_per_patient must be >= 1, got {slices_per_patient}")
        if not 0.0 <= z_range[0] < z_range[1] <= 1.0:
            raise ValueError(f"PhantomV2Dataset z_range must satisfy 0 <= lo < hi <= 1, got {tuple(z_range)}")
        n_pat = num_patients if num_patients is not None else math.ceil(num_samples / slices_per_patient)
        if n_pat < 1:
            raise ValueError(f"PhantomV2Dataset num_patients must be >= 1, got {num_patients}")
        self.size, self.num_samples, self.seed, self.split = int(size), int(num_samples), int(seed), split
        self.window = (float(window[0]), float(window[1]))
        self.patients = patients_v2(self.seed, split, n_pat)
        self.z = _stratified_z(np.random.default_rng([self.seed, _split_code(split), 12]), num_samples, z_range)
        self._cache: Optional[list[tuple[np.ndarray, np.ndarray]]] = None
        if self.size * self.size * self.num_samples <= _PRECOMPUTE_PIXELS:
            self._cache = [self._render(i) for i in range(num_samples)]

    def patient_of(self, index: int) -> PatientV2:
        return self.patients[index % len(self.patients)]

    def _render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, _split_code(self.split), 13, index])
        hu, labels = render_slice_v2(self.patient_of(index), float(self.z[index]), self.size, rng)
        return window_ct(hu, *self.window), labels

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"PhantomV2Dataset index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        image, labels = self._cache[index] if self._cache is not None else self._render(index)
        patient = self.patient_of(index)
        name = f"{self.split}/patient-{index % len(self.patients):05d}/z{self.z[index]:.3f}-{index:05d}"
        return {"image": image[..., None].copy(), "segmentation": labels.astype(np.int64),
                "has_segmentation": True, "file_path_": f"phantom2://{name}", "relative_file_path_": name,
                "slice_index": index, "variant": patient.variant, "z": float(self.z[index])}


def phantom_v2_arrays(size: int, n: int, seed: int = 0, split: str = "train", slices_per_patient: int = 2,
                      window: tuple[float, float] = PHANTOM_WINDOW) -> dict[str, Any]:
    """The slices of ``PhantomV2Dataset(size, n, seed, split)`` as arrays: ``image`` float32 [N,1,H,W] in
    [-1, 1], ``segmentation`` int64 [N,H,W], ``variant`` list[str], ``z`` and ``level`` (the patient's level
    name per slice), ``patient`` (index). About 3 ms a slice at 64 px on one core."""
    code = _split_code(split)
    n_pat = math.ceil(n / slices_per_patient)
    patients = patients_v2(seed, split, n_pat)
    z = _stratified_z(np.random.default_rng([seed, code, 12]), n, (0.02, 0.98))
    images = np.empty((n, 1, size, size), dtype=np.float32)
    masks = np.empty((n, size, size), dtype=np.int64)
    for i in range(n):
        rng = np.random.default_rng([seed, code, 13, i])
        hu, labels = render_slice_v2(patients[i % n_pat], float(z[i]), size, rng)
        images[i, 0] = window_ct(hu, *window)
        masks[i] = labels
    pats = [patients[i % n_pat] for i in range(n)]
    return {"image": torch.from_numpy(images), "segmentation": torch.from_numpy(masks),
            "variant": [p.variant for p in pats], "z": z, "level": [p.level(float(zi)) for p, zi in zip(pats, z)],
            "patient": np.arange(n) % n_pat}


def shows_variant(patient: PatientV2, z: float) -> Optional[str]:
    """The variant a true slice of ``patient`` at ``z`` visibly shows (what ``check_anatomy_v2`` should infer),
    or ``None`` where the slice holds no clear lateralised evidence.

    Situs (normal or inversus): the aorta is visible (above its bifurcation). Horseshoe: the isthmus levels.
    Pelvic kidney: the pelvic kidney not small (profile times size factor >= 0.8); at kidney level such a
    patient shows one kidney, which a single slice cannot tell from a single kidney, so that slice shows
    ``single_kidney``.
    Single kidney: the kidney near its full size (profile >= 0.9) and not small (size factor >= 1).
    """
    k = bump(z, *patient.kidney_z, 0.4)
    big_kidney = k >= 0.9 and patient.scale["kidney"] >= 1.0 and patient.level(z) != "pelvis"
    if patient.variant == "horseshoe_kidney":
        return "horseshoe_kidney" if patient.kidney_z[0] + 0.005 < z < patient.horseshoe_z1 - 0.005 else None
    if patient.variant == "pelvic_kidney":
        if bump(z, *patient.pelvic_z, 0.5) * patient.scale["kidney"] >= 0.8:
            return "pelvic_kidney"
        return "single_kidney" if big_kidney else None
    if patient.variant == "single_kidney":
        return "single_kidney" if big_kidney else None
    return patient.variant if z > patient.bifurcation_z + 0.01 else None


# ----------------------------------------------------------------------------------------------------------
# Corruptions (the judge's sensitivity): a consistent corrupted image AND mask, drawn by the renderer.
# ----------------------------------------------------------------------------------------------------------
CORRUPTIONS: tuple[str, ...] = ("mirrored_organ", "chest_over_pelvis", "organ_swap", "organ_deleted",
                                "organ_duplicated", "kidney_misplaced", "speckle")
CORRUPTION_RULES: dict[str, tuple[str, ...]] = {
    # one lateralised organ mirrored, the others not: a broken situs. (A whole-slice left-right flip of a normal
    # slice is the situs-inversus appearance, a variant, so it is not a per-slice defect and not a corruption.)
    "mirrored_organ": ("situs_consistent",),
    # the upper part of a chest slice over a pelvis slice: pelvic bone with ribs / lungs
    "chest_over_pelvis": ("level_consistent", "co_occurrence_ok"),
    # liver and spleen exchanged in position (the aorta stays): a broken situs
    "organ_swap": ("situs_consistent",),
    # an organ the level requires (liver, lungs or aorta) not drawn, filled with the surrounding tissue
    "organ_deleted": ("required_present",),
    # a second liver, spleen or bladder
    "organ_duplicated": ("organ_count_ok",),
    # a kidney at kidney level (not the pelvic-kidney variant) moved to the midline in front of the aorta and spine
    "kidney_misplaced": ("kidney_position_ok",),
    # scattered organ-labelled specks, 1-2 % of the image, with the organ's intensity
    "speckle": ("fragments_ok",),
}


def _interior(lo: float, hi: float, margin: float = 0.25) -> tuple[float, float]:
    return lo + margin * (hi - lo), hi - margin * (hi - lo)


def corruption_z(patient: PatientV2, kind: str) -> list[tuple[float, float]]:
    """The height ranges where ``kind`` applies to ``patient`` (``corrupt_slice`` refuses other heights)."""
    pelvis_top, ribs_z, chest_z = patient.level_z
    k0, k1 = patient.kidney_z
    ranges = {
        "mirrored_organ": [(ribs_z + 0.01, chest_z - 0.01)],
        "chest_over_pelvis": [(0.02, pelvis_top - 0.02)],
        "organ_swap": [_interior(*patient.spleen_z)],
        "organ_deleted": [(pelvis_top + 0.01, 0.98)],
        "organ_duplicated": [(ribs_z + 0.01, chest_z - 0.01), (0.0, patient.bladder_z1 - 0.07)],
        "kidney_misplaced": [_interior(max(k0, patient.horseshoe_z1 + 0.01) if patient.variant == "horseshoe_kidney"
                                       else k0, k1, 0.2)],
        "speckle": [(0.02, 0.98)],
    }
    if kind not in ranges:
        raise ValueError(f"unknown corruption {kind!r}; use one of {CORRUPTIONS}")
    return ranges[kind]


def _edit_for(patient: PatientV2, z: float, kind: str, rng: np.random.Generator) -> Edit:
    """The renderer edit of the kinds that are drawn directly."""
    sv = patient.spine_v
    if kind == "mirrored_organ":
        options = ["liver", "aorta"] + (["spleen"] if _spleen_size(patient, z) > 0.6 else [])
        return Edit(mirror=frozenset([options[int(rng.integers(len(options)))]]))
    if kind == "organ_swap":
        return Edit(swap_liver_spleen=True)
    if kind == "organ_deleted":
        level = patient.level(z)
        options = {"lower_abdomen": ["aorta"], "upper_abdomen": ["liver", "aorta"], "chest": ["lungs", "aorta"]}
        choice = options[level][int(rng.integers(len(options[level])))]
        return Edit(delete=frozenset([choice]))
    if kind == "kidney_misplaced":
        sides = patient.kidney_sides(z)
        side = sides[int(rng.integers(len(sides)))]
        # on the midline in front of the aorta and the spine (the bladder's place lower down), not beside the spine
        front = sv - 0.235 - 0.105 - 0.22 * patient.scale["kidney"] + float(rng.uniform(-0.05, 0.05))
        return Edit(kidney_move=(side, side * float(rng.uniform(0.0, 0.06)), front))
    raise ValueError(kind)


def _spleen_size(patient: PatientV2, z: float) -> float:
    return bump(z, *patient.spleen_z, 0.5)


def _duplicate_places(patient: PatientV2, z: float, rng: np.random.Generator) -> tuple[str, list]:
    """The organ to duplicate at ``z`` and candidate (du, dv, scale) places for its copy, best first."""
    m, fa = patient.mirror, patient.inner_a / 0.66
    if patient.level(z) == "pelvis":
        width = 0.22 * patient.scale["bladder"]
        side = float(rng.choice([-1.0, 1.0]))
        return "bladder", [(sd * (width + dx), dv, k) for k, dx, dv in ((0.55, 0.12, -0.02), (0.45, 0.1, 0.0),
                                                                         (0.5, 0.16, 0.05), (0.4, 0.08, -0.05))
                           for sd in (side, -side)]
    spleen_big = _spleen_size(patient, z) * patient.scale["spleen"] > 0.8
    if spleen_big and rng.uniform() < 0.5:  # a second spleen in front of the first, or on the right
        return "spleen", [(-m * 0.05, -0.36, 0.9), (-m * 0.82 * fa, 0.0, 0.85), (-m * 0.2, -0.3, 0.8)]
    # a smaller liver on the patient's left, where spleen and stomach are
    return "liver", [(m * 0.78 * fa, 0.08, 0.5), (m * 0.70 * fa, -0.05, 0.5), (m * 0.66 * fa, 0.15, 0.45),
                     (m * 0.74 * fa, -0.15, 0.4)]


def _duplicate(patient: PatientV2, z: float, size: int, rng: np.random.Generator,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A second liver or spleen (upper abdomen) or bladder (pelvis) at a plausible place, kept apart from the
    first by a one-pixel gap of surrounding tissue; the first place where the copy shows as a piece of its own
    (at least 25 pixels and 30 % of the first) is taken."""
    organ, places = _duplicate_places(patient, z, rng)
    label = PHANTOM_V2_CLASSES.index(organ)
    f = render_factor(size)
    original = render_clean(patient, z, size * f, np.random.default_rng(seed))[1] == label
    eight = np.ones((3, 3), dtype=bool)
    best = None
    for du, dv, k in places:
        hu, labels = render_clean(patient, z, size * f, np.random.default_rng(seed), Edit(duplicate=(organ, du, dv, k)))
        copy = (labels == label) & ~original
        gap = ndimage.binary_dilation(copy, iterations=2 * f + 1) & (labels == label) & ~copy
        labels[gap] = 0
        hu[gap] = patient.hu["cavity"]
        lab, n = ndimage.label(downsample(hu, labels, size)[1] == label, structure=eight)
        areas = np.sort(np.bincount(lab.ravel())[1:])
        best = best or (hu, labels)
        if n >= 2 and areas[-2] >= max(25, 0.3 * areas[-1]):
            return hu, labels
    return best


def _chest_over_pelvis(patient: PatientV2, z: float, size: int, rng: np.random.Generator,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
    factor = render_factor(size)
    zc = float(rng.uniform(patient.level_z[2] + 0.02, 0.98))
    hu, labels = render_clean(patient, z, size * factor, np.random.default_rng(seed))
    hu_c, labels_c = render_clean(patient, zc, size * factor, np.random.default_rng(seed + 1))
    n = size * factor
    rows = (np.arange(n) + 0.5) / n * 2 - 1
    cut = patient.shift[1] + patient.zoom * float(rng.uniform(-0.12, 0.02))
    top = rows < cut
    hu[top], labels[top] = hu_c[top], labels_c[top]
    return hu, labels


def _speckle(patient: PatientV2, hu: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> None:
    """Scatter separate specks (1-4 pixels) of one organ over 1-2 % of the image, inside the body, in place."""
    names = [PHANTOM_V2_CLASSES[c] for c in ORGANS]
    name = names[int(rng.integers(len(names)))]
    label = PHANTOM_V2_CLASSES.index(name)
    h, w = labels.shape
    target = int(round(float(rng.uniform(0.01, 0.02)) * h * w))
    blocked = ndimage.binary_dilation(labels == label, structure=np.ones((3, 3), dtype=bool))
    body = np.argwhere(hu > -500)
    shapes = [[(0, 0)], [(0, 0), (0, 1)], [(0, 0), (1, 0)], [(0, 0), (0, 1), (1, 0)], [(0, 0), (0, 1), (1, 0), (1, 1)]]
    done = 0
    for _ in range(50 * target):
        if done >= target or len(body) == 0:
            break
        r, c = body[int(rng.integers(len(body)))]
        cells = [(r + dr, c + dc) for dr, dc in shapes[int(rng.integers(len(shapes)))]]
        if any(not (0 <= y < h and 0 <= x < w) or blocked[y, x] for y, x in cells):
            continue
        for y, x in cells:
            labels[y, x] = label
            hu[y, x] = patient.hu[name]
            blocked[max(0, y - 1):y + 2, max(0, x - 1):x + 2] = True
        done += len(cells)


def corrupt_slice(patient: PatientV2, z: float, size: int, kind: str,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A corrupted slice (HU float32, labels uint8) of ``patient`` at ``z`` (inside ``corruption_z``), with
    image and mask corrupted together. ``CORRUPTION_RULES[kind]`` names the rule(s) it must break."""
    ranges = corruption_z(patient, kind)
    if not any(lo <= z <= hi for lo, hi in ranges):
        shown = ", ".join(f"[{lo:.3f}, {hi:.3f}]" for lo, hi in ranges)
        raise ValueError(f"corruption {kind!r} applies to this patient at z in {shown}, got {z:.3f}")
    seed = int(rng.integers(0, 2 ** 31))
    factor = render_factor(size)
    if kind == "chest_over_pelvis":
        hu, labels = _chest_over_pelvis(patient, z, size, rng, seed)
    elif kind == "organ_duplicated":
        hu, labels = _duplicate(patient, z, size, rng, seed)
    elif kind == "speckle":
        hu, labels = render_clean(patient, z, size * factor, np.random.default_rng(seed))
    else:
        hu, labels = render_clean(patient, z, size * factor, np.random.default_rng(seed),
                                  _edit_for(patient, z, kind, rng))
    hu, labels = downsample(hu, labels, size)
    if kind == "speckle":
        _speckle(patient, hu, labels, rng)
    return add_noise(hu, patient, rng), labels


def corrupted_arrays(size: int, n: int, kind: str, seed: int = 0, split: str = "test",
                     window: tuple[float, float] = PHANTOM_WINDOW) -> dict[str, Any]:
    """``n`` corrupted slices of kind ``kind``, one patient each (patients of ``split``), at heights drawn inside
    ``corruption_z``: ``image`` [N,1,H,W], ``segmentation`` [N,H,W], ``variant``, ``z``, ``kind``."""
    patients = patients_v2(seed, split, n)
    images = np.empty((n, 1, size, size), dtype=np.float32)
    masks = np.empty((n, size, size), dtype=np.int64)
    zs = np.empty(n)
    for i, patient in enumerate(patients):
        rng = np.random.default_rng([seed, _split_code(split), 21, CORRUPTIONS.index(kind), i])
        ranges = corruption_z(patient, kind)
        zs[i] = float(rng.uniform(*ranges[int(rng.integers(len(ranges)))]))
        hu, labels = corrupt_slice(patient, float(zs[i]), size, kind, rng)
        images[i, 0] = window_ct(hu, *window)
        masks[i] = labels
    return {"image": torch.from_numpy(images), "segmentation": torch.from_numpy(masks),
            "variant": [p.variant for p in patients], "z": zs, "kind": kind}
