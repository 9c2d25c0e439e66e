"""Tiny model configs shared by the tests (1-channel 16 px images, 2-channel 8x8 latents)."""
from __future__ import annotations

from typing import Any


def first_stage_config(ch: int = 32) -> dict[str, Any]:
    """A 1-channel f2 AutoencoderKL with 2 latent channels, frozen-first-stage style (Identity loss)."""
    return {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {"embed_dim": 2, "lossconfig": {"target": "torch.nn.Identity"},
                   "ddconfig": {"double_z": True, "z_channels": 2, "resolution": 16, "in_channels": 1, "out_ch": 1,
                                "ch": ch, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
                                "dropout": 0.0}},
    }


def unet_config(in_channels: int = 2, out_channels: int = 2, image_size: int = 8, **extra: Any) -> dict[str, Any]:
    """A one-level 32-channel UNetModel without attention; ``extra`` overrides its params."""
    params = {"image_size": image_size, "in_channels": in_channels, "out_channels": out_channels,
              "model_channels": 32, "attention_resolutions": [], "num_res_blocks": 1, "channel_mult": [1],
              "num_heads": 1}
    params.update(extra)
    return {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": params}
