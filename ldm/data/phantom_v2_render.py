"""Phantom v2 renderer: seeded patients with variants, one axial slice at a height ``z``.

Display orientation as in v1 (``ldm.data.phantom_render``): anterior at the top, the patient's right on the
image's left, u = columns and v = rows in [-1, 1]; ``z`` from 0 (lower pelvis) to 1 (lower chest). Every
structure is drawn in an *anatomical frame* (body centre at the origin, posterior = +v) and then placed in
the field by the patient's pose: ``display = shift + zoom * R(rotation) @ anatomical``, so the body outline
and every organ rotate, move and zoom together; the body stays inside the image with a margin of at least
3 % of the side.

The anatomy (ids, levels, variants) is defined in ``ldm.data.anatomy_check_v2``. Each level's bone marker is
a step in z at the patient's own boundary (``PatientV2.level_z``): pelvic bone below the pelvis top, ribs
from the upper abdomen up, the sternum in the chest, so a slice's level is visible in its mask. Organ
heights follow v1 (bladder and pelvic bone low, kidneys mid, liver and spleen upper abdomen, lungs and
ribs top, the vertebra everywhere, the aorta above its bifurcation just below the pelvis top), each jittered
per patient. ``Edit`` draws the corruptions (an organ mirrored, deleted, duplicated, the liver and spleen
swapped, a kidney moved) with the same painters, so the corrupted image and mask stay consistent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy import ndimage

from ldm.data.anatomy_check_v2 import (AORTA, BLADDER, KIDNEY, LEVEL_JITTER, LEVELS, LIVER, LUNGS, PELVIS, RIBS,
                                       SPLEEN, VARIANTS, VERTEBRA)

PHASES: tuple[str, ...] = ("native", "arterial", "portal")
PHASE_PROB: tuple[float, ...] = (0.25, 0.25, 0.5)
SIZE_RANGE = (0.7, 1.3)  # organ size factor (liver, spleen, kidney, bladder): +-30 %
MAX_ROTATION_DEG = 15.0
FIELD_MARGIN = 0.03  # fraction of the image side kept free around the body
# Shape rows of PatientV2.harmonics
_BODY, _LIVER, _SPLEEN, _KID_R, _KID_L, _LUNG_R, _LUNG_L, _BLADDER = range(8)
_HARM_AMPS = np.array([0.10, 0.06, 0.035])  # harmonics k = 2, 3, 4 (fraction of the radius)


@dataclass
class PatientV2:
    """One phantom-v2 patient: variant, pose, habitus, level boundaries, organ sizes and intensities.

    Args:
        variant: a ``VARIANTS`` name, the same in every slice.
        seed: seeds each slice's noise and bowel loops (with z) when ``render_slice_v2`` gets no rng.
        rotation: body rotation about the body axis (radians, +-15 deg); zoom: body size factor in the field;
            shift: display (u, v) of the body centre.
        habitus: 0 thin .. 1 obese; fat: subcutaneous fat thickness; inner_a, inner_b: semi-axes inside the fat;
            spine_v: depth of the vertebral body centre (anatomical frame).
        level_z: the patient's pelvis top, ribs start and chest start (``LEVELS`` boundaries, jittered).
        bladder_z1, bifurcation_z: bladder top, aortic bifurcation; kidney_z, liver_z, spleen_z: height ranges;
            lung_z0: lung bases; pelvic_z: height range of a pelvic kidney; horseshoe_z1: top of the isthmus.
        odd_side: side (-1 image left = patient's right, +1 image right) of the absent / pelvic kidney, else 0.
        scale: size factor per organ; kidney_du: kidney distance from the midline.
        phase: contrast phase (``PHASES``); hu: tissue intensities (HU); noise_hu: image noise (HU, sd).
        harmonics: shape coefficients, [shape, k, (amplitude, phase)].
    """

    variant: str
    seed: int
    rotation: float
    zoom: float
    shift: tuple[float, float]
    habitus: float
    fat: float
    inner_a: float
    inner_b: float
    spine_v: float
    level_z: tuple[float, float, float]
    bladder_z1: float
    bifurcation_z: float
    kidney_z: tuple[float, float]
    liver_z: tuple[float, float]
    spleen_z: tuple[float, float]
    lung_z0: float
    pelvic_z: tuple[float, float]
    horseshoe_z1: float
    odd_side: int
    scale: dict[str, float]
    kidney_du: float
    phase: str
    hu: dict[str, float]
    noise_hu: float
    harmonics: np.ndarray = field(repr=False)

    @property
    def mirror(self) -> int:
        """-1 for situs inversus (liver, spleen, aorta, IVC, stomach and heart mirrored), else +1."""
        return -1 if self.variant == "situs_inversus" else 1

    def level(self, z: float) -> str:
        """This patient's body level at height z (a ``LEVELS`` name)."""
        pelvis_top, ribs_z, chest_z = self.level_z
        if z < pelvis_top:
            return "pelvis"
        if z < ribs_z:
            return "lower_abdomen"
        return "upper_abdomen" if z < chest_z else "chest"

    def kidney_sides(self, z: float) -> tuple[int, ...]:
        """Sides (-1, +1) with a kidney at its normal place at height z (none outside ``kidney_z``)."""
        if not self.kidney_z[0] < z < self.kidney_z[1]:
            return ()
        if self.variant in ("single_kidney", "pelvic_kidney"):
            return (-self.odd_side,)
        return (-1, 1)


def draw_variant(u: float) -> str:
    """The variant whose cumulative prevalence interval holds ``u`` in [0, 1)."""
    acc = 0.0
    for name, prob in VARIANTS.items():
        acc += prob
        if u < acc:
            return name
    return "normal"


def _tissue_hu(rng: np.random.Generator, phase: str) -> dict[str, float]:
    """Intensities (HU) by contrast phase; the spleen differs from the liver by >= 10 HU in every phase."""
    def j(scale: float) -> float:
        return float(rng.uniform(-scale, scale))

    liver = {"native": 58.0, "arterial": 72.0, "portal": 108.0}[phase] + j(8)
    spleen_delta = {"native": -15.0 + j(3), "arterial": 38.0 + j(8), "portal": 17.0 + j(4)}[phase]
    aorta = {"native": 42.0 + j(5), "arterial": 290.0 + j(50), "portal": 165.0 + j(20)}[phase]
    kidney = {"native": 32.0 + j(5), "arterial": 175.0 + j(25), "portal": 150.0 + j(20)}[phase]
    ivc = {"native": 40.0, "arterial": 62.0, "portal": 135.0}[phase] + j(6)
    return {"fat": -100.0 + j(15), "muscle": 50.0 + j(6), "cavity": -55.0 + j(25), "liver": liver,
            "spleen": liver + spleen_delta, "kidney": kidney, "bladder": 8.0 + j(6), "lungs": -850.0 + j(40),
            "aorta": aorta, "ivc": ivc, "bone": 750.0 + j(150), "bowel": 45.0 + j(10), "heart": 0.5 * (aorta + 60.0)}


def _pose(rng: np.random.Generator, a: float, b: float, harm: np.ndarray) -> tuple[float, float, tuple[float, float]]:
    """Rotation, zoom and shift that keep the body outline (semi-axes a, b, harmonics) inside the field."""
    rotation = math.radians(float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)))
    t = np.linspace(0.0, 2 * math.pi, 181)
    radius = 1.0 + sum(amp * np.cos(k * t + ph) for k, (amp, ph) in enumerate(harm, start=2))
    x, y = a * radius * np.cos(t), b * radius * np.sin(t)
    ca, sa = math.cos(rotation), math.sin(rotation)
    half_x = float(np.abs(ca * x - sa * y).max())
    half_y = float(np.abs(sa * x + ca * y).max())
    limit = 1.0 - 2.0 * FIELD_MARGIN - 0.01  # the image is 2 wide in normalised units
    zoom = float(rng.uniform(0.74, 0.90)) / a
    zoom = min(zoom, limit / max(half_x, half_y))
    room_x, room_y = max(0.0, limit - zoom * half_x), max(0.0, limit - zoom * half_y)
    shift = (float(rng.uniform(-room_x, room_x)), float(rng.uniform(-room_y, room_y)))
    return rotation, zoom, shift


def _heights(rng: np.random.Generator) -> dict[str, object]:
    """Level boundaries and organ height ranges of one patient (derived from ``LEVELS``)."""
    def j(scale: float) -> float:
        return float(rng.uniform(-scale, scale))

    pelvis_top = LEVELS["pelvis"][1] + j(LEVEL_JITTER)
    ribs_z = LEVELS["upper_abdomen"][0] + j(LEVEL_JITTER)
    chest_z = LEVELS["chest"][0] + j(LEVEL_JITTER)
    k0 = pelvis_top + 0.03 + float(rng.uniform(0.0, 0.03))
    k1 = min(k0 + 0.27 + j(0.02), ribs_z + 0.08)
    liver = (ribs_z - 0.08 + j(0.01), chest_z + 0.06 + j(0.015))
    s0 = max(ribs_z + 0.04, k1 + 0.01) + float(rng.uniform(0.0, 0.02))
    return dict(level_z=(pelvis_top, ribs_z, chest_z), bladder_z1=pelvis_top - 0.09 + j(0.02),
                bifurcation_z=pelvis_top - 0.05 + j(0.01), kidney_z=(k0, k1), liver_z=liver,
                spleen_z=(s0, chest_z - 0.01 - float(rng.uniform(0.0, 0.015))), lung_z0=chest_z - 0.10 + j(0.015),
                pelvic_z=(0.05, pelvis_top - 0.04), horseshoe_z1=k0 + 0.09)


def sample_patient_v2(rng: np.random.Generator, variant: Optional[str] = None) -> PatientV2:
    """Draw one patient. The variant is the first draw (by ``VARIANTS`` prevalence) unless ``variant`` forces it."""
    drawn = draw_variant(float(rng.uniform()))
    variant = drawn if variant is None else variant
    if variant not in VARIANTS:
        raise ValueError(f"unknown phantom v2 variant {variant!r}; use one of {tuple(VARIANTS)}")
    seed = int(rng.integers(0, 2 ** 31))
    habitus = float(rng.uniform())
    inner_a = float(rng.uniform(0.62, 0.70))
    inner_b = inner_a * (float(rng.uniform(0.64, 0.76)) + 0.06 * habitus)  # obese bodies are rounder
    fat = 0.025 + 0.12 * habitus + float(rng.uniform(-0.008, 0.008))
    amps = rng.uniform(0.0, 1.0, size=(8, 3)) * _HARM_AMPS
    amps[_BODY] *= 0.35
    harmonics = np.stack([amps, rng.uniform(0.0, 2 * math.pi, size=(8, 3))], axis=-1)
    rotation, zoom, shift = _pose(rng, inner_a + fat, inner_b + fat, harmonics[_BODY])
    heights = _heights(rng)
    scale = {name: float(rng.uniform(*SIZE_RANGE)) for name in ("liver", "spleen", "kidney", "bladder")}
    scale["lungs"] = float(rng.uniform(0.8, 1.2))
    scale["aorta"] = float(rng.uniform(0.95, 1.1))
    phase = PHASES[int(rng.choice(len(PHASES), p=PHASE_PROB))]
    odd_side = int(rng.choice([-1, 1])) if variant in ("single_kidney", "pelvic_kidney") else 0
    return PatientV2(variant=variant, seed=seed, rotation=rotation, zoom=zoom, shift=shift, habitus=habitus, fat=fat,
                     inner_a=inner_a, inner_b=inner_b, spine_v=inner_b - 0.25, odd_side=odd_side, scale=scale,
                     kidney_du=float(rng.uniform(0.32, 0.37)), phase=phase, hu=_tissue_hu(rng, phase),
                     noise_hu=float(rng.uniform(8.0, 25.0)), harmonics=harmonics, **heights)


@dataclass(frozen=True)
class Edit:
    """What to draw differently from the patient's anatomy (the corruptions; the default draws it as it is).

    Args:
        mirror: organs ("liver", "spleen", "aorta") drawn mirrored across the body midline.
        delete: organs not drawn (the surrounding tissue stays).
        swap_liver_spleen: the liver drawn at the spleen's place and the spleen at the liver's.
        duplicate: (organ, du, dv, scale): a second copy of "liver", "spleen" or "bladder", its centre moved
            by (du, dv) in the anatomical frame and its size scaled.
        kidney_move: (side, u, v): the kidney of that side drawn with its centre at (u, v) (anatomical frame).
    """

    mirror: frozenset = frozenset()
    delete: frozenset = frozenset()
    swap_liver_spleen: bool = False
    duplicate: Optional[tuple[str, float, float, float]] = None
    kidney_move: Optional[tuple[int, float, float]] = None


NO_EDIT = Edit()


def _ramp(x: float, width: float, power: float = 0.5) -> float:
    """0 below 0, rising to 1 at ``width``."""
    return 0.0 if x <= 0 else min(1.0, x / width) ** power


def bump(z: float, lo: float, hi: float, power: float = 0.5) -> float:
    """A rounded bump, 0 outside (lo, hi)."""
    if z <= lo or z >= hi:
        return 0.0
    return math.sin(math.pi * (z - lo) / (hi - lo)) ** power


class _Canvas:
    """Display grid with the anatomical coordinates of every pixel, plus the growing HU image and label map."""

    def __init__(self, n: int, p: PatientV2) -> None:
        self.c = ((np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0).astype(np.float32)
        self.ca, self.sa = math.cos(p.rotation), math.sin(p.rotation)
        self.zoom, self.shift = p.zoom, p.shift
        dx = self.c[None, :] - np.float32(p.shift[0])
        dy = self.c[:, None] - np.float32(p.shift[1])
        self.u = ((self.ca * dx + self.sa * dy) / p.zoom).astype(np.float32)
        self.v = ((-self.sa * dx + self.ca * dy) / p.zoom).astype(np.float32)
        self.hu = np.full((n, n), -1000.0, dtype=np.float32)
        self.labels = np.zeros((n, n), dtype=np.uint8)

    def window(self, cu: float, cv: float, reach: float) -> tuple[slice, slice]:
        """Rows and columns of the display box around anatomical point (cu, cv) with radius ``reach``."""
        x = self.shift[0] + self.zoom * (self.ca * cu - self.sa * cv)
        y = self.shift[1] + self.zoom * (self.sa * cu + self.ca * cv)
        r = reach * self.zoom
        r0, r1 = np.searchsorted(self.c, [y - r, y + r])
        c0, c1 = np.searchsorted(self.c, [x - r, x + r])
        return slice(int(r0), int(r1)), slice(int(c0), int(c1))

    def blob(self, cu: float, cv: float, au: float, av: float, angle: float = 0.0,
             harm: Optional[np.ndarray] = None, flip: bool = False) -> np.ndarray:
        """Boolean mask of a (deformed, rotated) ellipse in the anatomical frame; ``flip`` mirrors its shape."""
        out = np.zeros(self.u.shape, dtype=bool)
        if au <= 0 or av <= 0:
            return out
        reach = max(au, av) * (1.0 + (float(np.abs(harm[:, 0]).sum()) if harm is not None else 0.0))
        rows, cols = self.window(cu, cv, reach)
        if rows.stop <= rows.start or cols.stop <= cols.start:
            return out
        du = self.u[rows, cols] - np.float32(cu)
        dv = self.v[rows, cols] - np.float32(cv)
        if flip:
            du = -du
        ca, sa = np.float32(math.cos(angle)), np.float32(math.sin(angle))
        x = (ca * du + sa * dv) / np.float32(au)
        y = (-sa * du + ca * dv) / np.float32(av)
        r2 = x * x + y * y
        if harm is None:
            out[rows, cols] = r2 <= 1.0
            return out
        theta = np.arctan2(y, x)
        radius = np.ones_like(r2)
        for k, (amp, phase) in enumerate(harm, start=2):
            radius += np.float32(amp) * np.cos(k * theta + np.float32(phase))
        out[rows, cols] = r2 <= radius * radius
        return out

    def paint(self, region: np.ndarray, hu: float, label: Optional[int] = None) -> None:
        self.hu[region] = hu
        if label is not None:
            self.labels[region] = label


def _paint_body(cv: _Canvas, p: PatientV2) -> tuple[np.ndarray, np.ndarray]:
    """Body outline (fat), muscle wall and the abdominal cavity; returns (body, cavity)."""
    h = p.harmonics[_BODY]
    body = cv.blob(0.0, 0.0, p.inner_a + p.fat, p.inner_b + p.fat, harm=h)
    cv.paint(body, p.hu["fat"])
    cv.paint(cv.blob(0.0, 0.0, p.inner_a, p.inner_b, harm=h), p.hu["muscle"])
    cavity = cv.blob(0.0, 0.0, p.inner_a - 0.05, p.inner_b - 0.05, harm=h)
    cv.paint(cavity, p.hu["cavity"])
    return body, cavity


def _paint_viscera(cv: _Canvas, p: PatientV2, z: float, cavity: np.ndarray, rng: np.random.Generator) -> None:
    """Unlabelled soft tissue: psoas and paraspinal muscles, bowel loops, stomach, IVC."""
    sv, m = p.spine_v, p.mirror
    pelvis_top, ribs_z, chest_z = p.level_z
    for side in (-1, 1):
        cv.paint(cv.blob(side * 0.14, sv + 0.16, 0.1, 0.08), p.hu["muscle"] + 5)
        psoas = bump(z, 0.05, ribs_z + 0.05, 1.0)
        if psoas > 0:
            cv.paint(cv.blob(side * 0.17, sv - 0.02, 0.075 * psoas + 0.01, 0.065 * psoas + 0.01) & cavity,
                     p.hu["muscle"])
    if 0.06 < z < ribs_z + 0.05:
        for _ in range(int(rng.integers(4, 9))):
            bu, bv = rng.uniform(-0.42, 0.42), rng.uniform(-p.inner_b + 0.1, sv - 0.3)
            loop = cv.blob(bu, bv, rng.uniform(0.05, 0.1), rng.uniform(0.04, 0.08), rng.uniform(0, math.pi)) & cavity
            cv.paint(loop, p.hu["bowel"] + 20.0 * rng.uniform(-1, 1))
            if rng.uniform() < 0.4:
                cv.paint(cv.blob(bu, bv - 0.02, 0.035, 0.025) & loop, -700.0)
    stomach = bump(z, ribs_z + 0.02, chest_z + 0.03)
    if stomach > 0:
        st = cv.blob(m * 0.2, -p.inner_b * 0.45, 0.2 * stomach, 0.14 * stomach, -m * 0.3) & cavity
        cv.paint(st, 25.0)
        cv.paint(st & (cv.v < -p.inner_b * 0.45 - 0.06 * stomach), -800.0)
    if z > p.bifurcation_z:
        cv.paint(cv.blob(-m * 0.15, sv - 0.22, 0.075, 0.055) & cavity, p.hu["ivc"])


def _lung_regions(cv: _Canvas, p: PatientV2, z: float, cavity: np.ndarray) -> Optional[np.ndarray]:
    g = _ramp(z - p.lung_z0, 0.16, 0.6)
    if g <= 0:
        return None
    s, sv = p.scale["lungs"], p.spine_v
    fa = p.inner_a / 0.66
    region = np.zeros_like(cavity)
    for side, row in ((-1, _LUNG_R), (1, _LUNG_L)):
        lu, lv = side * (0.30 + 0.05 * g) * fa, sv - 0.02 - 0.36 * g
        region |= cv.blob(lu, lv, (0.13 + 0.17 * g) * s, (0.07 + 0.32 * g) * s, side * 0.4 * (1 - g),
                          p.harmonics[row])
    return region & cavity & (np.abs(cv.u) > 0.13)


def _paint_lungs(cv: _Canvas, p: PatientV2, z: float, cavity: np.ndarray, e: Edit) -> None:
    """Lungs (posterior crescents at the bases, filling the chest higher up) with the heart between them."""
    region = None if "lungs" in e.delete else _lung_regions(cv, p, z, cavity)
    if region is not None:
        cv.paint(region, p.hu["lungs"], LUNGS)
    heart = _ramp(z - p.level_z[2] + 0.02, 0.1, 0.7)
    if heart > 0:
        m = p.mirror
        cv.paint(cv.blob(m * 0.08, -p.inner_b * 0.3, 0.27 * heart, 0.21 * heart, m * 0.3) & cavity, p.hu["heart"], 0)


def _liver_profile(p: PatientV2, z: float) -> float:
    lo, hi = p.liver_z
    return _ramp(z - lo, 0.07) * _ramp(hi - z, 0.18)


def _liver_region(cv: _Canvas, p: PatientV2, z: float, flip: bool, dx: float = 0.0, dy: float = 0.0,
                  k: float = 1.0) -> Optional[tuple[np.ndarray, tuple[float, float]]]:
    """The liver (right lobe, and the left lobe crossing the midline higher up) and its centre; ``flip``
    mirrors it."""
    prof = _liver_profile(p, z)
    if prof <= 0:
        return None
    m = -1 if flip else 1
    s = p.scale["liver"] * prof * k
    lu, lv = m * _CENTRES["liver"][0] * p.inner_a / 0.66 + dx, _CENTRES["liver"][1] + dy
    region = cv.blob(lu, lv, 0.30 * s, 0.34 * s, m * 0.2, p.harmonics[_LIVER], flip)
    lobe = bump(z, 0.5 * (p.liver_z[0] + p.liver_z[1]), p.liver_z[1] - 0.04)
    if lobe > 0:
        # the left lobe grows out of the right lobe towards the midline (its centre inside the right lobe)
        region |= cv.blob(lu + m * 0.6 * 0.30 * s, lv - 0.45 * 0.34 * s, 0.27 * lobe * s, 0.11 * lobe * s,
                          -m * 0.2, flip=flip)
    return region, (lu, lv)


def _spleen_region(cv: _Canvas, p: PatientV2, z: float, flip: bool, dx: float = 0.0, dy: float = 0.0,
                   k: float = 1.0) -> Optional[tuple[np.ndarray, tuple[float, float]]]:
    """The spleen, posterolateral on the patient's left (image right), and its centre; ``flip`` mirrors it."""
    prof = bump(z, *p.spleen_z, 0.5)
    if prof <= 0:
        return None
    m = -1 if flip else 1
    s = p.scale["spleen"] * prof * k
    su, sv = m * _CENTRES["spleen"][0] * p.inner_a / 0.66 + dx, _CENTRES["spleen"][1] + dy
    return cv.blob(su, sv, 0.12 * s, 0.21 * s, m * 0.5, p.harmonics[_SPLEEN], flip), (su, sv)


# Organ centres for the normal situs (lateral before the patient's width factor inner_a / 0.66, depth).
_CENTRES = {"liver": (-0.30, -0.02), "spleen": (0.44, 0.08)}


def _paint_liver_spleen(cv: _Canvas, p: PatientV2, z: float, cavity: np.ndarray, e: Edit) -> None:
    """Liver (label 1) and spleen (label 2) with the patient's situs and the edit's mirror / swap / duplicate."""
    m = p.mirror
    flip = {name: (m < 0) != (name in e.mirror) for name in ("liver", "spleen")}
    offsets = {"liver": (0.0, 0.0), "spleen": (0.0, 0.0)}
    if e.swap_liver_spleen:
        fa = p.inner_a / 0.66
        (lu, lv), (su, sv) = _CENTRES["liver"], _CENTRES["spleen"]
        offsets = {"liver": (m * (su - lu) * fa, sv - lv), "spleen": (m * (lu - su) * fa, lv - sv)}
    painters = {"liver": (_liver_region, LIVER), "spleen": (_spleen_region, SPLEEN)}
    jobs = [(name, offsets[name] + (1.0,)) for name in sorted(painters, key=lambda n: n in e.mirror)
            if name not in e.delete]  # a mirrored organ is drawn last, so that it shows
    if e.duplicate is not None and e.duplicate[0] in painters:
        jobs.append((e.duplicate[0], tuple(e.duplicate[1:])))
    for name, (dx, dy, k) in jobs:
        fn, label = painters[name]
        drawn = fn(cv, p, z, flip[name], dx, dy, k)
        if drawn is None:
            continue
        region = drawn[0] & cavity
        cv.paint(region, p.hu[name], label)
        if name == "liver":  # hepatic vessels
            cu, cvv = drawn[1]
            cv.paint(region & cv.blob(cu + 0.05, cvv + 0.02, 0.03, 0.03), 0.5 * (p.hu["liver"] + p.hu["ivc"]))


def _kidney_blob(cv: _Canvas, p: PatientV2, side: int, ku: float, kv: float, k: float) -> np.ndarray:
    s = p.scale["kidney"] * k
    row = _KID_R if side < 0 else _KID_L
    return cv.blob(ku, kv, 0.13 * s, 0.17 * s, -side * 0.5, p.harmonics[row])


def _paint_kidney(cv: _Canvas, p: PatientV2, region: np.ndarray, side: int, ku: float, kv: float, k: float) -> None:
    """One kidney with perirenal fat around it and a darker renal sinus."""
    s = p.scale["kidney"] * k
    cv.paint(ndimage.binary_dilation(region, iterations=1) & ~(cv.labels > 0), p.hu["fat"] + 30)
    cv.paint(region, p.hu["kidney"], KIDNEY)
    sinus = cv.blob(ku - side * 0.035 * s, kv - 0.02, 0.035 * s, 0.075 * s, -side * 0.5) & region
    cv.paint(sinus, 0.5 * p.hu["kidney"] - 20.0)


def _isthmus(cv: _Canvas, p: PatientV2, half: float, kv: float) -> np.ndarray:
    """The horseshoe isthmus: a band from one lower pole to the other in front of the aorta."""
    sv = p.spine_v
    ctrl = sv - 0.85
    region = np.zeros(cv.u.shape, dtype=bool)
    for t in np.linspace(0.0, 1.0, 17):
        u = (2 * t - 1) * half
        v = (1 - t) ** 2 * kv + 2 * t * (1 - t) * ctrl + t ** 2 * kv
        region |= cv.blob(float(u), float(v), 0.055, 0.055)
    return region


def _paint_kidneys(cv: _Canvas, p: PatientV2, z: float, cavity: np.ndarray, e: Edit) -> Optional[np.ndarray]:
    """Kidneys (label 3) beside the spine, the variant's pelvic kidney or horseshoe; returns a late isthmus."""
    if "kidney" in e.delete:
        return None
    sv = p.spine_v
    k0, k1 = p.kidney_z
    k = bump(z, k0, k1, 0.4)
    horseshoe = p.variant == "horseshoe_kidney" and k0 < z < p.horseshoe_z1
    late = None
    for side in p.kidney_sides(z):
        ku, kv, kk = side * p.kidney_du, sv - 0.10, k
        if horseshoe:
            ku, kv, kk = side * (p.kidney_du - 0.07), sv - 0.15, max(k, 0.75)
        if e.kidney_move is not None and e.kidney_move[0] == side:
            ku, kv = e.kidney_move[1], e.kidney_move[2]
        _paint_kidney(cv, p, _kidney_blob(cv, p, side, ku, kv, kk) & cavity, side, ku, kv, kk)
    if horseshoe:
        late = _isthmus(cv, p, p.kidney_du - 0.07, sv - 0.15) & cavity
    if p.variant == "pelvic_kidney":
        pk = bump(z, *p.pelvic_z, 0.5)
        if pk > 0:
            side = p.odd_side
            ku, kv = side * 0.23, sv - 0.30
            region = _kidney_blob(cv, p, side, ku, kv, 0.88 * pk) & cavity
            _paint_kidney(cv, p, region, side, ku, kv, 0.88 * pk)
    return late


def _paint_bladder(cv: _Canvas, p: PatientV2, z: float, cavity: np.ndarray, e: Edit) -> None:
    """Bladder (label 4) in the anterior pelvis, the rectum behind it."""
    bl = bump(z, -0.06, p.bladder_z1, 0.5)
    if bl <= 0:
        return
    sv = p.spine_v

    def region(dx: float = 0.0, dy: float = 0.0, k: float = 1.0) -> np.ndarray:
        bw = 0.22 * bl * p.scale["bladder"] * k
        return cv.blob(dx, sv - 0.45 + dy, bw, 0.75 * bw, 0.0, p.harmonics[_BLADDER]) & cavity

    if "bladder" not in e.delete:
        cv.paint(region(), p.hu["bladder"], BLADDER)
    if e.duplicate is not None and e.duplicate[0] == "bladder":
        cv.paint(region(*e.duplicate[1:]), p.hu["bladder"], BLADDER)
    cv.paint(cv.blob(0.0, sv - 0.16, 0.06, 0.05) & cavity & (cv.labels == 0), -400.0)


def _paint_aorta(cv: _Canvas, p: PatientV2, z: float, e: Edit) -> None:
    """Aorta (label 6) in front of the spine on the patient's left, in a rim of retroperitoneal fat."""
    if z <= p.bifurcation_z or "aorta" in e.delete:
        return
    m = p.mirror * (-1 if "aorta" in e.mirror else 1)
    r = 0.105 * p.scale["aorta"]
    au, av = m * 0.105, p.spine_v - 0.235
    cv.paint(cv.blob(au, av, r + 0.03, r + 0.03) & (cv.labels == 0), p.hu["fat"] + 20)
    region = cv.blob(au, av, r, r)
    cv.paint(region, p.hu["aorta"], AORTA)


def _bone(cv: _Canvas, p: PatientV2, region: np.ndarray, label: int, marrow: Optional[np.ndarray] = None) -> None:
    cv.paint(region, p.hu["bone"], label)
    if marrow is not None:
        cv.hu[marrow & region] = 0.3 * p.hu["bone"]


def _paint_vertebra(cv: _Canvas, p: PatientV2, z: float, body: np.ndarray) -> None:
    """Vertebra (label 7) in every slice: sacrum low in the pelvis, lumbar (wide transverse processes), thoracic."""
    sv = p.spine_v
    pelvis_top, ribs_z, _ = p.level_z
    if z < pelvis_top - 0.03:
        width = 0.13 + 0.09 * max(z, 0.0) / pelvis_top
        sacrum = cv.blob(0.0, sv + 0.04, width, 0.075)
        _bone(cv, p, sacrum & body, VERTEBRA, cv.blob(0.0, sv + 0.04, 0.7 * width, 0.04))
        _bone(cv, p, cv.blob(0.0, sv + 0.15, 0.03, 0.05) & body, VERTEBRA)
        return
    lumbar = z < ribs_z
    _bone(cv, p, cv.blob(0.0, sv, 0.125 if lumbar else 0.115, 0.095) & body, VERTEBRA, cv.blob(0.0, sv, 0.08, 0.06))
    arch = cv.blob(0.0, sv + 0.13, 0.075, 0.055) & ~cv.blob(0.0, sv + 0.125, 0.04, 0.032)
    arch |= cv.blob(0.0, sv + 0.19, 0.03, 0.045 if lumbar else 0.06)
    for side in (-1, 1):
        if lumbar:  # wide transverse processes: the lumbar vertebra is clearly wider than deep
            arch |= cv.blob(side * 0.18, sv + 0.09, 0.115, 0.042, side * 0.1)
        else:
            arch |= cv.blob(side * 0.11, sv + 0.12, 0.055, 0.03, -side * 0.3)
    _bone(cv, p, arch & body, VERTEBRA)


def _paint_ribs(cv: _Canvas, p: PatientV2, z: float, body: np.ndarray) -> None:
    """Ribs (label 8) from the upper abdomen up: arcs in the body wall from the spine towards the front,
    covering more of the wall higher up; the sternum in the chest."""
    _, ribs_z, chest_z = p.level_z
    if z < ribs_z:
        return
    ra, rb = p.inner_a - 0.02, p.inner_b - 0.02
    u, v = cv.u, cv.v
    rr = np.sqrt((u / ra) ** 2 + (v / rb) ** 2) + 1e-6
    grad = np.sqrt((u / ra ** 2) ** 2 + (v / rb ** 2) ** 2) / rr + 1e-6
    ring = (np.abs(rr - 1.0) / grad < 0.04) & body
    phi = np.arctan2(np.abs(u) / ra, v / rb)  # 0 posterior midline, pi/2 lateral, pi anterior
    extent = min(1.0, (z - ribs_z) / 0.25)
    phi_max = 1.85 + 0.75 * extent
    start = 0.34 + 0.12 * math.sin(2 * math.pi * 5.0 * z + p.seed % 7)
    length, gap = 0.70, 0.20
    ribs = np.zeros_like(ring)
    lo = start
    while lo + 0.45 <= phi_max:
        ribs |= (phi >= lo) & (phi <= min(lo + length, phi_max))
        lo += length + gap
    _bone(cv, p, ribs & ring, RIBS)
    if z >= chest_z:
        _bone(cv, p, cv.blob(0.0, -p.inner_b + 0.05, 0.15, 0.065) & body, RIBS)


def _paint_pelvis(cv: _Canvas, p: PatientV2, z: float, body: np.ndarray) -> None:
    """Pelvic bone (label 9) below the pelvis top: iliac wings, lower down the femoral heads and pubic rami."""
    pelvis_top = p.level_z[0]
    if z >= pelvis_top:
        return
    sv, fa = p.spine_v, p.inner_a / 0.66
    for side in (-1, 1):
        if z >= 0.09:
            w = (z - 0.09) / (pelvis_top - 0.09)
            cu, cvv, ang = side * (0.28 + 0.12 * w) * fa, sv - 0.03 - 0.05 * w, -side * (0.6 + 0.3 * w)
            _bone(cv, p, cv.blob(cu, cvv, 0.19, 0.058, ang) & body, PELVIS, cv.blob(cu, cvv, 0.14, 0.025, ang))
        if z < 0.13:
            cu = side * 0.40 * fa
            _bone(cv, p, cv.blob(cu, -0.02, 0.10, 0.10) & body, PELVIS, cv.blob(cu, -0.02, 0.065, 0.065))
        if z < 0.05:
            _bone(cv, p, cv.blob(side * 0.13, -p.inner_b + 0.1, 0.12, 0.04, side * 0.3) & body, PELVIS)


_EIGHT = np.ones((3, 3), dtype=bool)
SLIVER_FRACTION = 0.12  # organ pieces below this fraction of the organ's largest piece are absorbed


def absorb_slivers(hu: np.ndarray, labels: np.ndarray,
                   classes: tuple[int, ...] = (LIVER, SPLEEN, KIDNEY, BLADDER, LUNGS)) -> None:
    """Give every small detached piece of an organ (a lung rim left beside the liver, a kidney tip cut off by
    the aorta) to its most common neighbouring structure, label and intensity alike (in place)."""
    for c in classes:
        lab, n = ndimage.label(labels == c, structure=_EIGHT)
        if n < 2:
            continue
        areas = np.bincount(lab.ravel(), minlength=n + 1)
        areas[0] = 0
        for i in np.flatnonzero(areas < SLIVER_FRACTION * areas.max())[1:]:
            piece = lab == i
            ring = ndimage.binary_dilation(piece, structure=_EIGHT) & ~piece
            around = labels[ring]
            if around.size == 0:
                continue
            new = int(np.bincount(around, minlength=16).argmax())
            labels[piece] = new
            hu[piece] = float(np.median(hu[ring][around == new]))


def render_clean(p: PatientV2, z: float, n: int, rng: np.random.Generator,
                 edit: Edit = NO_EDIT) -> tuple[np.ndarray, np.ndarray]:
    """Render one noiseless slice on an ``n x n`` grid: (HU float32, labels uint8)."""
    cv = _Canvas(n, p)
    body, cavity = _paint_body(cv, p)
    _paint_viscera(cv, p, z, cavity, rng)
    _paint_lungs(cv, p, z, cavity, edit)
    _paint_liver_spleen(cv, p, z, cavity, edit)
    isthmus = _paint_kidneys(cv, p, z, cavity, edit)
    _paint_bladder(cv, p, z, cavity, edit)
    _paint_aorta(cv, p, z, edit)
    if isthmus is not None:
        cv.paint(isthmus & (cv.labels != AORTA), p.hu["kidney"], KIDNEY)
    _paint_vertebra(cv, p, z, body)
    _paint_ribs(cv, p, z, body)
    _paint_pelvis(cv, p, z, body)
    absorb_slivers(cv.hu, cv.labels)
    return cv.hu, cv.labels


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
