"""Evaluate folders of samples (from ``scripts/sample.py``) against real data, for a comparison report.

A sample set is a folder with ``images/*.png`` and, for anatomical models, ``masks/*.png`` (the model's own
predicted masks). Real data is a folder of the same layout or a dataset config (``target``/``params``, or a
``main.py`` config whose ``data.params.<split>`` is used).
"""
from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import torch

from ldm.data.batch import item_channels_first
from ldm.evaluation import anatomy, diversity, features, metrics

logger = logging.getLogger(__name__)


def _image_files(folder: str) -> list[str]:
    sub = os.path.join(folder, "images")
    root = sub if os.path.isdir(sub) else folder
    files = sorted(p for p in glob.glob(os.path.join(root, "*.png")) if "_mask" not in os.path.basename(p))
    if not files:
        raise FileNotFoundError(f"no PNG images in {root}; expected the output folder of scripts/sample.py "
                                "(images/*.png) or a folder of PNG slices")
    return files


def load_png_images(files: Sequence[str]) -> torch.Tensor:
    """8-bit PNGs -> ``[N, C, H, W]`` float in ``[-1, 1]`` (grey images give ``C = 1``)."""
    from PIL import Image

    arrays = []
    for f in files:
        arr = np.asarray(Image.open(f))
        arrays.append(arr[..., None] if arr.ndim == 2 else arr[..., :3])
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images have different sizes {sorted(shapes)}; evaluate sets of one size")
    stack = np.stack(arrays).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(stack).permute(0, 3, 1, 2).contiguous()


def load_sample_set(folder: str, max_images: Optional[int] = None) -> dict[str, Any]:
    """Images, the model's masks (``None`` if the folder has none) and the manifest of a sample folder."""
    from PIL import Image

    files = _image_files(folder)[:max_images]
    images = load_png_images(files)
    mask_dir = os.path.join(folder, "masks")
    masks = None
    mask_files = [os.path.join(mask_dir, os.path.basename(f)) for f in files]
    if os.path.isdir(mask_dir):
        have = [os.path.isfile(m) for m in mask_files]
        if all(have):
            masks = torch.from_numpy(np.stack([np.asarray(Image.open(m)) for m in mask_files]).astype(np.int64))
        else:
            logger.warning("%s: %d of %d images have no mask in masks/ (sampled without --save_masks?); the "
                           "model's own masks are left out of the evaluation.", folder, have.count(False), len(have))
    manifest_path = os.path.join(folder, "samples.json")
    manifest = json.load(open(manifest_path)) if os.path.isfile(manifest_path) else {}
    return {"images": images, "masks": masks, "files": files, "manifest": manifest}


def dataset_from_config(path: str, split: str = "validation") -> Any:
    """Instantiate a dataset from a YAML: ``{target, params}`` or a ``main.py`` config's ``data.params.<split>``."""
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    if not os.path.isfile(path):
        raise FileNotFoundError(f"data config not found: {path}")
    cfg = OmegaConf.load(path)
    if "target" in cfg:
        return instantiate_from_config(cfg)
    params = cfg.get("data", {}).get("params", {})
    if split not in params:
        raise ValueError(f"{path} has neither a top-level target nor data.params.{split}; its data.params keys are "
                         f"{list(params.keys())} (pick one with --real_split / --split)")
    return instantiate_from_config(params[split])


def load_dataset_arrays(dataset: Any, max_items: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Images ``[N, C, H, W]`` and masks ``[N, H, W]`` (``None`` unless every item has one) of a contract dataset."""
    n = len(dataset) if max_items is None else min(len(dataset), max_items)
    if n == 0:
        raise ValueError("the real dataset is empty")
    images, masks, all_masks = [], [], True
    for i in range(n):
        item = dataset[i]
        images.append(item_channels_first(item["image"]))  # channel-last or channel-first items alike
        if item.get("has_segmentation", "segmentation" in item) and "segmentation" in item:
            masks.append(np.asarray(item["segmentation"], dtype=np.int64))
        else:
            all_masks = False
    imgs = torch.stack(images).contiguous()
    return imgs, (torch.from_numpy(np.stack(masks)) if all_masks and masks else None)


def load_real(source: str, split: str = "validation", max_items: Optional[int] = None) -> dict[str, Any]:
    """Real images/masks from a folder (``images/``, optional ``masks/``) or a dataset config YAML."""
    if os.path.isdir(source):
        data = load_sample_set(source, max_items)
        return {"images": data["images"], "masks": data["masks"]}
    images, masks = load_dataset_arrays(dataset_from_config(source, split), max_items)
    return {"images": images, "masks": masks}


def _diversity(images: torch.Tensor, pairs: int, name: str) -> dict[str, float]:
    if len(images) < 2:
        logger.warning("%s: MS-SSIM diversity needs at least 2 images, the set has %d; left out", name, len(images))
        return {}
    return diversity.ms_ssim_diversity(images, pairs)


class Evaluation(NamedTuple):
    """What :func:`evaluate_sets` measured.

    ``results``: the numbers per set (and ``real``); ``area_fractions``: ``[N, C]`` class-area fractions per set for
    the report's distributions; ``masks``: per set, ``(masks [N, H, W], source, rate_key)``, the masks that describe
    the set's images (``"true masks"`` for real data, the model's ``"predicted masks"``, else the ``"segmenter
    masks"``), which the report's figure overlays, and the ``results`` key of their rule pass rate; sets with neither
    are absent.
    """

    results: dict[str, dict[str, float]]
    area_fractions: dict[str, np.ndarray]
    masks: dict[str, tuple[np.ndarray, str, str]]


def evaluate_sets(sets: Mapping[str, Mapping[str, Any]], real: Mapping[str, Any], num_classes: int,
                  extractors: Optional[Mapping[str, metrics.FeatureExtractor]] = None,
                  checker: Optional[Callable[[np.ndarray], Any]] = None, segmenter: Optional[torch.nn.Module] = None,
                  class_names: Optional[Sequence[str]] = None, kid_subset_size: int = 1000,
                  ms_ssim_pairs: int = 1000) -> Evaluation:
    """All numbers per sample set (plus ``real`` as a reference row).

    Keys: image quality (``histogram_w1``, ``fid_*``, ``kid_*``; real images are first quantised to 8 bits like
    the PNG samples, as clean-fid recommends); diversity (``ms_ssim``: mean MS-SSIM over ``ms_ssim_pairs`` pairs,
    0 to skip; compare with the real row's); ``model_*`` from the model's own masks; ``seg_*`` from the
    independent segmenter's masks (``seg_dice_*`` compares them with the model's masks, pooled and per case).
    Returns an :class:`Evaluation`; its ``area_fractions`` come from the segmenter's masks when there is one (so
    every set is measured alike), else from the model's own masks.
    """
    from ldm.evaluation.segmenter import segment

    results: dict[str, dict[str, float]] = {}
    fractions: dict[str, np.ndarray] = {}
    shown: dict[str, tuple[np.ndarray, str, str]] = {}
    real_masks = real.get("masks")
    real_images = features.quantize_8bit(real["images"])
    if real_masks is not None:
        fractions["real"] = anatomy.class_area_fractions(real_masks, num_classes)
        shown["real"] = (np.asarray(real_masks), "true masks", "model_rule_pass_rate")
        row: dict[str, float] = {"num_images": float(len(real["images"]))}
        if checker is not None:
            row["model_rule_pass_rate"] = anatomy.rule_pass_rate(real_masks, checker)[0]
        if segmenter is not None:
            seg_real = segment(segmenter, real["images"])
            row["seg_dice_mean"] = anatomy.mask_metrics(seg_real, num_classes, reference=real_masks)["dice_mean"]
        results["real"] = row
    if ms_ssim_pairs > 0:
        results.setdefault("real", {"num_images": float(len(real_images))})
        results["real"].update(_diversity(real_images, ms_ssim_pairs, "real"))
    for name, data in sets.items():
        row = {"num_images": float(len(data["images"]))}
        row.update(metrics.image_quality(data["images"], real_images, dict(extractors or {}),
                                         kid_subset_size=kid_subset_size))
        if ms_ssim_pairs > 0:
            row.update(_diversity(data["images"], ms_ssim_pairs, name))
        own = data.get("masks")
        if own is not None:
            row.update(anatomy.mask_metrics(own, num_classes, real_masks=real_masks, checker=checker,
                                            class_names=class_names, prefix="model_"))
            shown[name] = (np.asarray(own), "predicted masks", "model_rule_pass_rate")
            if segmenter is None:
                fractions[name] = anatomy.class_area_fractions(own, num_classes)
        if segmenter is not None:
            seg = segment(segmenter, data["images"])
            row.update(anatomy.mask_metrics(seg, num_classes, real_masks=real_masks, checker=checker,
                                            reference=own, class_names=class_names, prefix="seg_"))
            fractions[name] = anatomy.class_area_fractions(seg, num_classes)  # one yardstick for every set
            shown.setdefault(name, (np.asarray(seg), "segmenter masks", "seg_rule_pass_rate"))
        results[name] = row
    return Evaluation(results, fractions, shown)
