"""The student pose model: an EfficientFormerV2 backbone (timm, built from config, no pretrained
weights) and a small feature-pyramid heatmap head.

    RGB 0..255 → ImageNet normalisation → EfficientFormerV2 stages (strides 4, 8, 16, 32)
      → 1×1 lateral convs to ``head_channels`` → top-down: ×2 nearest upsample + lateral,
        then a depthwise-separable 3×3 block, down to ``heatmap_stride``
      → 1×1 conv → one heatmap per joint at ``heatmap_stride``

Why heatmaps rather than SimCC: the student trains from scratch on a few hundred pseudo-labelled
people; a convolutional heatmap head is translation-equivariant (a joint seen at one place of the
crop teaches every place), while SimCC's fully connected classifiers must see joints at each
position to learn it. The pyramid reaches the stride-4 stage so a joint is placed to a quarter of a
stride-8 cell before the sub-cell refinement of :func:`annotators.efficientformer_pose.decode_heatmaps`.

EfficientFormerV2's attention layers have position biases sized for one input resolution, so the
model is built for ``input_size`` (height, width; multiples of 32) and takes only that size; the
top-down crops are always that size. ``backbone_overrides`` go to ``timm.create_model`` (e.g.
``depths``, ``embed_dims``, ``mlp_ratios`` for a toy-size model in tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from hyperhuman.config import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STAGE_STRIDES = (4, 8, 16, 32)  # EfficientFormerV2's four stages
BACKBONES = ("efficientformerv2_s0", "efficientformerv2_s1", "efficientformerv2_s2", "efficientformerv2_l")


def check_model_config(config: dict) -> None:
    """The model section's values, or a ConfigError naming the key (before anything is built)."""
    backbone = config.get("backbone", "efficientformerv2_s0")
    if backbone not in BACKBONES:
        raise ConfigError(f"model.backbone must be one of {BACKBONES}, got {backbone!r}")
    size = config.get("input_size", (128, 96))
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 32 and v % 32 == 0 for v in size)
    ):
        raise ConfigError(
            f"model.input_size must be [height, width], multiples of 32 (EfficientFormerV2's attention "
            f"runs at stride 32), got {size!r}"
        )
    if config.get("heatmap_stride", 4) not in (4, 8):
        raise ConfigError(f"model.heatmap_stride must be 4 or 8, got {config.get('heatmap_stride')!r}")
    for key, default in (("head_channels", 64), ("num_keypoints", 17)):
        value = config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model.{key} must be a positive integer, got {value!r}")
    overrides = config.get("backbone_overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"model.backbone_overrides must be a mapping of timm arguments, got {overrides!r}")
    refused = {"pretrained", "img_size", "features_only", "out_indices"} & set(overrides)
    if refused:
        raise ConfigError(f"model.backbone_overrides may not set {sorted(refused)}: the student sets them itself")


class SeparableBlock(nn.Sequential):
    """Depthwise 3×3 → pointwise 1×1 → BatchNorm → GELU."""

    def __init__(self, channels: int):
        super().__init__(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.GELU(),
        )


class PoseStudent(ModelMixin, ConfigMixin):
    """Heatmaps ``(B, num_keypoints, H / heatmap_stride, W / heatmap_stride)`` of crops
    ``(B, 3, H, W)``, RGB in 0..255."""

    @register_to_config
    def __init__(
        self,
        backbone: str = "efficientformerv2_s0",
        input_size: tuple[int, int] = (128, 96),
        heatmap_stride: int = 4,
        head_channels: int = 64,
        num_keypoints: int = 17,
        backbone_overrides: dict | None = None,
    ):
        super().__init__()
        import timm

        check_model_config(dict(backbone=backbone, input_size=list(input_size), heatmap_stride=heatmap_stride,
                                head_channels=head_channels, num_keypoints=num_keypoints,
                                backbone_overrides=backbone_overrides))  # fmt: skip
        taps = tuple(i for i, stride in enumerate(STAGE_STRIDES) if stride >= heatmap_stride)
        self.encoder = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=taps,
                                          img_size=tuple(input_size), **(backbone_overrides or {}))  # fmt: skip
        channels = self.encoder.feature_info.channels()
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, head_channels, 1, bias=False), nn.BatchNorm2d(head_channels)) for c in channels
        )
        self.smooth = nn.ModuleList(SeparableBlock(head_channels) for _ in channels[:-1])
        self.final = nn.Conv2d(head_channels, num_keypoints, 1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)

    def freezing_units(self) -> list[list[str]]:
        """SpFDE's freezing units from the input side (:mod:`hyperhuman.efficiency.freezing`): the
        backbone's stem, then each stage; the pyramid head, which reads every stage, never freezes."""
        stages = [name for name, _ in self.encoder.named_children() if name.startswith("stages")]
        return [["encoder.stem*"]] + [[f"encoder.{name}.*"] for name in stages]

    @property
    def heatmap_size(self) -> tuple[int, int]:
        height, width = self.config.input_size
        return height // self.config.heatmap_stride, width // self.config.heatmap_stride

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.encoder((pixels - self.mean) / self.std)
        merged = self.lateral[-1](features[-1])
        for index in reversed(range(len(features) - 1)):
            merged = F.interpolate(merged, scale_factor=2.0, mode="nearest") + self.lateral[index](features[index])
            merged = self.smooth[index](merged)
        return self.final(merged)


def load_student(path: str, device: str | torch.device = "cpu") -> PoseStudent:
    """A saved student (``OUTPUT/student`` or the run folder holding it), in eval mode.
    ``low_cpu_mem_usage=False``: the backbone's attention-bias index buffers are not in the file
    and must be built, not left on the meta device."""
    from pathlib import Path

    folder = Path(path)
    if (folder / "student" / "config.json").is_file():
        folder = folder / "student"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{path!r} holds no student (no config.json, nor student/config.json)")
    return PoseStudent.from_pretrained(str(folder), low_cpu_mem_usage=False).to(device).eval()


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
