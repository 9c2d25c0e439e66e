"""The CompVis ``DiffusionWrapper``: holds the UNet as ``diffusion_model`` and routes the conditioning into it."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ldm.util import instantiate_from_config

CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm")
_NONE_STRINGS = ("None", "none", "null", "")


def _normalize_conditioning_key(key: Optional[str]) -> Optional[str]:
    key = None if key in _NONE_STRINGS else key
    if key not in CONDITIONING_KEYS:
        raise ValueError(f"conditioning_key must be one of {CONDITIONING_KEYS}, got {key!r}")
    return key


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model`` and feeds it the conditioning ``conditioning_key`` asks for.

    Args:
        diff_model_config: ``{target, params}`` of the UNet.
        conditioning_key: None (or the string "None"), "concat" (channel-concatenate ``c_concat``),
            "crossattn" (``c_crossattn`` as ``context``), "hybrid" (both) or "adm" (``c_crossattn[0]`` as ``y``).
    """

    # conditioning key -> (concatenate c_concat to x?, UNet keyword that receives c_crossattn)
    _ROUTES = {None: (False, None), "concat": (True, None), "crossattn": (False, "context"),
               "hybrid": (True, "context"), "adm": (False, "y")}

    def __init__(self, diff_model_config: Mapping[str, Any], conditioning_key: Optional[str]) -> None:
        super().__init__()
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = _normalize_conditioning_key(conditioning_key)

    def route(self, x: torch.Tensor, c_concat: Optional[Sequence[torch.Tensor]] = None,
              c_crossattn: Optional[Sequence[torch.Tensor]] = None,
              **extra: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """The UNet's input and conditioning keywords for ``x`` and the conditioning (``forward`` uses it); ``extra``
        conditioning (e.g. ``mask_condition``) goes to the UNet as keywords."""
        concat, keyword = self._ROUTES[self.conditioning_key]
        kwargs: dict[str, Any] = dict(extra)
        if concat:
            if c_concat is None:
                raise ValueError(f"conditioning_key {self.conditioning_key!r} needs c_concat conditioning")
            x = torch.cat([x, *c_concat], dim=1)
        if keyword is not None:
            if c_crossattn is None:
                raise ValueError(f"conditioning_key {self.conditioning_key!r} needs c_crossattn conditioning")
            kwargs[keyword] = c_crossattn[0] if keyword == "y" else torch.cat(list(c_crossattn), dim=1)
        return x, kwargs

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: Optional[Sequence[torch.Tensor]] = None,
                c_crossattn: Optional[Sequence[torch.Tensor]] = None, **kwargs: Any) -> Any:
        x, routed = self.route(x, c_concat, c_crossattn)
        return self.diffusion_model(x, t, **routed, **kwargs)
