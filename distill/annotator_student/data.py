"""Training crops for the pose student: every pseudo-labelled person of the shards, cut top-down
around its box as the annotator cuts it, augmented, with Gaussian heatmap targets.

Per person (the shards' ``pose.json``: its box and the teacher's COCO-17 keypoints with scores),
``data.crops_per_person`` crops per epoch, each with its own draw of:

- scale (the crop region × a factor in ``scale_range``), a shift of the centre (± ``shift`` × the
  region), a rotation (± ``rotation_deg``, with probability ``rotation_prob``);
- a horizontal flip (``flip_prob``): the crop is mirrored and the left/right joints swap names
  (COCO-17's pairs, :func:`shards.keypoints.flip_permutation`), so a mirrored left wrist is still
  labelled as what it now looks like, a right wrist;
- colour: brightness, contrast and saturation factors in ``1 ± color_jitter``.

Geometry is one affine map per crop (:func:`annotators.efficientformer_pose.crop_matrix`) applied to
the pixels and to the keypoints alike. Targets: a Gaussian of ``sigma`` heatmap cells at each joint
the teacher scored ≥ ``min_keypoint_score`` and that stays inside the crop, ``weight`` 1 for those
and 0 for the others (the joints the student must learn to call absent; see the loss in
:mod:`distill.annotator_student.train`). People with fewer than ``min_keypoints`` such joints are
skipped.

Every draw comes from a generator seeded by ``(seed, epoch, sample key, person, repeat)``: the
stream is a pure function of the seed and the epoch, whatever the order, the worker or the process
that reads a sample, so a resumed run replays exactly the crops of the uninterrupted one.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from annotators.efficientformer_pose import box_region, crop_matrix, transform_points, warp_crop
from hyperhuman.config import ConfigError
from hyperhuman.lsdm.data import Batches
from shards.keypoints import NUM_COCO17, flip_permutation

DEFAULTS = {
    "crops_per_person": 1,
    "min_keypoints": 4,
    "min_keypoint_score": 0.3,
    "crop_padding": 1.25,
    "scale_range": [0.75, 1.3],
    "shift": 0.1,
    "rotation_deg": 30.0,
    "rotation_prob": 0.6,
    "flip_prob": 0.5,
    "color_jitter": 0.3,
    "sigma": 2.0,
}
GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def settings(data: dict) -> dict:
    """The crop settings of a ``data:`` section, defaults filled in."""
    return {key: data.get(key, default) for key, default in DEFAULTS.items()}


def check_data_config(data: dict) -> None:
    """The augmentation values, or a ConfigError naming the ``data.`` key."""
    values = settings(data)
    for key in ("crops_per_person", "min_keypoints"):
        if isinstance(values[key], bool) or not isinstance(values[key], int) or values[key] < 1:
            raise ConfigError(f"data.{key} must be a positive integer, got {values[key]!r}")
    ranges = {"min_keypoint_score": (0, 1), "shift": (0, 1), "rotation_prob": (0, 1), "flip_prob": (0, 1),
              "color_jitter": (0, 1), "rotation_deg": (0, 180), "crop_padding": (1, 4),
              "sigma": (0.25, 16)}  # fmt: skip
    for key, (low, high) in ranges.items():
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise ConfigError(f"data.{key} must be a number in [{low}, {high}], got {value!r}")
    scale = values["scale_range"]
    if not (isinstance(scale, list | tuple) and len(scale) == 2 and 0 < scale[0] <= scale[1]):
        raise ConfigError(f"data.scale_range must be [low, high] with 0 < low ≤ high, got {scale!r}")


# --- one crop ------------------------------------------------------------------------------------
def heatmap_targets(keypoints: np.ndarray, visible: np.ndarray, heatmap_size, stride: int, sigma: float) -> np.ndarray:
    """``(K, h, w)`` float32: a unit-peak Gaussian of ``sigma`` cells at each visible keypoint
    (x, y in model-input pixels; the centre of cell ``j`` is input pixel ``(j + 0.5) · stride``),
    zeros for the others."""
    height, width = heatmap_size
    rows = np.arange(height, dtype=np.float32)[:, None]
    cols = np.arange(width, dtype=np.float32)[None, :]
    targets = np.zeros((len(keypoints), height, width), dtype=np.float32)
    for index, (x, y) in enumerate(keypoints[:, :2]):
        if visible[index]:
            cx, cy = x / stride - 0.5, y / stride - 0.5
            targets[index] = np.exp(-((cols - cx) ** 2 + (rows - cy) ** 2) / (2 * sigma**2))
    return targets


def jitter_colour(crop: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Brightness, contrast and saturation factors in ``1 ± strength``, in a random order."""
    if not strength:
        return crop
    for kind in rng.permutation(3):
        factor = np.float32(rng.uniform(1 - strength, 1 + strength))
        if kind == 0:
            crop = crop * factor
        elif kind == 1:
            crop = (crop - crop.mean()) * factor + crop.mean()
        else:
            gray = (crop @ GRAY_WEIGHTS)[..., None]
            crop = (crop - gray) * factor + gray
    return np.clip(crop, 0, 255).astype(np.float32)


def augment_matrix(box, values: dict, input_size, rng: np.random.Generator | None) -> tuple[np.ndarray, bool]:
    """The crop's image → input map and whether it is mirrored: the annotator's crop of ``box``,
    with a random scale, shift, rotation and flip drawn from ``rng`` (none when ``rng`` is None)."""
    height, width = input_size
    center, region = box_region(box, width / height, values["crop_padding"])
    if rng is None:
        return crop_matrix(center, region, input_size), False
    region = region * rng.uniform(*values["scale_range"])
    center = center + rng.uniform(-values["shift"], values["shift"], 2) * region
    rotate = rng.uniform() < values["rotation_prob"]
    rotation = rng.uniform(-values["rotation_deg"], values["rotation_deg"]) if rotate else 0.0
    flip = bool(rng.uniform() < values["flip_prob"])
    return crop_matrix(center, region, input_size, rotation, flip), flip


def person_crop(rgb, person: dict, values: dict, input_size, heatmap_size, stride, rng=None) -> dict:
    """One training crop of ``person``: ``pixels`` (3, H, W) float32 0..255, ``target`` (K, h, w),
    ``weight`` (K,) (1 for the joints seen in the crop) and, to map predictions back, ``matrix``
    (2, 3), the teacher's ``keypoints`` (K, 3) in image pixels (flip-swapped when mirrored) and the
    box's ``area`` (the OKS scale). ``rng`` None: the plain crop."""
    matrix, flip = augment_matrix(person["bbox"], values, input_size, rng)
    crop = warp_crop(rgb, matrix, input_size)
    if rng is not None:
        crop = jitter_colour(crop, rng, values["color_jitter"])
    keypoints = np.asarray(person["keypoints"], dtype=np.float32)
    if flip:  # the mirrored person's left joints are the original's right ones
        keypoints = keypoints[flip_permutation(len(keypoints))]
    in_crop = transform_points(keypoints, matrix)
    height, width = input_size
    inside = (in_crop[:, 0] >= 0) & (in_crop[:, 0] < width) & (in_crop[:, 1] >= 0) & (in_crop[:, 1] < height)
    visible = inside & (keypoints[:, 2] >= values["min_keypoint_score"])
    return {
        "pixels": torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1))),
        "target": torch.from_numpy(heatmap_targets(in_crop, visible, heatmap_size, stride, values["sigma"])),
        "weight": torch.from_numpy(visible.astype(np.float32)),
        "matrix": torch.from_numpy(matrix.astype(np.float32)),
        "keypoints": torch.from_numpy(keypoints),
        "area": torch.tensor(box_area(person["bbox"])),
    }


def box_area(box) -> float:
    x0, y0, x1, y1 = (float(v) for v in box)
    return max(x1 - x0, 0.0) * max(y1 - y0, 0.0)


def labelled_people(sample: dict, values: dict) -> list[tuple[int, dict]]:
    """``(index, person)`` of the people with at least ``min_keypoints`` confident keypoints."""
    people = (sample.get("pose.json") or {}).get("people", [])
    found = []
    for index, person in enumerate(people):
        scores = np.asarray(person["keypoints"], dtype=np.float32)[:, 2]
        if len(scores) == NUM_COCO17 and int((scores >= values["min_keypoint_score"]).sum()) >= values["min_keypoints"]:
            found.append((index, person))
    return found


class PersonCrops:
    """A webdataset stage: decoded samples → augmented crops of each labelled person,
    ``crops_per_person`` of each per epoch (``augment=False``: one plain crop each)."""

    def __init__(self, data: dict, model_config, seed: int, epoch: int, augment: bool = True):
        self.values = settings(data)
        self.input_size = tuple(model_config["input_size"])
        self.stride = model_config["heatmap_stride"]
        self.heatmap_size = (self.input_size[0] // self.stride, self.input_size[1] // self.stride)
        self.seed, self.epoch, self.augment = seed, epoch, augment

    def __call__(self, samples):
        for sample in samples:
            key = sample["__key__"]
            for index, person in labelled_people(sample, self.values):
                for repeat in range(self.values["crops_per_person"] if self.augment else 1):
                    rng = None
                    if self.augment:
                        rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(key.encode()), index, repeat])
                    crop = person_crop(sample["jpg"], person, self.values, self.input_size, self.heatmap_size,
                                       self.stride, rng)  # fmt: skip
                    yield {**crop, "key": key, "person": index}


NEEDED = ("jpg", "pose.json", "json")  # a sample's depth, normal and mask cost more to decode than its crops


def decoded_for_crops(shards):
    """webdataset stage: shard URL dicts → samples with only the image, the pose and the metadata
    decoded (read by :func:`shards.reader.read_shard`, which refuses unsafe tar members)."""
    from shards.reader import read_shard
    from shards.sample import decode_member

    for shard in shards:
        for raw in read_shard(shard["url"], decode=False):
            yield {
                "__key__": raw["__key__"],
                **{name: decode_member(name, raw[name]) for name in NEEDED if name in raw},
            }


def crop_dataset(data: dict, model_config, seed: int, epoch: int, split_by_node: bool = True):
    """The training crops of ``data.train`` for one epoch, shuffled (``data.shuffle_buffer``): the
    stages of :func:`shards.dataset.humanverse_dataset` (a marked copy) with a decoder of the
    members the crops need only."""
    import webdataset as wds

    from shards.reader import expand_urls

    stream_seed = seed * 100_003 + epoch
    buffer = data.get("shuffle_buffer", 0)
    stages = [wds.SimpleShardList(expand_urls(data["train"]))]
    if buffer:
        stages.append(wds.detshuffle(bufsize=len(stages[0].urls), seed=stream_seed))
    if split_by_node:
        stages.append(wds.split_by_node)
    stages += [wds.split_by_worker, decoded_for_crops, PersonCrops(data, model_config, seed, epoch)]
    if buffer:  # the crops of one person come together: mix them with the others'
        stages.append(wds.shuffle(buffer, initial=buffer, seed=stream_seed))
    return wds.DataPipeline(*stages)


class CropBatches(Batches):
    """Endless, resumable batches of crops (:class:`hyperhuman.lsdm.data.Batches`)."""

    too_few = (
        "pseudo-labelled people per epoch (× data.crops_per_person); lower train.batch_size, raise "
        "data.crops_per_person or annotate more images"
    )

    def __init__(self, data: dict, model_config, batch_size: int, seed: int, **position):
        super().__init__(data, batch_size, seed, **position)
        self.model_config = model_config

    def loader(self) -> DataLoader:
        dataset = crop_dataset(self.data, self.model_config, self.seed, self.epoch, self.split_by_node)
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.data.get("num_workers", 0),
                          collate_fn=default_collate, drop_last=True)  # fmt: skip


def heldout_crops(source, data: dict, model_config, limit: int | None) -> list[dict]:
    """Plain crops (no augmentation) of the first ``limit`` labelled people of ``source`` in shard
    order: a fixed set, the same for every run."""
    from shards.reader import expand_urls

    stage = PersonCrops(data, model_config, seed=0, epoch=0, augment=False)
    crops = []
    for url in expand_urls(source):
        for crop in stage(decoded_for_crops([{"url": url}])):
            crops.append(crop)
            if limit and len(crops) >= limit:
                return crops
    return crops
