"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features"),
VGG16 variant, with weights read from local files only (never downloaded).

Key names match the LPIPS module inside CompVis/taming loss checkpoints (``scaling_layer.shift``,
``net.slice{1..5}.{i}.weight``, ``lin{0..4}.model.1.weight``), so a full CompVis autoencoder checkpoint
(loss included) loads.

Weight files, looked up in order in ``$LDM_LPIPS_DIR``, then ``~/.cache/ldm/lpips``:
- ``vgg.pth``: the LPIPS linear layers (v0.1), as distributed with taming-transformers
  (``taming/modules/autoencoder/lpips/vgg.pth``) or the ``lpips`` package (``lpips/weights/v0.1/vgg.pth``);
  when neither folder has it, the copy that torchmetrics (installed with pytorch-lightning) ships in
  ``torchmetrics/functional/image/lpips_models/vgg.pth`` (same keys ``lin{0..4}.model.1.weight``) is used,
  so a user needs only the VGG16 file;
- ``vgg16-397923af.pth``: torchvision's ImageNet VGG16 weights; also found in torch hub's checkpoint
  directory (``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

LPIPS_LIN_FILE = "vgg.pth"
VGG16_FILE = "vgg16-397923af.pth"
LPIPS_DIR_ENV = "LDM_LPIPS_DIR"
CHANNELS = (64, 128, 256, 512, 512)
# VGG16 feature indices that end each slice (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
_SLICE_BOUNDS = (0, 4, 9, 16, 23, 30)


def lpips_search_dirs() -> list[Path]:
    """Directories searched for ``vgg.pth`` and ``vgg16-397923af.pth``, in order."""
    dirs = []
    env = os.environ.get(LPIPS_DIR_ENV)
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(Path.home() / ".cache" / "ldm" / "lpips")
    return dirs


def _torch_hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _torchmetrics_lpips_dir() -> Optional[Path]:
    """torchmetrics' folder of LPIPS linear-layer weights, or None when torchmetrics is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("torchmetrics")
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent / "functional" / "image" / "lpips_models"


def find_lpips_weights() -> tuple[Path, Path]:
    """Paths of (LPIPS linear weights, VGG16 weights); ``FileNotFoundError`` saying what to get if absent."""
    dirs = lpips_search_dirs()
    shipped = _torchmetrics_lpips_dir()
    lin_dirs = dirs + ([shipped] if shipped is not None else [])
    lin = next((d / LPIPS_LIN_FILE for d in lin_dirs if (d / LPIPS_LIN_FILE).is_file()), None)
    vgg_dirs = dirs + [_torch_hub_checkpoint_dir()]
    vgg = next((d / VGG16_FILE for d in vgg_dirs if (d / VGG16_FILE).is_file()), None)
    if lin is not None and vgg is not None:
        return lin, vgg
    missing = []
    if lin is None:
        missing.append(
            f"'{LPIPS_LIN_FILE}' (the LPIPS v0.1 VGG linear-layer weights, shipped by torchmetrics, which "
            f"pytorch-lightning installs, and distributed with taming-transformers as "
            f"taming/modules/autoencoder/lpips/vgg.pth and with the 'lpips' package as lpips/weights/v0.1/vgg.pth)"
        )
    if vgg is None:
        missing.append(
            f"'{VGG16_FILE}' (torchvision's ImageNet VGG16 weights, VGG16_Weights.IMAGENET1K_V1)"
        )
    searched = ", ".join(str(d) for d in vgg_dirs)
    raise FileNotFoundError(
        "LPIPS perceptual loss needs pretrained weights that are never downloaded at run time. Missing: "
        + "; ".join(missing)
        + f". Download them on a machine with network access and put them in ${LPIPS_DIR_ENV} or "
        f"~/.cache/ldm/lpips ({VGG16_FILE} may also live in torch hub's checkpoints directory). "
        f"Searched: {searched}. Or set lossconfig.params.perceptual_weight: 0 to train without LPIPS."
    )


class ScalingLayer(nn.Module):
    """Maps [-1, 1] images to the ImageNet-normalised range VGG expects (buffers ``shift``, ``scale``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """Dropout then a bias-free 1x1 convolution to one channel (key ``model.1.weight``).

    Args:
        chn_in: feature channels.
        chn_out: output channels (1).
    """

    def __init__(self, chn_in: int, chn_out: int = 1):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn_in, chn_out, kernel_size=1, stride=1, padding=0,
                                                           bias=False))


class VGG16Features(nn.Module):
    """torchvision's VGG16 ``features`` split into the five LPIPS slices ``slice1`` ... ``slice5``,
    keeping torchvision's layer indices as module names.

    Args:
        vgg_state_dict: a torchvision VGG16 state dict (``features.*`` entries are used), or None to
            keep the layers on the meta device (shape-only use).
    """

    def __init__(self, vgg_state_dict: Optional[dict[str, torch.Tensor]] = None):
        super().__init__()
        from torchvision.models import vgg16

        with torch.device("meta"):
            features = vgg16(weights=None).features
        if vgg_state_dict is not None:
            feats = {k[len("features."):]: v for k, v in vgg_state_dict.items() if k.startswith("features.")}
            features.load_state_dict(feats, strict=True, assign=True)
        for n, (lo, hi) in enumerate(zip(_SLICE_BOUNDS[:-1], _SLICE_BOUNDS[1:]), start=1):
            part = nn.Sequential()
            for i in range(lo, hi):
                part.add_module(str(i), features[i])
            setattr(self, f"slice{n}", part)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for n in range(1, 6):
            x = getattr(self, f"slice{n}")(x)
            outs.append(x)
        return outs


def _unit_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """LPIPS distance between two image batches in [-1, 1] (1 or 3 channels); returns ``[B, 1, 1, 1]``.

    Frozen and always in eval mode (its dropout never acts, unlike the taming module that a
    ``model.train()`` call switched to training).

    Args:
        lin_path: ``vgg.pth`` with the linear layers; default: looked up (see module docstring).
        vgg_path: ``vgg16-397923af.pth``; default: looked up.
    """

    def __init__(self, lin_path: Optional[str] = None, vgg_path: Optional[str] = None):
        super().__init__()
        if lin_path is None or vgg_path is None:
            found_lin, found_vgg = find_lpips_weights()
            lin_path = lin_path or str(found_lin)
            vgg_path = vgg_path or str(found_vgg)
        for path in (lin_path, vgg_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"LPIPS weight file not found: {path}")
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Features(torch.load(vgg_path, map_location="cpu", weights_only=True))
        for i, chn in enumerate(CHANNELS):
            setattr(self, f"lin{i}", NetLinLayer(chn))
        lin_sd = torch.load(lin_path, map_location="cpu", weights_only=True)
        lin_keys = {k: v for k, v in lin_sd.items() if k.startswith("lin")}
        expected = {f"lin{i}.model.1.weight" for i in range(len(CHANNELS))}
        if set(lin_keys) != expected:
            raise ValueError(f"{lin_path} is not an LPIPS v0.1 VGG weight file: expected keys {sorted(expected)}, "
                             f"found {sorted(lin_sd)[:10]}")
        self.load_state_dict(lin_keys, strict=False)
        logger.info("LPIPS loaded from %s and %s", lin_path, vgg_path)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape[1] not in (1, 3) or input.shape != target.shape:
            raise ValueError(f"LPIPS needs two [B, 1 or 3, H, W] batches of equal shape, got "
                             f"{tuple(input.shape)} and {tuple(target.shape)}")
        if input.shape[1] == 1:
            input, target = input.expand(-1, 3, -1, -1), target.expand(-1, 3, -1, -1)
        feats0 = self.net(self.scaling_layer(input))
        feats1 = self.net(self.scaling_layer(target))
        total = None
        for i, (f0, f1) in enumerate(zip(feats0, feats1)):
            diff = (_unit_normalize(f0) - _unit_normalize(f1)).pow(2)
            val = getattr(self, f"lin{i}").model(diff).mean(dim=(2, 3), keepdim=True)
            total = val if total is None else total + val
        return total
