"""Representation alignment to a frozen mask encoder (REPA, Yu et al. 2025, and U-REPA, its UNet form).

During training, a feature map of the UNet on the *noisy* latent (by default the middle block's output) is mapped by
a small projector (three 1x1 convolutions, training only) and pulled, position by position, towards the features a
frozen encoder gives the clean sample's **mask**: ``loss = 1 - mean cos(projector(h_t), E(mask))`` over the labelled
cells, added to the diffusion loss with ``weight``. The denoiser learns to carry the anatomy's layout in its middle
features, with no change to sampling: the projector and the encoder are not used there, a sample costs what the plain
LDM's costs, and no mask is needed.

The encoder (:class:`MaskFeatureEncoder`) is trained on real masks only (:func:`train_mask_encoder`: a small
convolutional autoencoder of one-hot masks whose encoder is kept), never on a judge's outputs. Its features are
average-pooled to the UNet feature map's grid, so each cell is compared with what its region of the mask holds.

``LatentDiffusion(representation_alignment={...})`` builds :class:`RepresentationAlignment` (keys
``representation_alignment.*``: the projector, and the frozen encoder so a checkpoint is complete without the
encoder's file).
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ldm.data.batch import masks_from_batch
from ldm.modules.anatomical_losses import class_onehot

logger = logging.getLogger(__name__)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8 if cout % 8 == 0 else 1, cout), nn.SiLU())


class MaskFeatureEncoder(nn.Module):
    """Encoder of one-hot masks ``[B, C, H, W]`` to features ``[B, feature_dim, H / patch, W / patch]``: a
    ``patch x patch`` stride-``patch`` convolution (patches of the mask, as a ViT embeds them), then ``depth`` 3x3
    convolution blocks at that grid; with the decoder that trains it (mask logits at full resolution through a
    pixel shuffle; not used once trained). Cheap on purpose: it runs on every training step of the LDM.

    Args:
        num_classes: mask classes C (background included); ignored pixels are all-zero one-hot vectors.
        patch: the features' grid is ``patch`` times coarser than the mask.
        channels: width of the convolution blocks.
        depth: 3x3 blocks after the patch embedding.
        feature_dim: feature channels.
    """

    def __init__(self, num_classes: int, patch: int = 4, channels: int = 64, depth: int = 1,
                 feature_dim: int = 64) -> None:
        super().__init__()
        if num_classes < 2 or patch < 1 or channels < 1 or depth < 0 or feature_dim < 1:
            raise ValueError(f"MaskFeatureEncoder needs num_classes >= 2, patch >= 1, channels >= 1, depth >= 0 and "
                             f"feature_dim >= 1; got {num_classes}, {patch}, {channels}, {depth}, {feature_dim}")
        self.hparams = {"num_classes": int(num_classes), "patch": int(patch), "channels": int(channels),
                        "depth": int(depth), "feature_dim": int(feature_dim)}
        groups = 8 if channels % 8 == 0 else 1
        self.encoder = nn.Sequential(nn.Conv2d(num_classes, channels, patch, stride=patch), nn.SiLU(),
                                     *[_conv_block(channels, channels) for _ in range(depth)],
                                     nn.Conv2d(channels, feature_dim, 1))
        self.decoder = nn.Sequential(nn.Conv2d(feature_dim, channels, 3, padding=1), nn.GroupNorm(groups, channels),
                                     nn.SiLU(), nn.Conv2d(channels, num_classes * patch * patch, 1),
                                     nn.PixelShuffle(patch))

    @property
    def factor(self) -> int:
        """How many times coarser the feature grid is than the mask."""
        return self.hparams["patch"]

    def forward(self, onehot: torch.Tensor) -> torch.Tensor:
        return self.encoder(onehot)

    def reconstruct(self, onehot: torch.Tensor) -> torch.Tensor:
        """Mask logits ``[B, C, H, W]`` of the features of ``onehot`` (what trains the encoder)."""
        return self.decoder(self.encoder(onehot))


def _onehot(mask: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    return class_onehot(mask, num_classes, ignore_index).float()


def train_mask_encoder(masks: torch.Tensor, num_classes: int, steps: int = 600, batch_size: int = 32,
                       lr: float = 2e-3, seed: int = 0, ignore_index: int = 255, progress: bool = False,
                       **hparams: Any) -> tuple[MaskFeatureEncoder, dict[str, Any]]:
    """Train a :class:`MaskFeatureEncoder` (``hparams``) as an autoencoder of the real masks ``[N, H, W]``
    (cross-entropy over the labelled pixels, Adam), on the CPU or the masks' device; returns it (eval mode, frozen)
    and ``{"steps", "final_loss", "pixel_accuracy"}`` (the reconstruction's accuracy on the last batch)."""
    if masks.dim() != 3 or masks.dtype.is_floating_point:
        raise ValueError(f"train_mask_encoder needs integer masks [N, H, W], got {tuple(masks.shape)} {masks.dtype}")
    if steps < 1 or len(masks) < 1:
        raise ValueError(f"train_mask_encoder needs steps >= 1 and at least one mask, got {steps} and {len(masks)}")
    size = masks.shape[-1]
    bad = (masks != ignore_index) & ((masks < 0) | (masks >= num_classes))
    if bool(bad.any()):
        found = sorted(masks[bad].unique().tolist())[:10]
        raise ValueError(f"the masks hold labels {found} outside 0..{num_classes - 1} (ignore index {ignore_index}); "
                         "set num_classes to the masks' class count")
    gen = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = MaskFeatureEncoder(num_classes, **hparams).to(masks.device)
    if size % model.factor or masks.shape[-2] % model.factor:
        raise ValueError(f"mask size {tuple(masks.shape[-2:])} is not divisible by the encoder's factor {model.factor}")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    from tqdm import tqdm

    for _ in tqdm(range(int(steps)), desc="mask encoder", disable=not progress):
        idx = torch.randint(0, len(masks), (min(batch_size, len(masks)),), generator=gen).to(masks.device)
        mask = masks[idx].long()
        logits = model.reconstruct(_onehot(mask, num_classes, ignore_index))
        loss = F.cross_entropy(logits, mask, ignore_index=ignore_index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        valid = mask != ignore_index
        accuracy = float((logits.argmax(1) == mask)[valid].float().mean()) if bool(valid.any()) else float("nan")
    model.eval().requires_grad_(False)
    return model, {"steps": int(steps), "final_loss": float(loss.detach()), "pixel_accuracy": accuracy}


def save_mask_encoder(path: str, model: MaskFeatureEncoder, meta: Optional[Mapping[str, Any]] = None) -> str:
    """Write the encoder's weights and hyper-parameters to ``path`` atomically; returns ``path``."""
    from ldm.atomic_io import save_torch

    save_torch({"hparams": model.hparams, "state_dict": model.state_dict(), "meta": dict(meta or {})}, path)
    return path


def load_mask_encoder(path: str) -> tuple[MaskFeatureEncoder, dict[str, Any]]:
    """The encoder saved by :func:`save_mask_encoder` (eval mode, frozen) and its ``meta``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask encoder {path!r} not found; train one with "
                                "ldm.modules.representation_alignment.train_mask_encoder")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = MaskFeatureEncoder(**blob["hparams"])
    model.load_state_dict(blob["state_dict"])
    return model.eval().requires_grad_(False), dict(blob.get("meta", {}))


def _layer(unet: nn.Module, name: str) -> nn.Module:
    try:
        return unet.get_submodule(name)
    except AttributeError:
        raise ValueError(f"representation_alignment.layer {name!r} is not a module of the UNet; use e.g. "
                         "'middle_block', 'input_blocks.3' or 'output_blocks.2'") from None


def _out_channels(layer: nn.Module, name: str) -> int:
    """Channels of ``layer``'s output: those of its last convolution (a UNet block ends with one)."""
    for module in reversed(list(layer.modules())):
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return int(module.out_channels)
    raise ValueError(f"representation_alignment.layer {name!r} has no convolution to read its width from")


class _Captured:
    output: Optional[torch.Tensor] = None


class RepresentationAlignment(nn.Module):
    """The alignment term of one LDM (see the module docstring).

    Args:
        unet: the LDM's UNet (read for the layer's width; not kept).
        num_classes: mask classes (the encoder's input).
        mask_key: batch key of the integer masks.
        layer: UNet submodule whose output is aligned (``"middle_block"``, ``"input_blocks.N"``, ``"output_blocks.N"``).
        weight: weight of the term in the training loss (REPA's 0.5).
        hidden: projector width.
        encoder_path: :func:`save_mask_encoder` file; without one the encoder must come from a checkpoint
            (``init_from_ckpt`` or a Lightning resume), and training refuses to start otherwise.
        encoder: the encoder's hyper-parameters when ``encoder_path`` is absent (those of the file otherwise).
        ignore_index: unknown pixels of the masks; cells that are mostly unknown are left out.
    """

    def __init__(self, unet: nn.Module, num_classes: int, mask_key: str = "segmentation",
                 layer: str = "middle_block", weight: float = 0.5, hidden: int = 256,
                 encoder_path: Optional[str] = None, encoder: Optional[Mapping[str, Any]] = None,
                 ignore_index: int = 255) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"representation_alignment.weight must be >= 0, got {weight}")
        self.mask_key, self.layer, self.weight = str(mask_key), str(layer), float(weight)
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        width = _out_channels(_layer(unet, self.layer), self.layer)
        if encoder_path is not None and os.path.isfile(encoder_path):
            self.encoder, _ = load_mask_encoder(encoder_path)
            ready = 1.0
        else:
            if encoder_path is not None:  # sampling elsewhere: the checkpoint carries the encoder
                logger.info("representation_alignment: encoder %s not found; its weights must come from a checkpoint",
                            encoder_path)
            self.encoder = MaskFeatureEncoder(num_classes, **dict(encoder or {})).eval().requires_grad_(False)
            ready = 0.0
        if self.encoder.hparams["num_classes"] != self.num_classes:
            raise ValueError(f"the mask encoder takes {self.encoder.hparams['num_classes']} classes, "
                             f"representation_alignment.num_classes is {self.num_classes}")
        self.register_buffer("encoder_ready", torch.tensor(ready))
        dim = self.encoder.hparams["feature_dim"]
        self.projector = nn.Sequential(nn.Conv2d(width, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, hidden, 1), nn.SiLU(),
                                       nn.Conv2d(hidden, dim, 1))

    def train(self, mode: bool = True) -> "RepresentationAlignment":
        super().train(mode)
        self.encoder.eval()  # frozen
        return self

    def check_ready(self) -> None:
        """ValueError unless the encoder's weights were loaded (from its file or a checkpoint)."""
        if float(self.encoder_ready) != 1.0:
            raise ValueError("representation_alignment has no trained mask encoder: set representation_alignment."
                             "encoder_path to a file of ldm.modules.representation_alignment.save_mask_encoder "
                             "(or start from a checkpoint that holds one)")

    def batch_masks(self, batch: Mapping[str, Any], device: torch.device, required: bool = True
                    ) -> Optional[torch.Tensor]:
        """The batch's masks ``[B, H, W]`` (int64, on ``device``); without ``mask_key`` in the batch a ValueError
        naming it, or ``None`` when not ``required`` (validation data without masks: no alignment term)."""
        if not required and self.mask_key not in batch:
            return None
        return masks_from_batch(batch, self.mask_key, self.ignore_index).to(device)

    @contextlib.contextmanager
    def capture(self, unet: nn.Module) -> Iterator[_Captured]:
        """Within the block, ``captured.output`` is the aligned layer's output of the last UNet call."""
        captured = _Captured()

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            captured.output = output[0] if isinstance(output, tuple) else output

        handle = _layer(unet, self.layer).register_forward_hook(hook)
        try:
            yield captured
        finally:
            handle.remove()

    @torch.no_grad()
    def targets(self, masks: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features [B, D, *size], labelled [B, *size])``: the encoder's features of ``masks`` pooled to ``size``,
        and whether at least half of each cell's pixels are labelled."""
        onehot = _onehot(masks, self.num_classes, self.ignore_index)
        feats = F.adaptive_avg_pool2d(self.encoder(onehot), size)
        labelled = F.adaptive_avg_pool2d((masks != self.ignore_index).float().unsqueeze(1), size)[:, 0] >= 0.5
        return feats, labelled

    def loss(self, features: Optional[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
        """``1 - mean cosine similarity`` of the projected ``features`` and the masks' targets over labelled cells
        (0 when no cell is labelled)."""
        if features is None:
            raise RuntimeError(f"layer {self.layer!r} was not called in the UNet's forward")
        target, labelled = self.targets(masks, tuple(features.shape[-2:]))
        cos = F.cosine_similarity(self.projector(features), target.to(features.dtype), dim=1)
        weights = labelled.to(cos.dtype)
        similarity = (cos * weights).sum() / weights.sum().clamp_min(1.0)
        return torch.where(weights.sum() > 0, 1.0 - similarity, similarity)  # no labelled cell: 0, no host copy


def build_representation_alignment(config: Optional[Mapping[str, Any]], unet: nn.Module
                                   ) -> Optional[RepresentationAlignment]:
    """:class:`RepresentationAlignment` from ``LatentDiffusion``'s ``representation_alignment`` dict (``None``:
    off); unknown keys are a ValueError listing the accepted ones."""
    if config is None:
        return None
    config = dict(config)
    accepted = ("num_classes", "mask_key", "layer", "weight", "hidden", "encoder_path", "encoder", "ignore_index")
    unknown = sorted(set(config) - set(accepted))
    if unknown or "num_classes" not in config:
        raise ValueError(f"representation_alignment: unknown keys {unknown} or no num_classes; accepted: "
                         f"{', '.join(accepted)}")
    return RepresentationAlignment(unet, **config)
