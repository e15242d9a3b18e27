"""The training reader: HumanVerse shards → aligned tensors for the LSDM and SGR.

One random crop, resize and horizontal flip is drawn per sample and applied to every
modality, so image, depth, normal, mask and keypoints stay pixel-aligned. A flip mirrors the
keypoints, swaps left/right joints and negates the normal's x component (normals are
x right / y up / z toward the viewer, see :mod:`shards.codecs`).

    dataset = humanverse_dataset("/data/humanverse", SampleTransform(512), shuffle_buffer=1000)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=4)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

from shards import tario
from shards.keypoints import NUM_COCO17, hflip_keypoints
from shards.reader import decode_sample, expand_urls
from shards.sample import CAPTION, DEPTH, IMAGE, MASK, NORMAL, POSE


def crop_keypoints(keypoints: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """Map keypoints into a crop ``box = (x0, y0, width, height)`` resized to ``size = (W, H)``;
    keypoints that leave the crop get score 0."""
    x0, y0, crop_w, crop_h = box
    out_w, out_h = size
    mapped = np.array(keypoints, dtype=np.float32, copy=True)
    mapped[:, 0] = (mapped[:, 0] - x0) * (out_w / crop_w)
    mapped[:, 1] = (mapped[:, 1] - y0) * (out_h / crop_h)
    outside = (mapped[:, 0] < 0) | (mapped[:, 0] > out_w) | (mapped[:, 1] < 0) | (mapped[:, 1] > out_h)
    mapped[outside, 2] = 0.0
    return mapped


def hflip_sample(sample: dict) -> dict:
    """Mirror a transformed sample (tensors ``(C, H, W)``; keypoints ``(P, K, 3)``)."""
    flipped = dict(sample)
    for name in ("pixel_values", "depth", "mask"):
        if name in sample:
            flipped[name] = torch.flip(sample[name], dims=[-1])
    if "normal" in sample:
        normal = torch.flip(sample["normal"], dims=[-1]).clone()
        normal[0] = -normal[0]
        flipped["normal"] = normal
    width = sample["pixel_values"].shape[-1]
    for name in ("keypoints", "wholebody"):
        if name in sample:
            people = sample[name].numpy()
            mirrored = [hflip_keypoints(person, width) for person in people]
            flipped[name] = torch.from_numpy(np.stack(mirrored)) if mirrored else sample[name].clone()
    return flipped


class SampleTransform:
    """Decoded sample → training dict of aligned tensors.

    Output: ``pixel_values`` (3, H, W) in [-1, 1]; ``depth`` (1, H, W) in the sample's depth
    units and ``depth_kind`` (e.g. ``metric_m``, ``relative_inverse``); ``normal``
    (3, H, W) unit vectors; ``mask`` (1, H, W) in [0, 1]; ``keypoints``
    (max_people, 17, 3) in output pixels, zero rows past ``num_people``; ``caption``; ``key``.

    The crop keeps the output aspect ratio; its side is a random fraction in
    ``[min_crop_scale, 1]`` of the largest such crop (1 = no zoom), at a random position
    (centered when ``random_crop=False``).
    """

    def __init__(
        self,
        resolution: int | tuple[int, int],
        *,
        random_crop: bool = True,
        min_crop_scale: float = 0.8,
        flip_prob: float = 0.5,
        max_people: int = 3,
        seed: int | None = None,
    ):
        self.height, self.width = (resolution, resolution) if isinstance(resolution, int) else resolution
        if not 0 < min_crop_scale <= 1:
            raise ValueError(f"min_crop_scale must be in (0, 1], got {min_crop_scale}")
        if not 0 <= flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.random_crop = random_crop
        self.min_crop_scale = min_crop_scale
        self.flip_prob = flip_prob
        self.max_people = max_people
        self.rng = np.random.default_rng(seed)

    def crop_box(self, image_w: int, image_h: int) -> tuple[int, int, int, int]:
        aspect = self.width / self.height
        full_w = min(image_w, image_h * aspect)
        scale = self.rng.uniform(self.min_crop_scale, 1.0) if self.random_crop else 1.0
        crop_w = max(1, min(image_w, round(full_w * scale)))
        crop_h = max(1, min(image_h, round(crop_w / aspect)))
        if self.random_crop:
            x0 = int(self.rng.integers(0, image_w - crop_w + 1))
            y0 = int(self.rng.integers(0, image_h - crop_h + 1))
        else:
            x0, y0 = (image_w - crop_w) // 2, (image_h - crop_h) // 2
        return x0, y0, crop_w, crop_h

    def _resize(self, array: np.ndarray, box, mode: str) -> torch.Tensor:
        x0, y0, crop_w, crop_h = box
        tensor = torch.from_numpy(np.array(array, dtype=np.float32))  # decoded arrays are read-only
        tensor = (tensor[..., None] if tensor.ndim == 2 else tensor).permute(2, 0, 1).float()
        tensor = tensor[:, y0 : y0 + crop_h, x0 : x0 + crop_w]
        antialias = mode == "bilinear"
        kwargs = {"align_corners": False} if mode == "bilinear" else {}
        return F.interpolate(tensor[None], size=(self.height, self.width), mode=mode, antialias=antialias, **kwargs)[0]

    def _people(self, pose: dict | None, field: str, box, num_keypoints: int) -> tuple[torch.Tensor, int]:
        padded = np.zeros((self.max_people, num_keypoints, 3), dtype=np.float32)
        people = [] if pose is None else [person[field] for person in pose["people"] if field in person]
        for index, keypoints in enumerate(people[: self.max_people]):
            padded[index] = crop_keypoints(keypoints, box, (self.width, self.height))
        return torch.from_numpy(padded), min(len(people), self.max_people)

    def __call__(self, sample: dict) -> dict:
        image = sample[IMAGE]
        image_h, image_w = image.shape[:2]
        box = self.crop_box(image_w, image_h)
        out = {
            "key": sample["__key__"],
            "caption": sample.get(CAPTION, ""),
            "pixel_values": self._resize(image, box, "bilinear").clamp(0, 255) / 127.5 - 1.0,
        }
        if DEPTH in sample:
            out["depth"] = self._resize(sample[DEPTH], box, "bilinear")
            out["depth_kind"] = sample.get("json", {}).get("annotations", {}).get("depth", {}).get("kind", "metric")
        if NORMAL in sample:
            normal = self._resize(sample[NORMAL], box, "bilinear")
            # (n * n).sum().sqrt() rather than Tensor.norm: ~10x faster on CPU for this shape
            out["normal"] = normal / (normal * normal).sum(dim=0, keepdim=True).sqrt().clamp_min(1e-6)
        if MASK in sample:
            out["mask"] = self._resize(sample[MASK], box, "bilinear") / 255.0
        pose = sample.get(POSE)
        out["keypoints"], out["num_people"] = self._people(pose, "keypoints", box, NUM_COCO17)
        if self.rng.uniform() < self.flip_prob:
            out = hflip_sample(out)
        return out


def _safe_tar_samples(source, handler=wds.reraise_exception):
    """webdataset stage: shard URL dicts → raw samples, refusing unsafe or split members."""
    import fsspec

    for shard in source:
        url = shard["url"]
        try:
            with fsspec.open(url, "rb") as handle:
                yield from tario.iter_samples(handle, url=url)
        except Exception as exc:
            if handler(exc):
                continue
            break


def humanverse_dataset(
    urls: str | list[str],
    transform=None,
    *,
    shuffle_buffer: int = 0,
    seed: int = 0,
    split_by_node: bool = True,
    handler=wds.reraise_exception,
) -> wds.DataPipeline:
    """An ``IterableDataset`` over HumanVerse shards for training.

    ``urls``: a dataset root (only complete shards are read), a brace pattern or a list of tar
    URLs (any fsspec URL). ``transform``: e.g. :class:`SampleTransform`; without it samples come
    decoded but untransformed. Shards are split across nodes (``torch.distributed``) and
    DataLoader workers. ``handler`` is webdataset's error policy (re-raise by default).
    """
    stages = [wds.SimpleShardList(expand_urls(urls))]
    if shuffle_buffer:
        stages.append(wds.detshuffle(bufsize=len(stages[0].urls), seed=seed))
    if split_by_node:
        stages.append(wds.split_by_node)
    stages += [wds.split_by_worker, wds.pipelinefilter(_safe_tar_samples)(handler=handler)]
    if shuffle_buffer:
        stages.append(wds.shuffle(shuffle_buffer, seed=seed))
    stages.append(wds.map(decode_sample, handler=handler))
    if transform is not None:
        stages.append(wds.map(transform, handler=handler))
    return wds.DataPipeline(*stages)
