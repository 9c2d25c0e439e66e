"""The cases of an export (:mod:`ldm.export_dataset`): the samples of a ``scripts/sample.py`` folder and real
image/label pairs of a folder as :class:`Case` records, one case read as an image/label volume pair on one grid,
and the label set the masks use.

A sample folder's 2D samples become single-slice volumes ``X, Y, 1``: a sample NIfTI keeps its voxels and affine
(a single slice not on the last axis is moved there, with the affine's columns alike); PNG and NPZ samples get
1 mm RAS+ pixels, the 8-bit PNG mapped back to [-1, 1]. Real cases come from an nnU-Net raw folder or the
project's data layout, 2D files or NIfTI volumes.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ldm.data.labels import LabelSet, generic_label_set, get_label_set

SYNTHETIC_PREFIX, REAL_PREFIX = "syn_", "real_"
_CASE_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_SAMPLE_PNG_RE = re.compile(r"^(\d{6,})\.png$")


@dataclass
class Case:
    """One image/label pair to write: where it comes from and how to read it.

    Args:
        name: case identifier in the dataset (``syn_000003``, ``real_patient-1-0004``).
        image: path of the image file read.
        label: path of the label file read.
        kind: ``nifti`` (a sample's NIfTI pair), ``npz``, ``png`` (a sample's PNGs) or ``real``.
        source: ``synthetic`` or ``real``.
        info: per-case record for the card (sample index, seed, session).
    """

    name: str
    image: str
    label: str
    kind: str
    source: str
    info: dict = field(default_factory=dict)



def _case_name(prefix: str, text: str) -> str:
    """A case identifier from free text: characters other than letters, digits, ``_``, ``-`` become ``-``."""
    cleaned = _CASE_CHARS.sub("-", text).strip("-")
    return prefix + (cleaned or "case")


def read_sample_manifest(sample_dir: str) -> dict[str, Any]:
    """The ``samples.json`` of a sample folder, or for a folder of ``sample.py --masks`` its ``from_masks.json`` in
    the same shape (one session; ``from_masks`` holds the record); a missing folder or manifest is an error naming
    it."""
    import json

    from ldm.sample_io import MANIFEST, read_manifest
    from ldm.sampling.masks import RECORD

    if not os.path.isdir(sample_dir):
        raise FileNotFoundError(f"sample folder not found: {sample_dir}")
    path = os.path.join(sample_dir, MANIFEST)
    from_masks = os.path.join(sample_dir, RECORD)
    if not os.path.isfile(path) and os.path.isfile(from_masks):
        try:
            with open(from_masks) as f:
                record = json.load(f)
        except (OSError, ValueError) as err:
            raise ValueError(f"{from_masks} is damaged ({err})") from None
        session = {"id": "from_masks", **{k: record.get(k) for k in (
            "seed", "sampler", "ddim_steps", "eta", "ema", "guidance_scale", "formats", "hu", "status")},
                   "masks": True}
        return {**{k: record.get(k) for k in ("checkpoint", "checkpoint_sha256", "config", "config_files",
                                              "geometry")},
                "mask_source": "condition", "masks_generated_jointly": False, "sessions": [session],
                "from_masks": record}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: export a folder written by scripts/sample.py (its samples.json "
                                "records the checkpoint, config and seeds the dataset card needs)")
    return read_manifest(sample_dir)


def _volume_cases(sample_dir: str, record: Mapping[str, Any]) -> list[Case]:
    """A finished label-volume session's volumes as 3D cases: ``images_<k>.nii.gz``, each labelled by
    ``condition_masks.nii.gz`` (the label volume it was drawn from, on its grid); a ValueError if the session has
    not written them yet."""
    volumes = record.get("volumes") or {}
    files = list(volumes.get("files") or [])
    images = sorted((f for f in files if f.startswith("images_")), key=lambda f: int(f[len("images_"):-7]))
    label = os.path.join(sample_dir, "condition_masks.nii.gz")
    missing = [f for f in [*images, "condition_masks.nii.gz"] if not os.path.isfile(os.path.join(sample_dir, f))]
    if not images or missing:
        raise ValueError(f"{sample_dir}: this label-volume session has not written its volumes yet (they are written "
                         f"once every slice is done{'; missing ' + ', '.join(missing) if missing else ''}); run its "
                         "sample.py command again to finish it, or export its finished slices with --slices")
    stem = os.path.basename(str(volumes.get("source") or "volume"))
    for ext in (".nii.gz", ".nii"):
        stem = stem[:-len(ext)] if stem.endswith(ext) else stem
    return [Case(_case_name(SYNTHETIC_PREFIX, f"{stem}_{k}"), os.path.join(sample_dir, name), label, "nifti",
                 "synthetic", {"sample_index": k, "mask": str(volumes.get("source")), "seed": record.get("seed"),
                               "session": "from_masks", "format": "nifti volume",
                               "ignore_index": record.get("ignore_index")})
            for k, name in enumerate(images)]


def _from_masks_cases(sample_dir: str, record: Mapping[str, Any], slices: bool = False
                      ) -> tuple[list[Case], list[int]]:
    """The images of a ``sample.py --masks`` folder as cases, each labelled by the mask it was made from
    (``condition_masks/<mask>``, NIfTI beside NIfTI images; unknown pixels stay the ignore value), and the indices
    of masks skipped as incomplete. A label-volume session gives its volumes (:func:`_volume_cases`) unless
    ``slices``: then its finished slices, each a single-slice case."""
    from ldm.sampling.masks import CONDITION_DIR, mask_complete

    settings = record.get("settings") or {}
    formats = record.get("formats") or ["png"]
    volume = settings.get("volume_source") is not None
    if volume and not slices:
        return _volume_cases(sample_dir, record), []
    cases, skipped = [], []
    for m, entry in enumerate(record.get("files") or []):
        if not mask_complete(sample_dir, entry["mask"], len(entry["images"]), formats, bool(record.get("own_masks")),
                             volume, staged=False):
            skipped.append(m)
            continue
        for k, name in enumerate(entry["images"]):
            nii = os.path.join(sample_dir, "images", name + ".nii.gz")
            npz = os.path.join(sample_dir, "images", name + ".npz")
            label_png = os.path.join(sample_dir, CONDITION_DIR, entry["mask"] + ".png")
            if os.path.isfile(nii):
                kind, image, label = "nifti", nii, os.path.join(sample_dir, CONDITION_DIR, entry["mask"] + ".nii.gz")
            elif os.path.isfile(npz):
                kind, image, label = "npz", npz, label_png
            else:
                kind, image, label = "png", os.path.join(sample_dir, "images", name + ".png"), label_png
            info = {"sample_index": m * len(entry["images"]) + k, "mask": entry["mask"], "seed": record.get("seed"),
                    "session": "from_masks", "format": kind, "ignore_index": record.get("ignore_index")}
            cases.append(Case(_case_name(SYNTHETIC_PREFIX, name), image, label, kind, "synthetic", info))
    if not cases:
        raise ValueError(f"{sample_dir} holds no complete sample drawn from masks; run its sample.py command again "
                         "to finish it")
    return cases, skipped


def _session_of(index: int, sessions: Sequence[Mapping[str, Any]]) -> Optional[Mapping[str, Any]]:
    """The last recorded session that wrote sample ``index`` (its range, or its ``redone`` list)."""
    found = None
    for session in sessions:
        start, count = session.get("start_index"), session.get("count")
        covered = isinstance(start, int) and isinstance(count, int) and start <= index < start + count
        if covered or index in (session.get("redone") or []):
            found = session
    return found


def synthetic_cases(sample_dir: str, manifest: Mapping[str, Any], slices: bool = False
                    ) -> tuple[list[Case], list[int]]:
    """The sample folder's samples as cases, and the indices skipped as incomplete.

    A sample counts when its image PNG exists (``sample.py`` writes it last, after every other file of the sample);
    its image is read from its NIfTI file, else its NPZ, else the PNG, and its mask from the matching file
    (``masks/N.nii.gz`` beside a NIfTI image, else ``masks/N.png``). A sample with an image but no mask file is an
    error naming the file; files of a sample without its image PNG (an interrupted session) are skipped."""
    from ldm.sample_io import IMAGE_DIR, MASK_DIR, present_files

    if manifest.get("from_masks") is not None:
        return _from_masks_cases(sample_dir, manifest["from_masks"], slices)
    sessions = manifest.get("sessions") or []
    if not any(s.get("masks") for s in sessions) and not manifest.get("mask_source"):
        raise ValueError(f"{os.path.join(sample_dir, 'samples.json')} records no masks: a training set needs a label "
                         "map per image; sample an anatomical model with --save_masks (joint models always write "
                         "masks)")
    images = os.path.join(sample_dir, IMAGE_DIR)
    indices = sorted(int(m.group(1)) for m in map(_SAMPLE_PNG_RE.match, os.listdir(images) if os.path.isdir(images)
                                                   else []) if m and os.path.getsize(os.path.join(images, m.group(0))))
    if not indices:
        raise ValueError(f"{sample_dir} holds no samples ({images}/NNNNNN.png); sample into it first")
    skipped = sorted(set(present_files(sample_dir)) - set(indices))
    cases = []
    for index in indices:
        stem = f"{index:06d}"
        nii = os.path.join(images, stem + ".nii.gz")
        npz = os.path.join(images, stem + ".npz")
        if os.path.isfile(nii):
            kind, image, label = "nifti", nii, os.path.join(sample_dir, MASK_DIR, stem + ".nii.gz")
        elif os.path.isfile(npz):
            kind, image, label = "npz", npz, os.path.join(sample_dir, MASK_DIR, stem + ".png")
        else:
            kind, image, label = "png", os.path.join(images, stem + ".png"), os.path.join(sample_dir, MASK_DIR,
                                                                                          stem + ".png")
        if not os.path.isfile(label) or os.path.getsize(label) == 0:
            raise FileNotFoundError(f"mask file {label} of sample {stem} is missing (or empty): the sample folder is "
                                    "incomplete; run the same scripts/sample.py command again to redo it, or move "
                                    "the sample away")
        session = _session_of(index, sessions) or {}
        info = {"sample_index": index, "seed": session.get("seed"), "session": session.get("id"), "format": kind}
        cases.append(Case(SYNTHETIC_PREFIX + stem, image, label, kind, "synthetic", info))
    return cases, skipped


def _mask_beside(rel: str, masks: Path, volume: bool) -> Optional[Path]:
    """The mask of an image at relative path ``rel`` under ``masks``, by the datasets' own name rules."""
    from ldm.data.medical_images import _mask_candidates

    for candidate in _mask_candidates(rel, volume):
        path = masks / candidate
        if path.is_file():
            return path
    return None


def real_cases(real_dir: str, split: str = "train") -> tuple[list[Case], str]:
    """Real image/label pairs of ``real_dir`` as cases (prefix ``real_``) and the layout found.

    Layouts: ``nnunet`` (``imagesTr/<case>_0000.<ext>`` + ``labelsTr/<case>.<ext>``; one channel) or ``slices``
    (``images/`` + ``masks/``, or ``<split>/images`` + ``<split>/masks``, masks at the same relative path with any
    mask extension, ``volume-N`` <-> ``labels-N``). An image without its label is an error naming it."""
    from ldm.data.io import NIFTI_EXTENSIONS, find_files, is_image_2d, is_nifti, split_extension

    root = Path(real_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--real {real_dir}: no such folder")
    cases: list[Case] = []
    if (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
        layout = "nnunet"
        for path in sorted((root / "imagesTr").iterdir()):
            stem, ext = split_extension(path.name)
            if path.name.startswith(".") or not ext or not (is_nifti(path) or is_image_2d(path)):
                continue
            if not stem.endswith("_0000"):
                raise ValueError(f"--real: {path} is not channel 0 (<case>_0000{ext}); only one-channel data can be "
                                 "mixed with the synthetic cases")
            case = stem[: -len("_0000")]
            label = next((root / "labelsTr" / (case + e) for e in (ext,) + NIFTI_EXTENSIONS + (".png",)
                          if (root / "labelsTr" / (case + e)).is_file()), None)
            if label is None:
                raise FileNotFoundError(f"--real: the label of {path} is missing ({root / 'labelsTr' / (case + ext)})")
            cases.append(Case(_case_name(REAL_PREFIX, case), str(path), str(label), "real", "real",
                              {"file": str(path)}))
    else:
        base = root / split if (root / split / "images").is_dir() else root
        images, masks = base / "images", base / "masks"
        if not images.is_dir() or not masks.is_dir():
            raise FileNotFoundError(f"--real {real_dir}: expected imagesTr/ + labelsTr/ (nnU-Net), images/ + masks/ or "
                                    f"{split}/images + {split}/masks (the project's data layout)")
        layout = "slices"
        for path in find_files(images):
            if not (is_nifti(path) or is_image_2d(path)):
                continue
            rel = path.relative_to(images).as_posix()
            label = _mask_beside(rel, masks, is_nifti(path))
            if label is None:
                raise FileNotFoundError(f"--real: the mask of {path} is missing (expected {masks / rel} or the same "
                                        "name with another mask extension)")
            cases.append(Case(_case_name(REAL_PREFIX, split_extension(rel)[0]), str(path), str(label), "real", "real",
                              {"file": str(path)}))
    if not cases:
        raise ValueError(f"--real {real_dir}: no image files found ({layout} layout)")
    names = [c.name for c in cases]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--real {real_dir}: file names that give the same case identifier {twice[:3]}; rename them")
    return cases, layout



def slice_last(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A single-slice volume with its singleton axis moved last (``X, Y, 1``) and the affine's columns reordered
    to match, so every voxel keeps its world position; volumes already so (or 3D volumes) are returned as they are."""
    volume = np.asarray(volume)
    if volume.ndim == 4 and volume.shape[3] == 1:
        volume = volume[..., 0]
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
    ones = [a for a in range(3) if volume.shape[a] == 1]
    if not ones or 2 in ones:
        return volume, np.asarray(affine, dtype=np.float64)
    axis = ones[0]
    order = [a for a in range(3) if a != axis] + [axis]
    out = np.array(affine, dtype=np.float64)
    out[:3, :3] = out[:3, order]
    return np.ascontiguousarray(volume.transpose(order)), out


def _png_volume(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A display-oriented 2D image/mask pair as ``X, Y, 1`` volumes with 1 mm RAS+ pixels (no geometry known)."""
    from ldm.sample_geometry import SampleGeometry, display_to_canonical

    volume = display_to_canonical(image[None].astype(np.float32), 2)
    labels = display_to_canonical(mask[None], 2)
    return volume, labels, SampleGeometry().affine(volume.shape)


def _from_8bit(array: np.ndarray) -> np.ndarray:
    """8-bit pixels as the model's [-1, 1] (the inverse of ``ldm.sample_io.to_uint8``); other dtypes as float32."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 127.5 - 1.0
    return array.astype(np.float32)


def _one_channel(image: np.ndarray, path: str) -> np.ndarray:
    if image.ndim != 2:
        raise ValueError(f"{path} has shape {image.shape}: only one-channel (grayscale) images can be exported")
    return image


def read_case(case: Case) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """``(image float32, labels int64, affine, intensity unit)`` of a case, image and labels on one grid."""
    import nibabel as nib

    from ldm.data.io import is_nifti, read_image_2d, read_mask_2d

    def nifti(path: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            img = nib.load(path)
            return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)
        except Exception as err:  # nibabel raises several types for damaged files
            raise ValueError(f"cannot read {path}: {err}") from err

    if case.kind in ("nifti", "real") and is_nifti(case.image):
        image, affine = nifti(case.image)
        if not is_nifti(case.label):
            raise ValueError(f"{case.label}: the label of the NIfTI image {case.image} must be a NIfTI file too")
        labels, label_affine = nifti(case.label)
        if image.shape != labels.shape:
            raise ValueError(f"{case.image} has shape {image.shape} but its label {case.label} has {labels.shape}")
        if not np.allclose(affine, label_affine, atol=1e-4):
            raise ValueError(f"{case.image} and its label {case.label} have different affines (not one grid)")
        image, affine = slice_last(image, affine)
        labels, _ = slice_last(labels, label_affine)
        unit = "as stored" if case.source == "real" else "sample NIfTI"
    elif case.kind == "npz":
        with np.load(case.image, allow_pickle=False) as data:
            if "image" not in data:
                raise ValueError(f"{case.image} holds no 'image' array")
            image2d = _one_channel(np.asarray(data["image"]), case.image).astype(np.float32)
        image, labels, affine = _png_volume(image2d, read_mask_2d(case.label))
        unit = "[-1, 1]"
    else:
        image2d = _one_channel(read_image_2d(case.image), case.image)
        mask2d = read_mask_2d(case.label)
        if image2d.shape != mask2d.shape:
            raise ValueError(f"{case.image} has shape {image2d.shape} but its mask {case.label} has {mask2d.shape}")
        unit = "[-1, 1]" if image2d.dtype == np.uint8 else "as stored"
        image, labels, affine = _png_volume(_from_8bit(image2d), mask2d)
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise ValueError(f"{case.label} holds non-integer label values")
    image = np.asarray(image, dtype=np.float32)
    if not np.all(np.isfinite(image)):
        raise ValueError(f"{case.image} holds NaN/Inf voxels; nnU-Net refuses them")
    return image, np.asarray(labels).astype(np.int64), affine, unit



def _find_key(node: Any, key: str) -> Any:
    """The first value of ``key`` anywhere in a nested config (depth first), or None."""
    if isinstance(node, Mapping):
        if node.get(key) is not None:
            return node[key]
        for value in node.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    elif isinstance(node, list):
        for value in node:
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


def label_set_for(manifest: Mapping[str, Any], name: Optional[str] = None) -> LabelSet:
    """The label set of the masks: ``name`` (``--label-set``), else the run config's ``label_set``, else generic
    classes of the config's ``num_anatomical_classes``; a run that names neither is an error."""
    if name:
        return get_label_set(name)
    config = manifest.get("config") or {}
    found = _find_key(config, "label_set")
    if isinstance(found, str) and "${" not in found:
        return get_label_set(found)
    classes = _find_key(config, "num_anatomical_classes")
    if isinstance(classes, int) and classes >= 1:
        return generic_label_set(classes)
    raise ValueError("the sample folder's config names no label_set and no class count; pass --label-set "
                     f"(one of {', '.join(_registry_names())})")


def _registry_names() -> list[str]:
    from ldm.data.labels import LABEL_SETS

    return list(LABEL_SETS)
