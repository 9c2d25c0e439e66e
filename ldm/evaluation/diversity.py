"""Diversity of a sample set: mean MS-SSIM between pairs of distinct images (Odena et al. 2017).

Lower means more diverse; a collapsed model gives values near 1. Compare a sample set's value with the real
set's. MS-SSIM is torchmetrics' (Wang et al. 2003; Gaussian window 11, sigma 1.5, data range 2 for ``[-1, 1]``
images, negative contrast terms clipped at 0). Medical slices are often smaller than the 176 px that the five
standard scales need, so the number of scales is the largest that fits the image (up to 5) and the standard
exponents ``(0.0448, 0.2856, 0.3001, 0.2363, 0.1333)`` are truncated to it and renormalised to sum to 1.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
KERNEL_SIZE = 11


def ms_ssim_scales(height: int, width: int, kernel_size: int = KERNEL_SIZE) -> int:
    """The largest number of MS-SSIM scales (1..5) that an image of this size supports."""
    side = min(height, width)
    for scales in range(len(MS_SSIM_BETAS), 0, -1):
        # torchmetrics' own size rule for a given number of scales
        if side >= 2 ** scales and side // max(1, scales - 1) ** 2 > kernel_size - 1:
            return scales
    raise ValueError(f"images of {height}x{width} are too small for MS-SSIM with an {kernel_size}-pixel window "
                     f"(need at least {kernel_size} pixels per side)")


def ms_ssim(images1: torch.Tensor, images2: torch.Tensor, scales: Optional[int] = None) -> torch.Tensor:
    """MS-SSIM of each pair ``(images1[i], images2[i])``, both ``[N, C, H, W]`` in ``[-1, 1]`` -> ``[N]``."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as tm_ms_ssim

    if images1.shape != images2.shape or images1.ndim != 4:
        raise ValueError(f"MS-SSIM needs two [N, C, H, W] batches of equal shape, got {tuple(images1.shape)} "
                         f"and {tuple(images2.shape)}")
    scales = scales or ms_ssim_scales(*images1.shape[-2:])
    betas = np.asarray(MS_SSIM_BETAS[:scales])
    betas = tuple(float(b) for b in betas / betas.sum())
    values = tm_ms_ssim(images1.double().clamp(-1, 1), images2.double().clamp(-1, 1), data_range=2.0,
                        kernel_size=KERNEL_SIZE, sigma=1.5, betas=betas, normalize="relu", reduction="none")
    return values.reshape(-1).float()


def ms_ssim_diversity(images: torch.Tensor, num_pairs: int = 1000, seed: int = 0,
                      batch_size: int = 64) -> dict[str, float]:
    """Mean and standard deviation of MS-SSIM over pairs of distinct images of one set ``[N, C, H, W]``.

    Every pair is used when there are at most ``num_pairs`` of them, else ``num_pairs`` pairs drawn at random
    (``seed``). Returns ``{"ms_ssim": mean, "ms_ssim_std": std, "ms_ssim_pairs": count}``.
    """
    n = int(images.shape[0])
    if n < 2:
        raise ValueError(f"MS-SSIM diversity needs at least 2 images, got {n}")
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    rows, cols = np.triu_indices(n, k=1)
    if len(rows) > num_pairs:
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(rows), size=num_pairs, replace=False)
        rows, cols = rows[pick], cols[pick]
    scales = ms_ssim_scales(*images.shape[-2:])
    values = []
    for start in range(0, len(rows), batch_size):
        i = torch.as_tensor(rows[start:start + batch_size])
        j = torch.as_tensor(cols[start:start + batch_size])
        values.append(ms_ssim(images[i], images[j], scales))
    v = torch.cat(values).double().numpy()
    return {"ms_ssim": float(v.mean()), "ms_ssim_std": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
            "ms_ssim_pairs": float(len(v))}
