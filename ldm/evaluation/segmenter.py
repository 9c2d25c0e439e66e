"""An independent segmentation network (small UNet) for judging the anatomy of generated samples.

It is trained on the real training split (``scripts/train_segmenter.py``) and applied to samples of any model,
baseline included, so both are measured by the same yardstick.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.data.batch import item_channels_first, to_channels_first
from ldm.modules.dice import class_argmax

logger = logging.getLogger(__name__)


def _block(cin: int, cout: int) -> nn.Sequential:
    groups = 8 if cout % 8 == 0 else 1
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU())


class SegmenterUNet(nn.Module):
    """A small UNet: ``depth`` levels of two 3x3 conv blocks, max-pool down, bilinear up with skips.

    Args:
        in_channels: image channels.
        num_classes: output classes (logits ``[B, num_classes, H, W]``).
        base_channels: channels at full resolution, doubled per level.
        depth: number of resolution levels; inputs are padded to a multiple of ``2 ** (depth - 1)``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 6, base_channels: int = 16, depth: int = 3) -> None:
        super().__init__()
        if depth < 1 or num_classes < 2:
            raise ValueError(f"depth must be >= 1 and num_classes >= 2, got {depth} and {num_classes}")
        self.hparams = {"in_channels": in_channels, "num_classes": num_classes, "base_channels": base_channels,
                        "depth": depth}
        chans = [base_channels * 2 ** i for i in range(depth)]
        self.down = nn.ModuleList()
        cin = in_channels
        for c in chans:
            self.down.append(_block(cin, c))
            cin = c
        self.up = nn.ModuleList(_block(chans[i + 1] + chans[i], chans[i]) for i in reversed(range(depth - 1)))
        self.head = nn.Conv2d(chans[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        mult = 2 ** (len(self.down) - 1)
        ph, pw = (-h) % mult, (-w) % mult
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)[..., :h, :w]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Global average of every encoder level, concatenated: ``[B, sum of channels]`` (for a domain FID)."""
        pooled = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            pooled.append(x.mean(dim=(-2, -1)))
        return torch.cat(pooled, dim=1)


def batch_to_tensors(batch: dict[str, Any], channels: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
    """Images ``[B, C, H, W]`` from the data contract's ``image`` (channel-last, or channel-first as a MONAI
    pipeline gives it, told apart by ``channels``: :func:`ldm.data.batch.to_channels_first`), masks, has-mask
    flags."""
    image = to_channels_first(batch["image"], channels, "image")
    mask = torch.as_tensor(batch["segmentation"]).long()
    has = torch.as_tensor(batch.get("has_segmentation", torch.ones(mask.shape[0], dtype=torch.bool))).bool()
    return image, mask, has


def _shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``x`` (``[..., H, W]``) moved by ``(dy, dx)`` pixels, zero-filled where it moved away (no wrap-around)."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd] = x[..., ys, xs]
    return out


def copy_paste(image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator, prob: float = 0.5,
               max_pastes: int = 3, small_share: float = 0.3, ignore_index: int = 255
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy-paste augmentation (after Ghiasi et al., CVPR 2021) of a batch ``image [B, C, H, W]``, ``mask [B, H,
    W]``: with probability ``prob`` an example receives 1..``max_pastes`` structures, each the pixels of one class
    of a random example of the batch (intensities and labels together), mirrored left-right half of the time,
    moved by a random offset of up to half the image, and, with probability ``small_share``, cut to a random box
    of 2-6 pixels (a speck). The segmenter then learns to label what a region looks like, not where its class
    usually lies, so that a judge built on it reports misplaced, mirrored, duplicated or scattered structures
    instead of imposing the usual anatomy. Returns new tensors; the inputs are not changed."""
    out_image, out_mask = image.clone(), mask.clone()
    b, _, h, w = image.shape

    def draw(n: int) -> int:
        return int(torch.randint(n, (1,), generator=generator))

    for i in range(b):
        if float(torch.rand((), generator=generator)) >= prob:
            continue
        for _ in range(1 + draw(max_pastes)):
            src = draw(b)
            classes = [int(c) for c in mask[src].unique() if 0 < int(c) != ignore_index]
            if not classes:
                continue
            c = classes[draw(len(classes))]
            region, pixels = mask[src] == c, image[src]
            if draw(2):
                region, pixels = region.flip(-1), pixels.flip(-1)
            dy, dx = draw(h + 1) - h // 2, draw(w + 1) - w // 2
            region, pixels = _shifted(region, dy, dx), _shifted(pixels, dy, dx)
            if float(torch.rand((), generator=generator)) < small_share and region.any():
                ys, xs = region.nonzero(as_tuple=True)
                k = draw(len(ys))
                side = 2 + draw(5)
                box = torch.zeros_like(region)
                box[max(0, int(ys[k]) - side // 2):int(ys[k]) + side - side // 2,
                    max(0, int(xs[k]) - side // 2):int(xs[k]) + side - side // 2] = True
                region = region & box
            out_image[i][:, region] = pixels[:, region]
            out_mask[i][region] = c
    return out_image, out_mask


def train_segmenter(dataset: Any, num_classes: int, steps: int = 500, batch_size: int = 16, lr: float = 2e-3,
                    base_channels: int = 16, depth: int = 3, ignore_index: int = 255, seed: int = 0,
                    device: Optional[torch.device] = None, progress: bool = False,
                    copy_paste_prob: float = 0.0) -> SegmenterUNet:
    """Train a ``SegmenterUNet`` with cross-entropy on labelled examples of ``dataset`` for ``steps`` steps;
    ``copy_paste_prob`` > 0 applies :func:`copy_paste` to every batch with that probability per example."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    if len(dataset) == 0:
        raise ValueError("the segmenter's training dataset is empty")
    torch.manual_seed(seed)
    first = dataset[0]
    in_ch = int(item_channels_first(first["image"]).shape[0])
    model = SegmenterUNet(in_ch, num_classes, base_channels, depth).to(device or "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) > batch_size,
                        generator=torch.Generator().manual_seed(seed))
    aug = torch.Generator().manual_seed(seed + 1)  # the augmentation's own stream: without it nothing changes
    model.train()
    step, bar = 0, tqdm(total=steps, desc="segmenter", disable=not progress)
    while step < steps:
        for batch in loader:
            image, mask, has = batch_to_tensors(batch, in_ch)
            if not has.any():
                continue
            if copy_paste_prob > 0:
                image, mask = copy_paste(image, mask, aug, copy_paste_prob, ignore_index=ignore_index)
            image, mask = image[has].to(next(model.parameters()).device), mask[has].to(next(model.parameters()).device)
            loss = F.cross_entropy(model(image), mask, ignore_index=ignore_index)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=float(loss.detach()))
            if step >= steps:
                break
        else:
            if step == 0:
                raise ValueError("no example of the segmenter's training dataset has a mask (has_segmentation)")
    bar.close()
    model.eval()
    return model


def save_segmenter(path: str, model: SegmenterUNet, meta: Optional[dict[str, Any]] = None) -> str:
    """Save weights and hyper-parameters (plain types only, so it loads with ``weights_only=True``)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hparams": dict(model.hparams), "meta": dict(meta or {})}, path)
    return path


def load_segmenter(path: str, device: Optional[torch.device] = None) -> tuple[SegmenterUNet, dict[str, Any]]:
    """Load a segmenter written by ``save_segmenter``; returns ``(model, meta)``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"segmenter checkpoint not found: {path} (train one with scripts/train_segmenter.py)")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "hparams" not in obj or "state_dict" not in obj:
        raise ValueError(f"{path} is not a segmenter checkpoint from scripts/train_segmenter.py")
    model = SegmenterUNet(**obj["hparams"])
    model.load_state_dict(obj["state_dict"])
    model.eval()
    if device is not None:
        model.to(device)
    return model, dict(obj.get("meta", {}))


@torch.no_grad()
def segment(model: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 32) -> torch.Tensor:
    """Argmax masks ``[N, H, W]`` for images ``[N, C, H, W]`` in ``[-1, 1]``."""
    device = next(model.parameters()).device
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    return torch.cat([class_argmax(model(b.to(device).float())).cpu() for b in batches])
