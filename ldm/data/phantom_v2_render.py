"""Phantom v2 renderer: seeded patients with variants, one axial slice at a height ``z``.

Display orientation as in v1 (``ldm.data.phantom_render``): anterior at the top, the patient's right on the
image's left, u = columns and v = rows in [-1, 1]; ``z`` from 0 (lower pelvis) to 1 (lower chest). Every
structure is drawn in an *anatomical frame* (body centre at the origin, posterior = +v) and then placed in
the field by the patient's pose: ``display = shift + zoom * R(rotation) @ anatomical``, so the body outline
and every organ rotate, move and zoom together; the body stays inside the image with a margin of at least
3 % of the side.

Every slice is drawn by ``ldm.data.phantom_v2_paint`` on the canvas of ``ldm.data.phantom_v2_canvas`` for a
patient of ``ldm.data.phantom_v2_patient`` (their public names are re-exported here); this module reduces it
to the output size and adds the noise. The anatomy (ids, levels, variants) is defined in
``ldm.data.anatomy_check_v2``.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from ldm.data.phantom_v2_paint import NO_EDIT, SLIVER_FRACTION, Edit, absorb_slivers, bump, render_clean
from ldm.data.phantom_v2_patient import (FIELD_MARGIN, MAX_ROTATION_DEG, PHASE_PROB, PHASES, SIZE_RANGE, PatientV2,
                                         draw_variant, sample_patient_v2)

__all__ = ["PatientV2", "sample_patient_v2", "draw_variant", "PHASES", "PHASE_PROB", "SIZE_RANGE", "MAX_ROTATION_DEG",
           "FIELD_MARGIN", "Edit", "NO_EDIT", "bump", "absorb_slivers", "SLIVER_FRACTION", "render_clean",
           "downsample", "add_noise", "slice_rng", "render_factor"]


def downsample(hu: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Area mean of the HU and the most frequent label of each ``f x f`` block (f = render size / size), then
    organ slivers absorbed again at the output size."""
    f = hu.shape[0] // size
    if f * size != hu.shape[0]:
        raise ValueError("render size must be a multiple of the output size")
    if f == 1:
        return ndimage.gaussian_filter(hu, 0.6), labels.copy()
    hu = hu.reshape(size, f, size, f).mean(axis=(1, 3))
    if f > 3:  # centre sample
        return hu.astype(np.float32), np.ascontiguousarray(labels[f // 2::f, f // 2::f], dtype=np.uint8)
    subs = [labels[i::f, j::f] for i in range(f) for j in range(f)]
    counts = [sum((a == b) for b in subs) for a in subs]  # votes for each sub-sample's label
    out = np.ascontiguousarray(np.choose(np.argmax(np.stack(counts), axis=0), subs), dtype=np.uint8)
    hu = hu.astype(np.float32)
    absorb_slivers(hu, out)  # pieces the reduction cut off
    return hu, out


def add_noise(hu: np.ndarray, p: PatientV2, rng: np.random.Generator) -> np.ndarray:
    """Smooth tissue texture inside the body plus white noise of the patient's level (as v1)."""
    size = hu.shape[0]
    texture = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), max(1.0, size / 64))
    texture *= 8.0 / max(float(texture.std()), 1e-6)
    noise = rng.normal(0.0, p.noise_hu, size=hu.shape).astype(np.float32)
    return (hu + texture * (hu > -500) + noise).astype(np.float32)


def slice_rng(p: PatientV2, z: float) -> np.random.Generator:
    """The generator of one slice's bowel loops and noise, fixed by the patient and the height."""
    return np.random.default_rng([p.seed, int(round(float(z) * 1e6))])


def render_factor(size: int, min_render: int = 128) -> int:
    return max(1, math.ceil(min_render / size))
