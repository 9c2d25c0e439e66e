"""Rule checker for CT-Organ label maps of axial abdominal slices (the phantom's anatomy).

``check_phantom_anatomy(mask)`` reads one ``H x W`` label map (0 background, 1 liver, 2 bladder,
3 lungs, 4 kidneys, 5 bone) in display orientation (anterior at the top, the patient's right on the
image's left) and returns an ``AnatomyReport``. Every phantom slice passes; it is meant as an
anatomical-plausibility metric for generated masks, so it first cleans the mask the way a noisy
prediction needs:

- components (8-connected) smaller than ``min_area_frac * H * W`` pixels (at least 3) are dropped;
  organ counts also ignore components smaller than ``rel_area`` times the class's largest one
  (fragments), position rules look at every component that is left;
- coordinates are normalised to u (columns) and v (rows) in [-1, 1].

Rules (each a boolean field of the report; ``plausible`` is their conjunction). The thresholds are the
fields of ``PHANTOM_THRESHOLDS`` (``ldm.data.phantom_rules``, where their values are), named here in brackets:

- ``valid_labels``: every value is a CT-Organ id 0..5.
- ``spine_present``: bone near the midline (``spine_half_width``) in the posterior half (``spine_min_v``).
- ``kidney_count_ok``: at most ``max_kidneys`` kidneys.
- ``kidneys_beside_spine``: each kidney lies to the side of the spine (``kidney_lateral``, a min-max distance)
  and behind ``kidney_min_v``, and two kidneys lie on opposite sides of the spine.
- ``liver_on_right``: at least ``liver_right_frac`` of the liver on the image's left (the patient's right) of the
  midline.
- ``lungs_ok``: no lung component centred on the spine (within ``lung_spine_gap``) and at most
  ``max_lungs_per_side`` components on each side of it (a lung may be cut by a rib at low resolution).
- ``bladder_ok``: at most ``max_bladders`` bladders, central (``bladder_lateral``) and in front of the spine
  (``bladder_max_v``).
- ``co_occurrence_ok``: the bladder (pelvis) never appears with lungs, liver or kidneys, and lungs
  never with kidneys (the phantom's organ heights do not overlap there).
- ``inside_field``: no organ within ``border`` (a fraction of the image side) of the image border (organs lie
  inside the body).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from ldm.data.labels import CTORGAN_CLASSES
from ldm.data.phantom_rules import PHANTOM_THRESHOLDS

LIVER, BLADDER, LUNGS, KIDNEYS, BONE = 1, 2, 3, 4, 5
RULES: tuple[str, ...] = ("valid_labels", "spine_present", "kidney_count_ok", "kidneys_beside_spine",
                          "liver_on_right", "lungs_ok", "bladder_ok", "co_occurrence_ok", "inside_field")
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass
class AnatomyReport:
    """Result of ``check_phantom_anatomy``.

    Args:
        valid_labels ... inside_field: one boolean per rule (see the module docstring).
        plausible: all rules hold.
        present: organ name -> present after cleaning.
        counts: organ name -> number of components counted.
    """

    valid_labels: bool
    spine_present: bool
    kidney_count_ok: bool
    kidneys_beside_spine: bool
    liver_on_right: bool
    lungs_ok: bool
    bladder_ok: bool
    co_occurrence_ok: bool
    inside_field: bool
    plausible: bool
    present: dict[str, bool] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def failed(self) -> list[str]:
        """Names of the rules that do not hold."""
        return [name for name in RULES if not getattr(self, name)]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def label_map(mask: Any, what: str = "check_phantom_anatomy") -> np.ndarray:
    """One ``H x W`` int64 label map from a numpy array or tensor (a channel axis of size 1 is dropped, floats
    are rounded); ``what`` names the caller in the error."""
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:-1])
    if arr.ndim != 2:
        raise ValueError(f"{what} expects one H x W label map, got shape {tuple(arr.shape)}")
    if arr.dtype.kind == "f":
        arr = np.round(arr)
    return arr.astype(np.int64)


def _components(binary: np.ndarray, min_area: int) -> list[np.ndarray]:
    """Boolean masks of the 8-connected components of ``binary`` with at least ``min_area`` pixels."""
    lab, n = ndimage.label(binary, structure=_EIGHT)
    if n == 0:
        return []
    areas = np.bincount(lab.ravel(), minlength=n + 1)
    return [lab == i for i in range(1, n + 1) if areas[i] >= min_area]


def check_phantom_anatomy(mask: Any, min_area_frac: float = 0.001, rel_area: float = 0.1) -> AnatomyReport:
    """Check one CT-Organ label map (numpy array or tensor, ``H x W``) against the phantom's anatomy rules."""
    th = PHANTOM_THRESHOLDS
    m = label_map(mask)
    h, w = m.shape
    min_area = max(3, int(np.ceil(min_area_frac * h * w)))
    v, u = np.meshgrid((np.arange(h) + 0.5) / h * 2 - 1, (np.arange(w) + 0.5) / w * 2 - 1, indexing="ij")
    valid = bool(np.all((m >= 0) & (m < len(CTORGAN_CLASSES))))

    comps: dict[int, list[np.ndarray]] = {}
    counted: dict[int, list[np.ndarray]] = {}
    for c in (LIVER, BLADDER, LUNGS, KIDNEYS, BONE):
        comps[c] = _components(m == c, min_area)
        largest = max((int(x.sum()) for x in comps[c]), default=0)
        counted[c] = [x for x in comps[c] if x.sum() >= rel_area * largest]
    present = {c: bool(comps[c]) for c in comps}

    def centroid(region: np.ndarray) -> tuple[float, float]:
        return float(u[region].mean()), float(v[region].mean())

    bone = np.zeros_like(m, dtype=bool)
    for x in comps[BONE]:
        bone |= x
    spine = bone & (np.abs(u) < th.spine_half_width) & (v > th.spine_min_v)
    spine_present = int(spine.sum()) >= min_area
    spine_u = float(u[spine].mean()) if spine_present else 0.0

    kidneys = [centroid(x) for x in counted[KIDNEYS]]
    kidney_count_ok = len(kidneys) <= th.max_kidneys
    near, far = th.kidney_lateral
    beside = all(near <= abs(cu - spine_u) <= far and cv > th.kidney_min_v for cu, cv in map(centroid, comps[KIDNEYS]))
    if len(kidneys) == 2:
        beside = beside and (kidneys[0][0] - spine_u) * (kidneys[1][0] - spine_u) < 0

    liver_on_right = True
    if present[LIVER]:
        liver = np.zeros_like(bone)
        for x in comps[LIVER]:
            liver |= x
        liver_on_right = float((u[liver] < 0).mean()) >= th.liver_right_frac

    lungs = [centroid(x) for x in counted[LUNGS]]
    per_side = [sum(1 for cu, _ in lungs if side * (cu - spine_u) > 0) for side in (-1, 1)]
    lungs_ok = max(per_side) <= th.max_lungs_per_side and all(abs(cu - spine_u) >= th.lung_spine_gap
                                                              for cu, _ in map(centroid, comps[LUNGS]))

    bladders = [centroid(x) for x in counted[BLADDER]]
    bladder_ok = len(bladders) <= th.max_bladders and all(abs(cu) < th.bladder_lateral and cv < th.bladder_max_v
                                                          for cu, cv in bladders)

    co_ok = not (present[BLADDER] and (present[LUNGS] or present[LIVER] or present[KIDNEYS]))
    co_ok = co_ok and not (present[LUNGS] and present[KIDNEYS])

    band = max(1, int(round(th.border * min(h, w))))
    organs = np.zeros_like(bone)
    for c in comps:
        for x in comps[c]:
            organs |= x
    inner = np.zeros_like(bone)
    inner[band:h - band, band:w - band] = True
    inside = not bool(np.any(organs & ~inner))

    rules = dict(valid_labels=valid, spine_present=spine_present, kidney_count_ok=kidney_count_ok,
                 kidneys_beside_spine=bool(beside), liver_on_right=liver_on_right, lungs_ok=bool(lungs_ok),
                 bladder_ok=bool(bladder_ok), co_occurrence_ok=bool(co_ok), inside_field=inside)
    return AnatomyReport(**rules, plausible=all(rules.values()),
                         present={CTORGAN_CLASSES[c]: present[c] for c in present},
                         counts={CTORGAN_CLASSES[c]: len(counted[c]) for c in counted})


def plausibility_rates(masks: Any, checker: Any, rules: tuple[str, ...], what: str, **kwargs: Any
                       ) -> dict[str, float]:
    """Fraction of a batch's masks (``B x H x W``) that ``checker`` finds plausible and the pass rate of each of
    its ``rules``; ``what`` names the caller in the error."""
    if hasattr(masks, "detach"):
        masks = masks.detach().cpu().numpy()
    arr = np.asarray(masks)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise ValueError(f"{what} expects a non-empty B x H x W batch, got shape {arr.shape}")
    reports = [checker(x, **kwargs) for x in arr]
    out = {"plausible": float(np.mean([r.plausible for r in reports]))}
    for name in rules:
        out[name] = float(np.mean([getattr(r, name) for r in reports]))
    return out


def anatomy_plausibility(masks: Any, **kwargs: Any) -> dict[str, float]:
    """Fraction of plausible masks in a batch (``B x H x W``) and the pass rate of every rule."""
    return plausibility_rates(masks, check_phantom_anatomy, RULES, "anatomy_plausibility", **kwargs)
