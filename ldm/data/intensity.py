"""Intensity scaling to [-1, 1] (CT window, MR percentiles, min-max, 8-bit) and resizing of slices."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

INTENSITY_MODES: tuple[str, ...] = ("ct", "mr", "minmax", "uint8")
INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
                  "lanczos": Image.LANCZOS, "area": Image.BOX}


def window_ct(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """CT window: ``level - width/2 .. level + width/2`` HU -> [-1, 1], clipped outside."""
    if width <= 0:
        raise ValueError(f"CT window width must be positive, got {width}")
    lo = level - width / 2.0
    return np.clip((np.asarray(hu, dtype=np.float32) - lo) / width * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)


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


def scale_linear(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``lo..hi`` to [-1, 1], clipped outside; a constant range maps everything to -1."""
    x = np.asarray(x, dtype=np.float32)
    if hi <= lo:
        return np.full(x.shape, -1.0, dtype=np.float32)
    return np.clip((x - lo) / (hi - lo) * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)


def check_intensity_mode(mode: str | None, window: Sequence[float] | None, percentiles: Sequence[float]) -> None:
    """Validate the intensity settings of a dataset (ValueError names the parameter); None = per-file default."""
    if mode is not None and mode not in INTENSITY_MODES:
        raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {mode!r}")
    if (mode == "ct" or window is not None) and (window is None or len(window) != 2 or float(window[1]) <= 0):
        raise ValueError(f"intensity 'ct' needs window: [level, width] in HU with width > 0, got {window}")
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


def resize_image(image: np.ndarray, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """Resize a float image (values in [-1, 1]) to ``size x size``; overshoot of bicubic is clipped."""
    if image.shape == (size, size):
        return image.astype(np.float32)
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))
    out = pil.resize((size, size), INTERPOLATIONS[interpolation])
    return np.clip(np.asarray(out, dtype=np.float32), -1.0, 1.0)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map (pixel centres), so no new label values appear."""
    h, w = mask.shape
    if (h, w) == (size, size):
        return mask
    rows = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
    return mask[rows[:, None], cols[None, :]]
