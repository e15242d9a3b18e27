"""Toy-size LSDM components from config with a fixed seed (the diffusers ``get_dummy_components``
pattern), for tests and the tiny benchmarks."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from hyperhuman.lsdm.model import LatentStructuralUNet
from hyperhuman.lsdm.pipeline import make_scheduler

TINY_UNET = {
    "sample_size": 8,
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
IDENTITY_NORM = {name: [0.0, 1.0] for name in ("rgb", "depth", "normal", "pose")}


def tiny_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_UNET, **overrides})


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )


def tiny_text_encoder(seed: int = 0, hidden_size: int = 32):
    """A 2-layer BERT with the packaged MiniLM tokenizer (real vocabulary, random weights)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from hyperhuman.text import minilm_path

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522, hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    return AutoTokenizer.from_pretrained(minilm_path()), BertModel(config).eval()


def dummy_components(seed: int = 0) -> dict:
    tokenizer, text_encoder = tiny_text_encoder(seed)
    unet = LatentStructuralUNet.from_unet(tiny_unet(seed), latent_norm=dict(IDENTITY_NORM))
    return {
        "vae": tiny_vae(seed),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": make_scheduler(),
    }
