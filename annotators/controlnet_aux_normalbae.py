"""Surface normals with NormalBae (Bae et al. 2021, as packaged by controlnet-aux), from a local
weights directory holding ``scannet.pt`` (e.g. from ``lllyasviel/Annotators``).

NormalBae predicts unit normals in the ScanNet convention that ControlNet 1.1's
``control_v11p_sd15_normalbae`` documents as "blue = front, red = left, green = top"; ours is
x right, y up, z toward the viewer (see :mod:`shards.codecs`), so x is negated by default
(``options.flip_x``). The prediction is made at ``detect_resolution`` (short side, multiple of
64 as in controlnet-aux), resized bilinearly to the image and renormalised.
"""

from __future__ import annotations

import os
import types

import numpy as np

from annotators.base import Annotator, AnnotatorConfig, WeightsNotFoundError, resolve_weights, to_rgb

DEFAULT_OPTIONS = {"detect_resolution": 512, "flip_x": True, "flip_y": False, "flip_z": False}
CHECKPOINT = "scannet.pt"


class ControlNetAuxNormalBae(Annotator):
    name = "controlnet-aux-normalbae"
    version = "0.0.10"
    modality = "normal"
    default_options = DEFAULT_OPTIONS

    def __init__(self, config: AnnotatorConfig):
        super().__init__(config)
        directory = resolve_weights(config, allow_patterns=[CHECKPOINT])
        path = os.path.join(directory, CHECKPOINT)
        if not os.path.isfile(path):
            raise WeightsNotFoundError(
                f"annotator {config.name!r}: {CHECKPOINT} is missing from {directory}; set 'weights'"
            )
        import torch
        import torchvision.transforms as transforms
        from controlnet_aux.normalbae import load_checkpoint
        from controlnet_aux.normalbae.nets.NNET import NNET

        # the architecture arguments controlnet-aux uses for the ScanNet checkpoint
        args = types.SimpleNamespace(
            mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4, importance_ratio=0.7
        )
        self.model = load_checkpoint(path, NNET(args)).to(config.device).eval()
        self.normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
        self.signs = torch.tensor(
            [-1.0 if self.options[f"flip_{axis}"] else 1.0 for axis in "xyz"], device=config.device
        ).view(1, 3, 1, 1)

    def normal_one(self, rgb: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        height, width = rgb.shape[:2]
        scale = self.options["detect_resolution"] / min(height, width)
        size = (max(64, round(height * scale / 64) * 64), max(64, round(width * scale / 64) * 64))
        with torch.inference_mode():
            image = torch.from_numpy(rgb).to(self.config.device).permute(2, 0, 1)[None].float() / 255.0
            image = self.normalize(
                F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
            )
            normal = self.model(image)[0][-1][:, :3] * self.signs
            normal = F.interpolate(normal, size=(height, width), mode="bilinear", align_corners=False)
            normal = normal / normal.norm(dim=1, keepdim=True).clamp_min(1e-6)
        return normal[0].permute(1, 2, 0).float().cpu().numpy()

    def __call__(self, images: list) -> list[np.ndarray]:
        """Unit normals ``(H, W, 3)`` float32 per image, x right / y up / z toward the viewer."""
        return [self.normal_one(to_rgb(image)) for image in images]
