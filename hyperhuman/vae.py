"""``hyperhuman train-vae``: a small ``AutoencoderKL`` trained on our shards, for offline runs.

Real runs use Stable Diffusion's VAE by path. Nothing like it can be downloaded here, and a random
decoder would make every offline generation noise, so this recipe trains a small VAE on the
images the LSDM encodes with its one shared VAE — RGB, depth (nearness), normals and rendered
skeletons (:func:`hyperhuman.modalities.batch_to_units`), all four concatenated along the batch
in every step — with an L1 + MSE reconstruction loss and a small KL term
(``DiagonalGaussianDistribution.kl()``, summed per image, averaged over the batch).

After training, the spread of the RGB latents (posterior mode) over the training data is
measured and stored as ``scaling_factor = 1 / std`` (how SD's 0.18215 was found), so the VAE
plugs into the diffusers convention unchanged.

Output: ``OUTPUT/vae/`` (``AutoencoderKL.from_pretrained``, safetensors), ``OUTPUT/vae_report.json``
(steps, losses, PSNR per modality and on which data, scaling factor, parameters, times) and
``OUTPUT/reconstructions.png`` (rows: RGB, depth, normal, pose; each input above its
reconstruction). Config keys are documented in ``configs/vae/tiny.yaml``.

Measured (2026-11-28, the 2-core development CPU): ``configs/vae/tiny.yaml`` (factor 8, 654k
parameters, 900 steps of 2 samples × 4 modalities at 64 px) on 40 annotated real photos from
``../shared/data/humans`` (9 more held out) trains in 296 s (301 s wall) and reconstructs the
held-out set at PSNR RGB 16.8, depth 18.2, normal 22.1, pose 17.1 dB (training set: 16.4, 18.0,
23.1, 17.5); scaling_factor 0.368. That is blurry — shapes and silhouettes, little colour, thin
skeleton limbs mostly lost — but real: the train and held-out numbers agree, so more steps, not
more data, is what it lacks (loss still falling at the end; a larger model or factor 4 did not do
better in the same time). Each step decodes full-size shard images (~60 ms a sample), about half
the step time.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, default_collate

from hyperhuman import modalities
from hyperhuman.config import ConfigError

MODALITIES = ("rgb", "depth", "normal", "pose")
DATA_KEYS = {
    "train",
    "eval",
    "resolution",
    "random_crop",
    "min_crop_scale",
    "flip_prob",
    "shuffle_buffer",
    "num_workers",
}
TRAIN_KEYS = {
    "batch_size",
    "max_train_steps",
    "learning_rate",
    "weight_decay",
    "kl_weight",
    "log_every",
    "scale_samples",
    "eval_samples",
    "channels_last",
}
KNOWN_KEYS = {"output": None, "seed": None, "data": dict.fromkeys(DATA_KEYS), "model": None,
              "train": dict.fromkeys(TRAIN_KEYS)}  # fmt: skip
# The training recipes share one vocabulary (train.batch_size, train.max_train_steps,
# train.learning_rate, top-level seed); the names this recipe used before say where they went.
RENAMED = {
    "data.batch_size": "train.batch_size",
    "train.max_steps": "train.max_train_steps",
    "train.lr": "train.learning_rate",
    "train.seed": "seed (top level)",
}
MAKE_SHARDS = "make some with `hyperhuman annotate SOURCE OUTPUT` (or `make demo` for demo_output/shards)"


def load_vae(path: str | os.PathLike, **kwargs):
    """``AutoencoderKL`` (or a distilled decoder's :class:`hyperhuman.slim_vae.AutoencoderKLSlimDecoder`)
    from a local folder: a ``vae/`` folder itself, or a run / pipeline folder holding one. Never
    random weights: a missing VAE raises a ``ValueError`` naming the path and
    the command that makes one."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return _vae_class(os.path.join(path, "config.json")).from_pretrained(path, **kwargs)
    if os.path.isfile(os.path.join(path, "vae", "config.json")):
        return _vae_class(os.path.join(path, "vae", "config.json")).from_pretrained(path, subfolder="vae", **kwargs)
    raise ConfigError(
        f"no VAE at {path!r} (no config.json there or in its vae/ folder): train one with "
        "`hyperhuman train-vae --set data.train=SHARDS --set output=DIR` (it lands in DIR/vae), "
        "or point at a Stable Diffusion vae/ folder"
    )


def _vae_class(config_path: str):
    """``AutoencoderKL``, or our narrow-decoder subclass when the folder holds one (a distilled decoder)."""
    from diffusers import AutoencoderKL

    from hyperhuman.slim_vae import AutoencoderKLSlimDecoder

    with open(config_path) as handle:
        name = json.load(handle).get("_class_name")
    return AutoencoderKLSlimDecoder if name == AutoencoderKLSlimDecoder.__name__ else AutoencoderKL


def build_vae(model: dict):
    """An ``AutoencoderKL`` from the ``model`` section: its kwargs, with 3 in/out channels and
    plain encoder/decoder blocks (one per ``block_out_channels`` entry) unless given."""
    from diffusers import AutoencoderKL

    kwargs = dict(model)
    blocks = len(kwargs["block_out_channels"])
    kwargs["block_out_channels"] = list(kwargs["block_out_channels"])
    kwargs.setdefault("down_block_types", ["DownEncoderBlock2D"] * blocks)
    kwargs.setdefault("up_block_types", ["UpDecoderBlock2D"] * blocks)
    kwargs.setdefault("in_channels", 3)
    kwargs.setdefault("out_channels", 3)
    kwargs.setdefault("latent_channels", 4)
    return AutoencoderKL(**kwargs)


def downscale_factor(model: dict) -> int:
    return 2 ** (len(model["block_out_channels"]) - 1)


def check_vae_config(config: dict, check_paths: bool = True) -> None:
    """Every problem that can be seen before training, as a ValueError naming the key
    (``check_paths=False``: not whether the shards exist)."""
    for section in ("output", "data", "model", "train"):
        if not config.get(section):
            raise ConfigError(f"VAE config lacks {section!r}; see configs/vae/tiny.yaml")
    if unknown := sorted(set(config) - {"output", "seed", "data", "model", "train"}):
        raise ConfigError(f"unknown top-level keys {unknown}; known: output, seed, data, model, train")
    data, model, train = config["data"], config["model"], config["train"]
    for name, section, known in (("data", data, DATA_KEYS), ("train", train, TRAIN_KEYS)):
        if unknown := sorted(set(section) - known):
            renamed = [
                f"{name}.{key} is now {RENAMED[f'{name}.{key}']}" for key in unknown if f"{name}.{key}" in RENAMED
            ]
            hint = f" ({'; '.join(renamed)})" if renamed else ""
            raise ConfigError(
                f"unknown {name} keys {unknown}{hint}; known: {sorted(known)} (see configs/vae/tiny.yaml)"
            )
    if check_paths:
        shard_urls(data.get("train"), "data.train")
        if data.get("eval"):
            shard_urls(data["eval"], "data.eval")
    for section, key in (("data", "resolution"), ("train", "batch_size"), ("train", "max_train_steps")):
        value = config[section].get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{section}.{key} must be a positive integer, got {value!r}")
    channels = model.get("block_out_channels")
    if not channels:
        raise ConfigError("model.block_out_channels is not set: one entry per VAE block, e.g. [32, 64, 128, 128]")
    factor = downscale_factor(model)
    resolution = data["resolution"]
    if resolution % factor:
        raise ConfigError(
            f"data.resolution={resolution} is not divisible by the VAE's downscale factor {factor} "
            f"(2 ** (len(model.block_out_channels) - 1)); use a multiple of {factor}, "
            f"e.g. {max(factor, resolution // factor * factor)}"
        )
    groups = model.get("norm_num_groups", 32)
    if any(width % groups for width in channels):
        raise ConfigError(
            f"model.norm_num_groups={groups} must divide every model.block_out_channels entry {list(channels)}"
        )


def shard_urls(source, key: str = "data.train") -> list[str]:
    """Shard URLs of a dataset root, brace pattern or list; a ValueError naming ``key`` and how to
    make shards when there are none (local paths are checked to exist)."""
    from shards.reader import expand_urls

    if not source:
        raise ConfigError(
            f"{key} is not set: point it at HumanVerse shards (a dataset folder or a tar pattern); {MAKE_SHARDS}"
        )
    try:
        urls = expand_urls(source)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"{key}={source!r} has no complete shards ({exc}); {MAKE_SHARDS}, or fix the path") from exc
    local = [url.removeprefix("file://") for url in urls if "://" not in url or url.startswith("file://")]
    missing = [path for path in local if not os.path.isfile(path)]
    if not urls or missing:
        detail = f"missing {missing[:3]}" if missing else "nothing matched"
        raise ConfigError(f"{key}={source!r} has no usable shards ({detail}); {MAKE_SHARDS}, or fix the path")
    return urls


def epoch_loader(
    data: dict, urls: list[str], seed: int, batch_size: int, *, augment: bool, drop_last: bool
) -> DataLoader:
    """One pass over the shards: every random draw (shard order, shuffle, crops, flips) from ``seed``."""
    from shards.dataset import SampleTransform, humanverse_dataset

    transform = SampleTransform(
        data["resolution"],
        random_crop=augment and data.get("random_crop", True),
        min_crop_scale=data.get("min_crop_scale", 0.8),
        flip_prob=data.get("flip_prob", 0.5) if augment else 0.0,
        seed=seed,
    )
    dataset = humanverse_dataset(
        urls, transform, shuffle_buffer=data.get("shuffle_buffer", 0) if augment else 0, seed=seed, split_by_node=False
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=data.get("num_workers") or 0,
        collate_fn=default_collate,
        drop_last=drop_last,
    )


def training_batches(data: dict, urls: list[str], seed: int, batch_size: int) -> Iterator[dict]:
    """Endless augmented batches, epoch after epoch (epoch ``e`` seeded with ``(seed, e)``)."""
    epoch = 0
    while True:
        count = 0
        for batch in epoch_loader(data, urls, seed * 100_003 + epoch, batch_size, augment=True, drop_last=True):
            count += 1
            yield batch
        if not count:
            raise ConfigError(
                f"data.train has fewer than train.batch_size={batch_size} samples: lower train.batch_size or add shards"
            )
        epoch += 1


def fixed_batches(data: dict, urls: list[str], seed: int, samples: int, batch_size: int) -> Iterator[dict]:
    """Batches of centred, unflipped crops: the first ``samples`` samples (one pass at most)."""
    seen = 0
    for batch in epoch_loader(data, urls, seed, batch_size, augment=False, drop_last=False):
        if seen >= samples:
            break
        take = min(samples - seen, len(batch["key"]))
        seen += take
        yield batch if take == len(batch["key"]) else {key: value[:take] for key, value in batch.items()}


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(reconstruction.clamp(-1, 1), target).item()
    return float(10 * np.log10(4.0 / max(mse, 1e-12)))


def train_vae(config: dict) -> dict:
    """Train, measure the scaling factor, evaluate, save; returns the report (also written as JSON)."""
    check_vae_config(config)
    started = time.perf_counter()
    data, train = config["data"], config["train"]
    output = Path(config["output"])
    seed, batch_size = int(config.get("seed", 0)), train["batch_size"]
    max_steps, log_every = train["max_train_steps"], train.get("log_every", 50)
    train_urls = shard_urls(data["train"])
    torch.manual_seed(seed)
    vae = build_vae(config["model"])
    memory_format = torch.channels_last if train.get("channels_last", True) else torch.contiguous_format
    vae.to(memory_format=memory_format)  # ~15% faster convolutions on CPU
    optimizer = torch.optim.AdamW(
        vae.parameters(),
        lr=float(train.get("learning_rate", 1e-3)),
        weight_decay=float(train.get("weight_decay", 0.0)),
    )
    kl_weight = float(train.get("kl_weight", 1e-6))
    generator = torch.Generator().manual_seed(seed)
    batches = training_batches(data, train_urls, seed, batch_size)
    losses, kls = [], []
    vae.train()
    for step in range(1, max_steps + 1):
        units = modalities.batch_to_units(next(batches))
        images = torch.cat([units[name] for name in MODALITIES]).contiguous(memory_format=memory_format)
        posterior = vae.encode(images).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        kl = posterior.kl().mean()
        loss = F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images) + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        kls.append(kl.item())
        if step % log_every == 0 or step in (1, max_steps):
            recent = losses[-log_every:]
            print(
                f"[train-vae] step {step}/{max_steps} loss {sum(recent) / len(recent):.4f} (mean of last "
                f"{len(recent)}) kl {kls[-1]:.1f} {time.perf_counter() - started:.0f}s",
                flush=True,
            )
    train_s = time.perf_counter() - started

    vae.eval()
    with torch.no_grad():
        # scaling_factor from the training data (centred crops), as SD's 0.18215 was measured
        rgb_latents = [
            vae.encode(modalities.batch_to_units(batch)["rgb"]).latent_dist.mode()
            for batch in fixed_batches(data, train_urls, seed, int(train.get("scale_samples", 64)), batch_size)
        ]
        rgb_latents = torch.cat(rgb_latents)
        scaling_factor = 1.0 / max(float(rgb_latents.std()), 1e-6)
        eval_on = "data.eval" if data.get("eval") else "data.train (no held-out set given)"
        eval_urls = shard_urls(data["eval"], "data.eval") if data.get("eval") else train_urls
        inputs = {name: [] for name in MODALITIES}
        outputs = {name: [] for name in MODALITIES}
        for batch in fixed_batches(data, eval_urls, seed, int(train.get("eval_samples", 32)), batch_size):
            units = modalities.batch_to_units(batch)
            for name in MODALITIES:
                inputs[name].append(units[name])
                outputs[name].append(vae(units[name], sample_posterior=False).sample)
        inputs = {name: torch.cat(values) for name, values in inputs.items()}
        outputs = {name: torch.cat(values) for name, values in outputs.items()}
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.to(memory_format=torch.contiguous_format)
    output.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(output / "vae", safe_serialization=True)
    save_reconstructions(inputs, outputs, output / "reconstructions.png")
    tail = losses[-min(len(losses), log_every) :]
    report = {
        "steps": max_steps,
        "first_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
        "final_loss_over_steps": len(tail),
        "last_loss": losses[-1],
        "psnr_db": {name: round(psnr(outputs[name], inputs[name]), 2) for name in MODALITIES},
        "psnr_on": eval_on,
        "psnr_samples": int(inputs["rgb"].shape[0]),
        "scaling_factor": scaling_factor,
        "rgb_latent_mean": float(rgb_latents.mean()),
        "scale_samples": int(rgb_latents.shape[0]),
        "downscale_factor": downscale_factor(config["model"]),
        "latent_channels": int(vae.config.latent_channels),
        "resolution": data["resolution"],
        "parameters": sum(p.numel() for p in vae.parameters()),
        "train_s": round(train_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
        "output": str(output / "vae"),
        "losses": losses,
    }
    (output / "vae_report.json").write_text(json.dumps(report, indent=1))
    return report


def save_reconstructions(units: dict, reconstructions: dict, path: Path, count: int = 8, zoom: int = 2) -> None:
    """Rows: each modality's inputs, then their reconstructions; ``count`` samples, upscaled ``zoom``×."""
    rows = []
    for name in MODALITIES:
        for tensor in (units[name], reconstructions[name]):
            rows.append(np.concatenate(list(modalities.unit_to_image(tensor[:count])), axis=1))
    grid = PIL.Image.fromarray(np.concatenate(rows, axis=0))
    grid.resize((grid.width * zoom, grid.height * zoom), PIL.Image.NEAREST).save(path)
