"""Training tensors ↔ the images the VAE sees: every structure map becomes 3 channels in [-1, 1].

The LSDM encodes RGB, depth, surface normal and the pose skeleton with one VAE (HyperHuman,
sec. 3.2), so each modality is first turned into an image-like tensor:

- depth → *nearness* (near = +1, far and invalid = -1), normalised per sample between robust
  percentiles, replicated to 3 channels; relative depth models disagree on scale and shift, so
  only the per-image ordering is learnt (as MiDaS-style training does);
- normal → the unit vector itself (x right, y up, z toward the viewer), already in [-1, 1];
- pose → the OpenPose-style COCO-17 skeleton rendered at the training resolution.

The inverse maps (``*_to_image``) turn generated tensors back into uint8 images.
"""

from __future__ import annotations

import numpy as np
import torch

NEAR_PERCENTILES = (0.02, 0.98)


def depth_to_unit(depth: torch.Tensor, kinds: list[str] | str = "metric") -> torch.Tensor:
    """``(B, 1, H, W)`` depth in its kind's units → ``(B, 3, H, W)`` nearness in [-1, 1].

    Zero or negative depth is treated as missing (far). ``kinds`` per sample: kinds containing
    ``inverse`` or ``disparity`` already grow toward the camera.
    """
    if depth.ndim == 3:
        depth = depth[None]
    kinds = [kinds] * depth.shape[0] if isinstance(kinds, str) else list(kinds)
    out = torch.full_like(depth, -1.0)
    for index, kind in enumerate(kinds):
        values = depth[index]
        valid = values > 0
        if not valid.any():
            continue
        inverse = "inverse" in kind or "disparity" in kind
        nearness = values if inverse else -values
        low, high = torch.quantile(nearness[valid].float(), torch.tensor(NEAR_PERCENTILES, dtype=torch.float32))
        scaled = ((nearness - low) / (high - low).clamp_min(1e-6)).clamp(0, 1) * 2 - 1
        out[index] = torch.where(valid, scaled, torch.full_like(scaled, -1.0))
    return out.expand(-1, 3, -1, -1).contiguous()


def pose_to_unit(keypoints: torch.Tensor, num_people: torch.Tensor | list[int], size: tuple[int, int]) -> torch.Tensor:
    """``(B, P, 17, 3)`` keypoints in output pixels → ``(B, 3, H, W)`` skeleton renders in [-1, 1]."""
    from hyperhuman.skeleton import render_pose

    height, width = size
    renders = []
    for people, count in zip(keypoints, num_people, strict=True):
        pose = {"width": width, "height": height, "people": [{"keypoints": k.tolist()} for k in people[: int(count)]]}
        renders.append(torch.from_numpy(render_pose(pose, wholebody=False)))
    return image_to_unit(torch.stack(renders))


def image_to_unit(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` → float ``(B, 3, H, W)`` in [-1, 1]."""
    images = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def unit_to_image(tensor: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` in [-1, 1] → uint8 ``(B, H, W, 3)``."""
    array = ((tensor.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


def unit_to_nearness(tensor: torch.Tensor) -> np.ndarray:
    """A generated depth tensor ``(B, 3, H, W)`` → float ``(B, H, W)`` nearness in [0, 1]."""
    return ((tensor.detach().float().mean(dim=1).clamp(-1, 1) + 1) / 2).cpu().numpy()


def unit_to_normal(tensor: torch.Tensor) -> np.ndarray:
    """A generated normal tensor ``(B, 3, H, W)`` → unit vectors ``(B, H, W, 3)``."""
    normal = tensor.detach().float().permute(0, 2, 3, 1)
    return (normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-6)).cpu().numpy()


def batch_to_units(batch: dict) -> dict[str, torch.Tensor]:
    """A collated :class:`shards.dataset.SampleTransform` batch → ``rgb``/``depth``/``normal``/``pose``
    tensors ``(B, 3, H, W)`` in [-1, 1]."""
    rgb = batch["pixel_values"]
    size = tuple(rgb.shape[-2:])
    return {
        "rgb": rgb,
        "depth": depth_to_unit(batch["depth"], batch.get("depth_kind", "metric")),
        "normal": batch["normal"].clamp(-1, 1),
        "pose": pose_to_unit(batch["keypoints"], batch["num_people"], size),
    }
