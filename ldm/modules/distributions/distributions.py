"""Diagonal Gaussian posterior of the KL autoencoder."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


class DiagonalGaussianDistribution:
    """Gaussian with diagonal covariance whose mean and log-variance are the two halves of
    ``parameters`` along dim 1 (the encoder's moments).

    Args:
        parameters: tensor ``[B, 2*C, ...]``; the log-variance half is clamped to ``[-30, 20]``.
        deterministic: zero variance; ``sample()`` returns the mean and ``kl``/``nll`` are 0.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        if parameters.ndim < 2 or parameters.shape[1] % 2 != 0:
            raise ValueError(
                f"DiagonalGaussianDistribution needs parameters [B, 2*C, ...] with an even channel count, "
                f"got shape {tuple(parameters.shape)}"
            )
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.std = torch.zeros_like(self.mean)
            self.var = torch.zeros_like(self.mean)

    def _dims(self) -> list[int]:
        return list(range(1, self.mean.ndim))

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``mean + std * eps`` with ``eps ~ N(0, I)`` drawn from ``generator`` (global RNG if None)."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: Optional["DiagonalGaussianDistribution"] = None) -> torch.Tensor:
        """KL(self || other) per sample, summed over all non-batch dims; ``other`` None means N(0, I)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        dims = self._dims()
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of ``sample``, summed over ``dims``."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        log_two_pi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims))
