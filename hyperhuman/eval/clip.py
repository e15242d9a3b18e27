"""FID_CLIP and CLIP score: a CLIP model from a local folder, and the two metrics on its embeddings.

- **FID_CLIP** (:func:`fid_clip`): FID on CLIP image embeddings (the projected, unnormalised
  ``get_image_features`` output, as clean-fid's ``clip_vit_b_32`` mode) of real vs generated;
  batch by batch it is :func:`hyperhuman.eval.fid.fid_from_statistics` on those embeddings.
- **CLIP score** (:func:`clip_score`): ``100 · max(cos(image, prompt), 0)`` per pair, averaged
  (Hessel et al. 2021, w = 100). torchmetrics' ``CLIPScore`` clamps the *mean* instead of each
  pair; the two agree whenever no pair has a negative cosine (always the case with real CLIP
  weights in practice). Captions longer than the text model's context are truncated keeping the
  end-of-text token (as OpenAI's ``clip.tokenize(truncate=True)``).

Weights: a transformers ``CLIPModel`` folder with its processor (e.g. ``openai/clip-vit-large-patch14``
fetched with ``huggingface-cli download ... --local-dir PATH`` elsewhere), loaded with
``local_files_only=True``; nothing is downloaded.

How it was checked (``tests/hyperhuman/test_metrics.py``; torchmetrics 1.9.0, transformers 5.24):
``clip_similarities`` against torchmetrics' CLIP-score code on a toy random ``CLIPModel`` saved to
disk (max difference 3.5e-6 on a 0-100 scale; torchmetrics 1.9 needs a shim there, as transformers
5 returns ModelOutputs from ``get_*_features``); FID_CLIP against torchmetrics' FID on our CLIP
module (2e-8).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from hyperhuman.config import ConfigError
from hyperhuman.eval.fid import as_image_batch, default_device, fid_from_features


class ClipFeatures(torch.nn.Module):
    """A transformers CLIP model and its processor from a local folder (``local_files_only``).

    ``image_embeddings`` / ``text_embeddings`` are the projected, unnormalised embeddings
    (``get_image_features`` / ``get_text_features``), float32 ``(N, D)`` on the CPU. Calling the
    module gives the image embeddings, so it is also a :class:`FeatureExtractor` (FID_CLIP).
    """

    def __init__(self, path: str | os.PathLike, batch_size: int = 32, device=None):
        super().__init__()
        path = os.fspath(path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(
                f"no CLIP model at {path!r} (no config.json there). Fetch a CLIPModel folder with its processor "
                "(e.g. `huggingface-cli download openai/clip-vit-large-patch14 --local-dir PATH` on a machine with "
                "network) and give its local path"
            )
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
            self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load a CLIPModel and CLIPProcessor from {path!r}: {exc}") from exc
        self.batch_size = batch_size
        self.device = default_device(device)
        self.model.to(self.device)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @staticmethod
    def _tensor(output) -> torch.Tensor:
        # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        images = as_image_batch(images)
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = list(images[start : start + self.batch_size])
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(self._tensor(self.model.get_image_features(pixel_values=pixels)).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(prompt, str) for prompt in prompts):
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        out = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.processor(
                text=prompts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            )
            features = self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
            )
            out.append(self._tensor(features).float().cpu())
        return torch.cat(out)

    def forward(self, images) -> torch.Tensor:
        return self.image_embeddings(images)


def similarities_from_embeddings(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> np.ndarray:
    """``100 · cos`` of paired image and text embeddings ``(N, D)`` (float64, unclamped)."""
    if len(image_embeddings) != len(text_embeddings):
        raise ValueError(f"{len(image_embeddings)} image embeddings but {len(text_embeddings)} text embeddings")
    image, text = image_embeddings.double(), text_embeddings.double()
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return (100 * (image * text).sum(-1)).numpy()


def clip_similarities(clip, images, prompts: Sequence[str]) -> np.ndarray:
    """``100 · cos(image, prompt)`` per pair (float64, unclamped); ``clip`` as :class:`ClipFeatures`."""
    images = as_image_batch(images)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts; give one prompt per image")
    return similarities_from_embeddings(clip.image_embeddings(images), clip.text_embeddings(prompts))


def clip_score(clip, images, prompts: Sequence[str]) -> float:
    """CLIP score: mean over pairs of ``100 · max(cos(image, prompt), 0)`` (see the module notes)."""
    return float(np.maximum(clip_similarities(clip, images, prompts), 0).mean())


def fid_clip(clip, real_images, generated_images) -> float:
    """FID on CLIP image embeddings (FID_CLIP) of real vs generated uint8 images."""
    return fid_from_features(clip.image_embeddings(real_images), clip.image_embeddings(generated_images))
