"""Compiling the diffusion UNet in place (``torch.compile`` through ``Module.compile``: the state-dict keys stay)."""
from __future__ import annotations

import logging
from typing import Any, Optional

from torch import nn

from ldm.modules.diffusionmodules.openaimodel import UNetModel

logger = logging.getLogger(__name__)


def compile_unet(model: nn.Module, backend: str = "inductor", mode: Optional[str] = None) -> nn.Module:
    """Compile the diffusion UNet of ``model`` in place with ``torch.compile`` and return the UNet.

    ``model`` is a diffusion model (its ``unet``, i.e. ``model.diffusion_model``) or a :class:`UNetModel`.
    ``Module.compile`` is used, not a ``torch.compile`` wrapper, so parameter names and state-dict keys stay
    exactly the CompVis ones (no ``_orig_mod.`` prefix) and checkpoints of compiled and eager runs are
    interchangeable. Graphs are captured at the first call (minutes with ``inductor`` on a large UNet).

    Args:
        model: the diffusion model (or the UNet itself).
        backend: ``torch.compile`` backend (``inductor``; ``aot_eager``/``eager`` capture graphs without
            generating code, for debugging).
        mode: ``torch.compile`` mode (``None``, ``"default"``, ``"reduce-overhead"``, ``"max-autotune"``).
    """
    unet = model if isinstance(model, UNetModel) else getattr(model, "unet", None)
    if not isinstance(unet, UNetModel):
        raise ValueError(f"--compile compiles the diffusion UNet, but {type(model).__name__} has none (model.unet); "
                         f"use it with a diffusion model config (LatentDiffusion, AnatomicalLatentDiffusion)")
    options: dict[str, Any] = {"backend": backend}
    if mode is not None:
        options["mode"] = mode
    unet.compile(**options)
    logger.info("torch.compile: %s compiled in place (backend=%s, mode=%s); graphs are captured at the first call",
                type(unet).__name__, backend, mode)
    return unet
