"""E2GAN's minimal data: a few representative pairs of a new concept instead of all of them.

Each pair is embedded (:func:`pair_features`), the embeddings are standardised and clustered with
k-means (``size`` clusters, seeded: scikit-learn's ``KMeans`` when it is installed, else the small
torch k-means++ / Lloyd below), and the member of each cluster nearest its centre is kept. The
choice is deterministic: the same pairs and settings give the same subset.

Embeddings (``features``):

- ``encoder``: the base GAN's own encoder, its down-sampling path (``conv_in`` and the down blocks,
  as its forward runs them), of the input and of the teacher's edit, each pooled to the per-channel
  mean and standard deviation (content and style, as style-transfer statistics are);
- ``colour``: per-channel mean and standard deviation of the input and the edit, and the mean and
  standard deviation of their gradient magnitude (texture), from the pixels alone.

:class:`SubsetBatches` trains on the chosen pairs: resumable, random crops and flips per epoch as
:class:`distill.e2gan.data.PairBatches`, the few decoded samples held in memory.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, default_collate

from distill.e2gan.data import PairBatches, PairTransform
from hyperhuman.config import ConfigError

FEATURES = ("encoder", "colour")
FEATURE_CHUNK = 64  # pairs embedded at a time while streaming the concept's pairs


# --- embeddings ------------------------------------------------------------------------------------
@torch.no_grad()
def encoder_features(generator, images: torch.Tensor) -> torch.Tensor:
    """(N, 2·C) per-channel mean and std of the generator's down-sampling path's output."""
    hidden = F.relu(generator.norm_in(generator.conv_in(images)))  # as E2GANGenerator.forward begins
    for block in generator.down_blocks:
        hidden = block(hidden)
    return torch.cat([hidden.mean(dim=(2, 3)), hidden.std(dim=(2, 3))], dim=1)


def colour_features(images: torch.Tensor) -> torch.Tensor:
    """(N, 8) per-channel mean and std, and the mean and std of the gradient magnitude of the grey image."""
    grey = images.mean(dim=1, keepdim=True)
    gradient = torch.sqrt(grey.diff(dim=2)[..., :, :-1] ** 2 + grey.diff(dim=3)[..., :-1, :] ** 2 + 1e-12)
    return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3)),
                      gradient.mean(dim=(1, 2, 3))[:, None], gradient.std(dim=(1, 2, 3))[:, None]], dim=1)  # fmt: skip


def pair_features(pairs: list[dict], kind: str, generator=None, batch_size: int = 16) -> torch.Tensor:
    """(N, D) float64 embeddings of ``pairs`` (``input`` and ``target`` in [-1, 1]): the input's
    features then the edit's."""
    if kind not in FEATURES:
        raise ConfigError(f"subset.features must be one of {FEATURES}, got {kind!r}")
    device = next(generator.parameters()).device if kind == "encoder" else "cpu"
    rows = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        halves = []
        for side in ("input", "target"):
            images = torch.stack([pair[side] for pair in chunk]).to(device)
            halves.append(encoder_features(generator, images) if kind == "encoder" else colour_features(images))
        rows.append(torch.cat(halves, dim=1).double().cpu())
    return torch.cat(rows)


# --- clustering ------------------------------------------------------------------------------------
def kmeans(features: torch.Tensor, k: int, seed: int, use_sklearn: bool | None = None) -> tuple:
    """``(labels (N,), centres (k, D))`` of k-means on ``features`` (float64), seeded; every cluster
    non-empty. ``use_sklearn``: None takes scikit-learn when it is installed."""
    if use_sklearn is None:
        try:
            import sklearn.cluster  # noqa: F401

            use_sklearn = True
        except ImportError:
            use_sklearn = False
    if use_sklearn:
        from sklearn.cluster import KMeans

        fitted = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(features.numpy())
        return torch.from_numpy(fitted.labels_).long(), torch.from_numpy(fitted.cluster_centers_)
    return torch_kmeans(features, k, seed)


def torch_kmeans(features: torch.Tensor, k: int, seed: int, iterations: int = 100) -> tuple:
    """k-means++ seeding then Lloyd's iterations (an empty cluster takes the point farthest from its
    centre), deterministic for a seed."""
    generator = torch.Generator().manual_seed(seed)
    centres = features[torch.randint(len(features), (1,), generator=generator)]
    while len(centres) < k:  # k-means++: the next centre drawn in proportion to the squared distance
        distance = torch.cdist(features, centres).min(dim=1).values ** 2
        weights = distance if distance.sum() > 0 else torch.ones_like(distance)
        centres = torch.cat([centres, features[torch.multinomial(weights, 1, generator=generator)]])
    labels = torch.full((len(features),), -1, dtype=torch.long)
    for _ in range(iterations):
        distances = torch.cdist(features, centres)
        new_labels = distances.argmin(dim=1)
        for cluster in range(k):
            if not (new_labels == cluster).any():
                farthest = distances.gather(1, new_labels[:, None]).squeeze(1).argmax()
                new_labels[farthest] = cluster
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
        centres = torch.stack([features[labels == cluster].mean(dim=0) for cluster in range(k)])
    return labels, centres


def select_representatives(features: torch.Tensor, size: int, seed: int, use_sklearn: bool | None = None) -> list:
    """Indices of ``size`` pairs, one per k-means cluster of the standardised ``features``: the
    member nearest its cluster's centre (ties: the first). Ascending; all indices when
    ``size ≥ len(features)``. Each entry ``{index, cluster, cluster_size, distance}``."""
    count = len(features)
    if size >= count:
        return [{"index": i, "cluster": i, "cluster_size": 1, "distance": 0.0} for i in range(count)]
    scaled = (features - features.mean(dim=0)) / features.std(dim=0).clamp_min(1e-8)
    labels, centres = kmeans(scaled, size, seed, use_sklearn)
    chosen = []
    for cluster in range(size):
        members = torch.nonzero(labels == cluster).squeeze(1)
        distances = torch.linalg.vector_norm(scaled[members] - centres[cluster], dim=1)
        nearest = int(distances.argmin())
        chosen.append({"index": int(members[nearest]), "cluster": cluster, "cluster_size": len(members),
                       "distance": float(distances[nearest])})  # fmt: skip
    return sorted(chosen, key=lambda entry: entry["index"])


# --- the concept's pairs ---------------------------------------------------------------------------
def concept_samples(source: str, concept: str, keys: set[str] | None = None):
    """Decoded pair samples of ``concept`` in ``source`` in shard order (only ``keys``, when given)."""
    from distill.e2gan.data import is_pair
    from shards.reader import expand_urls, read_shard

    for url in expand_urls(source):
        for sample in read_shard(url):
            if is_pair(sample) and sample["json"]["edit"]["concept"] == concept:
                if keys is None or sample["__key__"] in keys:
                    yield sample


def choose_subset(config: dict, base, log) -> dict:
    """Embed every pair of the concept (streamed, in chunks) and keep one per cluster."""
    subset, data = config["subset"], config["data"]
    kind = subset.get("features", "encoder")
    transform = PairTransform(data["resolution"], random_crop=False, flip_prob=0.0)
    keys, features, chunk = [], [], []
    for sample in itertools.chain(concept_samples(data["train"], config["concept"]), [None]):  # None: the end
        if sample is not None:
            chunk.append(transform(sample))
        if chunk and (sample is None or len(chunk) == FEATURE_CHUNK):
            features.append(pair_features(chunk, kind, base))
            keys += [pair["key"] for pair in chunk]
            chunk = []
    if not keys:
        raise ConfigError(f"data.train={data['train']!r} holds no pairs of concept={config['concept']!r}")
    chosen = select_representatives(torch.cat(features), subset["size"], config.get("seed", 0))
    log(f"[distill gan-concept] minimal data: {len(chosen)} of {len(keys)} pairs ({kind} features, k-means)")
    return {"features": kind, "pairs": len(keys), "size": len(chosen),
            "chosen": [{**entry, "key": keys[entry["index"]]} for entry in chosen]}  # fmt: skip


# --- training on the subset ------------------------------------------------------------------------
class SubsetBatches(PairBatches):
    """Endless, resumable batches of a few decoded pair ``samples`` held in memory: each epoch
    shuffles them and draws its crops and flips from ``(seed, epoch)`` (a resumed run replays the
    same); with several processes each takes every N-th sample of the epoch's order."""

    too_few = "pairs in the minimal data subset (of each process); lower train.batch_size or raise subset.size"

    def __init__(self, samples: list[dict], data: dict, batch_size: int, seed: int, **position):
        super().__init__(data, batch_size, seed, **position)
        self.samples = samples

    def loader(self) -> DataLoader:
        epoch_seed = self.seed * 100_003 + self.epoch
        order = np.random.default_rng(epoch_seed).permutation(len(self.samples))
        if self.split_by_node and torch.distributed.is_available() and torch.distributed.is_initialized():
            order = order[torch.distributed.get_rank() :: torch.distributed.get_world_size()]
        data = self.data
        transform = PairTransform(data["resolution"], data.get("random_crop", True), data.get("min_crop_scale", 0.8),
                                  data.get("flip_prob", 0.5), seed=epoch_seed)  # fmt: skip
        pairs = [transform(self.samples[i]) for i in order]
        return DataLoader(pairs, batch_size=self.batch_size, collate_fn=default_collate, drop_last=True)
