"""Toy-size SGR components from config with fixed seeds (the diffusers ``get_dummy_components``
pattern): an SD-style and an SDXL-style base UNet (16-px latents, 128-px conditions), refiners
built from them, matching inputs, and the perturbation that stands in for training."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from hyperhuman.sgr.model import CONDITIONS, StructureGuidedRefiner

TINY_SD_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (16, 32),
    "norm_num_groups": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
}
TINY_POOLED_DIM = 32  # SDXL's pooled text embedding (``text_embeds``), 1280 in SDXL
TINY_TIME_EMBED_DIM = 8  # per micro-conditioning number; SDXL: 256 × 6 time_ids
TINY_SDXL_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (16, 32),
    "norm_num_groups": 8,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2),
    "cross_attention_dim": 32,
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TINY_TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": TINY_POOLED_DIM + 6 * TINY_TIME_EMBED_DIM,
}
TINY_UNETS = {"sd": TINY_SD_UNET, "sdxl": TINY_SDXL_UNET}
TINY_EMBEDDER_CHANNELS = (8, 8, 16, 16)  # the paper's 16 / 32 / 96 / 256, shrunk; strides stay ×8
VAE_FACTOR = 8


def tiny_unet(kind: str = "sd", seed: int = 0, **overrides) -> UNet2DConditionModel:
    if kind not in TINY_UNETS:
        raise ValueError(f"kind must be one of {sorted(TINY_UNETS)}, got {kind!r}")
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_UNETS[kind], **overrides})


def tiny_refiner(unet: UNet2DConditionModel, seed: int = 0, **overrides) -> StructureGuidedRefiner:
    """``StructureGuidedRefiner.from_unet`` with toy embedders; seeded, so the embedders' convs repeat."""
    torch.manual_seed(seed)
    return StructureGuidedRefiner.from_unet(unet, **{"embedder_channels": TINY_EMBEDDER_CHANNELS, **overrides})


def dummy_components(kind: str = "sd", seed: int = 0) -> dict:
    """The frozen base UNet (eval mode, ``requires_grad`` off) and a refiner built from it."""
    unet = tiny_unet(kind, seed).eval().requires_grad_(False)
    return {"unet": unet, "refiner": tiny_refiner(unet, seed)}


def dummy_inputs(unet: UNet2DConditionModel, batch: int = 2, seed: int = 1, conditions=CONDITIONS) -> dict:
    """Keyword arguments for ``refiner_forward`` (and, without ``conditions``, the base UNet)."""
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    inputs = {
        "sample": torch.randn(batch, unet.config.in_channels, size, size, generator=generator),
        "timestep": torch.tensor([1, 500, 999, 250][:batch] + [700] * max(0, batch - 4)),
        "encoder_hidden_states": torch.randn(batch, 5, unet.config.cross_attention_dim, generator=generator),
        "conditions": {
            name: torch.rand(batch, 3, size * VAE_FACTOR, size * VAE_FACTOR, generator=generator) * 2 - 1
            for name in conditions
        },
    }
    if unet.config.addition_embed_type == "text_time":
        image = [size * VAE_FACTOR] * 2
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, TINY_POOLED_DIM, generator=generator),
            "time_ids": torch.tensor([image + [0, 0] + image] * batch, dtype=torch.float32),
        }
    return inputs


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int = 0, std: float = 0.05, zero_init_only: bool = False) -> None:
    """Add Gaussian noise to the parameters, as training would move them. ``zero_init_only``: only
    the embedders' projections and the zero convs (what makes a new refiner a no-op)."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in module.named_parameters():
        if zero_init_only and not is_zero_init(name):
            continue
        parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * std)


def is_zero_init(name: str) -> bool:
    """Whether a refiner parameter starts at zero: the zero convs and the embedders' projections."""
    return name.startswith("controlnet_") or (name.startswith("embedders.") and ".proj_out." in name)
