"""Anatomical plausibility of segmentation masks of generated samples.

Masks are integer class maps ``[N, H, W]`` (numpy or torch). The numbers: rule pass rate (a checker such as the
phantom's), per-class presence rate, distance between per-class area distributions of two mask sets, and Dice
between two mask sets of the same samples (e.g. an independent segmenter vs the model's own predicted masks).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ldm.modules.dice import dice_scores

logger = logging.getLogger(__name__)

RuleChecker = Callable[[np.ndarray], Any]


def _masks(masks: np.ndarray | torch.Tensor | Sequence) -> np.ndarray:
    from ldm.evaluation.descriptors import as_masks

    return as_masks(masks)


def class_area_fractions(masks: np.ndarray | torch.Tensor, num_classes: int,
                         ignore_index: Optional[int] = None) -> np.ndarray:
    """Fraction of each mask's pixels in each class, ``[N, num_classes]`` (ignored pixels left out)."""
    arr = _masks(masks)
    out = np.zeros((arr.shape[0], num_classes), dtype=np.float64)
    for i, mask in enumerate(arr):
        values = mask[mask != ignore_index] if ignore_index is not None else mask.reshape(-1)
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"mask {i} holds label {int(values.max())} outside 0..{num_classes - 1}; "
                             "is num_classes right?")
        counts = np.bincount(values.reshape(-1), minlength=num_classes)[:num_classes]
        out[i] = counts / max(values.size, 1)
    return out


def presence_rate(masks: np.ndarray | torch.Tensor, num_classes: int, min_fraction: float = 0.0) -> np.ndarray:
    """Per class, the fraction of masks in which the class covers more than ``min_fraction`` of the pixels."""
    return (class_area_fractions(masks, num_classes) > min_fraction).mean(axis=0)


def area_distribution_distance(masks_a: np.ndarray | torch.Tensor, masks_b: np.ndarray | torch.Tensor,
                               num_classes: int) -> np.ndarray:
    """Per class, the Wasserstein-1 distance between the area-fraction distributions of two mask sets."""
    from scipy.stats import wasserstein_distance

    fa, fb = class_area_fractions(masks_a, num_classes), class_area_fractions(masks_b, num_classes)
    return np.array([wasserstein_distance(fa[:, c], fb[:, c]) for c in range(num_classes)])


def dice_per_class(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, num_classes: int,
                   ignore_index: Optional[int] = None) -> np.ndarray:
    """Dice per class over a whole set (pixels pooled); NaN for a class absent from both sets
    (:func:`ldm.modules.dice.dice_scores`)."""
    p, t = torch.from_numpy(_masks(pred)), torch.from_numpy(_masks(target))
    return dice_scores(p, t, num_classes, ignore_index, per_case=False).numpy()


def dice_per_case(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, num_classes: int,
                  ignore_index: Optional[int] = None) -> np.ndarray:
    """Dice of each case and class, ``[N, num_classes]``; NaN where a class is absent from both masks of a case.

    Papers report Dice as mean +- sd over cases (this), which weights small and large structures per case;
    :func:`dice_per_class` pools the pixels of the whole set instead.
    """
    p, t = torch.from_numpy(_masks(pred)), torch.from_numpy(_masks(target))
    return dice_scores(p, t, num_classes, ignore_index, per_case=True).numpy()


def case_dice_summary(per_case: np.ndarray) -> dict[str, float]:
    """Mean and sample sd (ddof 1) over cases of per-case Dice ``[N, C]``: ``mean``/``std`` of each case's mean
    over its foreground classes (class 0 left out; classes absent from a case skipped), and per class
    ``class<c>``/``class<c>_std`` over the cases where the class occurs."""
    def mean_sd(values: np.ndarray) -> tuple[float, float]:
        values = values[np.isfinite(values)]
        if values.size == 0:
            return float("nan"), float("nan")
        return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else float("nan")

    fg = per_case[:, 1:] if per_case.shape[1] > 1 else per_case
    has_any = np.isfinite(fg).any(axis=1)
    case_means = np.full(len(fg), np.nan)
    case_means[has_any] = np.nanmean(fg[has_any], axis=1)
    out = dict(zip(("mean", "std"), mean_sd(case_means)))
    for c in range(per_case.shape[1]):
        out[f"class{c}"], out[f"class{c}_std"] = mean_sd(per_case[:, c])
    return out


def rule_pass_rate(masks: np.ndarray | torch.Tensor, checker: RuleChecker) -> tuple[float, list[bool]]:
    """Fraction of masks the rule ``checker`` accepts, and the per-mask verdicts.

    ``checker(mask)`` may return a bool, a ``(bool, reasons)`` tuple, a dict with ``"ok"``/``"passed"``/``"valid"``,
    an object with such an attribute, or a list of violated rules (empty means accepted).
    """
    rate, verdicts, _ = rule_rates(masks, checker)
    return rate, verdicts


def rule_rates(masks: np.ndarray | torch.Tensor, checker: RuleChecker) -> tuple[float, list[bool], dict[str, float]]:
    """Like ``rule_pass_rate``, plus the pass rate of each individual rule when the checker's result is a
    report with boolean fields (``as_dict()``, e.g. the phantom's ``AnatomyReport``)."""
    results = [checker(mask) for mask in _masks(masks)]
    if not results:
        raise ValueError("no masks to check")
    verdicts = [_verdict(r) for r in results]
    per_rule: dict[str, list[bool]] = {}
    for r in results:
        fields = r.as_dict() if hasattr(r, "as_dict") else {}
        for key, value in fields.items():
            if isinstance(value, (bool, np.bool_)) and key not in _VERDICT_KEYS:
                per_rule.setdefault(key, []).append(bool(value))
    return float(np.mean(verdicts)), verdicts, {k: float(np.mean(v)) for k, v in per_rule.items()}


_VERDICT_KEYS = ("plausible", "ok", "passed", "valid", "is_valid")


def _verdict(result: Any) -> bool:
    if isinstance(result, (bool, np.bool_)):
        return bool(result)
    if isinstance(result, tuple) and result and isinstance(result[0], (bool, np.bool_)):
        return bool(result[0])
    for key in _VERDICT_KEYS:
        if isinstance(result, dict) and key in result:
            return bool(result[key])
        if hasattr(result, key):
            return bool(getattr(result, key))
    if isinstance(result, (list, tuple, set)):
        return len(result) == 0
    raise ValueError(f"cannot read a pass/fail verdict from the rule checker's result {result!r}")


def mask_metrics(masks: np.ndarray | torch.Tensor, num_classes: int,
                 real_masks: Optional[np.ndarray | torch.Tensor] = None,
                 checker: Optional[RuleChecker] = None,
                 reference: Optional[np.ndarray | torch.Tensor] = None,
                 class_names: Optional[Sequence[str]] = None, prefix: str = "") -> dict[str, float]:
    """Flat dict of anatomy numbers for one mask set.

    ``real_masks`` gives area distances; ``checker`` the rule pass rate; ``reference`` (masks of the same samples
    from another source) the Dice, pooled over the set (``dice_*``) and per case as mean +- sd
    (``dice_case_*`` and ``dice_case_*_std``). Per-class keys use ``class_names`` (default ``class<i>``); means
    exclude class 0.
    """
    names = list(class_names) if class_names else [f"class{c}" for c in range(num_classes)]
    out: dict[str, float] = {}
    presence = presence_rate(masks, num_classes)
    for c in range(1, num_classes):
        out[f"{prefix}presence_{names[c]}"] = float(presence[c])
    if checker is not None:
        rate, _, per_rule = rule_rates(masks, checker)
        out[f"{prefix}rule_pass_rate"] = rate
        for rule, value in per_rule.items():
            out[f"{prefix}rule_{rule}"] = value
    if real_masks is not None:
        dist = area_distribution_distance(masks, real_masks, num_classes)
        out[f"{prefix}area_w1_mean"] = float(dist[1:].mean()) if num_classes > 1 else float(dist.mean())
        for c in range(1, num_classes):
            out[f"{prefix}area_w1_{names[c]}"] = float(dist[c])
    if reference is not None:
        dice = dice_per_class(masks, reference, num_classes)
        fg = dice[1:]
        out[f"{prefix}dice_mean"] = float(np.nanmean(fg)) if np.isfinite(fg).any() else float("nan")
        for c in range(1, num_classes):
            out[f"{prefix}dice_{names[c]}"] = float(dice[c])
        cases = case_dice_summary(dice_per_case(masks, reference, num_classes))
        out[f"{prefix}dice_case_mean"], out[f"{prefix}dice_case_mean_std"] = cases["mean"], cases["std"]
        for c in range(1, num_classes):
            out[f"{prefix}dice_case_{names[c]}"] = cases[f"class{c}"]
            out[f"{prefix}dice_case_{names[c]}_std"] = cases[f"class{c}_std"]
    return out
