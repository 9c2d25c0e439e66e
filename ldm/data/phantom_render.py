"""Analytic abdominal-CT-like phantom: seeded patients, one axial slice at a height ``z``.

Display orientation (radiological): rows run anterior (top) to posterior, columns run from the
patient's right (image left) to the patient's left. Normalised coordinates ``u`` (columns) and ``v``
(rows) lie in [-1, 1]. ``z`` runs from 0 (lower pelvis) to 1 (lower chest) and decides which organs a
slice shows. Label ids follow CT-Organ: 0 background, 1 liver, 2 bladder, 3 lungs, 4 kidneys, 5 bone.

Organ heights (before the per-patient jitter of about +-0.03):
bladder z < 0.18, kidneys 0.28-0.56 (the patient's right kidney a little lower), liver 0.42-0.80,
lungs above 0.66, pelvic bones below 0.30, ribs above 0.45; the spine (sacrum low down) is in every slice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

LIVER, BLADDER, LUNGS, KIDNEYS, BONE = 1, 2, 3, 4, 5

# Height ranges of the organs, shared with the anatomy checker's co-occurrence rules.
BLADDER_Z = (0.0, 0.18)
KIDNEY_Z = (0.28, 0.56)
LIVER_Z = (0.42, 0.80)
LUNG_Z = (0.66, 1.0)


@dataclass
class PhantomPatient:
    """Per-patient anatomy and intensity parameters (all drawn by ``sample_patient``).

    Args:
        body_a, body_b: horizontal and vertical semi-axes of the body outline.
        body_cv: vertical centre of the body.
        fat: subcutaneous fat thickness (fraction of the body size).
        spine_u: horizontal position of the spine.
        organ_scale: common size factor of the organs.
        liver_du, liver_dv: liver centre offsets; liver_z: liver height range.
        kidney_du: kidney distance from the spine; kidney_z_r, kidney_z_l: kidney height ranges
            (patient right = image left, patient left = image right).
        lung_z0: height where the lungs start; bladder_z1: height where the bladder ends;
        bladder_fill: bladder size factor.
        contrast: contrast phase in [0, 1] (brightens liver, kidneys, vessels).
        fat_hu, muscle_hu, liver_hu, kidney_hu, bladder_hu, lung_hu, bone_hu, vessel_hu: tissue intensities (HU).
        noise_hu: standard deviation of the image noise (HU).
        harmonics: shape-deformation coefficients, one row of (amplitude, phase) pairs per structure.
    """

    body_a: float
    body_b: float
    body_cv: float
    fat: float
    spine_u: float
    organ_scale: float
    liver_du: float
    liver_dv: float
    liver_z: tuple[float, float]
    kidney_du: float
    kidney_z_r: tuple[float, float]
    kidney_z_l: tuple[float, float]
    lung_z0: float
    bladder_z1: float
    bladder_fill: float
    contrast: float
    fat_hu: float
    muscle_hu: float
    liver_hu: float
    kidney_hu: float
    bladder_hu: float
    lung_hu: float
    bone_hu: float
    vessel_hu: float
    noise_hu: float
    harmonics: np.ndarray


_N_SHAPES = 8  # body, liver, kidney r, kidney l, lung r, lung l, bladder, spare
_N_HARM = 3  # harmonics k = 2, 3, 4


def sample_patient(rng: np.random.Generator) -> PhantomPatient:
    """Draw one phantom patient."""
    def jit(scale: float) -> float:
        return float(rng.uniform(-scale, scale))

    contrast = float(rng.uniform(0.0, 1.0))
    kz = (KIDNEY_Z[0] + jit(0.03), KIDNEY_Z[1] + jit(0.03))
    shift = float(rng.uniform(0.01, 0.04))
    amps = rng.uniform(0.0, 1.0, size=(_N_SHAPES, _N_HARM)) * np.array([0.06, 0.035, 0.02])
    phases = rng.uniform(0.0, 2 * math.pi, size=(_N_SHAPES, _N_HARM))
    return PhantomPatient(
        body_a=0.80 + jit(0.07), body_b=0.58 + jit(0.05), body_cv=0.04 + jit(0.03), fat=0.07 + jit(0.03),
        spine_u=jit(0.03), organ_scale=1.0 + jit(0.12),
        liver_du=jit(0.05), liver_dv=jit(0.05), liver_z=(LIVER_Z[0] + jit(0.03), LIVER_Z[1] + jit(0.03)),
        kidney_du=0.27 + jit(0.03), kidney_z_r=(kz[0] - shift, kz[1] - shift), kidney_z_l=kz,
        lung_z0=LUNG_Z[0] + jit(0.03), bladder_z1=BLADDER_Z[1] + jit(0.03), bladder_fill=0.8 + jit(0.25),
        contrast=contrast,
        fat_hu=-100.0 + jit(15), muscle_hu=50.0 + jit(8), liver_hu=58.0 + 50.0 * contrast + jit(8),
        kidney_hu=35.0 + 150.0 * contrast + jit(10), bladder_hu=8.0 + jit(6), lung_hu=-850.0 + jit(40),
        bone_hu=750.0 + jit(150), vessel_hu=45.0 + 200.0 * contrast + jit(10), noise_hu=float(rng.uniform(8, 25)),
        harmonics=np.stack([amps, phases], axis=-1),
    )


def _profile(z: float, lo: float, hi: float, power: float = 0.5, skew: float = 1.0) -> float:
    """Organ size factor along z: 0 outside [lo, hi], a rounded bump inside (peak at 0.5 ** (1 / skew))."""
    if z <= lo or z >= hi:
        return 0.0
    return math.sin(math.pi * ((z - lo) / (hi - lo)) ** skew) ** power


class _Canvas:
    """Coordinate grid plus the growing HU image and label map of one slice."""

    def __init__(self, n: int) -> None:
        self.c = (np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0
        self.v, self.u = np.meshgrid(self.c, self.c, indexing="ij")
        self.hu = np.full((n, n), -1000.0, dtype=np.float32)
        self.labels = np.zeros((n, n), dtype=np.uint8)

    def blob(self, cu: float, cv: float, au: float, av: float, angle: float = 0.0,
             harm: np.ndarray | None = None) -> np.ndarray:
        """Boolean mask of a (deformed, rotated) ellipse centred at (cu, cv) with semi-axes (au, av)."""
        out = np.zeros(self.u.shape, dtype=bool)
        if au <= 0 or av <= 0:
            return out
        reach = max(au, av) * (1.0 + (float(np.abs(harm[:, 0]).sum()) if harm is not None else 0.0))
        r0, r1 = np.searchsorted(self.c, [cv - reach, cv + reach])
        c0, c1 = np.searchsorted(self.c, [cu - reach, cu + reach])
        if r1 <= r0 or c1 <= c0:
            return out
        du, dv = self.u[r0:r1, c0:c1] - cu, self.v[r0:r1, c0:c1] - cv
        ca, sa = math.cos(angle), math.sin(angle)
        x = (ca * du + sa * dv) / au
        y = (-sa * du + ca * dv) / av
        r = np.hypot(x, y)
        if harm is None:
            out[r0:r1, c0:c1] = r <= 1.0
            return out
        theta = np.arctan2(y, x)
        radius = np.ones_like(r)
        for k, (amp, phase) in enumerate(harm, start=2):
            radius += amp * np.cos(k * theta + phase)
        out[r0:r1, c0:c1] = r <= radius
        return out

    def paint(self, region: np.ndarray, hu: float, label: int | None = None) -> None:
        self.hu[region] = hu
        if label is not None:
            self.labels[region] = label


def _paint_body(cv: _Canvas, p: PhantomPatient, z: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Body outline, subcutaneous fat, muscle wall, visceral fat/bowel background; returns (body, cavity)."""
    h = p.harmonics
    pelvis = _profile(z, -0.3, 0.3, 1.0)
    body_a = p.body_a * (1.0 + 0.06 * pelvis)
    body = cv.blob(0.0, p.body_cv, body_a, p.body_b, harm=h[0] * 0.5)
    cv.paint(body, p.fat_hu)
    inner_a, inner_b = body_a - p.fat, p.body_b - p.fat
    wall = cv.blob(0.0, p.body_cv, inner_a, inner_b, harm=h[0] * 0.5)
    cv.paint(wall, p.muscle_hu)
    cavity = cv.blob(0.0, p.body_cv + 0.01, inner_a - 0.05, inner_b - 0.05, harm=h[0] * 0.5)
    cv.paint(cavity, -20.0 + 35.0 * rng.uniform())
    return body, cavity


def _paint_unlabelled(cv: _Canvas, p: PhantomPatient, z: float, spine_v: float, body: np.ndarray,
                      cavity: np.ndarray, rng: np.random.Generator) -> None:
    """Unlabelled structures: bowel loops, paraspinal and psoas muscles, aorta and IVC, spleen and stomach."""
    s = p.organ_scale
    su = p.spine_u
    # Bowel loops (unlabelled) in the mid and lower abdomen, some holding gas.
    if 0.08 < z < 0.55:
        for _ in range(int(rng.integers(4, 9))):
            bu, bv = rng.uniform(-0.45, 0.45), rng.uniform(p.body_cv - 0.4, p.body_cv + 0.15)
            loop = cv.blob(bu, bv, rng.uniform(0.05, 0.1), rng.uniform(0.04, 0.08), rng.uniform(0, math.pi)) & cavity
            cv.paint(loop, 35.0 + 30.0 * rng.uniform())
            if rng.uniform() < 0.4:
                cv.paint(cv.blob(bu, bv - 0.02, 0.035, 0.025) & loop, -700.0)
    # Paraspinal and psoas muscles.
    for side in (-1, 1):
        cv.paint(cv.blob(su + side * 0.14, spine_v + 0.1, 0.1, 0.09) & body, p.muscle_hu + 5)
        psoas = _profile(z, 0.05, 0.5, 1.0)
        cv.paint(cv.blob(su + side * 0.15, spine_v - 0.06, 0.07 * psoas + 0.001, 0.06 * psoas + 0.001) & body,
                 p.muscle_hu)
    # Aorta (image right of the spine) and IVC (image left), above the bifurcation.
    if z > 0.18:
        cv.paint(cv.blob(su + 0.07, spine_v - 0.15, 0.042, 0.042), p.vessel_hu)
        cv.paint(cv.blob(su - 0.09, spine_v - 0.14, 0.05, 0.04), 0.6 * p.vessel_hu + 30)
    # Spleen and stomach (unlabelled) on the patient's left (image right).
    spleen = _profile(z, 0.5, 0.74)
    if spleen > 0:
        cv.paint(cv.blob(0.52, p.body_cv + 0.14, 0.11 * spleen * s, 0.2 * spleen * s, 0.5) & cavity, p.liver_hu - 8)
    stomach = _profile(z, 0.55, 0.78)
    if stomach > 0:
        st = cv.blob(0.28, p.body_cv - 0.22, 0.2 * stomach, 0.15 * stomach, -0.3) & cavity
        cv.paint(st, 25.0)
        cv.paint(st & (cv.v < p.body_cv - 0.22 - 0.06 * stomach), -800.0)


def render_slice(p: PhantomPatient, z: float, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render one noiseless slice on an ``n x n`` grid: (HU float32, labels uint8)."""
    cv = _Canvas(n)
    h = p.harmonics
    s = p.organ_scale
    body, cavity = _paint_body(cv, p, z, rng)
    spine_v = p.body_cv + 0.55 * p.body_b
    su = p.spine_u
    _paint_unlabelled(cv, p, z, spine_v, body, cavity, rng)
    # Lungs (label 3): posterior crescents at the bases, filling the chest higher up; heart between them.
    lung = _profile(z, p.lung_z0, 2.1 - p.lung_z0, power=0.7)
    if lung > 0:
        for side, harm in ((-1, h[4]), (1, h[5])):
            lu = su + side * (0.33 + 0.05 * lung)
            lv = spine_v + 0.02 - 0.4 * lung
            region = cv.blob(lu, lv, (0.14 + 0.16 * lung) * s, (0.06 + 0.34 * lung) * s, side * 0.4 * (1 - lung), harm)
            region &= cavity & (np.abs(cv.u - su) > 0.12)
            cv.paint(region, p.lung_hu, LUNGS)
        heart = _profile(z, 0.8, 1.2, power=0.7)
        if heart > 0:
            cv.paint(cv.blob(su + 0.08, p.body_cv - 0.12, 0.27 * heart, 0.22 * heart, 0.3) & cavity, 45.0, 0)
    # Liver (label 1) on the patient's right = image left, with a left lobe crossing the midline higher up.
    liver = _profile(z, *p.liver_z, power=0.6, skew=1.6)
    if liver > 0:
        lu, lv = -0.36 + p.liver_du, p.body_cv - 0.04 + p.liver_dv
        region = cv.blob(lu, lv, 0.34 * liver * s, 0.38 * liver * s, 0.2, h[1])
        lobe = _profile(z, 0.5 * (p.liver_z[0] + p.liver_z[1]), p.liver_z[1] - 0.05)
        if lobe > 0:
            region |= cv.blob(lu + 0.28, lv - 0.2, 0.2 * lobe * s, 0.12 * lobe * s, -0.2)
        region &= cavity
        cv.paint(region, p.liver_hu, LIVER)
        vessels = region & cv.blob(lu + 0.05, lv + 0.02, 0.03, 0.03)
        cv.paint(vessels, p.liver_hu + 0.4 * (p.vessel_hu - p.liver_hu))
    # Kidneys (label 4) beside the spine, tilted, with a darker renal sinus.
    for side, kz, harm in ((-1, p.kidney_z_r, h[2]), (1, p.kidney_z_l, h[3])):
        k = _profile(z, *kz, power=0.5)
        if k > 0:
            ku, kv = su + side * p.kidney_du * (1.0 + 0.1 * (1 - k)), spine_v - 0.03
            region = cv.blob(ku, kv, 0.095 * k * s, 0.14 * k * s, -side * 0.45, harm) & cavity
            cv.paint(region, p.kidney_hu, KIDNEYS)
            sinus = cv.blob(ku - side * 0.03, kv - 0.02, 0.03 * k, 0.06 * k, -side * 0.45) & region
            cv.paint(sinus, 0.5 * p.kidney_hu - 10)
    # Bladder (label 2) in the anterior pelvis, rectum behind it.
    bl = _profile(z, -0.05, p.bladder_z1, power=0.5)
    if bl > 0:
        bw = 0.22 * bl * s * p.bladder_fill
        region = cv.blob(0.6 * p.spine_u, p.body_cv - 0.12, bw, 0.75 * bw, 0.0, h[6]) & cavity
        cv.paint(region, p.bladder_hu, BLADDER)
        cv.paint(cv.blob(su, spine_v - 0.17, 0.06, 0.05) & cavity, -400.0)
    _paint_bones(cv, p, z, spine_v, body)
    return cv.hu, cv.labels


def _paint_bones(cv: _Canvas, p: PhantomPatient, z: float, spine_v: float, body: np.ndarray) -> None:
    """Spine (sacrum below z 0.25) in every slice, ribs above 0.45, sternum high up, pelvis low down."""
    su = p.spine_u
    marrow = 0.3 * p.bone_hu

    def bone(region: np.ndarray, cortex: np.ndarray | None = None) -> None:
        cv.paint(region, p.bone_hu, BONE)
        if cortex is not None:
            cv.hu[cortex & region] = marrow

    if z > 0.25:
        r = 0.085 + 0.01 * (1 - z)
        vb = cv.blob(su, spine_v, r, 0.9 * r)
        bone(vb, cv.blob(su, spine_v, 0.75 * r, 0.65 * r))
        arch = cv.blob(su, spine_v + 0.13, 0.07, 0.05) | cv.blob(su, spine_v + 0.2, 0.02, 0.05)
        arch &= ~cv.blob(su, spine_v + 0.11, 0.035, 0.03)
        bone(arch & body)
    else:
        width = 0.12 + 0.1 * z / 0.25
        sacrum = cv.blob(su, spine_v + 0.05, width, 0.055, 0.0)
        bone(sacrum & body, cv.blob(su, spine_v + 0.05, 0.7 * width, 0.03))
    if z < 0.3:  # iliac wings, lower down the acetabula and femoral heads
        for side in (-1, 1):
            wing = _profile(z, 0.08, 0.4, 1.0)
            if wing > 0:
                ilium = cv.blob(su + side * (0.36 + 0.1 * wing), spine_v - 0.08, 0.2 * wing + 0.02, 0.05,
                                -side * 0.9)
                bone(ilium & body, cv.blob(su + side * (0.36 + 0.1 * wing), spine_v - 0.08, 0.15 * wing, 0.02,
                                           -side * 0.9))
            hip = _profile(z, -0.1, 0.14, 1.0)
            if hip > 0:
                head = cv.blob(su + side * 0.42, p.body_cv + 0.02, 0.09 * hip + 0.01, 0.09 * hip + 0.01)
                bone(head & body, cv.blob(su + side * 0.42, p.body_cv + 0.02, 0.06 * hip, 0.06 * hip))
    if z > 0.45:  # ribs: short arcs around the body wall, more of them higher up
        extent = min(1.0, (z - 0.45) / 0.35)
        ra, rb = p.body_a - p.fat - 0.035, p.body_b - p.fat - 0.035
        n_ribs = 6 + int(round(5 * extent))
        for side in (-1, 1):
            for i in range(n_ribs):
                t = 0.25 + (1.1 + 1.0 * extent) * i / max(1, n_ribs - 1)  # 0 = posterior, pi/2 = lateral
                ang = math.pi * 0.5 - t
                ru, rv = su + side * ra * math.cos(ang) * 0.98, p.body_cv + rb * math.sin(ang) * 0.98
                bone(cv.blob(ru, rv, 0.035, 0.018, side * (math.pi / 2 - ang)) & body)
    if z > 0.78:
        bone(cv.blob(0.0, p.body_cv - p.body_b + p.fat + 0.05, 0.06, 0.025) & body)


def finish_slice(hu: np.ndarray, labels: np.ndarray, size: int, p: PhantomPatient,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Downsample a supersampled render to ``size`` (area mean for HU, centre sample for labels), add noise."""
    n = hu.shape[0]
    f = n // size
    assert f * size == n, "render size must be a multiple of the output size"
    if f > 1:
        hu = hu.reshape(size, f, size, f).mean(axis=(1, 3))
        labels = labels[f // 2::f, f // 2::f]
    else:
        hu = ndimage.gaussian_filter(hu, 0.6)
    texture = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), max(1.0, size / 64))
    texture *= 8.0 / max(float(texture.std()), 1e-6)
    body = hu > -500
    hu = hu + texture * body + rng.normal(0.0, p.noise_hu, size=(size, size)).astype(np.float32)
    return hu.astype(np.float32), np.ascontiguousarray(labels, dtype=np.uint8)


def phantom_slice(p: PhantomPatient, z: float, size: int, rng: np.random.Generator,
                  min_render: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """One finished slice of ``size x size``: (HU float32, labels uint8); small sizes are supersampled."""
    if size < 8:
        raise ValueError(f"phantom size must be at least 8 pixels, got {size}")
    factor = max(1, math.ceil(min_render / size))
    hu, labels = render_slice(p, z, size * factor, rng)
    return finish_slice(hu, labels, size, p, rng)
