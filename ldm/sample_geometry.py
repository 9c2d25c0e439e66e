"""Geometry and intensity units of NIfTI samples: the training data's orientation, spacing and (CT) HU.

The datasets (:mod:`ldm.data.medical_images`) bring a volume to canonical RAS+ orientation and show each slice
in radiological display orientation (:func:`ldm.data.io.volume_slice_to_display`), pad or crop it to a square
and resize it to ``size``. A sample is such a display image. :func:`display_to_canonical` undoes the display
transform, and :class:`SampleGeometry` gives the written volume an affine with the training data's directions,
the in-plane spacing of the training slices (``source spacing * square side / size``, or the dataset's
``spacing:`` when it resamples), the source's slice thickness, and its centre at the centre of the reference
volume (a sample is no particular slice, so its position along the slice axis is the reference's centre).

Where the geometry comes from (first that applies; :func:`resolve_geometry`):

1. a reference NIfTI the user names (``scripts/sample.py --reference``);
2. a ``geometry:`` section of the run's config (written by ``scripts/export.py``);
3. the first NIfTI under the data folder of the run's training dataset (its header only);
4. none of these: 1 mm pixels in RAS+ directions, with a note saying so.

Intensities: images stay in the model's ``[-1, 1]`` unless ``hu`` is asked for, which maps a CT run's window
back to Hounsfield units (:func:`ldm.data.intensity.hu_from_ct`: ``level - width/2 + (x + 1) / 2 * width`` for a
``[level, width]`` window, piecewise linear for ``multi``; values outside the window were clipped in training,
so samples never leave it). MR runs scale each volume by its own percentiles (or min-max), so no
absolute unit exists to go back to; their NIfTI samples stay in ``[-1, 1]``.
"""
from __future__ import annotations

import inspect
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_NOTE = ("no reference geometry (no NIfTI training data found, no --reference, no geometry in the config): "
                "1 mm pixels in RAS+ directions")
_DATA_SPLITS = ("train", "validation", "test")


# ------------------------------------------------------------------------------------------ orientation
def display_to_canonical(images: np.ndarray, slice_axis: int = 2) -> np.ndarray:
    """Display-oriented images ``[N, H, W]`` -> a canonical (RAS+) volume holding them as ``N`` slices along
    ``slice_axis``: the inverse of the datasets' display transform
    (:func:`ldm.data.io.display_slice_to_canonical` for each image)."""
    from ldm.data.io import display_slice_to_canonical

    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"display_to_canonical expects images [N, H, W], got shape {images.shape}")
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis}")
    return np.ascontiguousarray(np.concatenate([display_slice_to_canonical(img, slice_axis) for img in images],
                                               axis=slice_axis))


# -------------------------------------------------------------------------------------------- geometry
@dataclass
class SampleGeometry:
    """Where a sample volume lies in world space, and the units of its voxels.

    Args:
        directions: 3x3 unit column vectors of the canonical voxel axes in world (RAS) space.
        slice_axis: canonical axis the samples are slices along (2: axial).
        fov: world extent (mm) of the sample image along each canonical axis (the slice axis entry unused);
            None: 1 mm pixels.
        thickness: spacing (mm) along the slice axis, between stacked samples.
        centre: world position of the sample (stack) centre.
        source: what the geometry was read from.
        note: why it is a fallback, if it is one.
        intensity: ``{"mode": "ct", "window": [level, width]}`` or another dataset intensity mode.
    """

    directions: np.ndarray = field(default_factory=lambda: np.eye(3))
    slice_axis: int = 2
    fov: Optional[Sequence[float]] = None
    thickness: float = 1.0
    centre: np.ndarray = field(default_factory=lambda: np.zeros(3))
    source: str = "default"
    note: Optional[str] = DEFAULT_NOTE
    intensity: dict = field(default_factory=dict)

    def spacing(self, shape: Sequence[int]) -> np.ndarray:
        """Voxel sizes (mm) of a canonical volume of ``shape``."""
        zooms = np.ones(3)
        for axis in range(3):
            if axis == self.slice_axis:
                zooms[axis] = self.thickness
            elif self.fov is not None:
                zooms[axis] = float(self.fov[axis]) / int(shape[axis])
        return zooms

    def affine(self, shape: Sequence[int]) -> np.ndarray:
        """Voxel-to-world affine of a canonical volume of ``shape``, centred on ``centre``."""
        matrix = np.asarray(self.directions, dtype=np.float64) * self.spacing(shape)[None, :]
        out = np.eye(4)
        out[:3, :3] = matrix
        out[:3, 3] = np.asarray(self.centre, dtype=np.float64) - matrix @ ((np.asarray(shape, float) - 1.0) / 2.0)
        return out

    def check_hu(self) -> None:
        """Refuse HU output for a run that is not CT (no window to invert)."""
        if self.intensity.get("mode") != "ct":
            raise ValueError(f"--hu needs a CT run (dataset intensity 'ct' with a window); this run's data "
                             f"intensity is {self.intensity.get('mode')!r}. MR/min-max scaling is per volume, so "
                             "there are no absolute units to go back to: leave --hu out")

    def to_hu(self, images: np.ndarray) -> np.ndarray:
        """``[-1, 1]`` images of a CT run in Hounsfield units (the window, linear or multi, inverted:
        :func:`ldm.data.intensity.hu_from_ct`)."""
        from ldm.data.intensity import hu_from_ct

        self.check_hu()
        return hu_from_ct(images, self.intensity["window"])

    def to_dict(self, shape: Optional[Sequence[int]] = None) -> dict[str, Any]:
        """JSON-able record (``samples.json`` / an exported config's ``geometry:``); with ``shape`` also the
        affine and spacing of one sample of that canonical shape."""
        out: dict[str, Any] = {"orientation": "RAS", "slice_axis": self.slice_axis,
                               "directions": np.asarray(self.directions).round(8).tolist(),
                               "fov_mm": None if self.fov is None else [float(v) for v in self.fov],
                               "thickness_mm": float(self.thickness),
                               "centre_mm": np.asarray(self.centre, float).round(6).tolist(),
                               "source": self.source, "note": self.note, "intensity": dict(self.intensity)}
        if shape is not None:
            out["sample_shape"] = [int(s) for s in shape]
            out["spacing_mm"] = self.spacing(shape).round(8).tolist()
            out["affine"] = self.affine(shape).round(8).tolist()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SampleGeometry":
        try:
            directions = np.asarray(d.get("directions", np.eye(3)), dtype=np.float64)
            centre = np.asarray(d.get("centre_mm", np.zeros(3)), dtype=np.float64)
            fov = d.get("fov_mm")
            geometry = cls(directions=directions, slice_axis=int(d.get("slice_axis", 2)),
                           fov=None if fov is None else [float(v) for v in fov],
                           thickness=float(d.get("thickness_mm", 1.0)), centre=centre,
                           source=str(d.get("source", "config geometry")), note=d.get("note"),
                           intensity=dict(d.get("intensity") or {}))
        except (TypeError, ValueError) as err:
            raise ValueError(f"the config's geometry section is malformed ({err}); expected the keys written by "
                             "scripts/export.py (directions, slice_axis, fov_mm, thickness_mm, centre_mm)") from err
        if directions.shape != (3, 3) or centre.shape != (3,) or (fov is not None and len(fov) != 3):
            raise ValueError("the config's geometry section is malformed: directions must be 3x3, centre_mm and "
                             "fov_mm 3 numbers")
        return geometry


def geometry_from_nifti(path: str | os.PathLike, slice_axis: int = 2, size: Optional[int] = None,
                        square: str = "pad", spacing: Optional[Sequence[float]] = None,
                        intensity: Optional[Mapping[str, Any]] = None) -> SampleGeometry:
    """Geometry of samples from a model trained on slices of the NIfTI file ``path`` (header only) taken along
    ``slice_axis`` as the datasets take them: resampled to ``spacing`` ([row, column] mm) and centre-cropped or
    padded to ``size``; or (no ``spacing``) padded (``square: pad``) or cropped to a square and resized to
    ``size`` (None: kept)."""
    from ldm.data.io import nifti_info

    info = nifti_info(path)
    columns = np.asarray(info.affine[:3, :3], dtype=np.float64)
    zooms = np.linalg.norm(columns, axis=0)
    shape = np.asarray(info.shape, dtype=np.float64)
    p, q = (a for a in range(3) if a != slice_axis)  # display columns run along p, rows along q
    fov = [float(zooms[a] * info.shape[a]) for a in range(3)]
    if spacing is not None:
        target = {q: float(spacing[0]), p: float(spacing[1])}
        for a in (p, q):
            pixels = size if size is not None else max(1, int(round(info.shape[a] * zooms[a] / target[a])))
            fov[a] = target[a] * pixels
    elif size is not None:
        side = max(info.shape[p], info.shape[q]) if square == "pad" else min(info.shape[p], info.shape[q])
        fov[p], fov[q] = float(zooms[p] * side), float(zooms[q] * side)
    centre = info.affine[:3, :3] @ ((shape - 1.0) / 2.0) + info.affine[:3, 3]
    return SampleGeometry(directions=columns / zooms[None, :], slice_axis=slice_axis, fov=fov,
                          thickness=float(zooms[slice_axis]), centre=centre, source=f"reference NIfTI {path}",
                          note=None, intensity=dict(intensity or {}))


# ------------------------------------------------------------------------------------ from a run config
def _dataset_entry(config: Mapping[str, Any]) -> tuple[Optional[str], dict[str, Any]]:
    """``(target, params)`` of the run's training dataset (else validation, test), or ``(None, {})``."""
    data = (config.get("data") or {}).get("params") or {}
    for split in _DATA_SPLITS:
        entry = data.get(split)
        if isinstance(entry, Mapping) and entry.get("target"):
            return str(entry["target"]), dict(entry.get("params") or {})
    return None, {}


def _dataset_class(target: Optional[str]) -> Optional[type]:
    """The dataset class of a project target (``ldm.``); other targets are not imported here."""
    if not target or not target.startswith("ldm."):
        return None
    from ldm.util import get_obj_from_str

    try:
        return get_obj_from_str(target)
    except (ImportError, AttributeError):
        return None


def _class_default(cls: Optional[type], name: str, fallback: Any) -> Any:
    """Default of ``name`` in the first ``__init__`` along ``cls``'s MRO that declares it."""
    for klass in getattr(cls, "__mro__", ()):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        param = inspect.signature(init).parameters.get(name)
        if param is not None and param.default is not inspect.Parameter.empty:
            return param.default
    return fallback


def _images_folder(cls: Optional[type], params: Mapping[str, Any]) -> Optional[Path]:
    """Where the dataset reads its images: ``<root>/<split>/images`` for the named data sets, else data_root."""
    root = params.get("data_root")
    env_var = getattr(cls, "env_var", "")
    if root is None and env_var:
        root = os.environ.get(env_var)
    if not root:
        return None
    split = getattr(cls, "split", None)
    named = Path(root) / str(split) / "images" if env_var and split else None
    return named if named is not None and named.is_dir() else Path(root)


def _first_nifti(folder: Optional[Path]) -> Optional[Path]:
    from ldm.data.io import find_files, is_nifti

    if folder is None or not folder.is_dir():
        return None
    found = [p for p in find_files(folder) if is_nifti(p)]
    return found[0] if found else None


def data_intensity(config: Mapping[str, Any], volumes: bool) -> dict[str, Any]:
    """The run's data intensity mode (and CT window), from the training dataset's params or class defaults."""
    target, params = _dataset_entry(config)
    cls = _dataset_class(target)
    mode = params.get("intensity")
    if mode is None:
        mode = getattr(cls, "default_volume_intensity", None) if volumes else "uint8"
    out: dict[str, Any] = {"mode": mode}
    if mode == "ct":
        window = params.get("window")
        window = getattr(cls, "default_window", None) if window is None else window
        if window is None:
            raise ValueError(f"the run's dataset ({target}) uses intensity 'ct' but its window is unknown; set "
                             "data.params.train.params.window: [level, width]")
        from ldm.data.intensity import window_points

        window_points(window)  # a ValueError for a malformed window
        out["window"] = window if isinstance(window, str) else np.asarray(window, dtype=float).tolist()
    return out


def data_slicing(config: Mapping[str, Any]) -> dict[str, Any]:
    """How a run's training data slice their volumes: ``{"slice_axis", "size", "square", "spacing", "label_map"}`` of
    its dataset config (the dataset class's defaults where it sets none; ``label_map``: the class's default map,
    e.g. CT-ORG's brain id to background, updated by the config's)."""
    target, params = _dataset_entry(config)
    spacing = params.get("spacing")
    label_map = dict(getattr(_dataset_class(target), "default_label_map", None) or {})
    label_map.update(params.get("label_map") or {})
    return {"slice_axis": int(params.get("slice_axis", 2)),
            "label_map": {int(k): int(v) for k, v in label_map.items()},
            "size": params.get("size", _class_default(_dataset_class(target), "size", None)),
            "square": str(params.get("square", "pad")),
            "spacing": None if spacing is None else ([float(spacing)] * 2 if np.isscalar(spacing) else list(spacing))}


def resolve_geometry(config: Mapping[str, Any], reference: Optional[str] = None) -> SampleGeometry:
    """The geometry of this run's NIfTI samples (order in the module docstring); logs where it came from."""
    target, params = _dataset_entry(config)
    slicing = data_slicing(config)
    slice_axis, size, square, spacing = (slicing[k] for k in ("slice_axis", "size", "square", "spacing"))
    if config.get("geometry") and reference is None:
        geometry = SampleGeometry.from_dict(config["geometry"])
    else:
        folder = _images_folder(_dataset_class(target), params)
        found = _first_nifti(folder)
        # Training data of 2D files only (reachable, no NIfTI in it) was scaled as 2D files are, not as volumes.
        volumes = found is not None or folder is None or not folder.is_dir()
        if reference is not None:
            if not os.path.isfile(reference):
                raise FileNotFoundError(f"--reference {reference}: no such NIfTI file")
            found = reference
        if found is not None:
            geometry = geometry_from_nifti(found, slice_axis, size, square, spacing, data_intensity(config, volumes))
        else:
            geometry = SampleGeometry(slice_axis=slice_axis, intensity=data_intensity(config, volumes))
    check_finite_geometry(geometry)
    if geometry.note:
        logger.warning("NIfTI samples: %s; pass --reference VOLUME.nii.gz for the training data's geometry",
                       geometry.note)
    else:
        logger.info("NIfTI samples: geometry from %s", geometry.source)
    return geometry


def check_finite_geometry(geometry: SampleGeometry) -> None:
    """Refuse a geometry with non-finite or zero spacing (a damaged reference header)."""
    values = [geometry.thickness, *(geometry.fov or [1.0, 1.0, 1.0])]
    if not all(math.isfinite(float(v)) and float(v) > 0 for v in values):
        raise ValueError(f"the reference geometry ({geometry.source}) has non-positive or non-finite spacing "
                         f"{values}; pass another --reference")
