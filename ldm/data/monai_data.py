"""Training from a MONAI dataset and transform chain: NIfTI volumes (+ masks) as 2D slices for the models.

``MonaiSliceDataset`` builds a MONAI ``CacheDataset`` over NIfTI volumes with the usual MONAI chain

    LoadImaged -> EnsureChannelFirstd -> Orientationd("RAS") -> [Spacingd] -> ScaleIntensityRanged (CT window)
    or ScaleIntensityRangePercentilesd (MR) -> Resized / ResizeWithPadOrCropd

and serves the axial (or ``slice_axis``) slices of the transformed volumes, in the display orientation of
``ldm.data.medical_images.MedicalImagesBase`` (``ldm.data.io.volume_slice_to_display``: anterior at the top,
the patient's right on the left), so the same volume gives the same pictures through either dataset.

Layout of every example (the project's data contract, with a channel-first image as MONAI yields it):

- ``image``: float32 tensor ``1 x H x W`` (channel first) in [-1, 1]; default collate makes ``B x 1 x H x W``,
  which the models take as they take channel-last ``B x H x W x 1`` (``ldm.data.batch.to_channels_first``);
- ``segmentation``: int64 tensor ``H x W`` of class ids (``ignore_index`` where the volume has no mask);
- ``has_segmentation``: bool; ``file_path_``: the volume's path; ``slice_index``: the slice along ``slice_axis``.

MONAI is an optional extra: ``pip install -e ".[monai]"``. Example config:
``configs/autoencoder/monai_phantom_kl.yaml`` (phantom NIfTI volumes from ``scripts/make_phantom_dataset.py``).
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.data.io import NIFTI_EXTENSIONS, split_extension, volume_slice_to_display
from ldm.data.labels import DEFAULT_IGNORE_INDEX

logger = logging.getLogger(__name__)

INTENSITIES = ("ct", "mr")
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # axis codes of the affine's world frame (nibabel: RAS+ mm)


def import_monai() -> Any:
    """``monai``, or an ImportError saying how to install it."""
    try:
        import monai
    except ImportError as err:
        raise ImportError("MonaiSliceDataset needs MONAI: pip install -e '.[monai]' (or pip install monai)") from err
    return monai


def _volumes(image_dir: Path, mask_dir: Path | None) -> list[dict[str, str]]:
    """``{"image": path[, "label": path]}`` for every NIfTI file under ``image_dir``; a mask is the file with the
    same relative path (any NIfTI extension) under ``mask_dir``."""
    images = sorted(p for p in image_dir.rglob("*") if p.is_file() and split_extension(p.name)[1].lower()
                    in NIFTI_EXTENSIONS)
    if not images:
        raise ValueError(f"image_dir {image_dir} holds no NIfTI volumes (files ending in "
                         f"{', '.join(NIFTI_EXTENSIONS)}, searched recursively)")
    items = []
    for path in images:
        item = {"image": str(path)}
        if mask_dir is not None:
            stem = split_extension(path.relative_to(image_dir).as_posix())[0]
            masks = [mask_dir / (stem + ext) for ext in NIFTI_EXTENSIONS if (mask_dir / (stem + ext)).is_file()]
            if masks:
                item["label"] = str(masks[0])
        items.append(item)
    return items


class MonaiSliceDataset(Dataset):
    """2D slices of NIfTI volumes (+ masks) read and transformed by a MONAI ``CacheDataset`` (see module doc).

    Args:
        image_dir: folder searched recursively for NIfTI volumes (``.nii``, ``.nii.gz``).
        mask_dir: folder with label volumes at the same relative paths (any NIfTI extension); None: no masks.
            A volume without a mask gives ``has_segmentation`` False and a mask of ``ignore_index``.
        size: output side in pixels. Without ``spacing``: slices are resized to ``size`` x ``size`` (MONAI
            ``Resized``; images with ``interpolation``, masks nearest). With ``spacing``: resampled slices are
            centre-cropped or padded (image with -1, mask with 0) to it. None keeps the pixel grid (then all
            volumes must give slices of one size to be batched).
        intensity: "ct" (``ScaleIntensityRanged``: the HU ``window`` mapped to [-1, 1], clipped) or "mr"
            (``ScaleIntensityRangePercentilesd``: the ``percentiles`` of each volume mapped to [-1, 1], clipped).
        window: CT window [level, width] in HU.
        percentiles: [lower, upper] percentiles for "mr".
        spacing: in-plane spacing in mm (one number or [row, column]) to resample to (MONAI ``Spacingd``; the
            spacing along ``slice_axis`` is kept); None keeps each volume's spacing.
        slice_axis: axis of the RAS+ volume that is sliced (2: axial).
        n_labels: number of classes; a mask value outside 0..n_labels-1 is refused at start. None: no check.
        interpolation: MONAI resize mode of images ("area", "bilinear", "bicubic", "nearest", ...).
        cache_rate: fraction of the transformed volumes MONAI keeps in memory (1.0: all, 0: none).
        ignore_index: mask value of volumes without a mask.
    """

    def __init__(self, image_dir: str | os.PathLike, mask_dir: str | os.PathLike | None = None,
                 size: int | None = 64, intensity: str = "ct", window: Sequence[float] = (40.0, 400.0),
                 percentiles: Sequence[float] = (0.5, 99.5), spacing: float | Sequence[float] | None = None,
                 slice_axis: int = 2, n_labels: int | None = None, interpolation: str = "area",
                 cache_rate: float = 1.0, ignore_index: int = DEFAULT_IGNORE_INDEX) -> None:
        self.image_dir = Path(image_dir)
        self.mask_dir = Path(mask_dir) if mask_dir is not None else None
        self.size = None if size is None else int(size)
        self.intensity = intensity
        self.window = tuple(float(w) for w in window)
        self.percentiles = tuple(float(p) for p in percentiles)
        self.spacing = None if spacing is None else tuple(float(s) for s in np.ravel([spacing] * 2 if np.isscalar(
            spacing) else spacing))
        self.slice_axis = int(slice_axis)
        self.n_labels = None if n_labels is None else int(n_labels)
        self.interpolation = interpolation
        self.ignore_index = int(ignore_index)
        self._check_params()
        monai = import_monai()
        self.items = items = _volumes(self.image_dir, self.mask_dir)
        without = sum("label" not in item for item in items)
        if self.mask_dir is not None and without:
            logger.warning("%d of %d volumes under %s have no mask under %s; their slices have has_segmentation "
                           "False", without, len(items), self.image_dir, self.mask_dir)
        self.volumes = monai.data.CacheDataset(items, transform=self.transforms(), cache_rate=float(cache_rate),
                                               num_workers=0, progress=False)
        self.index = self._slice_index(items)

    def _check_params(self) -> None:
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image_dir {self.image_dir} does not exist or is not a directory")
        if self.mask_dir is not None and not self.mask_dir.is_dir():
            raise FileNotFoundError(f"mask_dir {self.mask_dir} does not exist or is not a directory (set it to the "
                                    "mask folder, or to null for volumes without masks)")
        if self.intensity not in INTENSITIES:
            raise ValueError(f"intensity must be one of {INTENSITIES} (MONAI ScaleIntensityRanged with the CT "
                             f"window, or ScaleIntensityRangePercentilesd), got {self.intensity!r}")
        if len(self.window) != 2 or self.window[1] <= 0:
            raise ValueError(f"window must be [level, width] in HU with width > 0, got {list(self.window)}")
        if len(self.percentiles) != 2 or not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(f"percentiles must be [lower, upper] with 0 <= lower < upper <= 100, got "
                             f"{list(self.percentiles)}")
        if self.spacing is not None and (len(self.spacing) != 2 or not all(np.isfinite(s) and s > 0
                                                                          for s in self.spacing)):
            raise ValueError(f"spacing must be positive mm (one number or [row, column]) or null, got "
                             f"{list(self.spacing)}")
        if self.size is not None and self.size < 1:
            raise ValueError(f"size must be a positive number of pixels or null, got {self.size}")
        if self.slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {self.slice_axis}")

    def transforms(self) -> Any:
        """The MONAI ``Compose`` applied to ``{"image": path, "label": path}`` (label optional)."""
        import_monai()
        from monai import transforms as mt

        keys = ["image", "label"]
        plane = [a for a in range(3) if a != self.slice_axis]  # canonical axes of display columns, rows
        with warnings.catch_warnings():  # LoadImaged sets up MONAI's DICOM reader too, which warns about a GPU codec
            warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
            load = mt.LoadImaged(keys, reader="NibabelReader", image_only=True, allow_missing_keys=True)
        chain = [load,
                 mt.EnsureChannelFirstd(keys, allow_missing_keys=True),
                 mt.Orientationd(keys, axcodes="RAS", labels=RAS_LABELS, allow_missing_keys=True)]
        if self.spacing is not None:
            pixdim = [-1.0] * 3  # <= 0 keeps the spacing of that axis
            pixdim[plane[0]], pixdim[plane[1]] = self.spacing[1], self.spacing[0]
            chain.append(mt.Spacingd(keys, pixdim=pixdim, mode=("bilinear", "nearest"), allow_missing_keys=True))
        if self.intensity == "ct":
            level, width = self.window
            chain.append(mt.ScaleIntensityRanged("image", a_min=level - width / 2, a_max=level + width / 2,
                                                 b_min=-1.0, b_max=1.0, clip=True))
        else:
            chain.append(mt.ScaleIntensityRangePercentilesd("image", lower=self.percentiles[0],
                                                            upper=self.percentiles[1], b_min=-1.0, b_max=1.0,
                                                            clip=True))
        if self.size is not None:
            shape = [self.size] * 3
            shape[self.slice_axis] = -1  # -1 keeps the number of slices
            if self.spacing is None:
                chain.append(mt.Resized(keys, spatial_size=shape, mode=(self.interpolation, "nearest"),
                                        allow_missing_keys=True))
            else:
                chain.append(mt.ResizeWithPadOrCropd("image", spatial_size=shape, value=-1.0))
                chain.append(mt.ResizeWithPadOrCropd("label", spatial_size=shape, value=0,
                                                     allow_missing_keys=True))
        return mt.Compose(chain)

    def _slice_index(self, items: list[dict[str, str]]) -> list[tuple[int, int]]:
        """(volume, slice) of every example; checks each transformed mask's values once."""
        index: list[tuple[int, int]] = []
        for v, item in enumerate(items):
            data = self.volumes[v]
            if "label" in data:
                self._check_labels(data["label"], item["label"])
            index.extend((v, k) for k in range(int(data["image"].shape[1 + self.slice_axis])))
        return index

    def _check_labels(self, label: Any, path: str) -> None:
        values = np.unique(np.asarray(label))
        if np.any(values != np.round(values)):
            raise ValueError(f"mask {path} holds non-integer values; masks must be class ids")
        top = self.n_labels - 1 if self.n_labels is not None else np.inf
        bad = values[(values < 0) | (values > top)]
        if bad.size:
            raise ValueError(f"mask {path} holds label values {[int(b) for b in bad[:10]]} outside 0..{top} "
                             f"(n_labels={self.n_labels}); fix the mask or raise n_labels")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        v, k = self.index[i]
        data = self.volumes[v]
        image = volume_slice_to_display(np.asarray(data["image"][0], dtype=np.float32), k, self.slice_axis)
        if "label" in data:
            mask = volume_slice_to_display(np.rint(np.asarray(data["label"][0])).astype(np.int64), k, self.slice_axis)
        else:
            mask = np.full(image.shape, self.ignore_index, dtype=np.int64)
        return {"image": torch.from_numpy(image)[None], "segmentation": torch.from_numpy(mask),
                "has_segmentation": "label" in data, "file_path_": self.items[v]["image"],
                "slice_index": k}
