"""Captions from a transformers image-to-text model (BLIP, BLIP-2, ...) from a path or hub id.

E.g. ``Salesforce/blip-image-captioning-large`` or ``Salesforce/blip2-opt-2.7b`` (HumanVerse
used BLIP-2), downloaded beforehand. Decoding is greedy (deterministic) unless
``options.num_beams`` > 1. ``options.keep_source: true`` keeps a non-empty source caption and
only captions images without one.
"""

from __future__ import annotations

import numpy as np

from annotators.base import Annotator, AnnotatorConfig, load_transformers, map_same_size_batches, to_rgb

DEFAULT_OPTIONS = {"max_new_tokens": 40, "num_beams": 1, "prompt": None, "keep_source": False}


class TransformersCaption(Annotator):
    name = "transformers-caption"
    version = "1"
    modality = "caption"
    inputs = ("captions",)
    default_options = DEFAULT_OPTIONS

    def __init__(self, config: AnnotatorConfig):
        super().__init__(config)
        self.processor, self.model = load_transformers(config, "AutoModelForImageTextToText", "AutoProcessor")

    def _caption(self, images: list[np.ndarray]) -> list[str]:
        import torch

        prompt = self.options["prompt"]
        text = None if prompt is None else [prompt] * len(images)
        inputs = self.processor(images=images, text=text, return_tensors="pt").to(self.config.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            tokens = self.model.generate(
                **inputs,
                max_new_tokens=self.options["max_new_tokens"],
                num_beams=self.options["num_beams"],
                do_sample=False,
            )
        return [" ".join(text.split()) for text in self.processor.batch_decode(tokens, skip_special_tokens=True)]

    def __call__(self, images: list, captions: list[str | None] | None = None) -> list[str]:
        captions = captions if captions is not None else [None] * len(images)
        todo = [
            i for i, caption in enumerate(captions) if not (self.options["keep_source"] and caption and caption.strip())
        ]
        generated = map_same_size_batches([to_rgb(images[i]) for i in todo], self.config.batch_size, self._caption)
        result = [" ".join((caption or "").split()) for caption in captions]
        for index, text in zip(todo, generated, strict=True):
            result[index] = text
        return result
