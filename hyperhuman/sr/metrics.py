"""PSNR and SSIM as SR papers report them: on the luma (Y of BT.601 YCbCr, 16–235) of images in
[0, 1], with ``scale`` pixels shaved off every border (EDSR / WDSR's convention), SSIM with an
11×11 Gaussian window of σ = 1.5 (Wang et al. 2004).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import PIL.Image
import torch
import torch.nn.functional as F

from hyperhuman.sr.data import bicubic_upscale, crop_to_multiple, downscale, to_tensor

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_C1, SSIM_C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def luma(image: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` RGB in [0, 1] → ``(B, 1, H, W)`` Y in [16, 235] (MATLAB's rgb2ycbcr)."""
    weights = torch.tensor([65.481, 128.553, 24.966], dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    return 16 + (image * weights).sum(dim=1, keepdim=True)


def _shave(image: torch.Tensor, border: int) -> torch.Tensor:
    return image[..., border:-border, border:-border] if border else image


def psnr(output: torch.Tensor, target: torch.Tensor, border: int = 0) -> float:
    """PSNR (dB) of the Y channel, 255 peak, the batch averaged as one image set."""
    error = (_shave(luma(output.clamp(0, 1)), border) - _shave(luma(target), border)).double().square().mean()
    return math.inf if error == 0 else 10 * math.log10(255**2 / float(error))


def ssim(output: torch.Tensor, target: torch.Tensor, border: int = 0) -> float:
    """Mean SSIM of the Y channel."""
    x = _shave(luma(output.clamp(0, 1)), border).double()
    y = _shave(luma(target), border).double()
    coords = torch.arange(SSIM_WINDOW, dtype=torch.float64) - SSIM_WINDOW // 2
    gauss = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    window = (gauss[:, None] * gauss[None, :] / gauss.sum() ** 2).view(1, 1, SSIM_WINDOW, SSIM_WINDOW)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window.to(t.device))

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_x**2 + mu_y**2 + SSIM_C1) * (var_x + var_y + SSIM_C2)
    )
    return float(ssim_map.mean())


@torch.inference_mode()
def evaluate(model, photos: Sequence[str | Path | PIL.Image.Image], max_side: int | None = None) -> dict:
    """PSNR / SSIM of ``model`` and of bicubic on held-out photos, each degraded by bicubic ×1/s.

    Photos are centre-cropped to multiples of the scale (and ``max_side``); the scores are the
    mean over photos (as SR benchmarks average per image)."""
    scale = model.config.scale
    scores = {"psnr": [], "ssim": [], "bicubic_psnr": [], "bicubic_ssim": []}
    for photo in photos:
        image = photo if isinstance(photo, PIL.Image.Image) else PIL.Image.open(photo)
        high = to_tensor(crop_to_multiple(image, scale, max_side))
        low = downscale(high, scale)
        output = model(low.to(model.device, model.dtype)).float().cpu()
        baseline = bicubic_upscale(low, scale)
        for prefix, upscaled in (("", output), ("bicubic_", baseline)):
            scores[f"{prefix}psnr"].append(psnr(upscaled, high, border=scale))
            scores[f"{prefix}ssim"].append(ssim(upscaled, high, border=scale))
    means = {key: sum(values) / len(values) for key, values in scores.items()}
    return {**means, "photos": len(photos), "psnr_over_bicubic_db": means["psnr"] - means["bicubic_psnr"]}
