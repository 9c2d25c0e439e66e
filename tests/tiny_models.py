"""Tiny model configs shared by the tests: first stages, plain and anatomical UNets, plain and anatomical LDMs.

Defaults: 1-channel 16 px images, 2-channel 8x8 latents, a one-level 32-channel UNet without attention.
Each builder returns plain dicts (``{target, params}`` or params), so a test overrides what it needs.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
ANATOMICAL_UNET_TARGET = "ldm.modules.diffusionmodules.anatomical_openaimodel.AnatomicalUNetModel"
LDM_TARGET = "ldm.models.diffusion.ddpm.LatentDiffusion"
ANATOMICAL_LDM_TARGET = "ldm.models.diffusion.anatomical_ddpm.AnatomicalLatentDiffusion"


def first_stage_config(ch: int = 32, embed_dim: int = 2, resolution: int = 16) -> dict[str, Any]:
    """A 1-channel f2 AutoencoderKL with ``embed_dim`` latent channels, frozen-first-stage style (Identity loss)."""
    return {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {"embed_dim": embed_dim, "lossconfig": {"target": "torch.nn.Identity"},
                   "ddconfig": {"double_z": True, "z_channels": embed_dim, "resolution": resolution, "in_channels": 1,
                                "out_ch": 1, "ch": ch, "ch_mult": [1, 2], "num_res_blocks": 1,
                                "attn_resolutions": [], "dropout": 0.0}},
    }


def unet_params(in_channels: int = 2, out_channels: int = 2, image_size: int = 8, two_level: bool = False,
                **extra: Any) -> dict[str, Any]:
    """32-channel UNetModel params: one level without attention, or (``two_level``) levels [1, 2] with
    2-head attention at ds 2; ``extra`` overrides."""
    params: dict[str, Any] = {"image_size": image_size, "in_channels": in_channels, "out_channels": out_channels,
                              "model_channels": 32, "attention_resolutions": [], "num_res_blocks": 1,
                              "channel_mult": [1], "num_heads": 1}
    if two_level:
        params.update(attention_resolutions=[2], channel_mult=[1, 2], num_heads=2)
    params.update(extra)
    return params


def anatomical_params(num_classes: int = 6, register_dim: int = 16, registers_per_class: int = 2, heads: int = 2,
                      **extra: Any) -> dict[str, Any]:
    """The anatomical part of an AnatomicalUNetModel's params (the other anatomical options at their defaults:
    registers on, timestep-aware, position codes)."""
    return {"num_anatomical_classes": num_classes, "anatomical_register_dim": register_dim,
            "num_registers_per_class": registers_per_class, "anatomical_attention_heads": heads, **extra}


def unet_config(in_channels: int = 2, out_channels: int = 2, image_size: int = 8,
                anatomy: Optional[dict[str, Any]] = None, **extra: Any) -> dict[str, Any]:
    """``{target, params}`` of a UNetModel (``unet_params``), or of an AnatomicalUNetModel with the ``anatomy``
    params (``anatomical_params``) added."""
    params = unet_params(in_channels, out_channels, image_size, **extra)
    if anatomy is None:
        return {"target": UNET_TARGET, "params": params}
    return {"target": ANATOMICAL_UNET_TARGET, "params": {**params, **anatomy}}


def ldm_params(first_stage: Optional[dict[str, Any]] = None, unet: Optional[dict[str, Any]] = None,
               **overrides: Any) -> dict[str, Any]:
    """Params of an unconditional LatentDiffusion on the tiny first stage and UNet (8x8x2 latents by default)."""
    params: dict[str, Any] = {
        "first_stage_config": copy.deepcopy(first_stage or first_stage_config()),
        "cond_stage_config": "__is_unconditional__", "unet_config": copy.deepcopy(unet or unet_config()),
        "image_size": 8, "channels": 2, "linear_start": 0.0015, "linear_end": 0.0205}
    params.update(overrides)
    return params


def ldm_config(anatomical: bool = False, first_stage: Optional[dict[str, Any]] = None,
               unet: Optional[dict[str, Any]] = None, **overrides: Any) -> dict[str, Any]:
    """``{target, params}`` of a tiny LatentDiffusion, or (``anatomical``) AnatomicalLatentDiffusion whose default
    UNet is the anatomical one (6 classes)."""
    if anatomical and unet is None:
        unet = unet_config(anatomy=anatomical_params())
    return {"target": ANATOMICAL_LDM_TARGET if anatomical else LDM_TARGET,
            "params": ldm_params(first_stage, unet, **overrides)}
