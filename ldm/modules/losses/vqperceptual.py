"""Loss of the VQ first stage: L1/L2 (+ LPIPS) reconstruction, codebook loss and an adaptively
weighted PatchGAN loss (taming-transformers' VQGAN objective)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ldm.modules.losses.contperceptual import (GANLossMixin, build_discriminator, build_perceptual_loss,
                                               disc_loss_fn)

PIXEL_LOSSES = ("l1", "l2")


def measure_perplexity(predicted_indices: torch.Tensor, n_embed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebook perplexity (exp of the usage entropy) and number of codes used in the batch."""
    counts = torch.bincount(predicted_indices.reshape(-1).long(), minlength=n_embed).float()
    avg_probs = counts / counts.sum().clamp_min(1.0)
    perplexity = torch.exp(-(avg_probs * torch.log(avg_probs + 1e-10)).sum())
    cluster_use = (avg_probs > 0).sum().float()
    return perplexity, cluster_use


class VQLPIPSWithDiscriminator(GANLossMixin, nn.Module):
    """Loss of ``VQModel``; ``optimizer_idx`` 0: autoencoder loss, 1: discriminator loss.

    Args:
        disc_start: global step from which the GAN terms act.
        codebook_weight: weight of the codebook (commitment) loss.
        pixelloss_weight: stored for config compatibility.
        disc_num_layers: PatchGAN depth.
        disc_in_channels: discriminator input channels.
        disc_factor: GAN term factor once active.
        disc_weight: factor on the adaptive weight.
        perceptual_weight: LPIPS weight; 0 builds no LPIPS.
        use_actnorm: ActNorm instead of BatchNorm in the discriminator.
        disc_conditional: discriminator also sees ``cond``.
        disc_ndf: discriminator base width.
        disc_loss: "hinge" or "vanilla".
        n_classes: codebook size, needed to log perplexity from ``predicted_indices``.
        perceptual_loss: only "lpips" is available.
        pixel_loss: "l1" or "l2".
    """

    def __init__(self, disc_start: int, codebook_weight: float = 1.0, pixelloss_weight: float = 1.0,
                 disc_num_layers: int = 3, disc_in_channels: int = 3, disc_factor: float = 1.0,
                 disc_weight: float = 1.0, perceptual_weight: float = 1.0, use_actnorm: bool = False,
                 disc_conditional: bool = False, disc_ndf: int = 64, disc_loss: str = "hinge",
                 n_classes: Optional[int] = None, perceptual_loss: str = "lpips", pixel_loss: str = "l1"):
        super().__init__()
        if perceptual_loss != "lpips":
            raise ValueError(f"perceptual_loss must be 'lpips', got {perceptual_loss!r} (lossconfig.params)")
        if pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {PIXEL_LOSSES}, got {pixel_loss!r} (lossconfig.params)")
        self.disc_loss = disc_loss_fn(disc_loss)
        self.codebook_weight = codebook_weight
        self.pixel_weight = pixelloss_weight
        self.perceptual_weight = perceptual_weight
        perceptual = build_perceptual_loss(perceptual_weight)
        if perceptual is not None:
            self.perceptual_loss = perceptual
        self.pixel_loss_name = pixel_loss
        self.discriminator = build_discriminator(disc_in_channels, disc_num_layers, use_actnorm, ndf=disc_ndf)
        self.discriminator_iter_start = disc_start
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_conditional = disc_conditional
        self.n_classes = n_classes

    def pixel_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.abs(x - y) if self.pixel_loss_name == "l1" else (x - y).pow(2)

    def forward(self, codebook_loss: Optional[torch.Tensor], inputs: torch.Tensor, reconstructions: torch.Tensor,
                optimizer_idx: int, global_step: int, last_layer: Optional[torch.Tensor] = None,
                cond: Optional[torch.Tensor] = None, split: str = "train",
                predicted_indices: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if optimizer_idx not in (0, 1):
            raise ValueError(f"optimizer_idx must be 0 (autoencoder) or 1 (discriminator), got {optimizer_idx}")
        if optimizer_idx == 1:
            return self._discriminator_step(inputs, reconstructions, cond, global_step, split)
        if codebook_loss is None:
            codebook_loss = torch.zeros(1, device=inputs.device)
        rec_loss = self.pixel_loss(inputs.contiguous(), reconstructions.contiguous())
        if self.perceptual_weight > 0:
            p_loss = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())
            rec_loss = rec_loss + self.perceptual_weight * p_loss
        else:
            p_loss = torch.zeros(1, device=inputs.device)
        nll_loss = torch.mean(rec_loss)

        g_loss, d_weight, disc_factor = self._generator_gan_terms(nll_loss, reconstructions, cond, global_step,
                                                                  last_layer)
        loss = nll_loss + d_weight * disc_factor * g_loss + self.codebook_weight * codebook_loss.mean()
        log = {
            f"{split}/total_loss": loss.clone().detach().mean(),
            f"{split}/quant_loss": codebook_loss.detach().mean(),
            f"{split}/nll_loss": nll_loss.detach().mean(),
            f"{split}/rec_loss": rec_loss.detach().mean(),
            f"{split}/p_loss": p_loss.detach().mean(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": torch.tensor(disc_factor, device=loss.device),
            f"{split}/g_loss": g_loss.detach().mean(),
        }
        if predicted_indices is not None:
            if self.n_classes is None:
                raise ValueError("predicted_indices were given but n_classes is not set (lossconfig.params.n_classes)")
            with torch.no_grad():
                perplexity, cluster_usage = measure_perplexity(predicted_indices, self.n_classes)
            log[f"{split}/perplexity"] = perplexity
            log[f"{split}/cluster_usage"] = cluster_usage
        return loss, log
