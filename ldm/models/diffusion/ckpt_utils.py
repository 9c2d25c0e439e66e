"""Checkpoint loading for the diffusion models: never a silent half-load.

Keys the model lacks or tensors of other shapes raise ``ValueError`` naming the file (nothing is
loaded then); missing keys (e.g. a plug-in added to the model) are loaded around and logged.
"""
from __future__ import annotations

import logging
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from ldm.util import load_checkpoint_state_dict, load_state_dict_report

logger = logging.getLogger(__name__)

KeyFilter = Callable[[dict, Mapping[str, torch.Tensor], str], dict]


def load_weights(module: nn.Module, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False,
                 key_filter: Optional[KeyFilter] = None) -> list[str]:
    """Load ``path`` (Lightning .ckpt, bare state dict or safetensors) into ``module``; return the missing keys.

    Keys starting with any of ``ignore_keys`` are dropped first. ``only_model`` loads into
    ``module.model`` (accepting either its own keys or the full model's ``model.*`` keys).
    ``key_filter(sd, own_state, path)`` may drop keys that legitimately differ between configs.
    """
    sd = load_checkpoint_state_dict(path)
    for k in list(sd):
        if any(k.startswith(prefix) for prefix in ignore_keys):
            logger.info("Deleting key %s from state_dict of %s.", k, path)
            del sd[k]
    target = module
    if only_model:
        target = module.model
        if any(k.startswith("model.") for k in sd):
            sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    own = target.state_dict()
    if key_filter is not None and not only_model:
        sd = key_filter(sd, own, path)
    unexpected = [k for k in sd if k not in own]
    if unexpected:
        raise ValueError(
            f"checkpoint {path} has {len(unexpected)} keys this model does not have (e.g. {unexpected[:5]}): "
            "it was trained with another config; fix the config or pass ignore_keys to skip them")
    if not sd:
        raise ValueError(f"checkpoint {path} holds no weights for this model (after ignore_keys)")
    try:
        missing, _ = load_state_dict_report(target, sd, strict=False, source=path)
    except RuntimeError as err:
        raise ValueError(str(err)) from err
    return missing
