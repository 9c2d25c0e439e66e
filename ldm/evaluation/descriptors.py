"""Unsaturated measures of the anatomy in segmentation masks of generated samples (anatomy benchmark v2).

A binary rule pass rate saturates near 100 %; these measures compare a sample set's masks with a real set's
masks as distributions, so they keep separating models that all pass the rules. Everything is generic over the
label set: masks are integer class maps ``[N, H, W]`` (numpy or torch) with 0 = background and foreground
classes ``1..num_classes-1``; no organ names are used here.

- :func:`mask_descriptors`: per sample and foreground class presence, area fraction, centroid, principal-axis
  orientation and number of connected components (all samples at once with ``np.bincount``; components with one
  ``scipy.ndimage.label`` call per chunk of samples).
- :func:`presence_patterns` / :func:`presence_distance`: which classes occur together, as "0110..." strings,
  and the total variation and Jensen-Shannon distances between two sets' pattern distributions.
- :func:`descriptor_w1`: 1-D Wasserstein-1 between the two sets' per-class descriptor distributions (circular
  for the orientation), each divided by the real set's spread so that descriptors can be averaged.
- :func:`descriptor_vectors`, :func:`centroid_fill`, :func:`fit_standardiser`: one fixed-length vector per
  mask, standardised with a real set's statistics, for the k-NN measures
  :func:`precision_recall` (Kynkaanniemi et al. 2019) and :func:`density_coverage` (Naeem et al. 2020).
- :func:`variant_summary` and :func:`level_consistency`: prevalence of inferred anatomical variants (rare-mode
  recall, plausibility of each variant) and of inferred body levels, from a rule checker's reports.
- :func:`anatomy_measures`: all of the above as one JSON-serialisable dict (no numpy types, ``None`` for NaN).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from scipy import ndimage
from scipy.stats import wasserstein_distance

from ldm.evaluation.intervals import wilson
from ldm.evaluation.report import jsonable

__all__ = [
    "DESCRIPTORS", "mask_descriptors", "presence_patterns", "presence_distance", "circular_w1",
    "descriptor_w1", "centroid_fill", "descriptor_vectors", "Standardiser", "fit_standardiser",
    "precision_recall", "density_coverage", "variant_summary", "level_consistency", "anatomy_measures",
]

# the scalar descriptors that :func:`descriptor_w1` compares (``present`` is compared via presence patterns)
DESCRIPTORS = ("area", "cu", "cv", "orientation", "components")
UNKNOWN_LABELS = ("unknown", "inconsistent")


# --------------------------------------------------------------------------------------------- descriptors

def as_masks(masks: Any) -> np.ndarray:
    """``[N, H, W]`` int64 class maps from a batch (numpy or tensor; one ``H x W`` map becomes ``N = 1``);
    non-integer float values are an error."""
    if hasattr(masks, "detach"):  # a torch tensor, without importing torch here
        masks = masks.detach().cpu().numpy()
    arr = np.asarray(masks)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"masks must be [N, H, W] integer class maps, got shape {arr.shape}")
    if arr.dtype.kind not in "iub":
        if arr.size and not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError("masks must hold integer class labels")
    return arr.astype(np.int64, copy=False)


def _component_counts(arr: np.ndarray, num_classes: int, min_area: int,
                      max_elements: int = 1 << 23) -> np.ndarray:
    """8-connected components of at least ``min_area`` pixels per sample and foreground class, ``[N, C-1]``."""
    n, h, w = arr.shape
    k = num_classes - 1
    out = np.zeros((n, k), dtype=np.int64)
    if k == 0 or n == 0:
        return out
    # one label call per chunk: a binary stack of (sample, class) planes [n * (C-1), H, W] whose structure
    # connects pixels only within a plane, with 8-connectivity inside it
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    classes = np.arange(1, num_classes, dtype=np.int64)[None, :, None, None]
    step = max(1, max_elements // max(1, k * h * w))
    for start in range(0, n, step):
        chunk = arr[start:start + step]
        planes = chunk.shape[0] * k
        binary = (chunk[:, None] == classes).reshape(planes, h, w)
        labels, count = ndimage.label(binary, structure=structure)
        if count == 0:
            continue
        sizes = np.bincount(labels.reshape(-1), minlength=count + 1)
        # labels are numbered in scan order, so plane p holds labels (last[p-1], last[p]]
        last = np.maximum.accumulate(labels.reshape(planes, -1).max(axis=1))
        big = np.flatnonzero(sizes[1:] >= min_area) + 1
        owner = np.searchsorted(last, big, side="left")
        out[start:start + chunk.shape[0]] = np.bincount(owner, minlength=planes).reshape(-1, k)
    return out


def mask_descriptors(masks: Any, num_classes: int, min_area: int = 3,
                     round_tol: float = 0.05) -> dict[str, np.ndarray]:
    """Per-sample, per-foreground-class descriptors of a batch of masks ``[N, H, W]``.

    Returns arrays of shape ``[N, num_classes - 1]`` (column ``j`` is class ``j + 1``):

    - ``present`` (bool): the class covers at least ``min_area`` pixels;
    - ``area`` (float): the class's fraction of the image's pixels (also where it is not ``present``);
    - ``cu``, ``cv`` (float): centroid in normalised coordinates in ``[-1, 1]``, ``u`` along the columns (left
      -1, right +1) and ``v`` along the rows (top -1, bottom +1); NaN where the class is not present;
    - ``orientation`` (float): angle of the principal axis of the class's pixels (second central moments in
      pixel units) in ``[0, pi)``, measured from the +u axis towards +v (so 0 = wide, pi/2 = tall, pi/4 =
      top-left to bottom-right); NaN where the class is not present or is round, i.e. its anisotropy
      ``(l1 - l2) / (l1 + l2)`` of the moment eigenvalues is below ``round_tol`` (a square is round);
    - ``components`` (int): 8-connected components of at least ``min_area`` pixels (0 is possible for a present
      class made only of smaller fragments).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if min_area < 1:
        raise ValueError(f"min_area must be >= 1, got {min_area}")
    arr = as_masks(masks)
    n, h, w = arr.shape
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        bad = int(arr.max()) if arr.max() >= num_classes else int(arr.min())
        raise ValueError(f"masks hold label {bad} outside 0..{num_classes - 1}; is num_classes right?")
    c = num_classes
    idx = (np.arange(n, dtype=np.int64)[:, None, None] * c + arr).reshape(-1)
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    xs, ys = np.broadcast_to(cols, arr.shape).reshape(-1), np.broadcast_to(rows, arr.shape).reshape(-1)

    def moment(weights: Optional[np.ndarray]) -> np.ndarray:
        return np.bincount(idx, weights=weights, minlength=n * c).reshape(n, c)[:, 1:].astype(np.float64)

    count = moment(None)
    sx, sy = moment(xs), moment(ys)
    sxx, syy, sxy = moment(xs * xs), moment(ys * ys), moment(xs * ys)
    present = count >= min_area
    with np.errstate(invalid="ignore", divide="ignore"):
        mx, my = sx / count, sy / count
        mu20 = sxx / count - mx * mx
        mu02 = syy / count - my * my
        mu11 = sxy / count - mx * my
    cu = 2.0 * mx / (w - 1) - 1.0 if w > 1 else np.zeros_like(mx)
    cv = 2.0 * my / (h - 1) - 1.0 if h > 1 else np.zeros_like(my)
    cu, cv = np.where(present, cu, np.nan), np.where(present, cv, np.nan)
    spread = mu20 + mu02
    diff = np.hypot(mu20 - mu02, 2.0 * mu11)
    with np.errstate(invalid="ignore", divide="ignore"):
        anisotropy = np.where(spread > 0, diff / np.where(spread > 0, spread, 1.0), 0.0)
    angle = np.mod(0.5 * np.arctan2(2.0 * mu11, mu20 - mu02), np.pi)
    angle = np.where(angle >= np.pi, 0.0, angle)  # -0.0 and rounding can land on pi itself
    orientation = np.where(present & (anisotropy >= round_tol), angle, np.nan)
    return {
        "present": present,
        "area": count / float(h * w) if h * w else np.zeros_like(count),
        "cu": cu,
        "cv": cv,
        "orientation": orientation,
        "components": _component_counts(arr, num_classes, min_area),
    }


# ---------------------------------------------------------------------------------------- presence patterns

def presence_patterns(present: np.ndarray) -> list[str]:
    """One ``"0110..."`` string per mask from a ``present`` array ``[N, C-1]`` (character ``j`` = class ``j+1``)."""
    p = np.asarray(present, dtype=bool)
    if p.ndim != 2:
        raise ValueError(f"present must be [N, C-1], got shape {p.shape}")
    return ["".join("1" if v else "0" for v in row) for row in p]


def _distribution(labels: Iterable[Any]) -> dict[Any, float]:
    counts = Counter(labels)
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()} if total else {}


def _tv_js(p: Mapping[Any, float], q: Mapping[Any, float]) -> tuple[Optional[float], Optional[float]]:
    if not p or not q:
        return None, None
    keys = sorted(set(p) | set(q), key=repr)  # a fixed order: the sums do not depend on string hashing
    a = np.array([p.get(k, 0.0) for k in keys])
    b = np.array([q.get(k, 0.0) for k in keys])
    tv = 0.5 * float(np.abs(a - b).sum())
    m = 0.5 * (a + b)

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    js = 0.5 * kl(a) + 0.5 * kl(b)
    return tv, max(0.0, js)


def presence_distance(a: Sequence[str] | np.ndarray, b: Sequence[str] | np.ndarray) -> dict[str, Optional[float]]:
    """Distance between two sets' presence-pattern distributions.

    ``a``, ``b``: pattern strings (:func:`presence_patterns`) or ``present`` arrays ``[N, C-1]``. Returns ``tv``,
    the total variation distance ``0.5 * sum |p - q|`` in ``[0, 1]``, and ``js``, the Jensen-Shannon divergence
    in bits (log base 2, also in ``[0, 1]``); ``None`` when a set is empty.
    """
    def patterns(x: Sequence[str] | np.ndarray) -> list[str]:
        if isinstance(x, np.ndarray) and x.dtype != object and x.dtype.kind != "U":
            return presence_patterns(x)
        return [str(s) for s in x]

    tv, js = _tv_js(_distribution(patterns(a)), _distribution(patterns(b)))
    return {"tv": tv, "js": js}


# ------------------------------------------------------------------------------------------ Wasserstein-1

def circular_w1(a: np.ndarray, b: np.ndarray, period: float = math.pi) -> float:
    """Wasserstein-1 between two empirical distributions on a circle of circumference ``period``.

    On a circle, ``W1 = min_alpha integral |F(x) - G(x) - alpha| dx`` over one period (Rabin, Delon & Gousseau
    2011), minimised by the length-weighted median of ``F - G``; used for axial angles (period pi).
    """
    a = np.mod(np.asarray(a, dtype=np.float64).ravel(), period)
    b = np.mod(np.asarray(b, dtype=np.float64).ravel(), period)
    if a.size == 0 or b.size == 0:
        raise ValueError("circular_w1 needs two non-empty samples")
    points = np.unique(np.concatenate([a, b]))
    if points.size == 1:
        return 0.0
    f = np.searchsorted(np.sort(a), points, side="right") / a.size
    g = np.searchsorted(np.sort(b), points, side="right") / b.size
    d = f - g  # constant on [points[i], points[i+1]); 0 on the wrap-around interval
    lengths = np.append(np.diff(points), points[0] + period - points[-1])
    order = np.argsort(d)
    cum = np.cumsum(lengths[order])
    median = d[order][np.searchsorted(cum, 0.5 * cum[-1])]
    return float(np.sum(lengths * np.abs(d - median)))


def _axial_std(theta: np.ndarray) -> float:
    """Circular standard deviation of axial angles (period pi), in radians (~ the ordinary std when small)."""
    r = float(np.abs(np.mean(np.exp(2j * theta))))
    return 0.5 * math.sqrt(-2.0 * math.log(r)) if r > 1e-12 else math.inf


def _spread(values: np.ndarray, how: str) -> float:
    if how == "std":
        return float(np.std(values))
    if how == "iqr":
        q75, q25 = np.percentile(values, [75, 25])
        return float(q75 - q25)
    raise ValueError(f"spread must be 'std' or 'iqr', got {how!r}")


def _class_values(desc: Mapping[str, np.ndarray], name: str, j: int) -> np.ndarray:
    values = np.asarray(desc[name], dtype=np.float64)[:, j]
    values = values[np.asarray(desc["present"], dtype=bool)[:, j]]
    return values[np.isfinite(values)]


def descriptor_w1(sample_desc: Mapping[str, np.ndarray], real_desc: Mapping[str, np.ndarray],
                  min_count: int = 5, spread: str = "std",
                  descriptors: Sequence[str] = DESCRIPTORS) -> dict[str, dict[str, Any]]:
    """Per descriptor and foreground class, W1 between a sample set's and a real set's values.

    For class ``c`` the values are those of the masks where ``c`` is present (and, for the orientation, not
    round) in each set; a class with fewer than ``min_count`` such values in either set gets ``None``. The
    orientation uses :func:`circular_w1` with period pi; the others ``scipy.stats.wasserstein_distance``.

    Per descriptor the result holds ``per_class`` (W1 in the descriptor's unit), ``spread`` (the real set's
    spread of the class's values: ``std`` or ``iqr``; the axial circular std for the orientation),
    ``normalised`` (W1 / spread; a zero spread, e.g. one component in every real mask, divides by 1 so the W1
    stays in its own unit), ``n_sample``/``n_real`` (values used), and ``summary``: the mean of ``normalised``
    over the classes present (``min_count`` times) in the real set that also have enough sample values, with
    ``n_classes`` the number averaged and ``n_missing`` the real classes left out for too few sample values.
    """
    k = np.asarray(real_desc["present"]).shape[1]
    if np.asarray(sample_desc["present"]).shape[1] != k:
        raise ValueError("sample and real descriptors have different numbers of classes")
    out: dict[str, dict[str, Any]] = {}
    for name in descriptors:
        per_class: list[Optional[float]] = []
        normalised: list[Optional[float]] = []
        spreads: list[Optional[float]] = []
        n_s, n_r = [], []
        missing = 0
        for j in range(k):
            s, r = _class_values(sample_desc, name, j), _class_values(real_desc, name, j)
            n_s.append(int(s.size))
            n_r.append(int(r.size))
            if r.size < min_count:
                per_class.append(None), normalised.append(None), spreads.append(None)
                continue
            sp = _axial_std(r) if name == "orientation" else _spread(r, spread)
            spreads.append(sp)
            if s.size < min_count:
                missing += 1
                per_class.append(None), normalised.append(None)
                continue
            w1 = circular_w1(s, r, math.pi) if name == "orientation" else float(wasserstein_distance(s, r))
            per_class.append(w1)
            normalised.append(w1 / sp if sp > 1e-12 else w1)
        used = [v for v in normalised if v is not None]
        out[name] = {
            "per_class": per_class, "normalised": normalised, "spread": spreads, "n_sample": n_s, "n_real": n_r,
            "summary": float(np.mean(used)) if used else None, "n_classes": len(used), "n_missing": missing,
        }
    return out


# -------------------------------------------------------------------------------- vectors and k-NN measures

def centroid_fill(real_desc: Mapping[str, np.ndarray]) -> np.ndarray:
    """The real set's mean centroid ``(cu, cv)`` per foreground class, ``[C-1, 2]`` (0 where never present):
    the fixed value :func:`descriptor_vectors` puts in for an absent class."""
    present = np.asarray(real_desc["present"], dtype=bool)
    fill = np.zeros((present.shape[1], 2))
    for j in range(present.shape[1]):
        if present[:, j].any():
            fill[j] = [np.mean(real_desc["cu"][present[:, j], j]), np.mean(real_desc["cv"][present[:, j], j])]
    return fill


def descriptor_vectors(desc: Mapping[str, np.ndarray], fill: Optional[np.ndarray] = None) -> np.ndarray:
    """One vector per mask, ``[N, 5 * (C-1)]``: per class presence (0/1), area, ``cu``, ``cv``, components.

    The area and components of an absent class are whatever was measured (area below ``min_area`` pixels,
    usually 0); its centroid is ``fill[j]`` (:func:`centroid_fill` of the real set; default the image centre), so
    that an absent class differs from a present one by its presence and area, not by an arbitrary position.
    The orientation is left out (axial and undefined for round shapes). Unstandardised: see
    :func:`fit_standardiser`.
    """
    present = np.asarray(desc["present"], dtype=bool)
    n, k = present.shape
    if fill is None:
        fill = np.zeros((k, 2))
    fill = np.asarray(fill, dtype=np.float64)
    if fill.shape != (k, 2):
        raise ValueError(f"fill must be [{k}, 2], got {fill.shape}")
    cu = np.where(present, np.nan_to_num(desc["cu"], nan=0.0), fill[None, :, 0])
    cv = np.where(present, np.nan_to_num(desc["cv"], nan=0.0), fill[None, :, 1])
    parts = [present.astype(np.float64), np.asarray(desc["area"], dtype=np.float64), cu, cv,
             np.asarray(desc["components"], dtype=np.float64)]
    return np.stack(parts, axis=2).reshape(n, 5 * k)


@dataclass
class Standardiser:
    """``(x - mean) / scale`` with a reference (real) set's per-dimension mean and std (1 where the std is 0)."""
    mean: np.ndarray
    scale: np.ndarray

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        return (np.asarray(vectors, dtype=np.float64) - self.mean) / self.scale


def fit_standardiser(real_vectors: np.ndarray) -> Standardiser:
    """The :class:`Standardiser` of a real set's vectors, to apply to the real and the sample vectors alike."""
    x = np.asarray(real_vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"fit_standardiser needs a non-empty [N, D] array, got shape {x.shape}")
    sd = x.std(axis=0)
    return Standardiser(mean=x.mean(axis=0), scale=np.where(sd > 1e-12, sd, 1.0))


def _pairwise_blocks(a: np.ndarray, b: np.ndarray, chunk: int):
    """Yield ``(start, distances)`` with Euclidean distances of ``a[start:start+chunk]`` to all of ``b``."""
    bb = np.einsum("ij,ij->i", b, b)
    for start in range(0, a.shape[0], chunk):
        x = a[start:start + chunk]
        d2 = np.einsum("ij,ij->i", x, x)[:, None] + bb[None, :] - 2.0 * (x @ b.T)
        yield start, np.sqrt(np.maximum(d2, 0.0))


def _chunk_rows(n_cols: int, max_elements: int = 1 << 21) -> int:
    return max(1, max_elements // max(1, n_cols))


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row of ``x`` to its ``k``-th nearest other row (the row itself excluded)."""
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k must be in 1..{x.shape[0] - 1} for {x.shape[0]} points, got {k}")
    radii = np.empty(x.shape[0])
    for start, d in _pairwise_blocks(x, x, _chunk_rows(x.shape[0])):
        rows = np.arange(d.shape[0])
        d[rows, start + rows] = -1.0  # the point itself sorts first whatever the rounding
        radii[start:start + d.shape[0]] = np.partition(d, k, axis=1)[:, k]
    return radii


def _check_vectors(real: np.ndarray, fake: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r, f = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1] or not r.size or not f.size:
        raise ValueError(f"need two non-empty [N, D] arrays of one D, got {r.shape} and {f.shape}")
    if not (np.isfinite(r).all() and np.isfinite(f).all()):
        raise ValueError("vectors must be finite")
    return r, f


def _in_any_ball(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    inside = np.zeros(points.shape[0], dtype=bool)
    for start, d in _pairwise_blocks(points, centres, _chunk_rows(centres.shape[0])):
        inside[start:start + d.shape[0]] = np.any(d <= radii[None, :], axis=1)
    return inside


def precision_recall(real_vecs: np.ndarray, fake_vecs: np.ndarray, k: int = 5) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    Each point of a set spans a ball with radius the distance to its ``k``-th nearest neighbour within its set.
    Precision: share of fake points inside at least one real ball (fidelity). Recall: share of real points
    inside at least one fake ball (coverage of the real distribution). Distances in chunks of rows.
    """
    r, f = _check_vectors(real_vecs, fake_vecs)
    precision = float(np.mean(_in_any_ball(f, r, _knn_radii(r, k))))
    recall = float(np.mean(_in_any_ball(r, f, _knn_radii(f, k))))
    return {"precision": precision, "recall": recall}


def density_coverage(real_vecs: np.ndarray, fake_vecs: np.ndarray, k: int = 5) -> dict[str, float]:
    """Density and coverage (Naeem et al. 2020), with k-NN balls around the real points only.

    Density: ``1/(k M) * sum_j #{real balls containing fake j}`` (about 1 for matching distributions, above 1
    where fakes crowd into dense real regions). Coverage: share of real points whose ball holds at least one
    fake point (about ``1 - 2**-k`` for matching distributions of equal size).
    """
    r, f = _check_vectors(real_vecs, fake_vecs)
    radii = _knn_radii(r, k)
    hits = 0.0
    for _, d in _pairwise_blocks(f, r, _chunk_rows(r.shape[0])):
        hits += float(np.sum(d <= radii[None, :]))
    covered = np.zeros(r.shape[0], dtype=bool)
    for start, d in _pairwise_blocks(r, f, _chunk_rows(f.shape[0])):
        covered[start:start + d.shape[0]] = d.min(axis=1) <= radii[start:start + d.shape[0]]
    return {"density": hits / (k * f.shape[0]), "coverage": float(np.mean(covered))}


# ----------------------------------------------------------------------------------- variants and levels

def _wilson(successes: int, n: int) -> tuple[Optional[float], Optional[float]]:
    return (None, None) if n <= 0 else wilson(successes, n)


def variant_summary(real_variants: Optional[Sequence[Optional[str]]], fake_variants: Sequence[Optional[str]],
                    fake_consistent: Sequence[bool], common: Sequence[str] = ("normal",),
                    invalid: Sequence[str] = UNKNOWN_LABELS) -> dict[str, Any]:
    """Prevalence of inferred anatomical variants in a real set and a sample set.

    ``real_variants``/``fake_variants``: one variant name per mask (``None`` counts as ``"unknown"``;
    ``real_variants`` may be ``None`` when no real reports exist); ``fake_consistent[i]``: sample ``i`` passes
    all anatomy rules. Per variant (every name seen in either set): counts, prevalence in the real set and in
    the samples (with a Wilson 95 % interval), ``ratio`` = sample / real prevalence (rare-mode recall; ``None``
    where the variant is absent from the real set) and ``plausible`` = share of the samples showing the variant
    that pass all rules (with its Wilson interval). Overall: ``tv`` between the two variant distributions, and
    ``rare_recall`` = mean over the rare variants of the real set (not in ``common`` nor ``invalid``) of
    ``min(1, ratio)`` (``None`` without rare real variants).
    """
    fake = ["unknown" if v is None else str(v) for v in fake_variants]
    ok = [bool(v) for v in fake_consistent]
    if len(ok) != len(fake):
        raise ValueError(f"fake_consistent has {len(ok)} entries for {len(fake)} sample variants")
    real = None if real_variants is None else ["unknown" if v is None else str(v) for v in real_variants]
    real_counts = Counter(real or [])
    fake_counts = Counter(fake)
    n_real, n_fake = len(real or []), len(fake)
    names = sorted(set(real_counts) | set(fake_counts), key=lambda s: (s not in common, s in invalid, s))
    variants: dict[str, dict[str, Any]] = {}
    rare: list[float] = []
    for name in names:
        nf, nr = fake_counts.get(name, 0), real_counts.get(name, 0)
        fake_prev = nf / n_fake if n_fake else None
        real_prev = nr / n_real if real is not None and n_real else None
        lo, hi = _wilson(nf, n_fake)
        n_ok = sum(1 for v, good in zip(fake, ok) if v == name and good)
        plo, phi = _wilson(n_ok, nf)
        ratio = fake_prev / real_prev if fake_prev is not None and real_prev else None
        variants[name] = {
            "real_count": nr, "real_prevalence": real_prev, "sample_count": nf, "sample_prevalence": fake_prev,
            "sample_lo": lo, "sample_hi": hi, "ratio": ratio,
            "plausible": n_ok / nf if nf else None, "plausible_lo": plo, "plausible_hi": phi,
        }
        if real_prev and name not in common and name not in invalid:
            rare.append(min(1.0, ratio or 0.0))
    tv = _tv_js(_distribution(real), _distribution(fake))[0] if real else None
    return {"n_real": n_real, "n_sample": n_fake, "variants": variants, "tv": tv,
            "rare_recall": float(np.mean(rare)) if rare else None, "n_rare": len(rare)}


def level_consistency(levels_inferred: Sequence[Optional[str]],
                      real_levels: Optional[Sequence[Optional[str]]] = None,
                      unknown: Sequence[str] = UNKNOWN_LABELS) -> dict[str, Any]:
    """How often a sample's inferred body level is a known one, and how the levels compare with a real set's.

    ``levels_inferred``: one inferred level per sample (``None`` counts as ``"unknown"``). Returns ``known_share``
    (share not in ``unknown``) with its Wilson interval, the level ``distribution`` of the samples and, given
    ``real_levels``, the real ``real_distribution``, ``real_known_share`` and ``tv``, the total variation distance
    between the two distributions over all labels (``unknown``/``inconsistent`` included as labels).
    """
    fake = ["unknown" if v is None else str(v) for v in levels_inferred]
    n = len(fake)
    known = sum(1 for v in fake if v not in unknown)
    lo, hi = _wilson(known, n)
    out: dict[str, Any] = {"n": n, "known_share": known / n if n else None, "known_lo": lo, "known_hi": hi,
                           "distribution": dict(sorted(_distribution(fake).items()))}
    if real_levels is not None:
        real = ["unknown" if v is None else str(v) for v in real_levels]
        out["real_distribution"] = dict(sorted(_distribution(real).items()))
        out["real_known_share"] = (sum(1 for v in real if v not in unknown) / len(real)) if real else None
        out["tv"] = _tv_js(_distribution(real), _distribution(fake))[0]
    return out


# ------------------------------------------------------------------------------------------- convenience

def _attr(report: Any, name: str) -> Any:
    if isinstance(report, Mapping):
        return report.get(name)
    return getattr(report, name, None)


def anatomy_measures(real_masks: Any, fake_masks: Any, num_classes: int,
                     real_reports: Optional[Sequence[Any]] = None, fake_reports: Optional[Sequence[Any]] = None,
                     k: int = 5, min_area: int = 3, min_count: int = 5) -> dict[str, Any]:
    """All the unsaturated anatomy measures of a sample set against a real set, JSON-serialisable.

    ``real_reports``/``fake_reports``: optional rule-checker reports per mask, objects (or dicts) with
    ``variant``, ``level`` and ``plausible``. Keys: ``n_real``, ``n_sample``, ``presence`` (per-class presence
    rates, pattern ``tv``/``js``, number of distinct patterns), ``fragmentation`` (share of present
    (mask, class) pairs with more than one component, per set), ``w1`` (:func:`descriptor_w1`), ``prdc``
    (precision, recall, density, coverage of standardised :func:`descriptor_vectors`; ``None`` when a set has
    ``k`` masks or fewer), and, with ``fake_reports``, ``variants`` (:func:`variant_summary`) and ``levels``
    (:func:`level_consistency`). NaN becomes ``None``.
    """
    real_d = mask_descriptors(real_masks, num_classes, min_area)
    fake_d = mask_descriptors(fake_masks, num_classes, min_area)
    n_real, n_fake = real_d["present"].shape[0], fake_d["present"].shape[0]
    pr, pf = presence_patterns(real_d["present"]), presence_patterns(fake_d["present"])

    def fragmentation(d: Mapping[str, np.ndarray]) -> Optional[float]:
        present = d["present"]
        return float(np.mean(d["components"][present] > 1)) if present.any() else None

    out: dict[str, Any] = {
        "n_real": n_real, "n_sample": n_fake, "num_classes": num_classes, "min_area": min_area,
        "presence": {"rate_real": real_d["present"].mean(axis=0) if n_real else None,
                     "rate_sample": fake_d["present"].mean(axis=0) if n_fake else None,
                     **presence_distance(pr, pf),
                     "patterns_real": len(set(pr)), "patterns_sample": len(set(pf))},
        "fragmentation": {"real": fragmentation(real_d), "sample": fragmentation(fake_d)},
        "w1": descriptor_w1(fake_d, real_d, min_count=min_count),
        "prdc": None,
    }
    if n_real > k and n_fake > k and num_classes > 1:
        fill = centroid_fill(real_d)
        real_v = descriptor_vectors(real_d, fill)
        std = fit_standardiser(real_v)
        rz, fz = std(real_v), std(descriptor_vectors(fake_d, fill))
        out["prdc"] = {"k": k, **precision_recall(rz, fz, k), **density_coverage(rz, fz, k)}
    if fake_reports is not None:
        if len(fake_reports) != n_fake:
            raise ValueError(f"{len(fake_reports)} sample reports for {n_fake} sample masks")
        if real_reports is not None and len(real_reports) != n_real:
            raise ValueError(f"{len(real_reports)} real reports for {n_real} real masks")
        real_var = None if real_reports is None else [_attr(r, "variant") for r in real_reports]
        out["variants"] = variant_summary(real_var, [_attr(r, "variant") for r in fake_reports],
                                          [bool(_attr(r, "plausible")) for r in fake_reports])
        real_lev = None if real_reports is None else [_attr(r, "level") for r in real_reports]
        out["levels"] = level_consistency([_attr(r, "level") for r in fake_reports], real_lev)
    return jsonable(out)
