"""Optimiser construction shared by the models' ``configure_optimizers``: the fused CUDA kernels when they apply."""
from __future__ import annotations

import logging
from typing import Any, Iterable

import torch

logger = logging.getLogger(__name__)

#: device types whose parameters get the fused Adam/AdamW kernel (PyTorch's default elsewhere)
FUSED_DEVICE_TYPES: tuple[str, ...] = ("cuda",)


def fused_kwargs(params: Iterable[Any]) -> dict[str, Any]:
    """Extra keyword arguments for ``torch.optim.Adam``/``AdamW`` over ``params``.

    ``{"fused": True}`` when every parameter is a floating-point tensor on CUDA (``FUSED_DEVICE_TYPES``): one fused kernel updates all
    parameters (fewer launches than the ``foreach`` default). Otherwise ``{}``: PyTorch's default
    (``foreach`` on CUDA, the per-parameter loop on the CPU), which also covers parameters split across devices.
    """
    params = list(params)
    if params and all(p.device.type in FUSED_DEVICE_TYPES and p.is_floating_point() for p in params):
        return {"fused": True}
    return {}


def make_adam(optimizer: type[torch.optim.Optimizer], params: Iterable[torch.nn.Parameter],
              **kwargs: Any) -> torch.optim.Optimizer:
    """``optimizer(params, **kwargs)`` (``torch.optim.Adam`` or ``AdamW``) with :func:`fused_kwargs` added."""
    params = list(params)
    extra = fused_kwargs(params)
    logger.debug("%s over %d tensors%s", optimizer.__name__, len(params), " (fused)" if extra else "")
    return optimizer(params, **kwargs, **extra)
