"""Feature extractors for FID/KID beyond ``metrics.py``'s: the standard FID Inception network and medical features.

Every extractor maps images ``[B, C, H, W]`` in ``[-1, 1]`` (``C`` = 1 or 3) to features ``[B, D]``; the
preprocessing each applies is stated here and in ``scripts/evaluate.py --help``.

- :class:`FIDInceptionExtractor`: the Inception-v3 graph of the original FID (Heusel et al. 2017; the TensorFlow
  ``2015-12-05`` weights ported to PyTorch by torch-fidelity), run through torchmetrics' ``NoTrainInceptionV3``
  (needs ``torch-fidelity``, the ``metrics`` extra). Numbers are comparable with published FIDs. Preprocessing:
  ``[-1, 1]`` -> 8-bit ``round((x + 1) * 127.5)``, grey replicated to 3 channels, resized to 299 x 299 inside the
  network with TensorFlow-1-compatible bilinear interpolation (no antialiasing, as the original), 2048-d pool3.
- :class:`MedicalFeatureExtractor`: features of a network given by path, e.g. RadImageNet ResNet-50 weights
  (Mei et al. 2022), as used for medical FIDs (Woodland et al. 2024): a ``torch.export`` archive (``.pt2``) or a
  torchvision ResNet-50 state dict. Preprocessing: ``[-1, 1]`` -> ``[0, 1]``, grey replicated to 3 channels, bilinear
  (antialiased) resize to ``size x size``, then ``normalize`` (``imagenet``: ImageNet mean/std; ``unit``: ``[0, 1]``
  as is; ``symmetric``: ``[-1, 1]``); a spatial output ``[B, D, h, w]`` is averaged over space.

Weights are never downloaded: a missing file raises ``FileNotFoundError`` saying what to get.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

FID_INCEPTION_ENV = "LDM_FID_INCEPTION_WEIGHTS"
FID_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
NORMALIZATIONS = ("imagenet", "unit", "symmetric")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` float -> ``[0, 255]`` uint8 as an 8-bit PNG stores it (``round((x + 1) * 127.5)``).

    Used on real images before any feature extraction, so they are quantised like the samples (clean-fid,
    Parmar et al. 2022)."""
    return ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` float images quantised to the 256 levels of an 8-bit PNG, back in ``[-1, 1]``."""
    return to_uint8(images).float() / 127.5 - 1.0


def _three_channels(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"feature extractors take images [B, 1 or 3, H, W], got {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _weights_file(path: Optional[str], what: str, hint: str) -> str:
    if not path:
        raise FileNotFoundError(f"{what} needs a local weights file: {hint}. Nothing is downloaded at run time.")
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: weights file not found at {path}. {hint}.")
    return path


class FIDInceptionExtractor(torch.nn.Module):
    """The standard FID Inception-v3 (2048-d pool3 features) with weights from a local file.

    Args:
        weights_path: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (the TensorFlow FID graph's
            weights in PyTorch layout); ``None`` reads ``LDM_FID_INCEPTION_WEIGHTS``.
    """

    num_features = 2048

    def __init__(self, weights_path: Optional[str] = None) -> None:
        super().__init__()
        path = _weights_file(
            weights_path or os.environ.get(FID_INCEPTION_ENV), "FID with the standard Inception network",
            f"pass --fid_inception PATH or set {FID_INCEPTION_ENV} to torch-fidelity's {FID_INCEPTION_FILE} "
            "(released with torch-fidelity v0.2.0 on its GitHub release page; copy it from a machine with network "
            "access)")
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
            from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
        except ImportError as err:  # torchmetrics comes with pytorch-lightning; an old one lacks the class
            raise ImportError("the standard FID Inception needs torchmetrics>=1.0: pip install -e '.[metrics]'") \
                from err
        if not _TORCH_FIDELITY_AVAILABLE:
            raise ImportError("the standard FID Inception network is torch-fidelity's: "
                              "pip install -e '.[metrics]' (or pip install torch-fidelity)")
        try:
            # antialias off: the original FID resizes with plain (TensorFlow 1) bilinear interpolation
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(self.num_features)],
                                          feature_extractor_weights_path=path, antialias=False)
        except RuntimeError as err:  # load_state_dict: wrong keys or shapes
            raise ValueError(f"{path} is not the FID Inception weights file ({FID_INCEPTION_FILE}): {err}") from err
        logger.info("standard FID Inception weights loaded from %s", path)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(to_uint8(_three_channels(images))).float()


class MedicalFeatureExtractor(torch.nn.Module):
    """Features of a network given by path (a ``torch.export`` archive, or a torchvision ResNet-50 state dict).

    Args:
        weights_path: a ``.pt2`` file of ``torch.export.save`` (an exported network taking ``[B, 3, size, size]``
            with a dynamic batch size; output ``[B, D]`` or ``[B, D, h, w]``), or a
            ``torch.save``'d torchvision ResNet-50 state dict (``conv1.weight``, ``layer1.*`` ... ; ``fc.*`` and a
            ``state_dict``/``model`` wrapper or ``module.``/``backbone.`` prefixes allowed): 2048-d pooled features.
        size: images are resized to ``size x size`` (224 for ImageNet/RadImageNet networks).
        normalize: ``imagenet`` (ImageNet mean/std on ``[0, 1]``), ``unit`` (``[0, 1]``) or ``symmetric``
            (``[-1, 1]``): what the network was trained with.
    """

    def __init__(self, weights_path: str, size: int = 224, normalize: str = "imagenet") -> None:
        super().__init__()
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if size < 8:
            raise ValueError(f"feature input size must be >= 8 pixels, got {size}")
        path = _weights_file(weights_path, "medical features",
                             "give an exported feature network (.pt2) or a torchvision ResNet-50 state dict "
                             "(e.g. RadImageNet ResNet-50) with --medical_features PATH")
        self.size, self.normalize = int(size), normalize
        self.source = path
        self.net = self._load(path)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def _load(path: str) -> torch.nn.Module:
        if path.endswith(".pt2"):  # keeps the mode it was exported in (export it in eval mode)
            return torch.export.load(path).module()
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict):
            raise ValueError(f"{path} is neither TorchScript nor a state dict")
        for prefix in ("module.", "backbone."):
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        net.fc = torch.nn.Identity()
        try:
            missing, unexpected = net.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shapes differ
            raise ValueError(f"{path} is not a torchvision ResNet-50 state dict: {err}") from err
        if missing or unexpected:
            raise ValueError(f"{path} is not a torchvision ResNet-50 state dict: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]} (exported networks, .pt2, are also accepted)")
        return net.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (_three_channels(images).float().clamp(-1, 1) + 1.0) / 2.0
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        if self.normalize == "imagenet":
            x = (x - self.mean) / self.std
        elif self.normalize == "symmetric":
            x = x * 2.0 - 1.0
        out = self.net(x)
        if out.ndim == 4:
            out = out.mean(dim=(2, 3))
        if out.ndim != 2:
            raise ValueError(f"the feature network {self.source} returned shape {tuple(out.shape)}; "
                             "expected [B, D] or [B, D, h, w]")
        return out.float()
