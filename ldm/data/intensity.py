"""Intensity scaling to [-1, 1] (CT window, MR percentiles, min-max, 8-bit, unit range) and resizing of slices.

CT windows: ``window: [level, width]`` is one linear window (clipped outside). ``window: multi`` (or a
list of ``[HU, value]`` points) is a piecewise-linear multi-window in one channel: ``CT_MULTI_WINDOW``
maps -1000 / -160 / 240 / 1500 HU to -1 / -0.5 / 0.5 / 1, i.e. the soft-tissue window (level 40,
width 400) keeps the middle half of the range, air and lungs share the lower quarter and bone the upper
quarter. Every CT-Organ class stays distinguishable: lung parenchyma (about -850 HU) is 0.09 above air
(-1000 HU) instead of clipped to the same -1, and cancellous (200-400 HU) and cortical bone (above
700 HU) stay apart instead of saturating at 240 HU, while liver, kidneys and bladder keep half of the
contrast of the 40/400 window. ``hu_from_ct`` inverts any of these windows inside their range.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image

Map = tuple[float, float]  # output pixel x sits at input pixel s * x + o (pixel centres), per axis
INTENSITY_MODES: tuple[str, ...] = ("ct", "mr", "minmax", "uint8", "unit", "signed")
CT_MULTI_WINDOW: tuple[tuple[float, float], ...] = ((-1000.0, -1.0), (-160.0, -0.5), (240.0, 0.5), (1500.0, 1.0))
INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
                  "lanczos": Image.LANCZOS, "area": Image.BOX}


def window_ct(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """CT window: ``level - width/2 .. level + width/2`` HU -> [-1, 1], clipped outside."""
    if width <= 0:
        raise ValueError(f"CT window width must be positive, got {width}")
    lo = level - width / 2.0
    return np.clip((np.asarray(hu, dtype=np.float32) - lo) / width * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)


def window_points(window: Any) -> np.ndarray:
    """``[[HU, value], ...]`` (float64, n x 2) of a window given as [level, width], "multi" or points."""
    if isinstance(window, str):
        if window != "multi":
            raise ValueError(f"window must be [level, width], 'multi' or a list of [HU, value] points, got {window!r}")
        return np.asarray(CT_MULTI_WINDOW, dtype=np.float64)
    arr = np.asarray(window, dtype=np.float64)
    if arr.shape == (2,):
        level, width = float(arr[0]), float(arr[1])
        if width <= 0:
            raise ValueError(f"CT window width must be positive, got {width}")
        return np.array([[level - width / 2.0, -1.0], [level + width / 2.0, 1.0]])
    if arr.ndim != 2 or arr.shape[1] != 2 or len(arr) < 2:
        raise ValueError(f"window must be [level, width], 'multi' or a list of [HU, value] points, got {window!r}")
    if np.any(np.diff(arr[:, 0]) <= 0) or np.any(np.diff(arr[:, 1]) <= 0) or arr[0, 1] != -1.0 or arr[-1, 1] != 1.0:
        raise ValueError(f"window points {arr.tolist()} must increase in HU and in value, from value -1 to value 1")
    return arr


def window_multi(hu: np.ndarray, window: Any) -> np.ndarray:
    """CT window of any form (``window_points``) -> [-1, 1], clipped outside its HU range."""
    pts = window_points(window)
    return np.interp(np.asarray(hu, dtype=np.float32), pts[:, 0], pts[:, 1]).astype(np.float32)


def hu_from_ct(x: np.ndarray, window: Any) -> np.ndarray:
    """Inverse of ``window_multi`` / ``window_ct``: [-1, 1] -> HU (clipped values come back at the edges)."""
    pts = window_points(window)
    return np.interp(np.asarray(x, dtype=np.float32), pts[:, 1], pts[:, 0]).astype(np.float32)


def scale_percentiles(x: np.ndarray, lower: float, upper: float, reference: np.ndarray | None = None) -> np.ndarray:
    """Map the ``lower``/``upper`` percentiles of ``reference`` (default ``x``) to -1/1, clipped (MR scaling)."""
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got [{lower}, {upper}]")
    ref = np.asarray(x if reference is None else reference, dtype=np.float32)
    lo, hi = np.percentile(ref, [lower, upper])
    return scale_linear(x, float(lo), float(hi))


def scale_minmax(x: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Map min..max of ``reference`` (default ``x``) to [-1, 1]."""
    ref = np.asarray(x if reference is None else reference, dtype=np.float32)
    return scale_linear(x, float(ref.min()), float(ref.max()))


def scale_uint8(x: np.ndarray) -> np.ndarray:
    """0..255 -> [-1, 1]; the caller checks the range first (``check_uint8_range``)."""
    return (np.asarray(x, dtype=np.float32) / 127.5 - 1.0).astype(np.float32)


def scale_unit(x: np.ndarray) -> np.ndarray:
    """0..1 -> [-1, 1]; the caller checks the range first."""
    return (np.asarray(x, dtype=np.float32) * 2.0 - 1.0).astype(np.float32)


def scale_linear(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``lo..hi`` to [-1, 1], clipped outside; a constant range maps everything to -1."""
    x = np.asarray(x, dtype=np.float32)
    if hi <= lo:
        return np.full(x.shape, -1.0, dtype=np.float32)
    return np.clip((x - lo) / (hi - lo) * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)


def check_intensity_mode(mode: str | None, window: Any, percentiles: Sequence[float]) -> None:
    """Validate the intensity settings of a dataset (ValueError names the parameter); None = per-file default."""
    if mode is not None and mode not in INTENSITY_MODES:
        raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {mode!r}")
    if mode == "ct" or window is not None:
        if window is None:
            raise ValueError("intensity 'ct' needs window: [level, width] in HU (width > 0), 'multi' or [HU, value] "
                             "points")
        try:
            window_points(window)
        except (ValueError, TypeError) as err:
            raise ValueError(f"window: {err}") from err
    if len(percentiles) != 2 or not 0.0 <= float(percentiles[0]) < float(percentiles[1]) <= 100.0:
        raise ValueError(f"percentiles must be [lower, upper] with 0 <= lower < upper <= 100, got {percentiles}")


def pad_to_square(image: np.ndarray, mask: np.ndarray, image_fill: float, mask_fill: int) -> tuple[np.ndarray,
                                                                                                       np.ndarray]:
    """Centre-pad a non-square slice (and its mask) to a square."""
    h, w = image.shape
    if h == w:
        return image, mask
    n = max(h, w)
    top, left = (n - h) // 2, (n - w) // 2
    img = np.full((n, n), image_fill, dtype=image.dtype)
    msk = np.full((n, n), mask_fill, dtype=mask.dtype)
    img[top:top + h, left:left + w] = image
    msk[top:top + h, left:left + w] = mask
    return img, msk


def crop_to_square(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre-crop a non-square slice (and its mask) to a square."""
    h, w = image.shape
    n = min(h, w)
    top, left = (h - n) // 2, (w - n) // 2
    return image[top:top + n, left:left + n], mask[top:top + n, left:left + n]


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))  # type: ignore[index]


def resize_image(image: np.ndarray, size: int | Sequence[int], interpolation: str = "bicubic") -> np.ndarray:
    """Resize a float image (values in [-1, 1]) to ``size x size`` (or ``(H, W)``); overshoot of bicubic is
    clipped. Pixel centres stay aligned: output pixel ``r`` samples input ``(r + 0.5) * H_in / H - 0.5``."""
    h, w = _hw(size)
    if image.shape == (h, w):
        return image.astype(np.float32)
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))
    out = pil.resize((w, h), INTERPOLATIONS[interpolation])
    return np.clip(np.asarray(out, dtype=np.float32), -1.0, 1.0)


def resize_mask(mask: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map (pixel centres) to ``size x size`` (or ``(H, W)``), so no
    new label values appear."""
    h, w = mask.shape
    ho, wo = _hw(size)
    if (h, w) == (ho, wo):
        return mask
    rows = np.minimum(((np.arange(ho) + 0.5) * h / ho).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(wo) + 0.5) * w / wo).astype(np.int64), w - 1)
    return mask[rows[:, None], cols[None, :]]


def fit_to_size(image: np.ndarray, mask: np.ndarray, size: int, image_fill: float,
                mask_fill: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Centre-pad or centre-crop each axis to ``size`` (no resampling). Returns the image, the mask and
    the offsets ``(top, left)`` of the output in the input (negative where padded)."""
    h, w = image.shape
    top, left = (h - size) // 2 if h > size else -((size - h) // 2), (w - size) // 2 if w > size else -((size - w) // 2)
    img = np.full((size, size), image_fill, dtype=image.dtype)
    msk = np.full((size, size), mask_fill, dtype=mask.dtype)
    r0, c0 = max(top, 0), max(left, 0)  # first input row/col kept
    d0, e0 = max(-top, 0), max(-left, 0)  # where it lands
    nh, nw = min(h - r0, size - d0), min(w - c0, size - e0)
    img[d0:d0 + nh, e0:e0 + nw] = image[r0:r0 + nh, c0:c0 + nw]
    msk[d0:d0 + nh, e0:e0 + nw] = mask[r0:r0 + nh, c0:c0 + nw]
    return img, msk, top, left


def compose_map(outer: Map, s: float, o: float) -> Map:
    """``outer`` after a further step whose output pixel x sits at its input pixel ``s * x + o``."""
    return outer[0] * s, outer[0] * o + outer[1]


def resampling_plan(hw: Sequence[int], size: int | None, square: str, spacing: Sequence[float] | None = None,
                    src_spacing: Sequence[float] | None = None
                    ) -> tuple[list[tuple[str, Any]], Map, Map, tuple[int, int]]:
    """How a ``hw`` slice becomes a dataset example: steps ``("resize", (h, w))`` / ``("fit", side)``
    (``resize_image``/``resize_mask``, ``fit_to_size``), the row and column maps from output to input
    pixels, and the output size.

    With ``spacing`` (and the slice's ``src_spacing``, both [row, column] mm): resample to that spacing,
    then centre-crop/pad to ``size`` (None: keep). Without: a non-square slice is padded or cropped to a
    square (``square``), then resized to ``size`` (None: unchanged).
    """
    h, w = int(hw[0]), int(hw[1])
    steps: list[tuple[str, Any]] = []
    rmap: Map = (1.0, 0.0)
    cmap: Map = (1.0, 0.0)

    def resize(h1: int, w1: int) -> None:
        nonlocal h, w, rmap, cmap
        steps.append(("resize", (h1, w1)))
        rmap = compose_map(rmap, h / h1, 0.5 * h / h1 - 0.5)
        cmap = compose_map(cmap, w / w1, 0.5 * w / w1 - 0.5)
        h, w = h1, w1

    def fit(side: int) -> None:
        nonlocal h, w, rmap, cmap
        steps.append(("fit", side))
        rmap = compose_map(rmap, 1.0, float((h - side) // 2 if h > side else -((side - h) // 2)))
        cmap = compose_map(cmap, 1.0, float((w - side) // 2 if w > side else -((side - w) // 2)))
        h = w = side

    if spacing is not None and src_spacing is not None:
        h1 = max(1, int(round(h * float(src_spacing[0]) / float(spacing[0]))))
        w1 = max(1, int(round(w * float(src_spacing[1]) / float(spacing[1]))))
        if (h1, w1) != (h, w):
            resize(h1, w1)
        if size is not None and (h, w) != (size, size):
            fit(size)
    elif size is not None:
        if h != w:
            fit(max(h, w) if square == "pad" else min(h, w))
        if (h, w) != (size, size):
            resize(size, size)
    return steps, rmap, cmap, (h, w)
