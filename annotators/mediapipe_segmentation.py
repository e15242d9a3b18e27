"""Offline default person mask: MediaPipe selfie segmentation (bundled in mediapipe 0.10.21)."""

from __future__ import annotations

import numpy as np

from annotators.base import Annotator, AnnotatorConfig, to_rgb

DEFAULT_OPTIONS = {
    "model_selection": 0,  # 0: general (256x256 input), 1: landscape (144x256)
    "threshold": None,  # None: soft mask 0..255; a float in (0, 1): binary 0/255
}


class MediaPipeSelfieMask(Annotator):
    name = "mediapipe-selfie-segmentation"
    version = "0.10.21"
    modality = "mask"
    default_options = DEFAULT_OPTIONS

    def __init__(self, config: AnnotatorConfig):
        super().__init__(config)
        if self.options["model_selection"] not in (0, 1):
            raise ValueError(f"model_selection must be 0 or 1, got {self.options['model_selection']}")
        import mediapipe as mp

        self._segmenter = mp.solutions.selfie_segmentation.SelfieSegmentation(
            model_selection=self.options["model_selection"]
        )

    @property
    def weights_id(self) -> str:
        model = ("selfie_segmentation", "selfie_segmentation_landscape")[self.options["model_selection"]]
        return f"mediapipe-0.10.21/{model}.tflite"

    def __call__(self, images: list) -> list[np.ndarray]:
        """uint8 ``(H, W)`` masks: 0 background, 255 person (soft unless ``threshold`` is set)."""
        masks = []
        for image in images:
            confidence = self._segmenter.process(to_rgb(image)).segmentation_mask
            threshold = self.options["threshold"]
            if threshold is None:
                masks.append(np.clip(np.round(confidence * 255.0), 0, 255).astype(np.uint8))
            else:
                masks.append(np.where(confidence > threshold, 255, 0).astype(np.uint8))
        return masks
