"""Train a latent diffusion model on latents computed once: a first stage that reads precomputed posteriors.

A frozen first stage encodes every training image the same way at every step, so its encoder need not run
inside the training loop. ``PrecomputedPosteriorFirstStage`` wraps a KL autoencoder: batches carry the
posterior *moments* (mean and log-variance, ``2 * embed_dim`` channels at the latent size, from
:func:`posterior_moments`) under the LDM's ``first_stage_key``, and ``encode`` turns them into the same
``DiagonalGaussianDistribution`` the autoencoder would return, so each step still draws a fresh posterior
sample. Images (``in_channels`` channels) go through the autoencoder as usual, and ``decode`` is the
autoencoder's, so sampling, ``log_images`` and re-encoding of samples work unchanged.

    first_stage_config:
      target: ldm.models.latent_cache.PrecomputedPosteriorFirstStage
      params:
        autoencoder_config: {target: ldm.models.autoencoder.AutoencoderKL, params: {..., ckpt_path: ...}}

The state-dict keys are the autoencoder's under ``autoencoder.``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

__all__ = ["PrecomputedPosteriorFirstStage", "posterior_moments"]


class PrecomputedPosteriorFirstStage(nn.Module):
    """A KL autoencoder whose ``encode`` also accepts precomputed posterior moments.

    Args:
        autoencoder_config: ``target``/``params`` of the wrapped autoencoder (an ``AutoencoderKL``; its
            ``ckpt_path`` loads its weights).
    """

    def __init__(self, autoencoder_config: Mapping[str, Any]) -> None:
        super().__init__()
        self.autoencoder = instantiate_from_config(autoencoder_config)
        self.embed_dim = int(self.autoencoder.embed_dim)
        conv_in = getattr(getattr(self.autoencoder, "encoder", None), "conv_in", None)
        if conv_in is not None and int(conv_in.in_channels) == 2 * self.embed_dim:
            raise ValueError(f"PrecomputedPosteriorFirstStage cannot tell images from moments: the autoencoder takes "
                             f"{conv_in.in_channels}-channel images and its moments have 2 * embed_dim = "
                             f"{2 * self.embed_dim} channels too")

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Moments ``[B, 2 * embed_dim, h, w]`` -> their posterior; images -> the autoencoder's posterior."""
        if x.dim() == 4 and x.shape[1] == 2 * self.embed_dim:
            return DiagonalGaussianDistribution(x)
        return self.autoencoder.encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True) -> tuple[torch.Tensor, Any]:
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior


@torch.no_grad()
def posterior_moments(autoencoder: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Posterior moments ``[N, 2 * embed_dim, h, w]`` (float32, on the CPU) of ``images`` ``[N, C, H, W]``.

    ``autoencoder`` is an ``AutoencoderKL`` (or the wrapper above); its ``encode`` must return a
    ``DiagonalGaussianDistribution``.
    """
    device = next(autoencoder.parameters()).device
    out = []
    for chunk in images.split(batch_size):
        posterior = autoencoder.encode(chunk.to(device))
        if not isinstance(posterior, DiagonalGaussianDistribution):
            raise TypeError(f"posterior_moments needs a KL first stage; encode returned {type(posterior).__name__}")
        out.append(posterior.parameters.float().cpu())
    return torch.cat(out)
