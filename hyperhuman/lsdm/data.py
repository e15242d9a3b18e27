"""Training batches for the LSDM: shards → aligned crops → VAE latents of every modality.

The stream is a pure function of ``(seed, epoch)``: the shard order, the shuffle buffer and the
crop/flip draws are all seeded, so a resumed run that re-reads an epoch and discards the batches
it already trained on sees exactly the batches the uninterrupted run saw (with any number of
DataLoader workers, whose assignment of shards is deterministic too).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, default_collate

from hyperhuman import modalities
from hyperhuman.config import ConfigError
from shards.dataset import SampleTransform, humanverse_dataset
from shards.reader import expand_urls


def check_data(data: dict) -> list[str]:
    """Shard URLs of ``data.train``, or a ValueError naming the key and how to make shards."""
    source = data.get("train")
    if not source:
        raise ConfigError("data.train is not set: point it at HumanVerse shards (a dataset folder or a tar pattern)")
    try:
        urls = expand_urls(source)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(
            f"data.train={source!r} has no complete shards ({exc}); make some with `hyperhuman annotate` "
            "or `make demo`, or fix the path"
        ) from exc
    if not urls:
        raise ConfigError(f"data.train={source!r} has no complete shards; make some with `hyperhuman annotate`")
    return urls


def epoch_loader(data: dict, batch_size: int, seed: int, epoch: int, split_by_node: bool = True) -> DataLoader:
    resolution = data["resolution"]
    transform = SampleTransform(
        resolution,
        random_crop=data.get("random_crop", True),
        min_crop_scale=data.get("min_crop_scale", 0.8),
        flip_prob=data.get("flip_prob", 0.5),
        seed=seed * 100_003 + epoch,
    )
    dataset = humanverse_dataset(
        data["train"],
        transform,
        shuffle_buffer=data.get("shuffle_buffer", 0),
        seed=seed * 100_003 + epoch,
        split_by_node=split_by_node,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=data.get("num_workers", 0),
        collate_fn=default_collate,
        drop_last=True,
    )


class Batches:
    """Endless batches across epochs, resumable at ``(epoch, batches_in_epoch)``; subclasses over
    other data override :meth:`loader` and :attr:`too_few`."""

    too_few = "samples per epoch; lower train.batch_size or add shards"

    def __init__(
        self, data: dict, batch_size: int, seed: int, epoch: int = 0, batches_in_epoch: int = 0, split_by_node=True
    ):
        self.data, self.batch_size, self.seed, self.split_by_node = data, batch_size, seed, split_by_node
        self.epoch, self.batches_in_epoch = epoch, batches_in_epoch
        self._iterator = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        for _ in range(2):  # a fresh epoch must yield at least one batch
            if self._iterator is None:
                self._iterator = iter(self.loader())
                for _ in range(self.batches_in_epoch):  # resuming: replay what was already trained on
                    next(self._iterator)
            try:
                batch = next(self._iterator)
                self.batches_in_epoch += 1
                return batch
            except StopIteration:
                self._iterator, self.epoch, self.batches_in_epoch = None, self.epoch + 1, 0
        raise ConfigError(f"data.train has fewer than train.batch_size={self.batch_size} {self.too_few}")

    def loader(self) -> DataLoader:
        """The current epoch's loader."""
        return epoch_loader(self.data, self.batch_size, self.seed, self.epoch, self.split_by_node)

    def state(self) -> dict:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}


@torch.no_grad()
def encode_batch(vae, unet, batch: dict, names: list[str], generator: torch.Generator | None) -> dict:
    """Normalised latents of every branch and of the pose: ``{name: (B, 4, h, w)}``.

    ``generator`` draws the VAE posterior samples (``None``: its mode, as when caching).
    """
    units = modalities.batch_to_units(batch)
    latents = {}
    for name in [*names, "pose"]:
        posterior = vae.encode(units[name].to(vae.device, vae.dtype)).latent_dist
        sample = posterior.mode() if generator is None or name == "pose" else _sample(posterior, generator)
        latents[name] = unet.normalize(name, sample.float())
    return latents


def _sample(posterior, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(posterior.mean.shape, generator=generator, dtype=posterior.mean.dtype)
    return posterior.mean + posterior.std * noise.to(posterior.mean.device)


@torch.no_grad()
def compute_latent_norm(vae, data: dict, names: list[str], batches: int, batch_size: int, seed: int) -> dict:
    """``{modality: [shift, scale]}`` so that each modality's latents match the RGB latents'
    mean and spread after RGB's own scaling (the VAE's ``scaling_factor``, shift 0)."""
    # Every process reads the same batches (no split by node), so all ranks agree on the result.
    stream = Batches({**data, "random_crop": False, "flip_prob": 0.0}, batch_size, seed, split_by_node=False)
    sums = {name: [] for name in [*names, "pose"]}
    for _ in range(batches):
        units = modalities.batch_to_units(next(stream))
        for name in sums:
            sums[name].append(vae.encode(units[name].to(vae.device, vae.dtype)).latent_dist.mode().float().cpu())
    rgb_scale = float(vae.config.scaling_factor)
    rgb = torch.cat(sums["rgb"]) * rgb_scale if "rgb" in sums else None
    target_mean, target_std = (float(rgb.mean()), float(rgb.std())) if rgb is not None else (0.0, 1.0)
    norm = {}
    for name, values in sums.items():
        if name == "rgb":
            norm[name] = [0.0, rgb_scale]
            continue
        values = torch.cat(values)
        scale = target_std / max(float(values.std()), 1e-6)
        norm[name] = [float(values.mean()) - target_mean / scale, scale]
    return norm
