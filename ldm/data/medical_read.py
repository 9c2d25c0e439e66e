"""Reading one example of the medical image datasets (``ldm.data.medical_images``): decoded volumes (LRU cache),
non-finite values refused or filled, intensities scaled to [-1, 1], label ids mapped and checked against the
class count (given, or the model's through ``expect_labels``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from ldm.data import intensity as inten
from ldm.data.io import load_canonical, nifti_info, read_image_2d, read_mask_2d, volume_slice_to_display
from ldm.data.medical_scan import _Example

logger = logging.getLogger("ldm.data.medical_images")  # the datasets' logger, named as before the split

NONFINITE_POLICIES: tuple[str, ...] = ("error", "fill")


def apply_label_map(labels: np.ndarray, label_map: dict[int, int] | None) -> np.ndarray:
    """``labels`` with each stored id of ``label_map`` replaced by its class id (all at once: a map may swap ids);
    ``labels`` itself when the map is empty."""
    if not label_map:
        return labels
    out = labels.copy()
    for src, dst in label_map.items():
        out[labels == src] = dst
    return out


class MedicalReadMixin:
    """The reading of ``MedicalImagesBase``, as methods of the dataset: they read its parameters (``intensity``,
    ``window``, ``percentiles``, ``nonfinite``, ``label_map``, ``n_labels``, ``ignore_index``, ``slice_axis``,
    ``cache_volumes``) and use its ``_volumes`` cache, ``_infos`` headers and ``_model_labels``."""

    @staticmethod
    def _labels_array(arr: np.ndarray, path: Path) -> np.ndarray:
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                raise ValueError(f"label file {path} holds non-integer values; labels must be class ids")
        return arr.astype(np.int64)

    def _map_labels(self, labels: np.ndarray, path: Path, slice_index: int = -1) -> np.ndarray:
        labels = apply_label_map(labels, self.label_map)
        bad = (labels < 0) | ((labels >= self.n_labels) & (labels != self.ignore_index)) if self.n_labels \
            else (labels < 0)
        if np.any(bad):
            where = f" slice {slice_index}" if slice_index >= 0 else ""
            values = sorted(int(x) for x in np.unique(labels[bad]))[:10]
            if self._model_labels is not None:  # n_labels came from the model (expect_labels)
                name, classes = self._model_labels
                named = f"label set {name!r}" if name and name != "generic" else "the model's label set"
                listed = f": {', '.join(f'{i} {c}' for i, c in enumerate(classes))}" if classes else ""
                raise ValueError(f"mask {path}{where} holds label values {values} outside {named} "
                                 f"(0..{self.n_labels - 1}{listed}; ignore_index={self.ignore_index}); fix the mask, map the ids with "
                                 "label_map, or train a model with that many classes")
            raise ValueError(f"mask {path}{where} holds label values {values} outside 0..{(self.n_labels or 1) - 1} "
                             f"(n_labels={self.n_labels}, ignore_index={self.ignore_index}); fix the mask or map "
                             "the ids with label_map")
        return labels

    def expect_labels(self, num_classes: int, label_set: str | None = None, classes: Sequence[str] = ()) -> None:
        """The model's class count and label set (``main.py`` calls this before training): without ``n_labels``
        a mask value outside ``0..num_classes - 1`` (other than ``ignore_index``) is then an error naming the file,
        the value and the label set when it is read, not deep inside the model. An ``n_labels`` given is kept."""
        if self.n_labels is not None or int(num_classes) < 1:
            return
        if 0 <= self.ignore_index < int(num_classes):
            raise ValueError(f"ignore_index {self.ignore_index} of {type(self).__name__} ({self.data_root}) is a class "
                             f"id of the model's {num_classes} classes; choose a value >= {num_classes} (default 255)")
        self.n_labels = int(num_classes)
        self._model_labels = (label_set, tuple(str(c) for c in classes))

    def _volume(self, path: Path, is_label: bool) -> tuple[np.ndarray, tuple[float, float] | None]:
        """Decoded canonical volume (LRU-cached) and its intensity reference range for mr/minmax."""
        if path in self._volumes:
            self._volumes.move_to_end(path)
            return self._volumes[path]
        info = self._infos.get(path) or nifti_info(path)
        arr = load_canonical(info)
        ref = None
        if is_label:
            arr = self._labels_array(arr, path)
        else:
            arr = self._finite(arr.astype(np.float32), path, "voxels")
            mode = self.intensity or self.default_volume_intensity
            if mode == "mr":
                lo, hi = np.percentile(arr, self.percentiles)
                ref = (float(lo), float(hi))
            elif mode == "minmax":
                ref = (float(arr.min()), float(arr.max()))
        self._volumes[path] = (arr, ref)
        while len(self._volumes) > 2 * self.cache_volumes:
            self._volumes.popitem(last=False)
        return arr, ref

    def _finite(self, arr: np.ndarray, path: Path, what: str) -> np.ndarray:
        """``arr`` when every value is finite; else an error naming the file and the count, or (``nonfinite:
        fill``) NaN/-Inf replaced by the lowest finite value and +Inf by the highest, with one warning."""
        if arr.dtype.kind != "f":
            return arr
        finite = np.isfinite(arr)
        bad = int(arr.size - np.count_nonzero(finite))
        if not bad:
            return arr
        n_nan = int(np.count_nonzero(np.isnan(arr)))
        if self.nonfinite == "error" or bad == arr.size:
            raise ValueError(f"{path} holds {bad} non-finite {what} ({n_nan} NaN, {bad - n_nan} Inf) of {arr.size}; "
                             "they would make the training loss non-finite: fix the file (e.g. numpy.nan_to_num) "
                             + ("" if bad == arr.size else "or set nonfinite: fill to replace them by the file's "
                                "lowest/highest finite value"))
        lo, hi = float(arr[finite].min()), float(arr[finite].max())
        log = logger.info if self._warned_nonfinite else logger.warning
        log("nonfinite: fill: %s holds %d non-finite %s (%d NaN); NaN and -Inf become %g, +Inf becomes %g%s", path,
            bad, what, n_nan, lo, hi, "" if self._warned_nonfinite else " (further files are logged at INFO)")
        self._warned_nonfinite = True
        return np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)

    def _scale(self, raw: np.ndarray, mode: str, path: Path, ref: tuple[float, float] | None) -> np.ndarray:
        lo, hi = (float(raw.min()), float(raw.max())) if raw.size else (0.0, 0.0)
        if mode == "uint8":
            if raw.dtype.kind == "f" and not np.all(raw == np.round(raw)):
                raise ValueError(f"image {path} holds {raw.dtype} values {lo:g}..{hi:g} with fractions, but intensity "
                                 "'uint8' expects whole numbers 0..255; for a float image in [0, 1] set intensity: "
                                 "unit, in [-1, 1] signed, otherwise minmax, ct or mr")
            if lo < 0 or hi > 255:
                raise ValueError(f"image {path} holds values {lo:g}..{hi:g}, outside the "
                                 "0..255 that intensity 'uint8' expects; set intensity to 'minmax', 'ct' or 'mr'")
            return inten.scale_uint8(raw)
        if mode in ("unit", "signed"):
            low = 0.0 if mode == "unit" else -1.0
            if lo < low or hi > 1.0:
                raise ValueError(f"image {path} holds values {lo:g}..{hi:g}, outside the [{low:g}, 1] that intensity "
                                 f"{mode!r} expects; set intensity to 'uint8', 'minmax', 'ct' or 'mr'")
            return inten.scale_unit(raw) if mode == "unit" else np.asarray(raw, dtype=np.float32)
        if mode == "ct":
            assert self.window is not None
            if isinstance(self.window, tuple) and len(self.window) == 2 and np.isscalar(self.window[0]):
                return inten.window_ct(raw, *self.window)
            return inten.window_multi(raw, self.window)
        if ref is not None:
            return inten.scale_linear(raw, *ref)
        if mode == "mr":
            return inten.scale_percentiles(raw, *self.percentiles)
        return inten.scale_minmax(raw)

    def _load(self, ex: _Example) -> tuple[np.ndarray, np.ndarray | None]:
        if ex.slice_index < 0:
            raw = self._finite(read_image_2d(ex.image), ex.image, "pixels")
            mode = self.intensity
            if mode is None:
                if raw.dtype.kind == "f":
                    raise ValueError(f"image {ex.image} holds {raw.dtype} values {float(raw.min()):g}.."
                                     f"{float(raw.max()):g}: a float file's range is not fixed by its type, so set "
                                     "intensity: unit (values in [0, 1]), signed ([-1, 1]), uint8 (whole numbers "
                                     "0..255), minmax (per file), ct (HU) or mr")
                mode = "uint8"
            scaled = self._scale(raw, mode, ex.image, None)
            mask = read_mask_2d(ex.mask) if ex.mask is not None else None
        else:
            vol, ref = self._volume(ex.image, is_label=False)
            raw = volume_slice_to_display(vol, ex.slice_index, self.slice_axis)
            scaled = self._scale(raw, self.intensity or self.default_volume_intensity, ex.image, ref)
            mask = None
            if ex.mask is not None:
                mask = volume_slice_to_display(self._volume(ex.mask, is_label=True)[0], ex.slice_index,
                                               self.slice_axis)
        if mask is not None:
            if mask.shape != raw.shape:
                raise ValueError(f"mask {ex.mask} has size {mask.shape} but image {ex.image} has size {raw.shape}; "
                                 "a mask must have the same height and width as its image")
            mask = self._map_labels(mask, ex.mask, ex.slice_index)
        return scaled, mask
