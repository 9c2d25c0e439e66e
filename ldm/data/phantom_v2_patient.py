"""Phantom v2 patients: one seeded draw of a patient's variant, pose, habitus, level boundaries, organ sizes,
heights and intensities (``sample_patient_v2``), the same in every slice of the patient.

The pose places the body in the field: ``display = shift + zoom * R(rotation) @ anatomical`` (the anatomical
frame has the body centre at the origin, posterior = +v), with the body inside the image and a margin of at
least 3 % of the side. The level boundaries (``PatientV2.level_z``) and the organ height ranges are jittered
around the nominal ``LEVELS`` of ``ldm.data.anatomy_check_v2``; ``ldm.data.phantom_v2_paint`` draws them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ldm.data.anatomy_check_v2 import LEVEL_JITTER, LEVELS, VARIANTS

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
