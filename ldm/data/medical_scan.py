"""Finding the examples of the medical image datasets (``ldm.data.medical_images``): the images under
``data_root``, the mask of each under ``segmentation_root``, the volume slices kept, and the checks made once at
start (no images, no mask for any image, volume and label grids that differ, slice sizes that cannot be batched).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldm.data.io import (IMAGE_EXTENSIONS, MASK_EXTENSIONS, NIFTI_EXTENSIONS, NiftiInfo, canonical_affines_match,
                         find_files, image_shape_2d, is_image_2d, is_nifti, load_canonical, nifti_info, slice_spacing,
                         split_extension)

logger = logging.getLogger("ldm.data.medical_images")  # the datasets' logger, named as before the split


@dataclass
class _Example:
    """One example: an image file, its mask (None: none found) and the volume slice."""

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


class MedicalScanMixin:
    """The scan of ``MedicalImagesBase`` (its ``_scan`` at construction), as methods of the dataset: they read its
    parameters (``data_root``, ``segmentation_root``, ``load_segmentations``, ``slice_axis``, ``spacing``,
    ``size``, ``check_affine``, ``ignore_index``), fill its ``_infos`` (NIfTI headers by path) and use its
    ``_steps`` (output sizes) and label mapping (``ldm.data.medical_read``)."""

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
