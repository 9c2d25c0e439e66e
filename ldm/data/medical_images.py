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

The scan for examples is in ``ldm.data.medical_scan``, the reading of one example (intensities, label checks)
in ``ldm.data.medical_read``; ``MedicalImagesBase`` inherits both.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.data import intensity as inten
from ldm.data.io import NiftiInfo, display_slice_affine, slice_spacing
from ldm.data.labels import BREASTMRI, CTORG_RAW_BRAIN_ID, CTORGAN, DEFAULT_IGNORE_INDEX
from ldm.data.medical_read import NONFINITE_POLICIES, MedicalReadMixin
from ldm.data.medical_scan import MedicalScanMixin, _Example
from ldm.data.medical_scan import _mask_candidates  # noqa: F401 (re-exported: ldm.export_dataset imports it here)

SPLIT_DIRS = {"train": "train", "validation": "validation", "test": "test"}


class MedicalImagesBase(MedicalScanMixin, MedicalReadMixin, Dataset):
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
