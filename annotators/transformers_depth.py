"""Monocular depth with a transformers depth-estimation model (DPT, Depth Anything, ...).

Load from a local directory or hub id (e.g. ``Intel/dpt-hybrid-midas``,
``depth-anything/Depth-Anything-V2-Small-hf``, ``Intel/zoedepth-nyu-kitti`` downloaded
beforehand). These models predict
*relative inverse depth* (disparity up to scale and shift), recorded as kind
``relative_inverse``; metric checkpoints (ZoeDepth, Depth Anything metric) set
``options.kind`` to ``metric_m``. The prediction is resized to the input image with the processor's own
post-processing.
"""

from __future__ import annotations

import inspect

import numpy as np

from annotators.base import Annotator, AnnotatorConfig, load_transformers, map_same_size_batches, to_rgb

DEFAULT_OPTIONS = {"kind": "relative_inverse"}


class TransformersDepth(Annotator):
    name = "transformers-depth"
    version = "1"
    modality = "depth"
    default_options = DEFAULT_OPTIONS

    def __init__(self, config: AnnotatorConfig):
        super().__init__(config)
        self.kind = self.options["kind"]
        self.processor, self.model = load_transformers(config, "AutoModelForDepthEstimation")

    def _predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        inputs = self.processor(images=images, return_tensors="pt").to(self.config.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        sizes = [image.shape[:2] for image in images]
        post_process = self.processor.post_process_depth_estimation
        if "source_sizes" in inspect.signature(post_process).parameters:
            # ZoeDepth pads its input and needs the source sizes to remove the padding
            predictions = post_process(outputs, source_sizes=sizes, target_sizes=sizes)
        else:
            predictions = post_process(outputs, target_sizes=sizes)
        return [prediction["predicted_depth"].float().cpu().numpy() for prediction in predictions]

    def __call__(self, images: list) -> list[dict]:
        """Per image: ``{"depth": (H, W) float32, "kind": ...}`` at the image's own size."""
        depths = map_same_size_batches([to_rgb(image) for image in images], self.config.batch_size, self._predict)
        return [{"depth": depth.astype(np.float32), "kind": self.kind} for depth in depths]
