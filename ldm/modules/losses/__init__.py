"""Autoencoder losses (CompVis class paths ``ldm.modules.losses.LPIPSWithDiscriminator`` etc.)."""
from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator
from ldm.modules.losses.vqperceptual import VQLPIPSWithDiscriminator

__all__ = ["LPIPSWithDiscriminator", "VQLPIPSWithDiscriminator"]
