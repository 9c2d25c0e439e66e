"""Exponential moving average of a model's trainable parameters, stored as buffers.

The buffer layout is the CompVis one, so EMA weights in existing checkpoints load unchanged:
``decay`` (float32 scalar), ``num_updates`` (int32 scalar) and one shadow buffer per trainable
parameter, named as the parameter's path with the dots removed
(``diffusion_model.input_blocks.0.0.weight`` -> ``diffusion_modelinput_blocks00weight``).
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

logger = logging.getLogger(__name__)


class LitEma(nn.Module):
    """Shadow copy of ``model``'s trainable parameters, updated by ``ema(model)``.

    Args:
        model: the module whose parameters (those with ``requires_grad``) are tracked.
        decay: the EMA decay in [0, 1].
        use_num_upates: (CompVis spelling) when True the effective decay warms up as
            ``min(decay, (1 + n) / (10 + n))`` with ``n`` the number of updates so far.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"LitEma decay must lie in [0, 1], got {decay}")
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int))
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            shadow_name = name.replace(".", "")
            if shadow_name in self.m_name2s_name.values():
                raise ValueError(f"parameter names collide once dots are removed: {name!r} -> {shadow_name!r}")
            self.m_name2s_name[name] = shadow_name
            self.register_buffer(shadow_name, param.detach().clone())
        self.collected_params: list[torch.Tensor] = []

    def reset_num_updates(self) -> None:
        """Restart the decay warm-up (e.g. when fine-tuning from a checkpoint)."""
        self.num_updates = torch.zeros_like(self.num_updates)

    def current_decay(self) -> float:
        """The decay the next update uses (warm-up applied)."""
        decay = float(self.decay)
        n = int(self.num_updates)
        if n >= 0:
            decay = min(decay, (2.0 + n) / (11.0 + n))  # (1 + n') / (10 + n') with n' = n + 1
        return decay

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA step: ``shadow -= (1 - decay) * (shadow - param)`` for every tracked parameter."""
        decay = self.current_decay()
        if int(self.num_updates) >= 0:
            self.num_updates += 1
        one_minus_decay = 1.0 - decay
        shadows = dict(self.named_buffers())
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            shadow_name = self.m_name2s_name.get(name)
            if shadow_name is None:
                raise ValueError(f"parameter {name!r} was not tracked when this LitEma was created")
            shadow = shadows[shadow_name]
            if shadow.dtype != param.dtype:
                shadow = shadow.to(param.dtype)
                setattr(self, shadow_name, shadow)
            shadow.sub_(one_minus_decay * (shadow - param.detach()))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the shadow values into ``model``'s tracked parameters."""
        shadows = dict(self.named_buffers())
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(shadows[self.m_name2s_name[name]])

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Keep a copy of ``parameters`` so that :meth:`restore` can put them back."""
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Put back the values saved by :meth:`store` (after evaluating with the EMA weights)."""
        params = list(parameters)
        if len(params) != len(self.collected_params):
            raise RuntimeError("LitEma.restore called without a matching store() of the same parameters")
        for saved, param in zip(self.collected_params, params):
            param.copy_(saved)
        self.collected_params = []
