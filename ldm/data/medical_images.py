"""Medical image datasets: 2D slices or NIfTI volumes with segmentation masks (see docs/data.md).

Every example follows the data contract: ``image`` float32 H x W x 1 in [-1, 1], ``segmentation``
int64 H x W (``ignore_index`` where there is no mask), ``has_segmentation`` bool, ``file_path_``,
``relative_file_path_`` and ``slice_index`` (-1 for a 2D file).

Geometry of each example (for writing outputs with the source's orientation and spacing):
``spacing`` float32 ``[row, column]`` in mm of the returned pixels, and ``affine`` float32 4 x 4, the
voxel-to-world (RAS+ mm) affine of the returned slice stored as a one-slice canonical volume,
``ldm.data.io.display_slice_to_canonical(image[..., 0], slice_axis)``; it accounts for resampling,
padding, cropping and flips. 2D files record no geometry: both are NaN there.
``MedicalImagesBase.slice_geometry(i)`` gives the same without reading voxels (unflipped).

Bad data is refused with the file named: non-finite voxels or pixels (unless ``nonfinite: fill``), a
float 2D file without an explicit ``intensity`` (its range is not fixed by its type), a damaged
``.nii.gz`` (gzip CRC), slices of different sizes with ``size: null``, a ``segmentation_root`` that holds no
mask for any image (while masks are loaded). Symlinked folders under
``data_root`` are followed (a folder reached twice, e.g. through a link loop, is read once).
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.data import intensity as inten
from ldm.data.io import (IMAGE_EXTENSIONS, MASK_EXTENSIONS, NIFTI_EXTENSIONS, NiftiInfo, canonical_affines_match,
                         display_slice_affine, find_files, image_shape_2d, is_image_2d, is_nifti, load_canonical,
                         nifti_info, read_image_2d, read_mask_2d, slice_spacing, split_extension,
                         volume_slice_to_display)
from ldm.data.labels import BREASTMRI, CTORG_RAW_BRAIN_ID, CTORGAN, DEFAULT_IGNORE_INDEX

logger = logging.getLogger(__name__)

SPLIT_DIRS = {"train": "train", "validation": "validation", "test": "test"}
NONFINITE_POLICIES: tuple[str, ...] = ("error", "fill")


@dataclass
class _Example:
    image: Path
    mask: Path | None
    slice_index: int  # -1 for a 2D file
    relative: str


def _mask_candidates(rel: str, volume: bool) -> list[str]:
    """Relative mask paths to try for an image at ``rel``: the same path, other extensions, CT-ORG names."""
    stem, ext = split_extension(rel)
    exts = NIFTI_EXTENSIONS if volume else MASK_EXTENSIONS
    names = [rel] + [stem + e for e in exts if e != ext.lower()]
    parent, _, base = stem.rpartition("/")
    if base.startswith("volume-"):  # CT-ORG: volume-N.nii.gz <-> labels-N.nii.gz
        other = (parent + "/" if parent else "") + "labels-" + base[len("volume-"):]
        names += [other + e for e in exts]
    return names


class MedicalImagesBase(Dataset):
    """2D slices (PNG/JPG/TIFF/NPY) or NIfTI volumes below ``data_root``, masks under ``segmentation_root``.

    Args:
        data_root: folder searched recursively for images (``.png .jpg .jpeg .tif .tiff .npy``) and
            volumes (``.nii .nii.gz``).
        segmentation_root: folder with masks at the same relative paths (any mask extension; for a
            volume ``volume-N`` also ``labels-N``). None: no masks. May equal ``data_root`` (files
            that are another file's mask are then not used as images). Images without a mask get
            ``ignore_index`` (one warning with the count); a folder with no mask for any image is a ValueError.
        size: output side in pixels (images resized with ``interpolation``, masks nearest neighbour);
            None keeps the stored size (then every slice must have the same size, checked at start).
            With ``spacing``: the side of the centre crop/pad after resampling (no further resize).
        n_labels: number of classes; a mask value >= n_labels (other than ``ignore_index``) is an error. None:
            the model's class count when ``main.py`` trains one with masks (:meth:`expect_labels`), else unchecked.
        load_segmentations: False ignores masks (``has_segmentation`` False everywhere).
        interpolation: "bicubic", "bilinear", "lanczos", "area" or "nearest" for images.
        flip_p: probability of a horizontal flip of image and mask (default 0: flips swap left and right anatomy).
        intensity: "ct" (``window``), "mr" (``percentiles`` per volume or 2D file), "minmax", "uint8"
            (whole numbers 0..255), "unit" (values in [0, 1]) or "signed" (values already in [-1, 1]).
            None: from the file type, "uint8" for integer 2D files (a float 2D file is refused: its
            range is not fixed by its type), the class's volume default for NIfTI.
        window: CT window [level, width] in HU, "multi" (``intensity.CT_MULTI_WINDOW``: lungs, soft
            tissue and bone in one channel) or [[HU, value], ...] points; None: the class default
            ([40, 400]).
        percentiles: [lower, upper] percentiles mapped to -1 and 1 for "mr".
        slice_axis: axis of the canonical (RAS+) volume to slice along (2 = axial).
        skip_empty_slices: keep only volume slices whose mask has foreground.
        label_map: {stored id: class id} remapping applied to masks before the range check.
        ignore_index: fill value of missing masks (and of padding in them).
        square: "pad" or "crop" for non-square slices before resizing (not used when ``size`` is None).
        check_affine: compare volume and label affines (after reorientation) and refuse a mismatch.
        cache_volumes: number of decoded volumes kept in memory (per worker).
        spacing: resample NIfTI slices to this in-plane spacing in mm (one number, or [row, column]) before
            ``size`` crops/pads them; None keeps the pixel grid and resizes to ``size``. 2D files record
            no spacing and are refused with it.
        nonfinite: "error" (default) refuses a volume or 2D file holding NaN/Inf, naming it and the count;
            "fill" replaces NaN and -Inf by the file's lowest finite value and +Inf by its highest, with
            one warning.
    """

    default_volume_intensity = "minmax"
    default_window: Any = (40.0, 400.0)

    def __init__(self, data_root: str | os.PathLike, segmentation_root: str | os.PathLike | None = None,
                 size: int | None = 256, n_labels: int | None = None, load_segmentations: bool = True,
                 interpolation: str = "bicubic", flip_p: float = 0.0, intensity: str | None = None,
                 window: Any = None, percentiles: Sequence[float] = (0.5, 99.5),
                 slice_axis: int = 2, skip_empty_slices: bool = False, label_map: Mapping[Any, Any] | None = None,
                 ignore_index: int = DEFAULT_IGNORE_INDEX, square: str = "pad", check_affine: bool = True,
                 cache_volumes: int = 2, spacing: float | Sequence[float] | None = None,
                 nonfinite: str = "error") -> None:
        self.data_root = Path(data_root)
        self.segmentation_root = Path(segmentation_root) if segmentation_root is not None else None
        self.size = None if size is None else int(size)
        self.n_labels = None if n_labels is None else int(n_labels)
        self.load_segmentations = bool(load_segmentations) and self.segmentation_root is not None
        self.interpolation = interpolation
        self.flip_p = float(flip_p)
        self.intensity = intensity
        self.window = self._window_param(self.default_window if window is None else window)
        self.spacing = self._spacing_param(spacing)
        self.nonfinite = nonfinite
        self._warned_nonfinite = False
        self.percentiles = tuple(float(p) for p in percentiles)
        self.slice_axis = int(slice_axis)
        self.ignore_index = int(ignore_index)
        self.square = square
        self.check_affine = bool(check_affine)
        self.cache_volumes = max(1, int(cache_volumes))
        self.label_map = {int(k): int(v) for k, v in (label_map or {}).items()}
        self._model_labels: tuple[str | None, tuple[str, ...]] | None = None  # set by expect_labels
        self._validate_params()
        self._volumes: OrderedDict[Path, tuple[np.ndarray, tuple[float, float] | None]] = OrderedDict()
        self._infos: dict[Path, NiftiInfo] = {}
        self.examples = self._scan(skip_empty_slices)

    # ----------------------------------------------------------------------------------------- set-up
    @staticmethod
    def _window_param(window: Any) -> Any:
        if isinstance(window, str):
            return window
        try:
            if len(window) == 2 and np.isscalar(window[0]):
                return tuple(float(w) for w in window)
            return tuple(tuple(float(v) for v in pt) for pt in window)
        except (TypeError, ValueError) as err:
            raise ValueError(f"window must be [level, width], 'multi' or a list of [HU, value] points, got "
                             f"{window!r}") from err

    @staticmethod
    def _spacing_param(spacing: Any) -> tuple[float, float] | None:
        if spacing is None:
            return None
        try:
            values = (float(spacing),) * 2 if np.isscalar(spacing) else tuple(float(v) for v in spacing)
        except (TypeError, ValueError):
            values = ()
        if len(values) != 2 or not all(np.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"spacing must be a positive in-plane spacing in mm (one number or [row, column]) or "
                             f"null, got {spacing!r}")
        return values  # type: ignore[return-value]

    def _validate_params(self) -> None:
        if self.size is not None and self.size < 1:
            raise ValueError(f"size must be a positive number of pixels or None, got {self.size}")
        if self.n_labels is not None and self.n_labels < 1:
            raise ValueError(f"n_labels must be >= 1, got {self.n_labels}")
        if self.n_labels is not None and 0 <= self.ignore_index < self.n_labels:
            raise ValueError(f"ignore_index {self.ignore_index} is a valid class id for n_labels={self.n_labels}; "
                             "choose a value >= n_labels (default 255)")
        if self.interpolation not in inten.INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(inten.INTERPOLATIONS)}, got {self.interpolation!r}")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {self.flip_p}")
        inten.check_intensity_mode(self.intensity, self.window, self.percentiles)
        if self.slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {self.slice_axis}")
        if self.square not in ("pad", "crop"):
            raise ValueError(f"square must be 'pad' or 'crop', got {self.square!r}")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {self.nonfinite!r}")
        if not self.data_root.is_dir():
            raise FileNotFoundError(f"data_root {self.data_root} does not exist or is not a directory")
        if self.segmentation_root is not None and not self.segmentation_root.is_dir():
            raise FileNotFoundError(f"segmentation_root {self.segmentation_root} does not exist or is not a "
                                    "directory (set it to the mask folder, or to null for images without masks)")

    def _find_mask(self, image: Path, rel: str) -> Path | None:
        assert self.segmentation_root is not None
        for cand in _mask_candidates(rel, is_nifti(image)):
            path = self.segmentation_root / cand
            if path != image and path.is_file():
                return path
        return None

    def _no_masks_at_all(self, images: list[Path]) -> None:
        """Masks are asked for but ``segmentation_root`` holds none for any image (an empty or wrong folder, another
        layout): refuse, since a mask-supervised model would train on the images alone without a word."""
        assert self.segmentation_root is not None
        first = images[0].relative_to(self.data_root).as_posix()
        tried = ", ".join(_mask_candidates(first, is_nifti(images[0]))[:3])
        image_paths = {i.resolve() for i in images}
        stored = find_files(self.segmentation_root)
        held = [p for p in stored if p.resolve() not in image_paths]
        if held:
            first_held = held[0].relative_to(self.segmentation_root).as_posix()
            there = f"its {len(held)} files match no image, first {first_held}"
        else:
            there = "it holds only the images" if stored else "it holds no files"
        raise ValueError(f"segmentation_root {self.segmentation_root} holds no mask for any of the {len(images)} image "
                         f"files under {self.data_root} ({there}; for {first} it looked for {tried}, ...). A mask "
                         "must sit at its image's relative path (docs/data.md, Layouts): point segmentation_root at "
                         "the mask folder, or set load_segmentations: false to use the images without masks")

    def _scan(self, skip_empty_slices: bool) -> list[_Example]:
        files = [p for p in find_files(self.data_root) if is_image_2d(p) or is_nifti(p)]
        masks: dict[Path, Path | None] = {}
        for f in files:
            rel = f.relative_to(self.data_root).as_posix()
            masks[f] = self._find_mask(f, rel) if self.load_segmentations else None
        used_as_mask = {m.resolve() for m in masks.values() if m is not None}
        files = [f for f in files if f.resolve() not in used_as_mask]
        if not files:
            raise ValueError(f"data_root {self.data_root} holds no images: expected files ending in "
                             f"{', '.join(IMAGE_EXTENSIONS + NIFTI_EXTENSIONS)} (searched recursively)")
        missing = [f for f in files if masks[f] is None]
        if self.load_segmentations and len(missing) == len(files):
            self._no_masks_at_all(files)
        if self.load_segmentations and missing:
            logger.warning("%d of %d image files under %s have no mask under %s (first: %s); their segmentation "
                           "is filled with ignore_index %d and has_segmentation is False", len(missing), len(files),
                           self.data_root, self.segmentation_root, missing[0].relative_to(self.data_root),
                           self.ignore_index)
        if self.spacing is not None:
            flat = [f for f in files if not is_nifti(f)]
            if flat:
                raise ValueError(f"spacing: {list(self.spacing)} resamples NIfTI volumes, but {flat[0]} (and "
                                 f"{len(flat) - 1} more 2D files) record no pixel spacing; use NIfTI volumes or "
                                 "set spacing: null")
        examples: list[_Example] = []
        skipped = 0
        for f in files:
            rel = f.relative_to(self.data_root).as_posix()
            if not is_nifti(f):
                examples.append(_Example(f, masks[f], -1, rel))
                continue
            info = nifti_info(f)
            self._infos[f] = info
            keep = range(info.shape[self.slice_axis])
            if masks[f] is not None:
                self._check_pair(info, masks[f])
                if skip_empty_slices:
                    keep = self._foreground_slices(masks[f])
            elif skip_empty_slices:
                keep = range(0)
            skipped += info.shape[self.slice_axis] - len(keep)
            examples.extend(_Example(f, masks[f], int(k), rel) for k in keep)
        if skipped:
            logger.info("skip_empty_slices: dropped %d volume slices without foreground", skipped)
        if not examples:
            raise ValueError(f"no slices left under {self.data_root}: every volume slice has an empty or missing "
                             "mask (set skip_empty_slices: false, or check segmentation_root)")
        if self.size is None:
            self._check_equal_sizes(examples)
        return examples

    def _check_equal_sizes(self, examples: list[_Example]) -> None:
        """``size: null`` keeps stored sizes; refuse, naming two files, sizes the default collate cannot batch."""
        first: tuple[Path, tuple[int, int]] | None = None
        seen: set[Path] = set()
        for ex in examples:
            if ex.image in seen:
                continue
            seen.add(ex.image)
            hw = self._out_hw(ex)
            if hw is None:
                continue
            if first is None:
                first = (ex.image, hw)
            elif hw != first[1]:
                raise ValueError(f"size: null keeps each slice's own size, but {first[0]} gives {first[1][0]}x"
                                 f"{first[1][1]} slices and {ex.image} gives {hw[0]}x{hw[1]}; they cannot be batched "
                                 "together: set size to a number of pixels (e.g. size: 256)")

    def _out_hw(self, ex: _Example) -> tuple[int, int] | None:
        """Output slice size from headers alone (None when a 2D header cannot be read)."""
        if ex.slice_index < 0:
            hw = image_shape_2d(ex.image)
            return None if hw is None else self._steps(hw, None)[3]
        info = self._infos[ex.image]
        return self._steps(self._display_hw(info), slice_spacing(info.affine, self.slice_axis))[3]

    def _display_hw(self, info: NiftiInfo) -> tuple[int, int]:
        p, q = (a for a in range(3) if a != self.slice_axis)
        return int(info.shape[q]), int(info.shape[p])

    def _check_pair(self, info: NiftiInfo, mask_path: Path) -> None:
        minfo = nifti_info(mask_path)
        self._infos[mask_path] = minfo
        if minfo.shape != info.shape:
            raise ValueError(f"volume {info.path} has shape {info.shape} but its label volume {mask_path} has shape "
                             f"{minfo.shape} (after reorienting both to RAS+); they must hold the same voxel grid")
        if self.check_affine and not canonical_affines_match(info.affine, minfo.affine):
            raise ValueError(f"volume {info.path} and label volume {mask_path} have different affines (orientation, "
                             f"spacing or origin) after reorienting both to RAS+:\n{np.round(info.affine, 4)}\nvs\n"
                             f"{np.round(minfo.affine, 4)}\nfix the label file's header, or set check_affine: false "
                             "if you know the voxels are aligned")

    def _foreground_slices(self, mask_path: Path) -> list[int]:
        labels = self._map_labels(self._labels_array(load_canonical(self._infos[mask_path]), mask_path), mask_path)
        axes = tuple(a for a in range(3) if a != self.slice_axis)
        fg = np.any((labels != 0) & (labels != self.ignore_index), axis=axes)
        return [int(k) for k in np.nonzero(fg)[0]]

    # ------------------------------------------------------------------------------------------ reading
    @staticmethod
    def _labels_array(arr: np.ndarray, path: Path) -> np.ndarray:
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                raise ValueError(f"label file {path} holds non-integer values; labels must be class ids")
        return arr.astype(np.int64)

    def _map_labels(self, labels: np.ndarray, path: Path, slice_index: int = -1) -> np.ndarray:
        if self.label_map:
            out = labels.copy()
            for src, dst in self.label_map.items():
                out[labels == src] = dst
            labels = out
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

    # ----------------------------------------------------------------------------------------- dataset
    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self.examples[index]
        image, mask = self._load(ex)
        has_seg = mask is not None
        if mask is None:
            mask = np.full(image.shape, self.ignore_index, dtype=np.int64)
        info = self._infos.get(ex.image) if ex.slice_index >= 0 else None
        src_spacing = slice_spacing(info.affine, self.slice_axis) if info is not None else None
        steps, row_map, col_map, _ = self._steps(image.shape, src_spacing)
        for op, arg in steps:
            if op == "fit":
                image, mask, _, _ = inten.fit_to_size(image, mask, arg, -1.0, 0 if has_seg else self.ignore_index)
            else:
                image = inten.resize_image(image, arg, self.interpolation)
                mask = inten.resize_mask(mask, arg)
        if self.flip_p > 0 and float(torch.rand(())) < self.flip_p:
            image, mask = image[:, ::-1], mask[:, ::-1]
            col_map = inten.compose_map(col_map, -1.0, image.shape[1] - 1.0)
        spacing, affine = self._geometry(ex, image.shape, row_map, col_map)
        return {"image": np.ascontiguousarray(image, dtype=np.float32)[..., None],
                "segmentation": np.ascontiguousarray(mask, dtype=np.int64), "has_segmentation": has_seg,
                "file_path_": str(ex.image), "relative_file_path_": ex.relative, "slice_index": ex.slice_index,
                "spacing": spacing, "affine": affine}

    # ---------------------------------------------------------------------------------------- geometry
    def _steps(self, hw: tuple[int, int], src_spacing: tuple[float, float] | None
               ) -> tuple[list[tuple[str, Any]], inten.Map, inten.Map, tuple[int, int]]:
        spacing = self.spacing if src_spacing is not None else None
        return inten.resampling_plan(hw, self.size, self.square, spacing, src_spacing)

    def _geometry(self, ex: _Example, out_hw: tuple[int, ...], row_map: inten.Map, col_map: inten.Map
                  ) -> tuple[np.ndarray, np.ndarray]:
        if ex.slice_index < 0:
            return np.full(2, np.nan, dtype=np.float32), np.full((4, 4), np.nan, dtype=np.float32)
        info = self._infos[ex.image]
        affine = display_slice_affine(info.affine, info.shape, self.slice_axis, ex.slice_index,
                                      (int(out_hw[0]), int(out_hw[1])), row_map, col_map)
        return np.asarray(slice_spacing(affine, self.slice_axis), dtype=np.float32), affine.astype(np.float32)

    def slice_geometry(self, index: int) -> dict[str, np.ndarray]:
        """``{"spacing", "affine"}`` of example ``index`` as ``__getitem__`` reports them (without a flip),
        from the headers alone; NaN for a 2D file."""
        ex = self.examples[index]
        if ex.slice_index < 0:
            spacing, affine = self._geometry(ex, (0, 0), (1.0, 0.0), (1.0, 0.0))
        else:
            info = self._infos[ex.image]
            _, rmap, cmap, hw = self._steps(self._display_hw(info), slice_spacing(info.affine, self.slice_axis))
            spacing, affine = self._geometry(ex, hw, rmap, cmap)
        return {"spacing": spacing, "affine": affine}


class _SplitDataset(MedicalImagesBase):
    """A named data set with ``<root>/<split>/images`` and ``<root>/<split>/masks``; root from params or env."""

    env_var = ""
    split = "train"
    n_classes = 0
    default_label_map: dict[int, int] = {}

    def __init__(self, data_root: str | os.PathLike | None = None,
                 segmentation_root: str | os.PathLike | None = None, **kwargs: Any) -> None:
        root_value = data_root if data_root is not None else os.environ.get(self.env_var)
        name = type(self).__name__
        if not root_value:
            raise ValueError(f"{name} needs its data folder: pass data_root in the dataset params or set the "
                             f"environment variable {self.env_var} (layout in docs/data.md)")
        root = Path(root_value)
        images = root / SPLIT_DIRS[self.split] / "images"
        if not images.is_dir():
            raise FileNotFoundError(f"{name}: expected the {self.split} images in {images} (layout "
                                    f"<root>/{SPLIT_DIRS[self.split]}/images and .../masks, see docs/data.md; "
                                    f"root from {'data_root' if data_root is not None else self.env_var})")
        if segmentation_root is None:
            masks = root / SPLIT_DIRS[self.split] / "masks"
            segmentation_root = masks if masks.is_dir() else None
        label_map = dict(self.default_label_map)
        label_map.update({int(k): int(v) for k, v in (kwargs.pop("label_map", None) or {}).items()})
        kwargs.setdefault("n_labels", self.n_classes)
        super().__init__(images, segmentation_root, label_map=label_map, **kwargs)


class CTOrganBase(_SplitDataset):
    """CT-Organ slices or CT-ORG volumes: 6 classes (0 background, 1 liver, 2 bladder, 3 lungs, 4 kidneys,
    5 bone); brain (6 in CT-ORG) maps to background unless ``label_map`` says otherwise. Volumes default
    to intensity "ct" with the given window. Root: ``data_root`` or ``$CTORG_ROOT``. Other arguments as
    ``MedicalImagesBase``.
    """

    env_var = "CTORG_ROOT"
    n_classes = CTORGAN.num_classes
    default_label_map = {CTORG_RAW_BRAIN_ID: 0}
    default_volume_intensity = "ct"


class CTOrganTrain(CTOrganBase):
    """CT-Organ training split (``<root>/train``); arguments as ``CTOrganBase``."""

    split = "train"


class CTOrganValidation(CTOrganBase):
    """CT-Organ validation split (``<root>/validation``); arguments as ``CTOrganBase``."""

    split = "validation"


class CTOrganTest(CTOrganBase):
    """CT-Organ test split (``<root>/test``); arguments as ``CTOrganBase``."""

    split = "test"


class BreastMRIBase(_SplitDataset):
    """Duke breast MRI slices: 4 classes (0 background, 1 breast, 2 fibroglandular tissue, 3 vessels).
    Volumes default to intensity "mr" (percentile scaling). Root: ``data_root`` or ``$BREASTMRI_ROOT``.
    Other arguments as ``MedicalImagesBase``.
    """

    env_var = "BREASTMRI_ROOT"
    n_classes = BREASTMRI.num_classes
    default_volume_intensity = "mr"


class BreastMRITrain(BreastMRIBase):
    """Breast MRI training split (``<root>/train``); arguments as ``BreastMRIBase``."""

    split = "train"


class BreastMRIValidation(BreastMRIBase):
    """Breast MRI validation split (``<root>/validation``); arguments as ``BreastMRIBase``."""

    split = "validation"


class BreastMRITest(BreastMRIBase):
    """Breast MRI test split (``<root>/test``); arguments as ``BreastMRIBase``."""

    split = "test"
