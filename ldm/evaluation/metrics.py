"""Image-quality statistics between two sets of images: FID, KID and feature-free intensity statistics.

FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) are computed from features given by a pluggable
extractor: any callable mapping a float tensor ``[B, C, H, W]`` in ``[-1, 1]`` to ``[B, D]``. Two are provided:
``InceptionFeatureExtractor`` (torchvision's Inception-v3 architecture with weights from a local file, no
download) and ``PixelFeatureExtractor`` (average-pooled pixels, needs nothing). The intensity histogram distance
needs no features at all, so offline users and tests always get a number.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]
INCEPTION_ENV = "LDM_INCEPTION_WEIGHTS"


# ----------------------------------------------------------------------------------------------- FID / KID
def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (unbiased) of features ``[N, D]``, in float64."""
    feats = _as_numpy(features)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need features of shape [N >= 2, D], got {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between two Gaussians: ``|mu1-mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.

    The trace of the matrix square root is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix ``S1^(1/2) S2 S1^(1/2)``, which is stable for the singular covariances of small sets.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape} vs {mu2.shape}")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    return max(value, 0.0)


def fid_from_features(features1: np.ndarray | torch.Tensor, features2: np.ndarray | torch.Tensor) -> float:
    """FID between two feature sets ``[N1, D]`` and ``[N2, D]``."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def kid_from_features(features1: np.ndarray | torch.Tensor, features2: np.ndarray | torch.Tensor,
                      num_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID: unbiased MMD^2 with the cubic polynomial kernel ``(x.y/D + 1)^3``, mean and std over random subsets.

    When both sets are no larger than ``subset_size`` every subset is the whole set, so there is one value and
    its std is reported as NaN (not 0: a spread over identical subsets says nothing about uncertainty).
    """
    f1, f2 = _as_numpy(features1), _as_numpy(features2)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"need two feature sets [N, D] with the same D, got {f1.shape} and {f2.shape}")
    m = min(subset_size, f1.shape[0], f2.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples in each set, got {f1.shape[0]} and {f2.shape[0]}")
    rng = np.random.default_rng(seed)
    dim = f1.shape[1]
    values = []
    whole_sets = m == f1.shape[0] and m == f2.shape[0]
    for _ in range(1 if whole_sets else max(1, num_subsets)):
        x = f1[rng.choice(f1.shape[0], m, replace=False)]
        y = f2[rng.choice(f2.shape[0], m, replace=False)]
        kxx = (x @ x.T / dim + 1.0) ** 3
        kyy = (y @ y.T / dim + 1.0) ** 3
        kxy = (x @ y.T / dim + 1.0) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2.0 * kxy.mean()
        values.append(mmd)
    return float(np.mean(values)), float("nan") if whole_sets else float(np.std(values))


# ----------------------------------------------------------------------------------------- feature-free
def intensity_histogram(images: torch.Tensor | np.ndarray, bins: int = 64,
                        value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Normalised intensity histogram (sums to 1) of all pixels of ``images``."""
    values = _as_numpy(images).reshape(-1)
    hist, _ = np.histogram(np.clip(values, *value_range), bins=bins, range=value_range)
    total = hist.sum()
    if total == 0:
        raise ValueError("cannot build an intensity histogram of an empty image set")
    return hist.astype(np.float64) / total


def histogram_distance(images1: torch.Tensor | np.ndarray, images2: torch.Tensor | np.ndarray, bins: int = 64,
                       value_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """Wasserstein-1 distance between the intensity histograms of two image sets (in intensity units).

    0 for identical distributions; a constant shift by ``s`` (within the range) gives about ``|s|``.
    """
    h1 = intensity_histogram(images1, bins, value_range)
    h2 = intensity_histogram(images2, bins, value_range)
    width = (value_range[1] - value_range[0]) / bins
    return float(np.abs(np.cumsum(h1) - np.cumsum(h2)).sum() * width)


def intensity_summary(images: torch.Tensor | np.ndarray) -> dict[str, float]:
    """Mean, standard deviation and 1st/99th percentiles of pixel intensities."""
    values = _as_numpy(images).reshape(-1)
    return {"mean": float(values.mean()), "std": float(values.std()),
            "p01": float(np.percentile(values, 1)), "p99": float(np.percentile(values, 99))}


# ------------------------------------------------------------------------------------ feature extractors
class PixelFeatureExtractor(torch.nn.Module):
    """Average-pooled pixels as features: needs no weights, for offline use and tests.

    Args:
        size: images are average-pooled to ``size x size``; features have ``C * size * size`` entries.
    """

    def __init__(self, size: int = 8) -> None:
        super().__init__()
        self.size = size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images.float(), self.size).flatten(1)


class InceptionFeatureExtractor(torch.nn.Module):
    """2048-d pool features of torchvision's Inception-v3, with weights read from a local file (never downloaded).

    Numbers are comparable between runs evaluated with the same weights file, not with published FIDs that use
    the TensorFlow graph.

    Args:
        weights_path: a ``torch.save``'d Inception-v3 state dict (e.g. torchvision's
            ``inception_v3_google-0cc3c7bd.pth``); ``None`` reads the ``LDM_INCEPTION_WEIGHTS`` environment variable.
    """

    def __init__(self, weights_path: Optional[str] = None) -> None:
        super().__init__()
        path = weights_path or os.environ.get(INCEPTION_ENV)
        if not path:
            raise FileNotFoundError(
                "FID/KID with Inception features need local Inception-v3 weights: pass --inception PATH or set "
                f"{INCEPTION_ENV} to a torchvision Inception-v3 state dict (inception_v3_google-0cc3c7bd.pth from "
                "download.pytorch.org/models). Nothing is downloaded at run time.")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Inception weights not found at {path} (from --inception or {INCEPTION_ENV}).")
        from torchvision.models import inception_v3

        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        num_classes = state["fc.weight"].shape[0] if "fc.weight" in state else 1000
        net = inception_v3(weights=None, aux_logits="AuxLogits.fc.weight" in state, init_weights=False,
                           num_classes=num_classes, transform_input=False)
        net.load_state_dict(state, strict=True)
        net.fc = torch.nn.Identity()
        net.eval()
        self.net = net
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float().clamp(-1, 1) + 1.0) / 2.0
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net((x - self.mean) / self.std)


def extract_features(extractor: FeatureExtractor, images: torch.Tensor | Iterable[torch.Tensor],
                     batch_size: int = 64, device: Optional[torch.device] = None) -> np.ndarray:
    """Run ``extractor`` over ``images`` (a tensor ``[N, C, H, W]`` or an iterable of batches) -> ``[N, D]``."""
    if device is None:
        params = list(extractor.parameters()) if isinstance(extractor, torch.nn.Module) else []
        device = params[0].device if params else torch.device("cpu")
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    out = []
    with torch.no_grad():
        for batch in batches:
            out.append(extractor(batch.to(device)).double().cpu())
    if not out:
        raise ValueError("no images to extract features from")
    return torch.cat(out).numpy()


def image_quality(samples: torch.Tensor, reals: torch.Tensor, extractors: Optional[dict[str, FeatureExtractor]] = None,
                  kid_subset_size: int = 1000, bins: int = 64) -> dict[str, float]:
    """All image-quality numbers between ``samples`` and ``reals`` (both ``[N, C, H, W]`` in ``[-1, 1]``).

    Returns ``histogram_w1``, the intensity means, and ``fid_<name>``, ``kid_<name>``, ``kid_<name>_std`` per extractor.
    """
    result: dict[str, float] = {"histogram_w1": histogram_distance(samples, reals, bins=bins)}
    result["intensity_mean"] = intensity_summary(samples)["mean"]
    result["real_intensity_mean"] = intensity_summary(reals)["mean"]
    for name, extractor in (extractors or {}).items():
        fs, fr = extract_features(extractor, samples), extract_features(extractor, reals)
        result[f"fid_{name}"] = fid_from_features(fs, fr)
        kid, kid_std = kid_from_features(fs, fr, subset_size=kid_subset_size)
        result[f"kid_{name}"], result[f"kid_{name}_std"] = kid, kid_std
    return result


# ---------------------------------------------------------------------------------------------- helpers
def _as_numpy(x: np.ndarray | torch.Tensor | Sequence) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    eig, vec = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vec * np.sqrt(np.clip(eig, 0.0, None))) @ vec.T
