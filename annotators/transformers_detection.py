"""Person detection with a transformers object detector (DETR, YOLOS, ...) from a path or hub id.

HumanVerse used YOLOS; any ``AutoModelForObjectDetection`` checkpoint with a "person" label
works (e.g. ``hustvl/yolos-base``, ``facebook/detr-resnet-50`` downloaded beforehand).
Images are batched with same-size images only (no padding), so a batch gives the same boxes
as the images one by one.
"""

from __future__ import annotations

import numpy as np

from annotators.base import Annotator, AnnotatorConfig, load_transformers, map_same_size_batches, to_rgb

DEFAULT_OPTIONS = {"threshold": 0.5, "label": "person"}


class TransformersPersonDetector(Annotator):
    name = "transformers-person-detector"
    version = "1"
    modality = "detection"
    default_options = DEFAULT_OPTIONS

    def __init__(self, config: AnnotatorConfig):
        super().__init__(config)
        self.processor, self.model = load_transformers(config, "AutoModelForObjectDetection")
        labels = {name.lower(): index for index, name in self.model.config.id2label.items()}
        if self.options["label"] not in labels:
            raise ValueError(
                f"detector {config.weights!r} has no {self.options['label']!r} label; "
                f"its labels are {sorted(labels)[:20]} (set options.label)"
            )
        self.person_label = labels[self.options["label"]]

    def _detect(self, images: list[np.ndarray]) -> list[dict]:
        import torch

        inputs = self.processor(images=images, return_tensors="pt").to(self.config.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        sizes = [image.shape[:2] for image in images]
        found = self.processor.post_process_object_detection(
            outputs, threshold=self.options["threshold"], target_sizes=sizes
        )
        results = []
        for (height, width), detection in zip(sizes, found, strict=True):
            keep = detection["labels"] == self.person_label
            boxes = detection["boxes"][keep].float().cpu().numpy()
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
            scores = detection["scores"][keep].float().cpu().numpy()
            order = np.argsort(-scores, kind="stable")
            results.append({"boxes": boxes[order], "scores": scores[order]})
        return results

    def __call__(self, images: list) -> list[dict]:
        """Per image: ``{"boxes": (N, 4) x0 y0 x1 y1 pixels, "scores": (N,)}``, best first."""
        return map_same_size_batches([to_rgb(image) for image in images], self.config.batch_size, self._detect)
