"""``hyperhuman train-vae``: a small ``AutoencoderKL`` trained on our shards, for offline runs.

Real runs use Stable Diffusion's VAE by path. Nothing like it can be downloaded here, and a random
decoder would make every offline generation noise, so this recipe trains a small VAE on the
images the LSDM encodes — RGB, depth (nearness), normals and rendered skeletons, mixed in every
batch — with an L1 + MSE reconstruction loss and a small KL term. After training, the RGB latent
spread is measured and stored as ``scaling_factor`` (how SD's 0.18215 was found), so the VAE
plugs into the diffusers convention unchanged.

Output: ``OUTPUT/vae/`` (``AutoencoderKL.from_pretrained``), ``OUTPUT/vae_report.json`` (steps,
losses, PSNR per modality, scaling factor, parameters, time) and ``OUTPUT/reconstructions.png``
(rows: RGB, depth, normal, pose; input above reconstruction).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from hyperhuman import modalities

MODALITIES = ("rgb", "depth", "normal", "pose")


def load_vae(path: str):
    """``AutoencoderKL`` from a folder; never random weights."""
    from diffusers import AutoencoderKL

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(
            f"no VAE at {path!r} (config.json missing): train one with `hyperhuman train-vae` "
            "or point the config at a Stable Diffusion vae/ folder"
        )
    return AutoencoderKL.from_pretrained(path)


def build_vae(model: dict):
    from diffusers import AutoencoderKL

    blocks = len(model["block_out_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        block_out_channels=list(model["block_out_channels"]),
        layers_per_block=model.get("layers_per_block", 1),
        latent_channels=model.get("latent_channels", 4),
        norm_num_groups=model.get("norm_num_groups", 32),
        sample_size=model.get("sample_size", 64),
        mid_block_add_attention=model.get("mid_block_add_attention", True),
    )


def check_vae_config(config: dict) -> None:
    from hyperhuman.lsdm.data import check_data

    for section in ("output", "data", "model", "train"):
        if section not in config:
            raise ValueError(f"VAE config lacks {section!r}; see configs/vae/tiny.yaml")
    check_data(config["data"])
    factor = 2 ** (len(config["model"]["block_out_channels"]) - 1)
    resolution = config["data"]["resolution"]
    if resolution % factor:
        raise ValueError(
            f"data.resolution={resolution} is not divisible by the VAE's downscale factor {factor} "
            f"(2 ** (len(model.block_out_channels) - 1)); use a multiple of {factor}"
        )


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(reconstruction.clamp(-1, 1), target).item()
    return float(10 * np.log10(4.0 / max(mse, 1e-12)))


def train_vae(config: dict) -> dict:
    from hyperhuman.lsdm.data import Batches

    check_vae_config(config)
    data, train = config["data"], config["train"]
    output = Path(config["output"])
    seed = config.get("seed", 0)
    torch.manual_seed(seed)
    vae = build_vae(config["model"])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=float(train.get("learning_rate", 1e-3)), weight_decay=0.0)
    kl_weight = float(train.get("kl_weight", 1e-6))
    batches = Batches(data, data.get("batch_size", 8), seed)
    generator = torch.Generator().manual_seed(seed)
    losses, started = [], time.perf_counter()
    vae.train()
    for step in range(1, train["max_steps"] + 1):
        units = modalities.batch_to_units(next(batches))
        images = torch.cat([units[name] for name in MODALITIES])
        posterior = vae.encode(images).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = (
            F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images) + kl_weight * posterior.kl().mean()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % train.get("log_every", 50) == 0 or step == 1:
            print(f"[train-vae] step {step}/{train['max_steps']} loss {losses[-1]:.4f}")
    train_s = time.perf_counter() - started

    vae.eval()
    held_out = data.get("eval") or data["train"]
    eval_units = modalities.batch_to_units(
        next(
            Batches(
                {**data, "train": held_out, "random_crop": False, "flip_prob": 0.0}, data.get("batch_size", 8), seed
            )
        )
    )
    with torch.no_grad():
        scaling_factor = 1.0 / float(vae.encode(eval_units["rgb"]).latent_dist.mode().std())
        reconstructions = {name: vae(eval_units[name], sample_posterior=False).sample for name in MODALITIES}
    vae.register_to_config(scaling_factor=scaling_factor)
    output.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(output / "vae")
    save_reconstructions(eval_units, reconstructions, output / "reconstructions.png")
    report = {
        "steps": train["max_steps"],
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "losses": losses,
        "psnr_db": {name: round(psnr(reconstructions[name], eval_units[name]), 2) for name in MODALITIES},
        "psnr_on": "data.eval" if data.get("eval") else "data.train (no held-out set given)",
        "scaling_factor": scaling_factor,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "train_s": round(train_s, 1),
    }
    (output / "vae_report.json").write_text(json.dumps(report, indent=1))
    return report


def save_reconstructions(units: dict, reconstructions: dict, path: Path, count: int = 4) -> None:
    rows = []
    for name in MODALITIES:
        rows.append(np.concatenate(list(modalities.unit_to_image(units[name][:count])), axis=1))
        rows.append(np.concatenate(list(modalities.unit_to_image(reconstructions[name][:count])), axis=1))
    PIL.Image.fromarray(np.concatenate(rows, axis=0)).save(path)
