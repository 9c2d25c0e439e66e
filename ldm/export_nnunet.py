"""The nnU-Net v2 raw layout of an export (:mod:`ldm.export_dataset`): the folder name ``DatasetNNN_Name``, each
case as ``imagesTr/<case>_0000.nii.gz`` + ``labelsTr/<case>.nii.gz``, nnU-Net's ``dataset.json`` and, beside it,
MONAI's Decathlon-style ``datalist.json`` (paths relative to the dataset folder).
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np

from ldm.atomic_io import write_json
from ldm.data.labels import LabelSet
from ldm.export_cases import Case
from ldm.sample_io import save_nifti

FILE_ENDING = ".nii.gz"
DATALIST = "datalist.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

# one NIfTI writer for samples and exports: sform and qform = affine, mm, read back before the rename
write_nifti = save_nifti


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``DatasetNNN_Name`` (nnU-Net's raw folder name) after checking the id (1..999) and the name."""
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, (int, np.integer)) or not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"--dataset-id must be an integer from 1 to 999 (nnU-Net's three digits), got {dataset_id!r}")
    if not _NAME_RE.match(str(name)):
        raise ValueError(f"--name {name!r}: use letters, digits, '_' and '-' only, starting with a letter or digit "
                         "(it becomes the folder name DatasetNNN_Name)")
    return f"Dataset{int(dataset_id):03d}_{name}"


def nnunet_labels(label_set: LabelSet, ignore: bool = False) -> dict[str, int]:
    """nnU-Net's ``labels``: ``{"background": 0, <class 1>: 1, ...}`` (names as in the registry), with ``ignore``
    also ``"ignore": C`` (nnU-Net v2's ignore label, the highest id: pixels of unknown class, left out of its loss)."""
    labels = {("background" if i == 0 else name): i for i, name in enumerate(label_set.classes)}
    return {**labels, "ignore": label_set.num_classes} if ignore else labels


def write_case(folder: str, case: str, image: np.ndarray, labels: np.ndarray, affine: np.ndarray) -> None:
    """Case ``case`` as ``imagesTr/<case>_0000.nii.gz`` (its one channel) and ``labelsTr/<case>.nii.gz`` (uint8)
    under ``folder``, both with ``affine``."""
    write_nifti(os.path.join(folder, "imagesTr", f"{case}_0000{FILE_ENDING}"), image, affine)
    write_nifti(os.path.join(folder, "labelsTr", f"{case}{FILE_ENDING}"), labels.astype(np.uint8), affine)


def write_dataset_json(folder: str, name: str, description: str, channel_name: str, label_set: LabelSet,
                       num_synthetic: int, num_real: int, ignore: bool = False) -> None:
    """nnU-Net's ``dataset.json`` in ``folder``: channel name, labels (``ignore``: with the ignore label), case count
    and file ending."""
    write_json(os.path.join(folder, "dataset.json"),
               {"name": name, "description": description, "channel_names": {"0": channel_name},
                "labels": nnunet_labels(label_set, ignore), "numTraining": num_synthetic + num_real,
                "file_ending": FILE_ENDING,
                "reference": "synthetic (anatomical-ldm scripts/export_dataset.py)",
                "synthetic_cases": num_synthetic,
                "real_cases": num_real})


def write_datalist(folder: str, name: str, description: str, channel_name: str, label_set: LabelSet,
                   cases: Sequence[Case], ignore: bool = False) -> None:
    """MONAI's ``datalist.json`` in ``folder`` (``monai.data.load_decathlon_datalist``): every case as training
    data, its image and label paths relative to ``folder``."""
    write_json(os.path.join(folder, DATALIST),
               {"name": name, "description": description, "modality": {"0": channel_name},
                "labels": {str(i): n for n, i in nnunet_labels(label_set, ignore).items()}, "numTraining": len(cases),
                "training": [{"image": f"imagesTr/{c.name}_0000{FILE_ENDING}",
                              "label": f"labelsTr/{c.name}{FILE_ENDING}", "source": c.source} for c in cases],
                "testing": []})
