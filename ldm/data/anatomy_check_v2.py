"""Anatomy of phantom v2 (label ids, body levels, variants, rule thresholds) and its variant-aware rule checker.

This module is the ONE place that defines what phantom v2's anatomy is: ``ldm.data.phantom_v2_render`` draws
the levels and variants defined here and ``check_anatomy_v2`` checks a label map against them (and any
guidance that wants the same rules reads ``THRESHOLDS``).

Label ids (``PHANTOM_V2_CLASSES``): 0 background, 1 liver, 2 spleen, 3 kidney (both kidneys), 4 bladder,
5 lungs, 6 aorta, 7 vertebra (sacrum included), 8 ribs (with the sternum), 9 pelvis (pelvic bone and femoral
heads). Masks are in display orientation: anterior at the top, the patient's right on the image's left;
u (columns) and v (rows) are normalised to [-1, 1].

Body levels (``LEVELS``, nominal z ranges; each patient's boundaries are jittered by up to
``LEVEL_JITTER``). Each level has a bone marker, drawn by the renderer exactly at the patient's level,
which the checker uses to infer the level of a mask:

================  ============  ==========================================  =====================================
level             z (nominal)   marker                                      required structures
================  ============  ==========================================  =====================================
pelvis            0.00 - 0.25   pelvic bone present                         vertebra, pelvis
lower_abdomen     0.25 - 0.51   no pelvic bone, no ribs                     vertebra, aorta
upper_abdomen     0.51 - 0.80   ribs, no sternum                            vertebra, aorta, liver, ribs
chest             0.80 - 1.00   sternum (a rib-labelled anterior midline    vertebra, aorta, lungs, ribs
                                component)
================  ============  ==========================================  =====================================

The structures a level may show besides the required ones are ``LEVEL_ALLOWED``; anything else is a
co-occurrence error (e.g. bladder only at pelvis level, so never with lungs; no kidney in the chest).
Kidneys are allowed but never required: their poles are small and the variants remove them.

Variants (``VARIANTS``, prevalence per patient; one per patient, the same in every slice):
``normal``; ``situs_inversus`` (liver, spleen and aorta mirrored); ``single_kidney`` (one kidney absent);
``pelvic_kidney`` (one kidney low in the pelvis beside the bladder); ``horseshoe_kidney`` (the lower poles
joined by an isthmus in front of the aorta and the spine). A whole-slice left-right flip of a normal slice
is the situs-inversus appearance: it is a variant, not a per-slice defect.

The checker and its rules are described on ``check_anatomy_v2``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
from scipy import ndimage

from ldm.data.labels import PHANTOM_V2_CLASSES
from ldm.data.anatomy_check import label_map, plausibility_rates

# ----------------------------------------------------------------------------------------------------------
# The anatomy definition shared by the renderer and the checker.
# ----------------------------------------------------------------------------------------------------------
LIVER, SPLEEN, KIDNEY, BLADDER, LUNGS, AORTA, VERTEBRA, RIBS, PELVIS = range(1, 10)
NUM_CLASSES_V2 = len(PHANTOM_V2_CLASSES)
ORGANS: tuple[int, ...] = (LIVER, SPLEEN, KIDNEY, BLADDER, LUNGS, AORTA)  # soft structures
BONES: tuple[int, ...] = (VERTEBRA, RIBS, PELVIS)
ID = {name: i for i, name in enumerate(PHANTOM_V2_CLASSES)}

LEVELS: dict[str, tuple[float, float]] = {
    "pelvis": (0.0, 0.25),
    "lower_abdomen": (0.25, 0.51),
    "upper_abdomen": (0.51, 0.80),
    "chest": (0.80, 1.0),
}
LEVEL_JITTER = 0.02  # per-patient shift of each level boundary (uniform +-)
LEVEL_REQUIRED: dict[str, tuple[str, ...]] = {
    "pelvis": ("vertebra", "pelvis"),
    "lower_abdomen": ("vertebra", "aorta"),
    "upper_abdomen": ("vertebra", "aorta", "liver", "ribs"),
    "chest": ("vertebra", "aorta", "lungs", "ribs"),
}
LEVEL_ALLOWED: dict[str, tuple[str, ...]] = {  # may appear besides the required structures
    "pelvis": ("bladder", "aorta", "kidney"),  # aorta above its bifurcation; kidney: a pelvic kidney only
    "lower_abdomen": ("kidney", "liver"),  # the liver's lower tip
    "upper_abdomen": ("spleen", "kidney", "lungs"),  # lung bases, upper kidney poles
    "chest": ("liver", "spleen"),  # liver dome, spleen tip
}
# Structure pairs never seen together (implied by the levels, checked explicitly as well) and implications.
FORBIDDEN_PAIRS: tuple[tuple[str, str], ...] = (("bladder", "lungs"), ("bladder", "liver"), ("bladder", "spleen"),
                                                ("bladder", "ribs"), ("kidney", "lungs"), ("pelvis", "ribs"),
                                                ("pelvis", "lungs"), ("pelvis", "liver"), ("pelvis", "spleen"))
IMPLIES: tuple[tuple[str, str], ...] = (("spleen", "liver"), ("lungs", "ribs"))

VARIANTS: dict[str, float] = {
    "normal": 0.91,
    "situs_inversus": 0.03,
    "single_kidney": 0.03,
    "pelvic_kidney": 0.02,
    "horseshoe_kidney": 0.01,
}


@dataclass(frozen=True)
class RuleThresholds:
    """Every number the v2 rules use (distances in normalised image units, body frame relative to the spine).

    The body frame: origin at the vertebra's centroid, lateral axis ``a`` (positive = image right = the
    patient's left) along the principal axis of the bone pixels, depth axis ``b`` (positive = posterior).

    Args:
        min_pixels: a component never counts with fewer pixels than this (whatever ``min_area_frac``).
        max_tilt_deg: the estimated body rotation is clipped to +- this.
        sternum_lateral, sternum_depth: a rib component with ``|a| <`` and ``b <`` these is the sternum.
        liver_side_frac: the liver is on the patient's right (normal) when at least this fraction of it has
            ``a < 0``, mirrored when at most ``1 -`` this; in between it is ambiguous (a conflict).
        spleen_side, aorta_side: ``|a|`` of the centroid beyond which the spleen / aorta is lateralised.
        aorta_depth: the aorta's centroid lies in front of the spine, ``b`` in this range.
        aorta_max_dist: and at most this far from the spine.
        kidney_lateral, kidney_depth: a kidney beside the spine has its centroid's ``|a|`` and ``b`` in these.
        horseshoe_reach: a kidney crossing the midline (pixels with ``a <= -`` and ``>=`` this) is a horseshoe
            only with its lateral parts (``|a| >=`` this) at kidney depth and its midline part
            (``|a| < horseshoe_midline``) at least ``horseshoe_front`` in front of the lateral parts' mean depth.
        pelvic_kidney_lateral, pelvic_kidney_depth: the one kidney at pelvis level lies there.
        bladder_lateral, bladder_depth: the bladder's centroid lies there.
        lung_spine_gap: no lung component centred within this of the midline.
        max_lungs_per_side: lung components (counted) on each side.
        max_fragments: organ components smaller than the count threshold (specks), summed over the organs.
        body_lateral, body_depth: every labelled pixel lies inside this box of the body frame.
        border: no labelled pixel within this fraction of the image side from the border.
        single_kidney_area: a lone kidney beside the spine is single-kidney evidence from this fraction of the
            vertebra's area (smaller lone kidneys are poles, which normal patients show too).
    """

    min_pixels: int = 3
    max_tilt_deg: float = 25.0
    sternum_lateral: float = 0.16
    sternum_depth: float = -0.35
    liver_side_frac: float = 0.6
    spleen_side: float = 0.12
    aorta_side: float = 0.03
    aorta_depth: tuple[float, float] = (-0.6, -0.05)
    aorta_max_dist: float = 0.6
    kidney_lateral: tuple[float, float] = (0.12, 0.7)
    kidney_depth: tuple[float, float] = (-0.45, 0.25)
    horseshoe_reach: float = 0.15
    horseshoe_midline: float = 0.06
    horseshoe_front: float = 0.08
    pelvic_kidney_lateral: float = 0.5
    pelvic_kidney_depth: tuple[float, float] = (-0.75, -0.05)
    bladder_lateral: float = 0.35
    bladder_depth: tuple[float, float] = (-1.1, -0.12)
    lung_spine_gap: float = 0.08
    max_lungs_per_side: int = 2
    max_fragments: int = 5
    body_lateral: float = 1.05
    body_depth: tuple[float, float] = (-1.6, 0.45)
    border: float = 0.03
    single_kidney_area: float = 0.5


THRESHOLDS = RuleThresholds()

RULES_V2: tuple[str, ...] = ("valid_labels", "spine_present", "level_consistent", "required_present",
                             "co_occurrence_ok", "situs_consistent", "organ_count_ok", "organ_position_ok",
                             "kidney_count_ok", "kidney_position_ok", "fragments_ok", "inside_body", "inside_field",
                             "variant_consistent")
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass
class AnatomyReportV2:
    """Result of ``check_anatomy_v2``.

    Args:
        valid_labels ... variant_consistent: one boolean per rule (``RULES_V2``, see ``check_anatomy_v2``).
        plausible: all rules hold.
        variant: the variant the mask shows (a ``VARIANTS`` name), ``"inconsistent"`` (conflicting evidence)
            or ``"unknown"`` (no lateralised evidence).
        level: the body level its bone markers show (a ``LEVELS`` name), ``"inconsistent"`` where the markers
            contradict each other (e.g. pelvic bone with ribs).
        present: structure name -> present after cleaning; counts: structure name -> components counted.
        fragments: organ specks (components too small to count); tilt_deg: estimated body rotation.
    """

    valid_labels: bool
    spine_present: bool
    level_consistent: bool
    required_present: bool
    co_occurrence_ok: bool
    situs_consistent: bool
    organ_count_ok: bool
    organ_position_ok: bool
    kidney_count_ok: bool
    kidney_position_ok: bool
    fragments_ok: bool
    inside_body: bool
    inside_field: bool
    variant_consistent: bool
    plausible: bool
    variant: str = "unknown"
    level: str = "unknown"
    present: dict[str, bool] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    fragments: int = 0
    tilt_deg: float = 0.0

    def failed(self) -> list[str]:
        """Names of the rules that do not hold."""
        return [name for name in RULES_V2 if not getattr(self, name)]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_GRIDS: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised (u, v) of every pixel, flattened, and the border-band mask (cached per shape)."""
    key = (h, w)
    if key not in _GRIDS:
        v, u = np.meshgrid((np.arange(h) + 0.5) / h * 2 - 1, (np.arange(w) + 0.5) / w * 2 - 1, indexing="ij")
        band_h = max(1, int(round(THRESHOLDS.border * h)))
        band_w = max(1, int(round(THRESHOLDS.border * w)))
        border = np.ones((h, w), dtype=bool)
        border[band_h:h - band_h, band_w:w - band_w] = False
        _GRIDS[key] = (u.ravel(), v.ravel(), border.ravel())
    return _GRIDS[key]


class _Class:
    """The 8-connected components of one label: areas, which are kept (>= min area) and counted (also
    >= rel_area of the largest kept one), and per-component sums for centroids in the body frame."""

    def __init__(self, binary: np.ndarray, min_area: int, rel_area: float) -> None:
        lab, n = ndimage.label(binary, structure=_EIGHT)
        self.lab = lab.ravel()
        self.n = n
        self.areas = np.bincount(self.lab, minlength=n + 1)[1:] if n else np.zeros(0, dtype=np.int64)
        self.kept = self.areas >= min_area
        largest = int(self.areas[self.kept].max()) if self.kept.any() else 0
        self.counted = self.kept & (self.areas >= rel_area * largest)
        self.present = bool(self.kept.any())
        self.fragments = int(n - self.counted.sum())

    def pixels(self, which: np.ndarray) -> np.ndarray:
        """Flat boolean mask of the pixels of the components selected by ``which`` (per component)."""
        if self.n == 0:
            return np.zeros(self.lab.shape, dtype=bool)
        lut = np.concatenate([[False], which])
        return lut[self.lab]

    def means(self, values: np.ndarray, select: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-component sum of ``select`` pixels and mean of ``values`` over them."""
        weights = None if select is None else select.astype(np.float64)
        cnt = np.bincount(self.lab, weights=weights, minlength=self.n + 1)[1:]
        tot = np.bincount(self.lab, weights=values if select is None else values * select, minlength=self.n + 1)[1:]
        return cnt, tot / np.maximum(cnt, 1e-9)


def _body_frame(cls: dict[int, _Class], u: np.ndarray, v: np.ndarray,
                t: RuleThresholds) -> tuple[np.ndarray, np.ndarray, float]:
    """Body-frame coordinates (a lateral, b depth) of every pixel and the estimated tilt (degrees).

    Origin: the centroid of the largest vertebra component (else of all bone, else the image centre); the
    lateral axis: the principal axis of the kept bone pixels (rib cage, pelvis and vertebra are wider than
    deep), its rotation clipped to +- ``max_tilt_deg``.
    """
    bone = np.zeros(u.shape, dtype=bool)
    for c in BONES:
        bone |= cls[c].pixels(cls[c].kept)
    vert = cls[VERTEBRA]
    if vert.present:
        biggest = np.zeros(vert.n, dtype=bool)
        biggest[int(np.argmax(np.where(vert.kept, vert.areas, -1)))] = True
        origin = vert.pixels(biggest)
    else:
        origin = bone
    ox, oy = (float(u[origin].mean()), float(v[origin].mean())) if origin.any() else (0.0, 0.0)
    tilt = 0.0
    if int(bone.sum()) >= 8:
        du, dv = u[bone] - u[bone].mean(), v[bone] - v[bone].mean()
        tilt = 0.5 * math.atan2(2.0 * float((du * dv).mean()), float((du * du).mean() - (dv * dv).mean()))
        lim = math.radians(t.max_tilt_deg)
        tilt = min(lim, max(-lim, tilt))
    ca, sa = math.cos(tilt), math.sin(tilt)
    a = (u - ox) * ca + (v - oy) * sa
    b = -(u - ox) * sa + (v - oy) * ca
    return a, b, math.degrees(tilt)


def _infer_level(cls: dict[int, _Class], a: np.ndarray, b: np.ndarray, t: RuleThresholds) -> tuple[str, bool]:
    """(level from the bone markers, markers consistent)."""
    ribs = cls[RIBS]
    sternum = False
    if ribs.present:
        _, ca = ribs.means(a)
        _, cb = ribs.means(b)
        sternum = bool(np.any(ribs.kept & (np.abs(ca) < t.sternum_lateral) & (cb < t.sternum_depth)))
    pelvis, lungs = cls[PELVIS].present, cls[LUNGS].present
    consistent = not (pelvis and (ribs.present or lungs)) and not (lungs and not ribs.present)
    if pelvis:
        level = "pelvis"
    elif sternum:
        level = "chest"
    else:
        level = "upper_abdomen" if ribs.present else "lower_abdomen"
    return level, consistent


def _co_occurrence(present: dict[str, bool], level: str) -> bool:
    shown = {name for name, yes in present.items() if yes}
    allowed = set(LEVEL_REQUIRED[level]) | set(LEVEL_ALLOWED[level])
    ok = shown <= allowed
    ok = ok and not any(x in shown and y in shown for x, y in FORBIDDEN_PAIRS)
    return ok and all(y in shown for x, y in IMPLIES if x in shown)


def _situs(cls: dict[int, _Class], a: np.ndarray, t: RuleThresholds) -> str:
    """"none", "normal", "mirrored" or "conflict" from the sides of the liver, spleen and aorta."""
    signs = []
    liver = cls[LIVER]
    if liver.present:
        px = liver.pixels(liver.kept)
        right = float((a[px] < 0).mean())
        signs.append(1 if right >= t.liver_side_frac else (-1 if right <= 1 - t.liver_side_frac else 0))
    for c, lim in ((SPLEEN, t.spleen_side), (AORTA, t.aorta_side)):
        if cls[c].present:
            pos = float(a[cls[c].pixels(cls[c].counted)].mean())
            signs.append(1 if pos > lim else (-1 if pos < -lim else 0))
    if not signs:
        return "none"
    if all(s == 1 for s in signs):
        return "normal"
    return "mirrored" if all(s == -1 for s in signs) else "conflict"


def _horseshoe_shaped(kid: _Class, i: int, a: np.ndarray, b: np.ndarray, t: RuleThresholds) -> bool:
    """Component ``i`` crosses the midline as a horseshoe: lateral parts at kidney depth, the midline part
    (the isthmus) in front of them."""
    px = kid.lab == i + 1
    aa, bb = a[px], b[px]
    lateral = np.abs(aa) >= t.horseshoe_reach
    mid = np.abs(aa) < t.horseshoe_midline
    if not lateral.any() or not mid.any():
        return False
    lat_b = float(bb[lateral].mean())
    return (t.kidney_depth[0] <= lat_b <= t.kidney_depth[1]) and float(bb[mid].mean()) <= lat_b - t.horseshoe_front


def _kidneys(cls: dict[int, _Class], a: np.ndarray, b: np.ndarray, level: str,
             t: RuleThresholds) -> tuple[bool, bool, str]:
    """(count ok, position ok, evidence) for the kidneys at ``level``; evidence: none / pair / single / pelvic /
    horseshoe / bad."""
    kid = cls[KIDNEY]
    idx = np.flatnonzero(kid.counted)
    if len(idx) == 0:
        return True, True, "none"
    _, ca = kid.means(a)
    _, cb = kid.means(b)
    if level == "pelvis":  # only a pelvic kidney: one, anterior of the sacrum, within the pelvis
        pos_ok = all(abs(ca[i]) <= t.pelvic_kidney_lateral
                     and t.pelvic_kidney_depth[0] <= cb[i] <= t.pelvic_kidney_depth[1] for i in idx)
        count_ok = len(idx) == 1
        return count_ok, pos_ok, "pelvic" if count_ok and pos_ok else "bad"
    lo_a, hi_a = t.horseshoe_reach, t.horseshoe_reach
    amin = ndimage.minimum(a, kid.lab, idx + 1)
    amax = ndimage.maximum(a, kid.lab, idx + 1)
    crossing = [(mn <= -lo_a and mx >= hi_a) for mn, mx in zip(np.atleast_1d(amin), np.atleast_1d(amax))]
    count_ok = len(idx) <= 2 and (not any(crossing) or len(idx) == 1)
    if any(crossing):
        ok = len(idx) == 1 and level == "lower_abdomen" and _horseshoe_shaped(kid, int(idx[0]), a, b, t)
        return count_ok, ok, "horseshoe" if ok and count_ok else "bad"
    beside = [t.kidney_lateral[0] <= abs(ca[i]) <= t.kidney_lateral[1]
              and t.kidney_depth[0] <= cb[i] <= t.kidney_depth[1] for i in idx]
    pos_ok = all(beside) and (len(idx) != 2 or ca[idx[0]] * ca[idx[1]] < 0)
    if not (pos_ok and count_ok):
        return count_ok, pos_ok, "bad"
    if len(idx) == 2:
        return True, True, "pair"
    vert = cls[VERTEBRA]
    ref = float(vert.areas[vert.counted].max()) if vert.present else float("inf")
    return True, True, "single" if kid.areas[idx[0]] >= t.single_kidney_area * ref else "none"


def _organs_placed(cls: dict[int, _Class], a: np.ndarray, b: np.ndarray,
                   t: RuleThresholds) -> tuple[bool, bool]:
    """(organ counts ok, organ positions ok) for the aorta, bladder, lungs, liver and spleen."""
    count_ok = all(int(cls[c].counted.sum()) <= 1 for c in (LIVER, SPLEEN, BLADDER, AORTA))
    pos_ok = True
    for c in (AORTA, BLADDER):
        if cls[c].present:
            _, ca = cls[c].means(a)
            _, cb = cls[c].means(b)
            i = cls[c].counted
            if c == AORTA:
                dist = np.hypot(ca[i], cb[i])
                pos_ok &= bool(np.all((cb[i] >= t.aorta_depth[0]) & (cb[i] <= t.aorta_depth[1])
                                      & (dist <= t.aorta_max_dist)))
            else:
                pos_ok &= bool(np.all((np.abs(ca[i]) <= t.bladder_lateral) & (cb[i] >= t.bladder_depth[0])
                                      & (cb[i] <= t.bladder_depth[1])))
    lungs = cls[LUNGS]
    if lungs.present:
        _, ca = lungs.means(a)
        sides = ca[lungs.counted]
        count_ok &= int((sides < 0).sum()) <= t.max_lungs_per_side and int((sides > 0).sum()) <= t.max_lungs_per_side
        pos_ok &= bool(np.all(np.abs(ca[lungs.kept]) >= t.lung_spine_gap))
    return bool(count_ok), bool(pos_ok)


def _variant(situs: str, kidneys: str) -> str:
    if situs == "conflict" or kidneys == "bad":
        return "inconsistent"
    kidney_variant = {"single": "single_kidney", "pelvic": "pelvic_kidney",
                      "horseshoe": "horseshoe_kidney"}.get(kidneys)
    if situs == "mirrored":
        return "inconsistent" if kidney_variant else "situs_inversus"
    if kidney_variant:
        return kidney_variant
    return "normal" if situs == "normal" else "unknown"


def check_anatomy_v2(mask: Any, min_area_frac: float = 0.001, rel_area: float = 0.1,
                     thresholds: RuleThresholds = THRESHOLDS) -> AnatomyReportV2:
    """Check one phantom-v2 label map (numpy array or tensor, ``H x W``, display orientation).

    Cleaning (as v1): per label, 8-connected components smaller than ``min_area_frac * H * W`` pixels (at
    least ``min_pixels``) are dropped; of the rest, those smaller than ``rel_area`` times the label's largest
    one are not counted (fragments). Positions are measured in the body frame (``RuleThresholds``), so the
    rules hold for any rotation, shift and zoom of the body. Rules (``RULES_V2``):

    - ``valid_labels``: every id is 0..9. ``spine_present``: a vertebra.
    - ``level_consistent``: the level markers agree (no pelvic bone with ribs or lungs, no lungs without ribs).
    - ``required_present``: every structure ``LEVEL_REQUIRED`` names for the inferred level is present
      (absence never passes by default: an upper-abdomen slice without a liver fails).
    - ``co_occurrence_ok``: nothing the level does not allow (``LEVEL_ALLOWED``), no ``FORBIDDEN_PAIRS``, every
      ``IMPLIES`` (a spleen needs a liver, lungs need ribs); judged after cleaning, so one speck cannot decide.
    - ``situs_consistent``: liver, spleen and aorta all on their normal sides or all mirrored (situs inversus).
    - ``organ_count_ok``: at most one counted liver, spleen, bladder and aorta; at most two lung parts a side.
    - ``organ_position_ok``: aorta in front of the spine and near it, bladder central and anterior, no lung over
      the spine (one lung may be missing: at the chest's lower border the liver dome can cover a lung base).
    - ``kidney_count_ok``: at most two kidneys; a kidney crossing the midline is the only one; at pelvis level
      exactly one (a pelvic kidney).
    - ``kidney_position_ok``: kidneys beside the spine on opposite sides; a midline-crossing kidney only as a
      horseshoe (isthmus in front, lateral parts at kidney depth) at lower-abdomen level; at pelvis level the
      kidney lies anterior of the sacrum inside the pelvis (beside the bladder).
    - ``fragments_ok``: at most ``max_fragments`` organ specks in total (a scattered-speckle mask fails).
    - ``inside_body``: every kept pixel inside the body box of the body frame; ``inside_field``: none in the
      3 % border band.
    - ``variant_consistent``: the evidence shows at most one variant (variants are exclusive per patient).

    Performance: about 1 ms per 64 x 64 mask on one core (see ``tests/test_phantom_v2.py``).
    """
    t = thresholds
    m = label_map(mask, "check_anatomy_v2")
    h, w = m.shape
    u, v, border = _grid(h, w)
    flat = m.ravel()
    min_area = max(t.min_pixels, int(math.ceil(min_area_frac * h * w)))
    cls = {c: _Class((flat == c).reshape(h, w), min_area, rel_area) for c in range(1, NUM_CLASSES_V2)}
    present = {PHANTOM_V2_CLASSES[c]: cls[c].present for c in cls}
    a, b, tilt = _body_frame(cls, u, v, t)
    level, markers_ok = _infer_level(cls, a, b, t)
    situs = _situs(cls, a, t)
    kidney_count, kidney_pos, kidney_evidence = _kidneys(cls, a, b, level, t)
    count_ok, pos_ok = _organs_placed(cls, a, b, t)
    kept = np.zeros(flat.shape, dtype=bool)
    for c in cls:
        kept |= cls[c].pixels(cls[c].kept)
    inside = (np.abs(a) <= t.body_lateral) & (b >= t.body_depth[0]) & (b <= t.body_depth[1])
    variant = _variant(situs, kidney_evidence)
    fragments = sum(cls[c].fragments for c in ORGANS)
    rules = dict(
        valid_labels=bool(np.all((flat >= 0) & (flat < NUM_CLASSES_V2))), spine_present=cls[VERTEBRA].present,
        level_consistent=markers_ok, required_present=all(present[s] for s in LEVEL_REQUIRED[level]),
        co_occurrence_ok=_co_occurrence(present, level), situs_consistent=situs != "conflict",
        organ_count_ok=count_ok, organ_position_ok=pos_ok, kidney_count_ok=kidney_count,
        kidney_position_ok=kidney_pos, fragments_ok=fragments <= t.max_fragments,
        inside_body=not bool(np.any(kept & ~inside)), inside_field=not bool(np.any(kept & border)),
        variant_consistent=variant != "inconsistent")
    return AnatomyReportV2(**rules, plausible=all(rules.values()), variant=variant,
                           level=(level if markers_ok else "inconsistent") if any(present.values()) else "unknown",
                           present=present,
                           counts={PHANTOM_V2_CLASSES[c]: int(cls[c].counted.sum()) for c in cls},
                           fragments=int(fragments), tilt_deg=float(tilt))


def anatomy_plausibility_v2(masks: Any, **kwargs: Any) -> dict[str, float]:
    """Fraction of plausible masks in a batch (``B x H x W``) and the pass rate of every v2 rule."""
    return plausibility_rates(masks, check_anatomy_v2, RULES_V2, "anatomy_plausibility_v2", **kwargs)
