"""The LAION improved aesthetic predictor, HumanVerse's aesthetic filter (it kept scores ≥ 4.5).

A score on the AVA scale (mean human rating, 1–10) from the image's CLIP ViT-L/14 embedding,
L2-normalised, through a small MLP head (christophschuhmann/improved-aesthetic-predictor):

- ``weights``: the CLIP checkpoint, a local folder or a hub id already in the cache, e.g.
  ``openai/clip-vit-large-patch14``: a full ``CLIPModel`` (its vision tower and projection are
  loaded) or a ``CLIPVisionModelWithProjection`` folder;
- ``options.head``: the head's file, e.g. ``sac+logos+ava1-l14-linearMSE.pth`` (LAION-5B's
  aesthetic scores), a torch state dict with keys ``layers.0.weight`` … ``layers.7.bias``.

The embedding is CLIP's projected image embedding (``image_embeds``, what OpenAI CLIP's
``encode_image`` returns, 768-d for ViT-L/14), preprocessed by the checkpoint's own image
processor (resize the shorter side, centre crop, CLIP's mean and std). The head runs in float32
whatever ``dtype`` CLIP runs in. The annotate stage records the score in each sample's
metadata (``aesthetic.score``); the filter rule ``filters.min_aesthetic`` rejects below it.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from annotators.base import Annotator, AnnotatorConfig, WeightsNotFoundError, resolve_weights, to_rgb

DEFAULT_OPTIONS = {"head": None}
HIDDEN_SIZES = (1024, 128, 64, 16)  # the published head's layers after the embedding, before the score
DROPOUT = (0.2, 0.2, 0.1)  # inactive in eval mode; kept so the module is the published one


def aesthetic_mlp(embedding_dim: int = 768):
    """The head exactly as published: linear layers with dropout between the first four and no
    activation anywhere (the ReLUs are commented out upstream), so it is affine in the embedding.
    Its state dict keys are ``layers.{0,2,4,6,7}.{weight,bias}``."""
    from torch import nn

    head = nn.Module()
    head.layers = nn.Sequential(
        nn.Linear(embedding_dim, HIDDEN_SIZES[0]),
        nn.Dropout(DROPOUT[0]),
        nn.Linear(HIDDEN_SIZES[0], HIDDEN_SIZES[1]),
        nn.Dropout(DROPOUT[1]),
        nn.Linear(HIDDEN_SIZES[1], HIDDEN_SIZES[2]),
        nn.Dropout(DROPOUT[2]),
        nn.Linear(HIDDEN_SIZES[2], HIDDEN_SIZES[3]),
        nn.Linear(HIDDEN_SIZES[3], 1),
    )
    return head


def load_clip_vision(config: AnnotatorConfig):
    """``(image processor, CLIPVisionModelWithProjection)`` from ``config.weights``, in
    ``config.dtype`` on ``config.device``, in eval mode."""
    import torch
    from transformers import AutoConfig, AutoImageProcessor, CLIPVisionModelWithProjection

    path = resolve_weights(config)
    clip_config = AutoConfig.from_pretrained(path)
    kwargs = {"dtype": getattr(torch, config.dtype)}
    if clip_config.model_type == "clip":
        # A full CLIP checkpoint keeps the projection size at its top level; the vision config
        # alone would default to 512 and refuse ViT-L/14's 768-d projection.
        vision = clip_config.vision_config
        vision.projection_dim = clip_config.projection_dim
        kwargs["config"] = vision
    elif clip_config.model_type != "clip_vision_model":
        raise ValueError(
            f"annotator {config.name!r}: weights {config.weights!r} are a {clip_config.model_type!r} model, not "
            "CLIP; set 'weights' to a CLIP checkpoint such as openai/clip-vit-large-patch14"
        )
    model = CLIPVisionModelWithProjection.from_pretrained(path, **kwargs)
    return AutoImageProcessor.from_pretrained(path), model.to(config.device).eval()


def load_head(config: AnnotatorConfig, embedding_dim: int):
    """The MLP head from ``options.head``, checked against the published architecture."""
    import torch

    path = config.options.get("head")
    if not path or not os.path.isfile(path):
        raise WeightsNotFoundError(
            f"annotator {config.name!r} needs the aesthetic MLP head file, got options.head={path!r}: set "
            "annotators.aesthetic.options.head to e.g. /weights/sac+logos+ava1-l14-linearMSE.pth "
            "(from christophschuhmann/improved-aesthetic-predictor)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    head = aesthetic_mlp(embedding_dim)
    expected = {name: tuple(value.shape) for name, value in head.state_dict().items()}
    found = {name: tuple(value.shape) for name, value in state.items()} if isinstance(state, dict) else {}
    if found != expected:
        raise ValueError(
            f"annotator {config.name!r}: {path} is not an improved-aesthetic-predictor head for {embedding_dim}-d "
            f"CLIP embeddings (the projection size of {config.weights!r}): expected tensors {expected}, found "
            f"{found}. The LAION heads take CLIP ViT-L/14 embeddings (768-d)."
        )
    head.load_state_dict(state)
    return head.to(config.device).eval()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class LaionAesthetic(Annotator):
    name = "laion-aesthetic"
    version = "1"
    modality = "aesthetic"
    default_options = DEFAULT_OPTIONS

    def __init__(self, config: AnnotatorConfig):
        super().__init__(config)
        self.processor, self.clip = load_clip_vision(config)
        self.head = load_head(config, self.clip.config.projection_dim)
        self.head_sha256 = file_sha256(config.options["head"])

    @property
    def weights_id(self) -> str:
        return f"{self.config.weights} + {self.config.options['head']}"

    def provenance(self) -> dict:
        return {**super().provenance(), "head_sha256": self.head_sha256}

    def embed(self, images: list[np.ndarray]):
        """L2-normalised CLIP image embeddings, float32 ``(N, D)``."""
        import torch

        inputs = self.processor(images=images, return_tensors="pt").to(self.config.device)
        with torch.inference_mode():
            embeddings = self.clip(pixel_values=inputs["pixel_values"].to(self.clip.dtype)).image_embeds.float()
        # as upstream: a zero embedding is left as is rather than divided by zero
        norms = embeddings.norm(dim=-1, keepdim=True)
        return embeddings / torch.where(norms == 0, torch.ones_like(norms), norms)

    def __call__(self, images: list) -> list[float]:
        """One aesthetic score per image (CLIP resizes every image, so any sizes batch together)."""
        import torch

        scores: list[float] = []
        rgb = [to_rgb(image) for image in images]
        for start in range(0, len(rgb), self.config.batch_size):
            embeddings = self.embed(rgb[start : start + self.config.batch_size])
            with torch.inference_mode():
                scores += self.head.layers(embeddings)[:, 0].tolist()
        return scores
