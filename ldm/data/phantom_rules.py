"""The thresholds of the phantom's anatomy rules (CT-Organ labels), defined once.

``ldm.data.anatomy_check.check_phantom_anatomy`` checks label maps against ``PHANTOM_THRESHOLDS`` and the
mask-free anatomy guidance (``ldm.models.diffusion.guidance.ctorgan_terms``) reads the same thresholds for its
energy terms. The module imports nothing, so the guidance can read it without loading the checker.

Positions are in display orientation (anterior at the top, the patient's right on the image's left) and in
normalised coordinates: u (columns) and v (rows) in [-1, 1], v growing towards the posterior.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PhantomRuleThresholds:
    """Every number the phantom's anatomy rules use (see ``ldm.data.anatomy_check``).

    Args:
        spine_half_width: bone with ``|u| <`` this (near the midline) can be the spine.
        spine_min_v: and only bone behind this row (``v >`` this, the posterior half).
        kidney_lateral: each kidney's centroid lies this far (min, max) to the side of the spine.
        kidney_min_v: each kidney's centroid lies behind this row (``v >`` this).
        max_kidneys: kidneys counted in one slice.
        liver_right_frac: at least this fraction of the liver lies on the image's left (``u < 0``, the patient's right).
        lung_spine_gap: no lung component is centred within this of the spine.
        max_lungs_per_side: lung components counted on each side of the spine.
        max_bladders: bladders counted in one slice.
        bladder_lateral: the bladder's centroid lies at ``|u| <`` this.
        bladder_max_v: and in front of this row (``v <`` this).
        border: no organ pixel within this fraction of the shorter image side from the border.
    """

    spine_half_width: float = 0.2
    spine_min_v: float = 0.05
    kidney_lateral: tuple[float, float] = (0.08, 0.65)
    kidney_min_v: float = 0.0
    max_kidneys: int = 2
    liver_right_frac: float = 0.6
    lung_spine_gap: float = 0.08
    max_lungs_per_side: int = 2
    max_bladders: int = 1
    bladder_lateral: float = 0.35
    bladder_max_v: float = 0.3
    border: float = 0.03


PHANTOM_THRESHOLDS = PhantomRuleThresholds()
"""The thresholds ``check_phantom_anatomy`` applies and the anatomy guidance reads."""
