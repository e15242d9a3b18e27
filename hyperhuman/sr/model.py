"""A WDSR-style ×s super-resolution network (Yu et al. 2018, "Wide Activation for Efficient and
Accurate Image Super-Resolution", WDSR-A), the network the compiler-aware SR search prunes.

    LR (B, 3, h, w) in [0, 1]
      ├─ head: conv3×3 3 → C ─ residual blocks ─ tail: conv3×3 C → 3·s² ─ pixel shuffle ─┐
      └─ skip: conv5×5 3 → 3·s² ─ pixel shuffle ──────────────────────────────────────────── + → SR (B, 3, s·h, s·w)

Each residual block is ``x + conv3×3(ReLU(conv3×3(x)))`` with a *wide* inner activation (C → inner
→ C; WDSR's point is to spend the channels before the ReLU, where they pay most). Inputs are
centred at 0.5 (WDSR subtracts the dataset mean), outputs are not clamped while training; use
:meth:`SuperResolutionNet.upscale` for images.

Two things in the config make a pruned network an ordinary model of this class:

- ``widths``: the inner width of every block (``None``: all ``inner_channels``);
- ``skipped_blocks``: the indices of blocks removed by the depth search. Blocks live in a
  ``ModuleDict`` keyed by their index in the unpruned network, so a kept block's parameters keep
  their names (``blocks.3.conv1.weight``) whichever blocks before it were skipped.

``save_pretrained`` / ``from_pretrained`` (diffusers' ``ModelMixin``) store and rebuild both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

INPUT_MEAN = 0.5  # WDSR centres its input on the data mean; 0.5 keeps the network data-independent


class ResidualBlock(nn.Module):
    """``x + conv2(ReLU(conv1(x)))``, ``conv1``: channels → inner, ``conv2``: inner → channels."""

    def __init__(self, channels: int, inner: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, inner, 3, padding=1)
        self.act = nn.ReLU(inplace=False)  # a mask pre-hook on conv2 reads this output: keep it a new tensor
        self.conv2 = nn.Conv2d(inner, channels, 3, padding=1)

    @property
    def inner(self) -> int:
        return self.conv1.out_channels

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.conv2(self.act(self.conv1(hidden)))


class SuperResolutionNet(ModelMixin, ConfigMixin):
    """WDSR-A at ``scale`` ×: ``num_blocks`` wide-activation residual blocks of ``channels`` (see the
    module docstring for ``widths`` and ``skipped_blocks``)."""

    @register_to_config
    def __init__(
        self,
        scale: int = 2,
        channels: int = 32,
        num_blocks: int = 8,
        inner_channels: int = 128,
        widths: Sequence[int] | None = None,
        skipped_blocks: Sequence[int] = (),
    ):
        super().__init__()
        widths = [inner_channels] * num_blocks if widths is None else list(widths)
        if scale < 1 or channels < 1 or num_blocks < 0 or inner_channels < 1:
            raise ValueError(
                f"scale={scale}, channels={channels}, num_blocks={num_blocks}, inner_channels={inner_channels}: "
                "all must be positive (num_blocks may be 0)"
            )
        if len(widths) != num_blocks or any(not 1 <= w <= inner_channels for w in widths):
            raise ValueError(
                f"widths={widths}: give one inner width per block ({num_blocks}), each in 1..{inner_channels}"
            )
        if bad := sorted(set(skipped_blocks) - set(range(num_blocks))):
            raise ValueError(f"skipped_blocks has {bad}, which are not block indices 0..{num_blocks - 1}")
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.ModuleDict(
            {str(i): ResidualBlock(channels, widths[i]) for i in range(num_blocks) if i not in set(skipped_blocks)}
        )
        self.tail = nn.Conv2d(channels, 3 * scale**2, 3, padding=1)
        self.skip = nn.Conv2d(3, 3 * scale**2, 5, padding=2)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, low_resolution: torch.Tensor) -> torch.Tensor:
        """``(B, 3, h, w)`` in [0, 1] → ``(B, 3, scale·h, scale·w)``, roughly [0, 1] (unclamped)."""
        centred = low_resolution - INPUT_MEAN
        hidden = self.head(centred)
        for block in self.blocks.values():
            hidden = block(hidden)
        return self.shuffle(self.tail(hidden)) + self.shuffle(self.skip(centred)) + INPUT_MEAN

    def block_widths(self) -> dict[int, int]:
        """Index in the unpruned network → inner width, for the blocks present."""
        return {int(index): block.inner for index, block in self.blocks.items()}

    @torch.inference_mode()
    def upscale(self, images: Sequence[PIL.Image.Image], batch_size: int = 1) -> list[PIL.Image.Image]:
        """RGB images → ``scale``× larger RGB images (uint8; any size, one at a time by default since
        sizes may differ)."""
        upscaled = []
        device, dtype = self.device, self.dtype
        for start in range(0, len(images), batch_size):
            chunk = [image.convert("RGB") for image in images[start : start + batch_size]]
            if len({image.size for image in chunk}) > 1:
                sizes = [image.size for image in chunk]
                raise ValueError(f"a batch of images of different sizes {sizes}: use batch_size=1")
            pixels = torch.from_numpy(np.stack([np.asarray(image) for image in chunk])).permute(0, 3, 1, 2)
            output = self(pixels.to(device, dtype) / 255).clamp(0, 1)
            for array in (output * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy():
                upscaled.append(PIL.Image.fromarray(array))
        return upscaled
