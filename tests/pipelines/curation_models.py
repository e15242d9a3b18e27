"""Toy-size models of the real architectures the curation steps load (random weights, fixed seed,
saved with ``save_pretrained`` / ``torch.save`` the way real checkpoints are): a CLIP vision
tower with ViT-L/14's 768-d projection, the LAION aesthetic head, and a Stable Diffusion
inpainting pipeline (9-channel UNet, VAE, CLIP text encoder and tokenizer). A plain module, not a
test file, so the Ray job test's workers can import what the registry entries name."""

from __future__ import annotations

import torch

# The curation steps' registry entries (annotators/registry.py lists them once its owner adds them).
REGISTRY_ENTRIES = {
    "laion-aesthetic": "annotators.aesthetic:LaionAesthetic",
    "diffusers-outpaint": "pipelines.outpaint:DiffusersOutpaint",
}
TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}
PROJECTION = 768  # ViT-L/14's: the size the LAION heads take


def register_curation(monkeypatch) -> None:
    from annotators.registry import REGISTRY

    for name, target in REGISTRY_ENTRIES.items():
        monkeypatch.setitem(REGISTRY, name, target)


def save_tiny_clip(path, full: bool = False, seed: int = 0):
    """A CLIP checkpoint with its image processor: a ``CLIPModel`` (``full``, as openai/clip-vit-large-patch14
    is published) or a ``CLIPVisionModelWithProjection``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    if full:
        text = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4}
        text.update(vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=TINY_VISION, projection_dim=PROJECTION))
    else:
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_VISION, projection_dim=PROJECTION))
    model.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def save_aesthetic_head(path, embedding_dim: int = PROJECTION, seed: int = 0, scale: float = 1.0, shift: float = 0.0):
    """The head's state dict as the public ``.pth`` files hold it; its scores are ``scale`` times
    those of the seed's head plus ``shift`` (the head is affine)."""
    from annotators.aesthetic import aesthetic_mlp

    torch.manual_seed(seed)
    head = aesthetic_mlp(embedding_dim)
    with torch.no_grad():
        head.layers[-1].weight *= scale
        head.layers[-1].bias.mul_(scale).add_(shift)
    torch.save(head.state_dict(), path)
    return path


def save_tiny_inpainting(path, in_channels: int = 9, seed: int = 0):
    """A ``StableDiffusionInpaintPipeline`` folder: the LSDM tests' toy UNet and VAE, a toy CLIP text encoder."""
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from hyperhuman.lsdm.testing import tiny_unet, tiny_vae
    from tests.hyperhuman.conftest import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    tokenizer.model_max_length = 77  # the pipeline pads prompts to it
    special = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,  # the toy UNet's cross_attention_dim
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            **special,
        )
    )
    pipeline = StableDiffusionInpaintPipeline(
        vae=tiny_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_unet(seed, in_channels=in_channels),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path)
    return path
