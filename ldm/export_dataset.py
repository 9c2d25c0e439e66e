"""A sample folder of ``scripts/sample.py`` as a training set for nnU-Net v2 and MONAI, with a dataset card.

Input: a sample folder (``images/``, ``masks/``, ``samples.json``; :mod:`ldm.sample_io`) whose samples have masks
(anatomical models with ``--save_masks``, joint models always). Output, in one dataset folder
``<out>/DatasetNNN_Name/``::

    imagesTr/syn_000000_0000.nii.gz   float32 image, one channel (``_0000``)
    labelsTr/syn_000000.nii.gz        uint8 label volume, the label set's ids only
    dataset.json                      nnU-Net v2: channel_names, labels ("background": 0, ...), numTraining,
                                      file_ending ".nii.gz"
    datalist.json                     MONAI (Decathlon style): {"training": [{"image", "label"}, ...]}, paths
                                      relative to this folder (monai.data.load_decathlon_datalist)
    dataset_card.json, README.md      what made the data: checkpoint hash, config, sampler, seeds, mask source,
                                      benchmark numbers, and that the data are synthetic

Each 2D sample becomes a single-slice volume ``X, Y, 1``, the way nnU-Net takes 2D data in NIfTI (its ``2d``
configuration slices along the last NIfTI axis, the first numpy axis after SimpleITK reads it). Where a sample has
a NIfTI file (``sample.py --format nii``) its voxels and affine are kept (the training data's orientation,
spacing and position; intensities in the model's [-1, 1], or HU with ``--hu``); when the training slices were not
axial (``slice_axis`` 0 or 1) the voxel axes are reordered so that the single slice is the last axis, with the
affine's columns reordered alike (same world positions). Samples with only PNGs (or NPZ) have no geometry: they
get 1 mm pixels in RAS+ directions (``ldm.sample_geometry.SampleGeometry()``), the 8-bit PNG mapped back to
[-1, 1] (``p / 127.5 - 1``), and the card says so.

Real cases (``real``): an nnU-Net raw folder (``imagesTr/<case>_0000.<ext>``, ``labelsTr/<case>.<ext>``) or the
project's data layout (``images/`` + ``masks/`` at the same relative paths, also below a split folder
``train/``), 2D files or NIfTI volumes, added with the case prefix ``real_`` beside the synthetic ``syn_``.

Everything is written into a hidden staging folder beside the dataset folder, every file atomically
(:mod:`ldm.atomic_io`), and renamed into place at the end: an export that fails (bad input, a full disk) leaves no
dataset folder and never touches an existing one; ``overwrite`` replaces an existing one only after the new one is
complete.

Modules: :mod:`ldm.export_cases` (the cases and their reading, the label set), :mod:`ldm.export_nnunet` (the
nnU-Net layout and the MONAI datalist), :mod:`ldm.export_card` (the dataset card); this module checks the target,
writes the dataset into the staging folder and moves it into place. Their public names are re-exported here.
"""
from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ldm.atomic_io import TMP_PREFIX, write_json, write_text
from ldm.data.labels import LabelSet
from ldm.export_card import (CARD_JSON, CARD_MD, SYNTHETIC_STATEMENT, UNIT_SPACING_NOTE, _geometry_summary, build_card,
                             card_markdown, read_benchmark)
from ldm.export_cases import (REAL_PREFIX, SYNTHETIC_PREFIX, Case, _session_of, label_set_for, read_case,
                              read_sample_manifest, real_cases, slice_last, synthetic_cases)
from ldm.export_nnunet import (DATALIST, FILE_ENDING, dataset_folder_name, nnunet_labels, write_case,
                               write_datalist, write_dataset_json, write_nifti)

__all__ = ["export_dataset", "ExportResult", "Case", "SYNTHETIC_PREFIX", "REAL_PREFIX", "FILE_ENDING", "DATALIST",
           "CARD_JSON", "CARD_MD", "SYNTHETIC_STATEMENT", "UNIT_SPACING_NOTE", "dataset_folder_name",
           "read_sample_manifest", "synthetic_cases", "real_cases", "slice_last", "read_case", "write_nifti",
           "label_set_for", "nnunet_labels", "read_benchmark", "build_card", "card_markdown"]

logger = logging.getLogger(__name__)


@dataclass
class ExportResult:
    """What :func:`export_dataset` wrote: the dataset folder, its files, and the counts."""

    dataset_dir: str
    dataset_json: str
    datalist: str
    card_json: str
    card_md: str
    num_synthetic: int
    num_real: int
    cases: list[str]


def _check_target(out_dir: str, folder: str, overwrite: bool) -> str:
    """Path of the dataset folder; refuse a non-empty one without ``overwrite``, a file there, or another
    ``DatasetNNN_*`` of the same id (nnU-Net finds datasets by id)."""
    target = os.path.join(out_dir, folder)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"output folder {out_dir} is a file")
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"{target} exists and is a file; remove it or choose another --name/--dataset-id")
    if os.path.isdir(target) and os.listdir(target) and not overwrite:
        raise ValueError(f"{target} exists and is not empty; pass --overwrite to replace it (the new dataset "
                         "replaces it only once it is complete) or choose another --dataset-id/--name")
    if os.path.isdir(out_dir):
        prefix = folder.split("_", 1)[0] + "_"
        others = sorted(n for n in os.listdir(out_dir) if n.startswith(prefix) and n != folder
                        and os.path.isdir(os.path.join(out_dir, n)))
        if others:
            raise ValueError(f"{out_dir} already holds {others[0]} with the same dataset id; nnU-Net finds datasets by "
                             "id, so choose another --dataset-id (or remove that folder)")
    return target


def _write_cases(staging: str, cases: Sequence[Case], labels: LabelSet, manifest: Mapping[str, Any],
                 progress: bool) -> tuple[dict[str, list[str]], list[str], bool]:
    """Every case's image and label files in the staging folder, its label values checked against the label set;
    returns the intensity units by source, the single-slice cases thinner than their in-plane spacing and whether
    a case has unknown pixels (a partial mask given to ``sample.py --masks``: written as nnU-Net's ignore label,
    the id after the last class)."""
    from tqdm import tqdm

    allowed = set(range(labels.num_classes))
    units: dict[str, list[str]] = {"synthetic": [], "real": []}
    thin: list[str] = []
    ignored = False
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(staging, sub))
    for case in tqdm(cases, desc="exporting", unit="case", disable=not progress):
        image, mask, affine, unit = read_case(case)
        unknown = case.info.get("ignore_index")
        if unknown is not None and bool((mask == unknown).any()):
            mask = np.where(mask == unknown, labels.num_classes, mask)
            ignored = True
        found = set(np.unique(mask).tolist()) - ({labels.num_classes} if unknown is not None else set())
        if not found <= allowed:
            raise ValueError(f"{case.label} holds label values {sorted(found - allowed)} outside the label set "
                             f"{labels.name!r} (ids 0..{labels.num_classes - 1}: {', '.join(labels.classes)}); "
                             "remap them, or pass the right --label-set")
        if case.source == "synthetic" and case.kind == "nifti":
            session = _session_of(case.info["sample_index"], manifest.get("sessions") or []) or {}
            unit = "HU" if session.get("hu") else "[-1, 1]"
        units[case.source].append(unit)
        zooms = np.linalg.norm(affine[:3, :3], axis=0)
        if mask.shape[2] == 1 and zooms[2] < zooms[:2].max() - 1e-6:
            thin.append(case.name)
        write_case(staging, case.name, image, mask, affine)
    return units, thin, ignored


def _warn_about_units_and_slices(units: Mapping[str, list[str]], thin: Sequence[str], has_real: bool) -> None:
    """Warn where nnU-Net would treat the export badly: synthetic and real cases in different intensity units,
    single-slice cases its plans would slice sideways."""
    if has_real and set(units["synthetic"]) != set(units["real"]):
        logger.warning("synthetic cases are in %s, real cases in %s: nnU-Net normalises per channel over the "
                       "whole dataset, so bring them to one unit (sample CT with --hu for real HU volumes)",
                       sorted(set(units["synthetic"])), sorted(set(units["real"])))
    if thin:
        logger.warning("%d single-slice cases (first: %s) have a slice spacing below their in-plane spacing: "
                       "nnU-Net takes the axis of largest spacing as the 2D slicing axis, so its plans would "
                       "slice them sideways; check transpose_forward in the plans", len(thin), thin[0])


def export_dataset(sample_dir: str, out_dir: str, dataset_id: int, name: str, real_dir: Optional[str] = None,
                   real_split: str = "train", benchmark: Optional[str] = None, label_set: Optional[str] = None,
                   channel_name: Optional[str] = None, overwrite: bool = False,
                   progress: bool = True, slices: bool = False) -> ExportResult:
    """Write ``sample_dir`` (and ``real_dir``) as ``out_dir/DatasetNNN_name`` (module docstring); returns what was
    written. Every input is checked before the first file is written; the dataset appears only when complete.
    ``slices``: a label-volume ``--masks`` session as single-slice cases instead of its volumes."""
    folder = dataset_folder_name(dataset_id, name)
    target = _check_target(out_dir, folder, overwrite)
    manifest = read_sample_manifest(sample_dir)
    labels = label_set_for(manifest, label_set)
    synthetic, skipped = synthetic_cases(sample_dir, manifest, slices)
    if skipped:
        logger.warning("%s: samples %s are incomplete (an interrupted session) and are not exported", sample_dir,
                       skipped[:10])
    real, layout = real_cases(real_dir, real_split) if real_dir else ([], None)
    bench = read_benchmark(benchmark)
    geometry = manifest.get("geometry") or {}
    if channel_name is None:
        channel_name = "CT" if (geometry.get("intensity") or {}).get("mode") == "ct" else "zscore"
    os.makedirs(out_dir, exist_ok=True)
    staging = os.path.join(out_dir, f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{folder}")
    cases = [*synthetic, *real]
    try:
        units, thin, ignored = _write_cases(staging, cases, labels, manifest, progress)
        _warn_about_units_and_slices(units, thin, bool(real))
        kinds = {c.kind for c in synthetic}
        card = build_card(manifest, sample_dir, folder, synthetic, real,
                          {"folder": os.path.abspath(real_dir), "layout": layout, "split": real_split}
                          if real_dir else None, labels, channel_name, _geometry_summary(kinds, manifest), bench,
                          skipped, {k: v for k, v in units.items() if v})
        card["thin_slice_cases"] = thin
        description = (f"Synthetic {labels.name} image/label pairs from an anatomical latent diffusion model "
                       f"(checkpoint sha256 {str(manifest.get('checkpoint_sha256'))[:12]}...)"
                       + (f" and {len(real)} real cases" if real else "") + f"; see {CARD_MD}")
        card["ignore_label"] = labels.num_classes if ignored else None
        write_dataset_json(staging, folder, description, channel_name, labels, len(synthetic), len(real), ignored)
        write_datalist(staging, folder, description, channel_name, labels, cases, ignored)
        write_json(os.path.join(staging, CARD_JSON), card, default=str)
        write_text(os.path.join(staging, CARD_MD), card_markdown(card))
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote %d synthetic and %d real cases to %s", len(synthetic), len(real), target)
    return ExportResult(target, os.path.join(target, "dataset.json"), os.path.join(target, DATALIST),
                        os.path.join(target, CARD_JSON), os.path.join(target, CARD_MD), len(synthetic), len(real),
                        [c.name for c in cases])


def _move_into_place(staging: str, target: str) -> None:
    """Rename the complete staging folder to ``target``; an existing ``target`` (``overwrite``) is moved aside first
    and deleted only after the rename."""
    if not os.path.exists(target):
        os.replace(staging, target)
        return
    aside = os.path.join(os.path.dirname(target), f"{TMP_PREFIX}old-{uuid.uuid4().hex[:8]}-{os.path.basename(target)}")
    os.replace(target, aside)
    try:
        os.replace(staging, target)
    except OSError:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)
