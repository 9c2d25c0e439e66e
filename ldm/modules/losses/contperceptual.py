"""Autoencoder loss of the KL first stage: L1 (+ LPIPS) reconstruction with a learned output
log-variance, KL regularisation and an adaptively weighted PatchGAN loss (Esser et al. 2021, eq. 7)."""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

DISC_LOSSES = ("hinge", "vanilla")


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``value`` before step ``threshold``, ``weight`` from then on."""
    return value if global_step < threshold else weight


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def disc_loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name not in DISC_LOSSES:
        raise ValueError(f"disc_loss must be one of {DISC_LOSSES}, got {name!r} (lossconfig.params.disc_loss)")
    return hinge_d_loss if name == "hinge" else vanilla_d_loss


def build_discriminator(disc_in_channels: int, disc_num_layers: int, use_actnorm: bool, ndf: int = 64) -> nn.Module:
    """taming's PatchGAN ``NLayerDiscriminator`` with its DCGAN-style initialisation."""
    from taming.modules.discriminator.model import NLayerDiscriminator, weights_init

    return NLayerDiscriminator(input_nc=disc_in_channels, ndf=ndf, n_layers=disc_num_layers,
                               use_actnorm=use_actnorm).apply(weights_init)


def build_perceptual_loss(perceptual_weight: float) -> Optional[nn.Module]:
    """LPIPS when ``perceptual_weight > 0`` (weights from local files only), else None."""
    if perceptual_weight <= 0:
        return None
    from ldm.modules.losses.lpips import LPIPS

    return LPIPS().eval()


class GANLossMixin:
    """Shared pieces of the KL and VQ losses: adaptive generator weight and discriminator step."""

    discriminator: nn.Module
    discriminator_weight: float
    discriminator_iter_start: int
    disc_factor: float
    disc_conditional: bool
    disc_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def calculate_adaptive_weight(self, nll_loss: torch.Tensor, g_loss: torch.Tensor,
                                  last_layer: torch.Tensor) -> torch.Tensor:
        """``|grad nll| / (|grad g| + 1e-4)`` at ``last_layer``, clamped to [0, 1e4], times ``disc_weight``."""
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(d_weight, 0.0, 1e4).detach() * self.discriminator_weight

    def _can_adapt(self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: Optional[torch.Tensor]) -> bool:
        grads_available = (torch.is_grad_enabled() and last_layer is not None and nll_loss.requires_grad
                           and g_loss.requires_grad)
        if self.training and not grads_available:
            raise ValueError("the adaptive GAN weight needs gradients at last_layer in training: pass "
                             "last_layer=model.get_last_layer() and run with gradients enabled")
        return grads_available

    def _disc_input(self, x: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        if cond is None:
            if self.disc_conditional:
                raise ValueError("disc_conditional=True needs a cond tensor in the loss call")
            return x.contiguous()
        if not self.disc_conditional:
            raise ValueError("a cond tensor was given but disc_conditional=False (lossconfig.params)")
        return torch.cat((x.contiguous(), cond), dim=1)

    def _generator_gan_terms(self, nll_loss: torch.Tensor, reconstructions: torch.Tensor,
                             cond: Optional[torch.Tensor], global_step: int,
                             last_layer: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float]:
        logits_fake = self.discriminator(self._disc_input(reconstructions, cond))
        g_loss = -torch.mean(logits_fake)
        if self.disc_factor > 0.0 and self._can_adapt(nll_loss, g_loss, last_layer):
            d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
        else:
            d_weight = torch.zeros((), device=g_loss.device)
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        return g_loss, d_weight, disc_factor

    def _discriminator_step(self, inputs: torch.Tensor, reconstructions: torch.Tensor,
                            cond: Optional[torch.Tensor], global_step: int,
                            split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits_real = self.discriminator(self._disc_input(inputs.detach(), None if cond is None else cond.detach()))
        logits_fake = self.discriminator(
            self._disc_input(reconstructions.detach(), None if cond is None else cond.detach()))
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        log = {
            f"{split}/disc_loss": d_loss.clone().detach().mean(),
            f"{split}/logits_real": logits_real.detach().mean(),
            f"{split}/logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, log


class LPIPSWithDiscriminator(GANLossMixin, nn.Module):
    """Loss of ``AutoencoderKL``; ``forward(..., optimizer_idx=0)`` gives the autoencoder loss,
    ``optimizer_idx=1`` the discriminator loss, each with a log dict of CompVis keys.

    Args:
        disc_start: global step from which the GAN terms act.
        logvar_init: initial value of the output log-variance ``logvar``.
        kl_weight: weight of the KL term.
        pixelloss_weight: stored for config compatibility (CompVis does not use it either).
        disc_num_layers: PatchGAN depth.
        disc_in_channels: discriminator input channels (image channels, + cond channels if conditional).
        disc_factor: GAN term factor once active.
        disc_weight: factor on the adaptive weight.
        perceptual_weight: LPIPS weight; 0 builds no LPIPS at all.
        use_actnorm: ActNorm instead of BatchNorm in the discriminator.
        disc_conditional: discriminator also sees ``cond``.
        disc_loss: "hinge" or "vanilla".
    """

    def __init__(self, disc_start: int, logvar_init: float = 0.0, kl_weight: float = 1.0,
                 pixelloss_weight: float = 1.0, disc_num_layers: int = 3, disc_in_channels: int = 3,
                 disc_factor: float = 1.0, disc_weight: float = 1.0, perceptual_weight: float = 1.0,
                 use_actnorm: bool = False, disc_conditional: bool = False, disc_loss: str = "hinge"):
        super().__init__()
        self.disc_loss = disc_loss_fn(disc_loss)
        self.kl_weight = kl_weight
        self.pixel_weight = pixelloss_weight
        self.perceptual_weight = perceptual_weight
        perceptual = build_perceptual_loss(perceptual_weight)
        if perceptual is not None:
            self.perceptual_loss = perceptual
        self.logvar = nn.Parameter(torch.ones(size=()) * logvar_init)
        self.discriminator = build_discriminator(disc_in_channels, disc_num_layers, use_actnorm)
        self.discriminator_iter_start = disc_start
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_conditional = disc_conditional

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posteriors, optimizer_idx: int,
                global_step: int, last_layer: Optional[torch.Tensor] = None, cond: Optional[torch.Tensor] = None,
                split: str = "train", weights: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if optimizer_idx not in (0, 1):
            raise ValueError(f"optimizer_idx must be 0 (autoencoder) or 1 (discriminator), got {optimizer_idx}")
        if optimizer_idx == 1:
            return self._discriminator_step(inputs, reconstructions, cond, global_step, split)

        rec_loss = torch.abs(inputs.contiguous() - reconstructions.contiguous())
        if self.perceptual_weight > 0:
            p_loss = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())
            rec_loss = rec_loss + self.perceptual_weight * p_loss
        nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar
        weighted_nll_loss = nll_loss if weights is None else weights * nll_loss
        weighted_nll_loss = torch.sum(weighted_nll_loss) / weighted_nll_loss.shape[0]
        nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
        kl_loss = posteriors.kl()
        kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]

        g_loss, d_weight, disc_factor = self._generator_gan_terms(nll_loss, reconstructions, cond, global_step,
                                                                  last_layer)
        loss = weighted_nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        log = {
            f"{split}/total_loss": loss.clone().detach().mean(),
            f"{split}/logvar": self.logvar.detach(),
            f"{split}/kl_loss": kl_loss.detach().mean(),
            f"{split}/nll_loss": nll_loss.detach().mean(),
            f"{split}/rec_loss": rec_loss.detach().mean(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": torch.tensor(disc_factor, device=loss.device),
            f"{split}/g_loss": g_loss.detach().mean(),
        }
        return loss, log
