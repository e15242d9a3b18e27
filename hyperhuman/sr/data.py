"""Super-resolution pairs: a high-resolution image and its bicubic downscale (the "bicubic ×s"
degradation every SR benchmark since SRCNN uses), and the photos the network is scored on.

Training pairs come from shard RGB (:class:`hyperhuman.lsdm.data.Batches`: the same seeded,
resumable stream as the LSDM's, random crops and flips included): the crop at ``data.resolution``
is the target, its ×s bicubic downscale with anti-aliasing the input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def downscale(high: torch.Tensor, scale: int) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] (H, W multiples of ``scale``) → its bicubic ×1/s with anti-aliasing."""
    if high.shape[-1] % scale or high.shape[-2] % scale:
        raise ValueError(f"an image of {tuple(high.shape[-2:])} is not divisible by the scale {scale}; crop it first")
    size = (high.shape[-2] // scale, high.shape[-1] // scale)
    return F.interpolate(high, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def bicubic_upscale(low: torch.Tensor, scale: int) -> torch.Tensor:
    """The baseline every SR network must beat: plain bicubic ×s."""
    return F.interpolate(low, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)


def batch_pairs(batch: dict, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A collated shard batch → ``(low, high)`` in [0, 1]."""
    high = ((batch["pixel_values"].float() + 1) / 2).clamp(0, 1)
    return downscale(high, scale), high


def crop_to_multiple(image: PIL.Image.Image, multiple: int, max_side: int | None = None) -> PIL.Image.Image:
    """The centre crop whose sides are multiples of ``multiple`` (and at most ``max_side``)."""
    width, height = image.size
    if max_side:
        width, height = min(width, max_side), min(height, max_side)
    width, height = width // multiple * multiple, height // multiple * multiple
    if width < multiple or height < multiple:
        raise ValueError(f"an image of {image.size} is smaller than the scale {multiple}")
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """An RGB image → ``(1, 3, H, W)`` float in [0, 1]."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None].float() / 255


def photo_paths(source: str | Path | list) -> list[Path]:
    """A folder's images (sorted by name) or a list of image paths; a clear error for neither."""
    if isinstance(source, list | tuple):
        paths = [Path(path) for path in source]
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise FileNotFoundError(f"{str(folder)!r} is not a folder of photos; give a folder or a list of images")
        paths = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if missing := [str(path) for path in paths if not path.is_file()]:
        raise FileNotFoundError(f"these photos do not exist: {missing}")
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {source!r}")
    return paths
