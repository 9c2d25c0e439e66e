"""Phantom v2 anatomy painters: the structures of one noiseless slice at height ``z`` (``render_clean``).

Each level's bone marker is a step in z at the patient's own boundary (``PatientV2.level_z``): pelvic bone
below the pelvis top, ribs from the upper abdomen up, the sternum in the chest, so a slice's level is visible
in its mask. Organ heights follow v1 (bladder and pelvic bone low, kidneys mid, liver and spleen upper abdomen,
lungs and ribs top, the vertebra everywhere, the aorta above its bifurcation just below the pelvis top), each
jittered per patient. ``Edit`` draws the corruptions (an organ mirrored, deleted, duplicated, the liver and
spleen swapped, a kidney moved) with the same painters, so the corrupted image and mask stay consistent.
The anatomy (ids, levels, variants) is defined in ``ldm.data.anatomy_check_v2``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import ndimage

from ldm.data.anatomy_check_v2 import AORTA, BLADDER, KIDNEY, LIVER, LUNGS, PELVIS, RIBS, SPLEEN, VERTEBRA
from ldm.data.phantom_v2_canvas import _Canvas
from ldm.data.phantom_v2_patient import (_BLADDER, _BODY, _KID_L, _KID_R, _LIVER, _LUNG_L, _LUNG_R, _SPLEEN,
                                         PatientV2)


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
