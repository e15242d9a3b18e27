"""pix2pix's PatchGAN discriminator, conditioned on the input image.

It scores overlapping patches of ``concat(input, edited)`` (one logit per patch: a 70×70 receptive
field at pix2pix's ``num_layers=3``), so it judges local texture and style, the L1 term the global
layout. Layers: a 4×4 stride-2 conv and LeakyReLU(0.2), ``num_layers - 1`` more stride-2 convs with
InstanceNorm, one stride-1, then a 1-channel stride-1 conv (raw logits: the adversarial loss of
:mod:`distill.e2gan.train` decides what they mean).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from hyperhuman.config import ConfigError


class PatchDiscriminator(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, in_channels: int = 6, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        for key, value in (("in_channels", in_channels), ("base_channels", base_channels), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"discriminator.{key} must be a positive integer, got {value!r}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        channels = base_channels
        for index in range(1, num_layers + 1):
            out = base_channels * 2 ** min(index, 3)
            stride = 2 if index < num_layers else 1
            layers += [nn.Conv2d(channels, out, 4, stride=stride, padding=1), nn.InstanceNorm2d(out, affine=True),
                       nn.LeakyReLU(0.2)]  # fmt: skip
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
        """Patch logits ``(B, 1, h, w)`` for ``edited`` as an edit of ``image`` (both (B, 3, H, W))."""
        return self.net(torch.cat([image, edited], dim=1))
