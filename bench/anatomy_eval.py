"""How the anatomy benchmark judges a set of images: the independent segmenter, the phantom rules, own-mask
agreement, image statistics, memorisation and train-on-synthetic / test-on-real.

Generated images are judged only through the independent segmenter (trained on the real training split,
never on samples). A model's own masks are scored separately.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ldm.data.anatomy_check import RULES, check_phantom_anatomy
from ldm.evaluation.anatomy import dice_per_class
from ldm.evaluation.metrics import PixelFeatureExtractor, extract_features, fid_from_features, histogram_distance
from ldm.evaluation.segmenter import segment, train_segmenter

NUM_CLASSES = 6


def rule_outcomes(masks: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """Per mask: ``plausible`` and one boolean per phantom rule (True = holds)."""
    reports = [check_phantom_anatomy(m) for m in np.asarray(masks)]
    out = {"plausible": np.array([r.plausible for r in reports], dtype=bool)}
    for rule in RULES:
        out[rule] = np.array([getattr(r, rule) for r in reports], dtype=bool)
    return out


def foreground_dice(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """Pooled Dice per class and the mean over the foreground classes present (1..5)."""
    per_class = dice_per_class(pred, target, NUM_CLASSES)
    fg = per_class[1:]
    return {"per_class": [None if np.isnan(v) else float(v) for v in per_class],
            "foreground_mean": float(np.nanmean(fg)) if np.isfinite(fg).any() else None}


@torch.no_grad()
def segmenter_features(seg: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Features of the independent segmenter (global average of every encoder level), for a domain FID."""
    return extract_features(seg.features, images, batch_size=batch, device=next(seg.parameters()).device)


def judge(images: torch.Tensor, seg: torch.nn.Module, own_masks: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """Segmenter masks of ``images``, their rule outcomes and, with ``own_masks``, own-mask agreement/rules."""
    seg_masks = segment(seg, images, batch_size=128)
    out: dict[str, Any] = {"seg_masks": seg_masks, "outcomes": rule_outcomes(seg_masks)}
    if own_masks is not None:
        out["own_outcomes"] = rule_outcomes(own_masks)
        out["own_dice"] = foreground_dice(own_masks, seg_masks)
    return out


def pixel_nn_distances(queries: torch.Tensor, reference: torch.Tensor, size: int = 32,
                       exclude_self: bool = False) -> np.ndarray:
    """Euclidean distance of each query image to its nearest reference image (both pooled to ``size``)."""
    q = F.adaptive_avg_pool2d(queries.float(), size).flatten(1)
    r = F.adaptive_avg_pool2d(reference.float(), size).flatten(1)
    best = []
    for chunk in q.split(256):
        d = torch.cdist(chunk, r)
        if exclude_self:
            d[d == 0] = float("inf")
        best.append(d.min(dim=1).values)
    return torch.cat(best).numpy()


def memorisation(samples: torch.Tensor, train: torch.Tensor, heldout_nn: np.ndarray) -> dict[str, float]:
    """Share of samples closer to a training slice than 95 % of held-out real slices are (0.05 expected
    without copying), and the median nearest-neighbour distance of samples over that of held-out slices."""
    nn = pixel_nn_distances(samples, train)
    threshold = float(np.quantile(heldout_nn, 0.05))
    return {"share_below_heldout_p05": float((nn < threshold).mean()),
            "median_nn_ratio": float(np.median(nn) / max(np.median(heldout_nn), 1e-12))}


def image_statistics(samples: torch.Tensor, real: torch.Tensor, seg: torch.nn.Module,
                     real_seg_features: Optional[np.ndarray] = None) -> dict[str, float]:
    """FID on segmenter features and on pooled pixels, and the intensity-histogram W1, against ``real``."""
    feats_real = real_seg_features if real_seg_features is not None else segmenter_features(seg, real)
    pixel = PixelFeatureExtractor(8)
    return {"fid_segmenter": fid_from_features(segmenter_features(seg, samples), feats_real),
            "fid_pixel8": fid_from_features(extract_features(pixel, samples), extract_features(pixel, real)),
            "histogram_w1": histogram_distance(samples, real)}


@torch.no_grad()
def head_masks_on_real(model: torch.nn.Module, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """The model's own masks of real images: its segmentation head (EMA weights) at ``t = 0`` on the scaled
    posterior means of ``images`` (a ``mask_from: reencoded`` model labels their reconstruction encoded again,
    as it does its samples). Against the true masks this measures the head alone, apart from how plausible
    the model's samples are."""
    device = next(model.parameters()).device
    masks = []
    with model.ema_scope():
        for x in images.split(batch):
            z = model.scale_factor * model.encode_first_stage(x.to(device)).mode()
            masks.append(model.predict_masks(z, x.shape[-2:]).cpu())
    return torch.cat(masks)


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i].permute(1, 2, 0), "segmentation": self.masks[i].long(),
                "has_segmentation": True}


def tstr_dice(images: torch.Tensor, masks: torch.Tensor, test: dict[str, torch.Tensor], steps: int, seed: int,
              device: torch.device) -> float:
    """Train a fresh segmenter on ``(images, masks)`` pairs, return its foreground Dice on the real test split."""
    model = train_segmenter(_Pairs(images, masks), NUM_CLASSES, steps=steps, batch_size=16, seed=seed,
                            device=device)
    pred = segment(model, test["image"], batch_size=128)
    return foreground_dice(pred, test["segmentation"])["foreground_mean"]
