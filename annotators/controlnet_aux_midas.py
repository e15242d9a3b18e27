"""MiDaS depth (DPT-Hybrid / DPT-Large, as ControlNet's depth preprocessor) via controlnet-aux,
from a local weights directory holding the original checkpoint file
(``dpt_hybrid-midas-501f0c75.pt`` or ``dpt_large-midas-2f21e586.pt``).

MiDaS predicts relative inverse depth (disparity up to scale and shift): kind
``relative_inverse``. The prediction is made at ``detect_resolution`` (short side, a multiple
of 64, as controlnet-aux does) and resized bilinearly to the image; the raw float values are
kept (controlnet-aux's own call normalises them to an 8-bit picture). The same architectures
in transformers format (``Intel/dpt-hybrid-midas``) run through ``transformers-depth``.
"""

from __future__ import annotations

import os

import numpy as np

from annotators.base import Annotator, AnnotatorConfig, WeightsNotFoundError, resolve_weights, to_rgb

CHECKPOINTS = {"dpt_hybrid": "dpt_hybrid-midas-501f0c75.pt", "dpt_large": "dpt_large-midas-2f21e586.pt"}
DEFAULT_OPTIONS = {"model_type": "dpt_hybrid", "detect_resolution": 384}


class ControlNetAuxMidas(Annotator):
    name = "controlnet-aux-midas"
    version = "0.0.10"
    modality = "depth"
    default_options = DEFAULT_OPTIONS
    kind = "relative_inverse"

    def __init__(self, config: AnnotatorConfig):
        super().__init__(config)
        model_type = self.options["model_type"]
        if model_type not in CHECKPOINTS:
            raise ValueError(f"options.model_type must be one of {sorted(CHECKPOINTS)}, got {model_type!r}")
        directory = resolve_weights(config, allow_patterns=[CHECKPOINTS[model_type]])
        path = os.path.join(directory, CHECKPOINTS[model_type])
        if not os.path.isfile(path):
            raise WeightsNotFoundError(
                f"annotator {config.name!r}: {CHECKPOINTS[model_type]} is missing from {directory}; set 'weights'"
            )
        from controlnet_aux.midas.api import MiDaSInference

        self.model = MiDaSInference(model_type=model_type, model_path=path).to(config.device).eval()

    def depth_one(self, rgb: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        height, width = rgb.shape[:2]
        scale = self.options["detect_resolution"] / min(height, width)
        size = (max(64, round(height * scale / 64) * 64), max(64, round(width * scale / 64) * 64))
        with torch.inference_mode():
            image = torch.from_numpy(rgb).to(self.config.device).permute(2, 0, 1)[None].float() / 127.5 - 1.0
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
            disparity = self.model(image)[:, None]
            disparity = F.interpolate(disparity, size=(height, width), mode="bilinear", align_corners=False)
        return disparity[0, 0].float().cpu().numpy()

    def __call__(self, images: list) -> list[dict]:
        """Per image: ``{"depth": (H, W) float32 relative inverse depth, "kind": "relative_inverse"}``."""
        return [{"depth": self.depth_one(to_rgb(image)), "kind": self.kind} for image in images]
