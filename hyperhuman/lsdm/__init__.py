"""Latent Structural Diffusion Model (HyperHuman stage 1): joint RGB + depth + normal generation."""

from hyperhuman.lsdm.model import BRANCHES, LatentStructuralUNet, LSDMOutput

__all__ = ["BRANCHES", "LatentStructuralUNet", "LSDMOutput"]
