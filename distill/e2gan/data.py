"""Training batches of edit pairs: pair shards → aligned (input, target) crops and the prompt.

A pair sample's ``jpg`` holds the input and the teacher's edit side by side
(:mod:`distill.e2gan.pairs`); one random crop and flip is drawn per pair and applied to both
halves. As :mod:`hyperhuman.lsdm.data`, the stream is a pure function of ``(seed, epoch)`` so a
resumed run replays exactly the batches of the uninterrupted one; :class:`PairBatches` is a marked
copy of its ``Batches`` with the pair transform (a small copy rather than a hook in the LSDM's).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, default_collate

from distill.e2gan.pairs import split_pair
from hyperhuman.config import ConfigError
from hyperhuman.lsdm.data import Batches


class PairTransform:
    """Decoded pair sample → ``{input, target}`` (3, R, R) in [-1, 1], ``prompt``, ``concept``, ``key``."""

    def __init__(self, resolution: int, random_crop=True, min_crop_scale=0.8, flip_prob=0.5, seed=None):
        if not 0 < min_crop_scale <= 1:
            raise ConfigError(f"data.min_crop_scale must be in (0, 1], got {min_crop_scale!r}")
        if not 0 <= flip_prob <= 1:
            raise ConfigError(f"data.flip_prob must be in [0, 1], got {flip_prob!r}")
        self.resolution, self.random_crop = resolution, random_crop
        self.min_crop_scale, self.flip_prob = min_crop_scale, flip_prob
        self.rng = np.random.default_rng(seed)

    def _crop(self, image: np.ndarray, box) -> torch.Tensor:
        top, left, side = box
        tensor = torch.from_numpy(np.array(image[top : top + side, left : left + side], dtype=np.float32))
        tensor = F.interpolate(tensor.permute(2, 0, 1)[None], size=(self.resolution, self.resolution),
                               mode="bilinear", antialias=True, align_corners=False)[0]  # fmt: skip
        return tensor.clamp(0, 255) / 127.5 - 1.0

    def __call__(self, sample: dict) -> dict:
        image, edited = split_pair(sample["jpg"])
        height, width = image.shape[:2]
        full = min(height, width)
        side = max(1, round(full * self.rng.uniform(self.min_crop_scale, 1.0))) if self.random_crop else full
        if self.random_crop:
            box = (int(self.rng.integers(0, height - side + 1)), int(self.rng.integers(0, width - side + 1)), side)
        else:
            box = ((height - side) // 2, (width - side) // 2, side)
        pair = {"input": self._crop(image, box), "target": self._crop(edited, box)}
        if self.rng.uniform() < self.flip_prob:
            pair = {name: torch.flip(value, dims=[-1]) for name, value in pair.items()}
        edit = sample.get("json", {}).get("edit", {})
        return {**pair, "prompt": sample.get("txt", ""), "concept": edit.get("concept", ""), "key": sample["__key__"]}


def is_pair(sample: dict) -> bool:
    return "edit" in sample.get("json", {})


def wanted(sample: dict, concepts: list[str] | None) -> bool:
    """A pair of one of ``concepts`` (all when empty)."""
    return is_pair(sample) and (not concepts or sample["json"]["edit"]["concept"] in concepts)


def pair_dataset(data: dict, seed: int, split_by_node: bool = True, transform=None):
    """The pair shards of ``data.train`` (only ``data.concepts``, when set), transformed."""
    import webdataset as wds

    from shards.dataset import humanverse_dataset

    dataset = humanverse_dataset(data["train"], None, shuffle_buffer=data.get("shuffle_buffer", 0), seed=seed,
                                 split_by_node=split_by_node)  # fmt: skip
    dataset.append(wds.select(functools.partial(wanted, concepts=data.get("concepts"))))
    if transform is not None:
        dataset.append(wds.map(transform))
    return dataset


def epoch_loader(data: dict, batch_size: int, seed: int, epoch: int, split_by_node: bool = True) -> DataLoader:
    transform = PairTransform(data["resolution"], data.get("random_crop", True), data.get("min_crop_scale", 0.8),
                              data.get("flip_prob", 0.5), seed=seed * 100_003 + epoch)  # fmt: skip
    dataset = pair_dataset(data, seed * 100_003 + epoch, split_by_node, transform)
    return DataLoader(dataset, batch_size=batch_size, num_workers=data.get("num_workers", 0),
                      collate_fn=default_collate, drop_last=True)  # fmt: skip


class PairBatches(Batches):
    """Endless, resumable batches of pairs (:class:`hyperhuman.lsdm.data.Batches` over
    :func:`epoch_loader` above)."""

    too_few = (
        "pairs per epoch (of data.concepts); lower train.batch_size or make more pairs with "
        "`hyperhuman distill edit-pairs`"
    )

    def loader(self) -> DataLoader:
        return epoch_loader(self.data, self.batch_size, self.seed, self.epoch, self.split_by_node)


def read_pairs(source: str, resolution: int, per_concept: int | None, concepts=None) -> list[dict]:
    """Held-out pairs, whole (centre square, no flip), the first ``per_concept`` of each concept in
    shard order: a fixed set, the same for every run."""
    from shards.reader import expand_urls, read_shard

    transform = PairTransform(resolution, random_crop=False, flip_prob=0.0)
    taken: dict[str, int] = {}
    pairs = []
    for url in expand_urls(source):
        for sample in read_shard(url):
            if not is_pair(sample):
                continue
            concept = sample["json"]["edit"]["concept"]
            if (concepts and concept not in concepts) or (per_concept and taken.get(concept, 0) >= per_concept):
                continue
            taken[concept] = taken.get(concept, 0) + 1
            pairs.append(transform(sample))
    return pairs
