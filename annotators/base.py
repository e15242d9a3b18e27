"""The annotator interface: built from a config, called on a batch of RGB images.

Every annotator:
- is constructed from an :class:`AnnotatorConfig` (``name``, ``weights`` path or hub id,
  ``device``, ``dtype``, ``batch_size``, plus model-specific ``options``);
- is called on a list of images (any of RGB/gray/RGBA uint8, 16-bit arrays, or encoded bytes;
  all converted to RGB uint8 by :func:`to_rgb`), with person boxes where it needs them;
- returns one result per image, in the shard schema's units (pixels of that image);
- reports ``name``, ``version`` and ``weights_id``, recorded in every sample's metadata by
  :meth:`Annotator.provenance`.

Real weights come from a local directory or a hub id; nothing is downloaded when the hub is
offline, and a missing checkpoint raises :class:`WeightsNotFoundError` naming the config key
to set. No annotator falls back to random weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from shards.codecs import decode_image


class WeightsNotFoundError(FileNotFoundError):
    """The configured weights are neither a local path nor a cached hub id."""


@dataclass
class AnnotatorConfig:
    name: str
    weights: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 8
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, config: dict | str) -> AnnotatorConfig:
        if isinstance(config, str):
            return cls(name=config)
        known = {"name", "weights", "device", "dtype", "batch_size", "options"}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"unknown annotator config keys {sorted(unknown)}; allowed: {sorted(known)}")
        if "name" not in config:
            raise ValueError(f"annotator config {config} needs a 'name'")
        return cls(**config)


def to_rgb(image) -> np.ndarray:
    """Any image input → RGB uint8 ``(H, W, 3)``: gray, RGBA, 16-bit and float arrays, or bytes."""
    if isinstance(image, (bytes, bytearray)):
        return decode_image(bytes(image))
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {array.shape}")
    if array.dtype == np.uint16:
        array = (array.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif array.dtype.kind == "f":
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        raise ValueError(f"unsupported image dtype {array.dtype}; use uint8, uint16, bool or float in [0, 1]")
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array[..., :3])


def keypoints_in_image(keypoints: np.ndarray, width: int, height: int) -> np.ndarray:
    """Models predict joints beyond the frame; the shards keep only joints inside the image:
    those outside get score 0 and coordinates clamped to the border."""
    keypoints = np.array(keypoints, dtype=np.float32, copy=True)
    outside = (keypoints[:, 0] < 0) | (keypoints[:, 0] > width) | (keypoints[:, 1] < 0) | (keypoints[:, 1] > height)
    keypoints[outside, 2] = 0.0
    keypoints[:, 0] = np.clip(keypoints[:, 0], 0, width)
    keypoints[:, 1] = np.clip(keypoints[:, 1], 0, height)
    return keypoints


def person_boxes(poses: list[dict]) -> list[dict]:
    """A pose annotator's people as detections: per image ``{"boxes": (N, 4) x0 y0 x1 y1 pixels,
    "scores": (N,)}``, in the poses' order."""
    return [
        {
            "boxes": np.array([person["bbox"] for person in pose["people"]], dtype=np.float32).reshape(-1, 4),
            "scores": np.array([person["score"] for person in pose["people"]], dtype=np.float32),
        }
        for pose in poses
    ]


def map_same_size_batches(images: list[np.ndarray], batch_size: int, predict) -> list:
    """``predict(list of images) -> list of results`` on batches of same-size images, results in
    input order. Batching only equal sizes means no padding, so a batch gives the same results
    as the images one by one."""
    by_size: dict[tuple, list[int]] = {}
    for index, image in enumerate(images):
        by_size.setdefault(image.shape, []).append(index)
    results: list = [None] * len(images)
    for indices in by_size.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            for index, result in zip(chunk, predict([images[i] for i in chunk]), strict=True):
                results[index] = result
    return results


def resolve_weights(config: AnnotatorConfig, allow_patterns: list[str] | None = None) -> str:
    """Local directory/file for ``config.weights``: a path as is, or a hub id from the local cache
    (downloaded only when the hub is online and ``HF_HUB_OFFLINE`` is unset)."""
    if not config.weights:
        raise WeightsNotFoundError(
            f"annotator {config.name!r} needs weights: set 'weights' in its config "
            "(e.g. --set annotators.<modality>.weights=/path/to/checkpoint or a hub id)"
        )
    if os.path.exists(config.weights):
        return config.weights
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return snapshot_download(config.weights, local_files_only=offline, allow_patterns=allow_patterns)
    except Exception as exc:  # hub errors have many types; all mean "not available here"
        raise WeightsNotFoundError(
            f"annotator {config.name!r}: weights {config.weights!r} are not a local path and could not be "
            f"loaded from the hub cache ({type(exc).__name__}; HF_HUB_OFFLINE={int(offline)}). Set 'weights' "
            "in the annotator config to a local directory, or download the hub id first."
        ) from exc


def load_transformers(config: AnnotatorConfig, model_class: str, processor_class: str = "AutoImageProcessor"):
    """``(processor, model)`` of a transformers checkpoint named by ``config.weights``, in
    ``config.dtype`` on ``config.device``, in eval mode."""
    import torch
    import transformers

    path = resolve_weights(config)
    processor = getattr(transformers, processor_class).from_pretrained(path)
    model = getattr(transformers, model_class).from_pretrained(path, dtype=getattr(torch, config.dtype))
    return processor, model.to(config.device).eval()


class Annotator:
    """Base class: subclasses set ``name``/``version``/``modality`` and implement ``__call__``."""

    name: ClassVar[str]
    version: ClassVar[str]
    modality: ClassVar[str]  # "detection", "pose", "depth", "normal", "mask" or "caption"
    # Other annotations this annotator consumes, passed as keyword arguments of the same name
    # ("boxes", "poses", "masks", "depths", "captions"); the annotate stage supplies them.
    inputs: ClassVar[tuple[str, ...]] = ()
    # Every option the annotator understands, with its default; anything else is refused.
    default_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: AnnotatorConfig):
        unknown = set(config.options) - set(self.default_options)
        if unknown:
            raise ValueError(
                f"unknown options {sorted(unknown)} for {config.name}; allowed: {sorted(self.default_options)}"
            )
        self.config = config
        self.options = {**self.default_options, **config.options}

    @classmethod
    def missing_weights(cls, config: AnnotatorConfig) -> str | None:
        """Why ``config`` cannot run here (its weights are not installed), or ``None``; read by
        :func:`annotators.registry.resolve` for configs that name a ``fallback``."""
        return None

    @property
    def weights_id(self) -> str:
        return self.config.weights or "none"

    def provenance(self) -> dict:
        return {"annotator": self.name, "version": self.version, "weights": self.weights_id}

    def __call__(self, images: list, **inputs) -> list:
        raise NotImplementedError
