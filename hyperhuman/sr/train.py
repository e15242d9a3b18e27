"""``hyperhuman train-sr``: the WDSR-style ×s super-resolution network's training recipe.

Each step takes a batch of shard RGB crops at ``data.resolution`` (the targets), degrades them by
bicubic ×1/s (the inputs) and regresses the targets with an L1 loss (EDSR / WDSR's choice: it
trains sharper than MSE at the same PSNR). The machinery is the other recipes'
(:mod:`hyperhuman.training`): accelerate, gradient accumulation and clipping, AdamW, EMA,
checkpoints with exact ``--resume``, TensorBoard, multi-process.

Validation (every ``validation.every`` steps and at the end) scores PSNR / SSIM on the Y channel
of ``validation.photos`` (held-out photos, each degraded the same way), next to bicubic's, and
saves ``validation/step-STEP.png`` (bicubic | network | original, per photo). Output:
``checkpoints/``, ``logs/``, ``validation/``, ``sr/`` (:class:`SuperResolutionNet`, EMA weights
when EMA is on; ``SuperResolutionNet.from_pretrained`` loads it) and ``train_report.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from hyperhuman.config import ConfigError, check_known_keys
from hyperhuman.lsdm.data import Batches, check_data
from hyperhuman.sr.data import batch_pairs, bicubic_upscale, crop_to_multiple, downscale, photo_paths, to_tensor
from hyperhuman.sr.metrics import evaluate
from hyperhuman.sr.model import SuperResolutionNet
from hyperhuman.training import (
    DATA_KEYS,
    TRAIN_KEYS,
    check_processes_agree,
    check_train_counts,
    image_grid,
    make_accelerator,
    optimizer_step,
    prepare_for_training,
    restore,
    save_checkpoint,
    trained_copy,
)

REFERENCE = "configs/sr/tiny.yaml"
MODEL_KEYS = ("scale", "channels", "num_blocks", "inner_channels")
KNOWN_KEYS = {
    "output": None,
    "seed": None,
    "data": DATA_KEYS,
    "model": dict.fromkeys([*MODEL_KEYS, "pretrained"]),
    "train": TRAIN_KEYS,
    "validation": dict.fromkeys(["every", "photos", "max_side", "num_samples"]),
}


def check_config(config: dict, check_paths: bool = True) -> None:
    """What would fail later fails here, naming the key to fix."""
    for section in ("output", "data", "model", "train"):
        if section not in config:
            raise ConfigError(f"training config lacks {section!r}; see {REFERENCE}")
    check_known_keys(config, KNOWN_KEYS, REFERENCE)
    check_train_counts(config["train"])
    scale = config["model"].get("scale", 2)
    if not isinstance(scale, int) or scale < 2:
        raise ConfigError(f"model.scale={scale!r}: an SR network upscales by an integer ≥ 2")
    resolution = config["data"].get("resolution")
    if not isinstance(resolution, int) or resolution % scale or resolution < 4 * scale:
        raise ConfigError(
            f"data.resolution={resolution!r} is the target crop: a multiple of model.scale={scale} of at least "
            f"{4 * scale} (e.g. {max(4, 48 // scale) * scale})"
        )
    if check_paths:
        check_data(config["data"])
        pretrained = config["model"].get("pretrained")
        if pretrained and not (Path(pretrained) / "config.json").is_file():
            raise ConfigError(f"model.pretrained={pretrained!r} is not a SuperResolutionNet folder (no config.json)")
        if photos := config.get("validation", {}).get("photos"):
            try:
                photo_paths(photos)
            except FileNotFoundError as exc:
                raise ConfigError(f"validation.photos: {exc}") from exc


def build_model(model_config: dict, seed: int) -> SuperResolutionNet:
    if model_config.get("pretrained"):
        return SuperResolutionNet.from_pretrained(model_config["pretrained"])
    torch.manual_seed(seed)
    return SuperResolutionNet(**{key: model_config[key] for key in MODEL_KEYS if key in model_config})


def train_sr(config: dict, resume: str | None = None) -> dict:
    check_config(config)
    output = Path(config["output"])
    data, train = config["data"], config["train"]
    seed = config.get("seed", 0)
    accelerator = make_accelerator(train, output)
    model = build_model(config["model"], seed)
    scale = model.config.scale
    model, optimizer, lr_scheduler, ema = prepare_for_training(accelerator, model, train)
    state = restore(accelerator, output, resume, "train-sr")
    global_step, micro_step = state["global_step"], state["micro_step"]
    batches = Batches(data, train["batch_size"], seed, **state["data"])
    validation = config.get("validation", {})
    photos = photo_paths(validation["photos"]) if validation.get("photos") else []
    if accelerator.is_main_process:
        accelerator.init_trackers("sr", config={"max_train_steps": train["max_train_steps"]})

    losses, scores, started = [], {}, time.perf_counter()
    model.train()
    while global_step < train["max_train_steps"]:
        batch = next(batches)
        micro_step += 1  # the stream alone is random here (crops, flips): it resumes by its own position
        with accelerator.accumulate(model):
            low, high = batch_pairs(batch, scale)
            loss = F.l1_loss(model(low.to(accelerator.device)), high.to(accelerator.device))
            optimizer_step(accelerator, model, optimizer, lr_scheduler, loss, train.get("max_grad_norm"))
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        if ema is not None:
            ema.step(model.parameters())
        losses.append(loss.item())
        accelerator.log({"loss": losses[-1], "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
        if global_step % train.get("log_every", 10) == 0 or global_step == 1:
            accelerator.print(f"[train-sr] step {global_step}/{train['max_train_steps']} L1 {losses[-1]:.4f}")
        if global_step % train["checkpointing_steps"] == 0:
            save_checkpoint(accelerator, output, global_step, micro_step, batches, train.get("checkpoints_total_limit"))
        if photos and validation.get("every") and global_step % validation["every"] == 0:
            if accelerator.is_main_process:
                scores = run_validation(accelerator, trained_copy(accelerator, model, ema), photos, validation, output,
                                        global_step)  # fmt: skip
            model.train()

    accelerator.wait_for_everyone()
    report = {"steps": global_step, "wall_s": round(time.perf_counter() - started, 2), "losses": losses}
    report["weights_sha256_per_process"] = check_processes_agree(
        accelerator, accelerator.unwrap_model(model), "train-sr"
    )
    if accelerator.is_main_process:
        final = trained_copy(accelerator, model, ema)
        final.save_pretrained(output / "sr")
        if photos:
            scores = run_validation(accelerator, final, photos, validation, output, global_step)
        report.update(heldout=scores, params=sum(p.numel() for p in final.parameters()))
        if losses:
            report.update(first_loss=losses[0], last_loss=losses[-1])
        (output / "train_report.json").write_text(json.dumps(report, indent=1))
    accelerator.end_training()
    return report


@torch.no_grad()
def run_validation(accelerator, model, photos: list[Path], validation: dict, output: Path, step: int) -> dict:
    """Held-out PSNR / SSIM (network and bicubic), logged; a grid of the first photos."""
    max_side = validation.get("max_side")
    scores = evaluate(model, photos, max_side=max_side)
    accelerator.log({f"heldout/{key}": value for key, value in scores.items()}, step=step)
    accelerator.print(
        f"[train-sr] step {step}: held-out PSNR {scores['psnr']:.2f} dB (bicubic {scores['bicubic_psnr']:.2f}), "
        f"SSIM {scores['ssim']:.4f} (bicubic {scores['bicubic_ssim']:.4f})"
    )
    save_grid(model, photos[: validation.get("num_samples", 2)], max_side, output / "validation" / f"step-{step}.png")
    return scores


def save_grid(model, photos: list[Path], max_side: int | None, path: Path) -> Path:
    """Rows of bicubic | network | original for each photo (cropped to a common size)."""
    scale = model.config.scale
    images = [crop_to_multiple(PIL.Image.open(photo).convert("RGB"), scale, max_side) for photo in photos]
    side = min(min(image.size) for image in images) // scale * scale
    rows = []
    for image in images:
        high = to_tensor(crop_to_multiple(image, scale, side))
        low = downscale(high, scale)
        upscaled = [bicubic_upscale(low, scale), model(low.to(model.device, model.dtype)).float().cpu(), high]
        rows.append([_to_image(tensor) for tensor in upscaled])
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows).save(path)
    return path


def _to_image(tensor: torch.Tensor) -> PIL.Image.Image:
    array = (tensor[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return PIL.Image.fromarray(np.ascontiguousarray(array))
