"""Reading 2D slices (PNG/JPG/TIFF/NPY) and NIfTI volumes, and the slice display orientation.

Volumes are brought to the closest canonical (RAS+) orientation with nibabel. A slice along
``slice_axis`` is returned in radiological display orientation: for axial slices anterior at the top
and the patient's right on the image's left (``volume_slice_to_display``); the same rule gives the
usual coronal and sagittal views.

Geometry: ``display_slice_affine`` gives the voxel-to-world affine of a (resized, padded, flipped) display
slice, stored as a one-slice canonical volume by ``display_slice_to_canonical``; ``save`` of that array
with that affine (nibabel) puts every pixel where its source voxel was.

Integrity: a ``.nii.gz`` is read to its end once per process so that gzip's CRC-32 and length check
runs (nibabel stops at the last voxel and would return damaged voxels silently). A plain ``.nii`` has
no checksum; damage there cannot be detected.
"""
from __future__ import annotations

import gzip
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy")
NIFTI_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii")
MASK_EXTENSIONS: tuple[str, ...] = (".png", ".npy", ".tif", ".tiff")

logger = logging.getLogger(__name__)


def find_files(root: str | Path) -> list[Path]:
    """Files under ``root`` (any depth, hidden names skipped), sorted, following symlinked folders.

    A folder whose real path was already visited (a link loop, or a second link to the same folder) is
    read once, at its first path in sorted order; the others are logged with one warning.
    """
    root = Path(root)
    seen: set[str] = set()
    repeated: list[str] = []
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            repeated.append(dirpath)
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        found.extend(Path(dirpath) / n for n in filenames
                     if not n.startswith(".") and os.path.isfile(os.path.join(dirpath, n)))
    if repeated:
        logger.warning("%d linked folders under %s lead to folders already read (a link loop or a second link; "
                       "first: %s); each folder is read once", len(repeated), root, repeated[0])
    return sorted(found)


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_EXTENSIONS)


def is_image_2d(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def split_extension(name: str) -> tuple[str, str]:
    """``"a/b.nii.gz" -> ("a/b", ".nii.gz")``; other names split at the last dot."""
    lower = name.lower()
    for ext in NIFTI_EXTENSIONS + IMAGE_EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)], name[-len(ext):]
    return name, ""


def _read_array_2d(path: Path, what: str) -> np.ndarray:
    """Pixel array of a 2D file, or a ValueError naming the file when it cannot be read."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False)
        with Image.open(path) as img:
            img.load()
            if img.mode == "P":
                return np.asarray(img)  # palette indices
            if img.mode in ("RGBA", "LA", "PA"):
                img = img.convert("RGB" if img.mode == "RGBA" else "L")
            return np.asarray(img)
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, EOFError) as err:
        raise ValueError(f"cannot read {what} {path}: {err} (the file is damaged, truncated or not an image; "
                         "replace or remove it)") from err


def image_shape_2d(path: str | Path) -> tuple[int, int] | None:
    """``(H, W)`` of a 2D file from its header alone; None when the header cannot be read (reading the
    file later names the problem)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
            return (int(shape[0]), int(shape[1])) if len(shape) >= 2 else None
        with Image.open(path) as img:
            return int(img.size[1]), int(img.size[0])
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, EOFError):
        return None


def read_image_2d(path: str | Path) -> np.ndarray:
    """One-channel pixel array (dtype as stored) of a 2D image; RGB is reduced to its luminance."""
    path = Path(path)
    arr = _read_array_2d(path, "image")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]
        if np.all(rgb[..., 0] == rgb[..., 1]) and np.all(rgb[..., 1] == rgb[..., 2]):
            arr = rgb[..., 0]
        else:
            arr = (rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
            arr = np.clip(np.round(arr), 0, 255).astype(np.uint8) if rgb.dtype == np.uint8 else arr
    elif arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"image {path} has shape {arr.shape}; expected a 2D grayscale image (H x W)")
    return arr


def read_mask_2d(path: str | Path) -> np.ndarray:
    """Integer label map (int64 H x W) of a 2D mask file (single channel, palette, or gray RGB)."""
    path = Path(path)
    arr = _read_array_2d(path, "mask")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]
        if not (np.all(rgb[..., 0] == rgb[..., 1]) and np.all(rgb[..., 1] == rgb[..., 2])):
            raise ValueError(f"mask {path} is a colour image; save label masks as single-channel images "
                             "holding the class ids (0, 1, 2, ...)")
        arr = rgb[..., 0]
    elif arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"mask {path} has shape {arr.shape}; expected a 2D label map (H x W)")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"mask {path} holds non-integer values; masks must hold class ids")
    return arr.astype(np.int64)


@dataclass
class NiftiInfo:
    """Header facts of a NIfTI file needed to slice it in canonical orientation.

    Args:
        path: the file.
        ornt: nibabel orientation that takes the stored array to canonical RAS+.
        shape: canonical 3D shape.
        affine: canonical voxel-to-world affine.
    """

    path: Path
    ornt: np.ndarray
    shape: tuple[int, int, int]
    affine: np.ndarray


def _squeeze_3d(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise ValueError(f"NIfTI file {path} has shape {shape}; expected a 3D volume (or 4D with one frame)")
    return shape  # type: ignore[return-value]


def nifti_info(path: str | Path) -> NiftiInfo:
    """Read a NIfTI header (no voxel data) and work out its canonical orientation and shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NIfTI file not found: {path}")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises many types for damaged headers
        raise ValueError(f"cannot read NIfTI header of {path}: {err}") from err
    shape = _squeeze_3d(tuple(int(s) for s in img.shape), path)
    ornt = orientations.io_orientation(img.affine)
    canon_shape = tuple(int(shape[int(ax)]) for ax in ornt[:, 0].argsort())
    canon_affine = img.affine @ orientations.inv_ornt_aff(ornt, shape)
    return NiftiInfo(path=path, ornt=ornt, shape=canon_shape, affine=canon_affine)  # type: ignore[arg-type]


_GZIP_VERIFIED: set[tuple[str, int, int]] = set()


def verify_gzip(path: str | Path) -> None:
    """Decompress ``path`` to its end so that gzip checks its CRC-32 and length (once per file version and
    process); ValueError naming the file when the check fails."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), int(stat.st_mtime_ns), int(stat.st_size))
    if key in _GZIP_VERIFIED:
        return
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 22):
                pass
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"cannot read voxel data of {path}: {err} (the file is damaged or truncated: its gzip "
                         "integrity check failed, so its voxels cannot be trusted; download or export it "
                         "again)") from err
    _GZIP_VERIFIED.add(key)


def load_canonical(info: NiftiInfo) -> np.ndarray:
    """Voxel data of a NIfTI file in canonical orientation (as stored dtype, or float32 when scaled).

    A ``.gz`` file is checked end to end first (``verify_gzip``)."""
    if str(info.path).lower().endswith(".gz"):
        verify_gzip(info.path)
    try:
        img = nib.load(str(info.path))
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # truncated gzip streams raise EOFError, zlib.error, OSError...
        raise ValueError(f"cannot read voxel data of {info.path}: {err} (the file is damaged or truncated)") from err
    if data.ndim == 4:
        data = data[..., 0]
    data = orientations.apply_orientation(data, info.ornt)
    if data.dtype.kind == "f" and data.dtype != np.float32:
        data = data.astype(np.float32)
    return np.ascontiguousarray(data)


def volume_slice_to_display(volume: np.ndarray, index: int, axis: int) -> np.ndarray:
    """Slice ``index`` along ``axis`` of a canonical (RAS+) volume, in radiological display orientation."""
    plane = np.take(volume, index, axis=axis)
    return np.ascontiguousarray(plane.T[::-1, ::-1])


def display_slice_to_canonical(image: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of ``volume_slice_to_display``: an ``H x W`` display slice as a one-slice canonical volume
    (size 1 along ``axis``)."""
    return np.expand_dims(np.ascontiguousarray(np.asarray(image)[::-1, ::-1].T), axis)


def slice_spacing(affine: np.ndarray, axis: int) -> tuple[float, float]:
    """(row, column) pixel spacing of display slices along ``axis`` of a canonical volume with ``affine``."""
    p, q = (a for a in range(3) if a != axis)
    zooms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return float(zooms[q]), float(zooms[p])


def display_slice_affine(canon_affine: np.ndarray, canon_shape: Sequence[int], axis: int, index: int,
                         out_hw: tuple[int, int], row_map: tuple[float, float] = (1.0, 0.0),
                         col_map: tuple[float, float] = (1.0, 0.0)) -> np.ndarray:
    """Voxel-to-world affine of a display slice stored with ``display_slice_to_canonical``.

    The slice is slice ``index`` along ``axis`` of a canonical volume (``canon_affine``, ``canon_shape``),
    possibly resampled, padded, cropped or flipped to ``out_hw``: ``row_map = (s, o)`` says that output
    row ``r`` sits at source display row ``s * r + o`` (pixel centres), ``col_map`` the same for columns.
    """
    p, q = (a for a in range(3) if a != axis)
    (sr, orow), (sc, ocol) = row_map, col_map
    h_out, w_out = out_hw
    t = np.eye(4)
    # display[r, c] = plane[n_p - 1 - c, n_q - 1 - r]; the same rule holds for the output slice.
    t[p, p], t[p, 3] = sc, canon_shape[p] - 1 - sc * (w_out - 1) - ocol
    t[q, q], t[q, 3] = sr, canon_shape[q] - 1 - sr * (h_out - 1) - orow
    t[axis, 3] = index
    return np.asarray(canon_affine, dtype=np.float64) @ t


def display_slices_to_volume(slices: np.ndarray) -> np.ndarray:
    """Inverse of ``volume_slice_to_display`` for axial slices: ``N x H x W`` -> canonical ``W x H x N``."""
    return np.ascontiguousarray(np.transpose(slices[:, ::-1, ::-1], (2, 1, 0)))


def canonical_affines_match(a: np.ndarray, b: np.ndarray, tol: float = 1e-3) -> bool:
    """Same voxel grid in world space: equal directions/spacings (relative) and origins (in voxels)."""
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    if not np.allclose(a[:3, :3], b[:3, :3], rtol=tol, atol=tol * float(spacing.max())):
        return False
    return bool(np.all(np.abs(a[:3, 3] - b[:3, 3]) <= 0.01 * float(spacing.min()) + tol))
