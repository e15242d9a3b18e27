"""``hyperhuman train-lsdm``: the LSDM training recipe (HyperHuman sec. 3.2 and appendix).

One timestep per sample shared by the three branches, independent noise per branch, loss = sum
of the branches' v-prediction MSEs, text dropped for 15% of samples (classifier-free guidance).
Runs on one CPU process here and unchanged under ``accelerate launch`` on GPUs:

    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 \\
        -m hyperhuman train-lsdm --config lsdm/sd2-base-512 --set data.train=s3://bucket/hv

Reproducible: every random draw of an optimizer step (timesteps, noise, dropout, VAE posterior
samples) comes from a generator seeded by ``(seed, micro-batch index, process)``, and the data
stream is seeded per epoch, so ``--resume`` continues bit-exactly where a checkpoint left off.

Output folder: ``checkpoints/checkpoint-STEP/`` (accelerate state: model, optimizer, scheduler,
EMA, RNG; plus ``trainer_state.json``), ``logs/`` (TensorBoard), ``validation/step-STEP.png``,
``latent_stats.json``, and at the end ``pipeline/`` (loadable with
``HyperHumanPipeline.from_pretrained``; EMA weights when EMA is on) and ``train_report.json``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hyperhuman.config import ConfigError, check_known_keys
from hyperhuman.lsdm.data import Batches, check_data, compute_latent_norm, encode_batch
from hyperhuman.lsdm.model import BRANCHES, LatentStructuralUNet
from hyperhuman.lsdm.pipeline import SCHEDULER_DEFAULTS, HyperHumanPipeline, make_scheduler
from hyperhuman.skeleton import RENDERER_VERSION
from hyperhuman.training import (
    DATA_KEYS,
    EFFICIENCY_KEYS,
    TRAIN_KEYS,
    VALIDATION_KEYS,
    check_efficiency,
    check_processes_agree,
    check_train_counts,
    data_stream,
    image_grid,
    make_accelerator,
    make_efficiency,
    optimizer_step,
    prepare_for_training,
    restore,
    save_checkpoint,
    step_generator,
    trained_copy,
)

# --- configuration ---------------------------------------------------------------------------------
KNOWN_KEYS = {
    "output": None,
    "seed": None,
    "data": {**DATA_KEYS, "cache_latents": None},
    "model": dict.fromkeys(
        [
            "pretrained_unet",
            "unet",
            "branches",
            "replicated_blocks",
            "merge",
            "vae",
            "text_encoder",
            "latent_norm",
            "latent_stats_batches",
        ]
    ),  # fmt: skip
    "scheduler": dict.fromkeys(SCHEDULER_DEFAULTS),
    "train": {
        **TRAIN_KEYS,
        **dict.fromkeys(["condition_dropout", "pose_dropout", "loss_weights"]),
        "efficiency": EFFICIENCY_KEYS,  # SpFDE: sparse masks, freezing, data sieving (hyperhuman.efficiency)
    },
    "validation": VALIDATION_KEYS,
}


def check_config(config: dict, check_paths: bool = True) -> None:
    """Everything that would fail an hour in fails here, naming the key to fix."""
    for section in ("output", "data", "model", "train"):
        if section not in config:
            raise ConfigError(f"training config lacks {section!r}; see configs/lsdm/tiny.yaml")
    check_known_keys(config, KNOWN_KEYS, "configs/lsdm/tiny.yaml")
    model, train, data = config["model"], config["train"], config["data"]
    branches = model.get("branches", list(BRANCHES))
    unknown = [name for name in branches if name not in BRANCHES]
    if unknown or len(set(branches)) != len(branches) or "rgb" not in branches:
        raise ConfigError(f"model.branches={branches!r}: distinct names from {list(BRANCHES)}, including 'rgb'")
    weights = train.get("loss_weights")
    if weights is not None and len(weights) != len(branches):
        raise ConfigError(
            f"train.loss_weights has {len(weights)} entries for {len(branches)} branches {branches}: "
            "give one per branch"
        )
    norm = model.get("latent_norm")
    if isinstance(norm, dict) and (missing := [m for m in [*branches, "pose"] if m not in norm]):
        raise ConfigError(f"model.latent_norm lacks {missing}; give [shift, scale] for every branch and 'pose'")
    if not model.get("vae"):
        raise ConfigError("model.vae is not set: a VAE directory (SD's vae/, or one made by `hyperhuman train-vae`)")
    if not model.get("pretrained_unet") and not model.get("unet"):
        raise ConfigError("set model.pretrained_unet (an SD-style UNet directory) or model.unet (an architecture)")
    check_train_counts(train)
    check_efficiency(train)
    if data.get("cache_latents") and (data.get("random_crop", True) or data.get("flip_prob", 0.5)):
        raise ConfigError(
            "data.cache_latents needs fixed crops: set data.random_crop=false and data.flip_prob=0 "
            "(cached latents cannot follow random augmentation)"
        )
    if check_paths:
        check_data(data)
        if not os.path.isdir(model["vae"]):
            raise ConfigError(
                f"model.vae={model['vae']!r} is not a directory; train one with `hyperhuman train-vae` "
                "or point it at a Stable Diffusion vae/ folder"
            )


def check_resolution(resolution: int, vae_factor: int, unet_factor: int) -> None:
    step = vae_factor * unet_factor
    if resolution % step:
        raise ConfigError(
            f"data.resolution={resolution} is not divisible by {step} (VAE factor {vae_factor} × UNet down factor "
            f"{unet_factor}); use a multiple such as {max(step, resolution // step * step)}"
        )


def latent_stats(config: dict, path: str | None = None) -> tuple[dict, Path]:
    """``hyperhuman lsdm-stats``: compute the per-modality latent normalisation and write it as JSON."""
    from hyperhuman.vae import load_vae

    check_config(config)
    model = config["model"]
    vae = load_vae(model["vae"]).requires_grad_(False).eval()
    norm = compute_latent_norm(
        vae,
        config["data"],
        list(model.get("branches", list(BRANCHES))),
        model.get("latent_stats_batches", 8),
        config["train"]["batch_size"],
        config.get("seed", 0),
    )
    target = Path(path) if path else Path(config["output"]) / "latent_stats.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(norm, indent=1))
    return norm, target


def build_model(model_config: dict, latent_norm: dict | None) -> LatentStructuralUNet:
    from diffusers import UNet2DConditionModel

    if model_config.get("pretrained_unet"):
        unet = UNet2DConditionModel.from_pretrained(model_config["pretrained_unet"])
    else:
        unet = UNet2DConditionModel(**model_config["unet"])
    return LatentStructuralUNet.from_unet(
        unet,
        branches=model_config.get("branches", list(BRANCHES)),
        replicated_blocks=model_config.get("replicated_blocks", 1),
        merge=model_config.get("merge", "mean"),
        latent_norm=latent_norm,
        pose_renderer=RENDERER_VERSION,  # the drawing of the pose conditions this model learns
    )


def load_latent_norm(value) -> dict | None:
    if isinstance(value, str):
        return json.loads(Path(value).read_text())
    return value


def run_latent_norm(accelerator, config: dict, vae, names: list[str], resuming: bool) -> dict:
    """The latent normalisation of this run: ``model.latent_norm`` when given; when resuming, the run's
    own ``latent_stats.json`` (the checkpoint's weights were trained under it, whatever the data is
    now); else computed from the data and saved there."""
    output, model_config = Path(config["output"]), config["model"]
    given = load_latent_norm(model_config.get("latent_norm"))
    if given is not None:
        return given
    saved = output / "latent_stats.json"
    if resuming and saved.is_file():
        accelerator.print(f"[train-lsdm] latent normalisation from {saved} (the run's own)")
        return json.loads(saved.read_text())
    norm = compute_latent_norm(
        vae,
        config["data"],
        names,
        model_config.get("latent_stats_batches", 8),
        config["train"]["batch_size"],
        config.get("seed", 0),
    )
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(norm, indent=1))
    return norm


# --- training --------------------------------------------------------------------------------------
def noisy_latents(scheduler, latents: dict, names, generator) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """One timestep per sample shared by all branches, independent noise per branch: the stacked
    noisy latents, each branch's velocity target and the timesteps."""
    first = latents[names[0]]
    batch = first.shape[0]
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
    timesteps = timesteps.to(first.device)
    noisy, targets = [], []
    for name in names:
        noise = torch.randn(latents[name].shape, generator=generator).to(first.device)
        noisy.append(scheduler.add_noise(latents[name], noise, timesteps))
        targets.append(scheduler.get_velocity(latents[name], noise, timesteps))
    return torch.cat(noisy, dim=1), targets, timesteps


def branch_losses(prediction: torch.Tensor, targets: list[torch.Tensor]) -> list[torch.Tensor]:
    """MSE of each branch's slice of a stacked prediction against its target."""
    chunks = prediction.chunk(len(targets), dim=1)
    return [F.mse_loss(p.float(), t.float()) for p, t in zip(chunks, targets, strict=True)]


@torch.no_grad()
def sample_losses(prediction: torch.Tensor, targets: list[torch.Tensor], weights) -> torch.Tensor:
    """Each sample's weighted sum of branch MSEs ``(B,)``, detached: data sieving's scores."""
    chunks = prediction.chunk(len(targets), dim=1)
    return sum(
        w * (p.float() - t.float()).square().flatten(1).mean(1)
        for w, p, t in zip(weights, chunks, targets, strict=True)
    )


def v_prediction_loss(model, scheduler, latents: dict, names, states, mask, pose_latent, generator, weights):
    """Sum over branches of MSE(v̂, v), one timestep per sample shared by all branches; also each
    branch's loss and each sample's (detached)."""
    noisy, targets, timesteps = noisy_latents(scheduler, latents, names, generator)
    prediction = model(noisy, timesteps, states, pose_latent=pose_latent, encoder_attention_mask=mask)
    losses = branch_losses(prediction.sample, targets)
    total = sum(w * loss for w, loss in zip(weights, losses, strict=True))
    return total, [loss.item() for loss in losses], sample_losses(prediction.sample, targets, weights)


def drop_conditions(states, mask, pose_latent, empty_states, empty_mask, text_dropout, pose_dropout, generator):
    """Classifier-free guidance's training half: the text (and, if asked, the pose) of a random
    share of the samples replaced by the empty prompt (zeros)."""
    batch_size = states.shape[0]
    drop_text = torch.rand(batch_size, generator=generator) < text_dropout
    drop_pose = torch.rand(batch_size, generator=generator) < pose_dropout
    states = torch.where(drop_text[:, None, None].to(states.device), empty_states, states)
    mask = torch.where(drop_text[:, None].to(mask.device), empty_mask, mask)
    pose_latent = pose_latent * (~drop_pose).float()[:, None, None, None].to(pose_latent.device)
    return states, mask, pose_latent


def train_lsdm(config: dict, resume: str | None = None) -> dict:
    from hyperhuman.text import encode_prompts, load_text_encoder
    from hyperhuman.vae import load_vae

    check_config(config)
    output = Path(config["output"])
    data, model_config, train = config["data"], config["model"], config["train"]
    seed = config.get("seed", 0)
    accelerator = make_accelerator(train, output)
    torch.manual_seed(seed)
    vae = load_vae(model_config["vae"]).requires_grad_(False).eval()
    tokenizer, text_encoder = load_text_encoder(model_config.get("text_encoder", "minilm"))
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for frozen in (vae, text_encoder):
        frozen.to(accelerator.device)
        if weight_dtype != torch.float32:
            frozen.to(dtype=weight_dtype)

    names = list(model_config.get("branches", list(BRANCHES)))
    latent_norm = run_latent_norm(accelerator, config, vae, names, resuming=resume is not None)
    model = build_model(model_config, latent_norm)
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    check_resolution(data["resolution"], vae_factor, 2**model.trunk.num_upsamplers)
    cross = model.config.unet.get("cross_attention_dim")
    if cross != text_encoder.config.hidden_size:
        raise ConfigError(
            f"the UNet's cross_attention_dim is {cross} but the text encoder gives {text_encoder.config.hidden_size}-d "
            f"states; set model.unet.cross_attention_dim={text_encoder.config.hidden_size} or use another text encoder"
        )
    if train.get("gradient_checkpointing"):
        model.enable_gradient_checkpointing()
    noise_scheduler = make_scheduler(**config.get("scheduler", {}))

    efficiency = make_efficiency(train, model, seed)  # None unless train.efficiency turns a part on
    model, optimizer, lr_scheduler, ema = prepare_for_training(accelerator, model, train, efficiency=efficiency)
    state = restore(accelerator, output, resume, "train-lsdm")
    global_step, micro_step = state["global_step"], state["micro_step"]
    batches = data_stream(lambda position: Batches(data, train["batch_size"], seed, **position), state, efficiency)

    empty_states, empty_mask = encode_prompts(tokenizer, text_encoder, [""], accelerator.device)
    weights = train.get("loss_weights") or [1.0] * len(names)
    text_dropout, pose_dropout = train.get("condition_dropout", 0.15), train.get("pose_dropout", 0.0)
    cache = {} if data.get("cache_latents") else None
    validation = config.get("validation", {})
    validation_batch = None
    if accelerator.is_main_process:
        accelerator.init_trackers("lsdm", config={"max_train_steps": train["max_train_steps"]})
        if validation.get("every"):
            validation_batch = first_samples(data, validation.get("num_samples", 2), seed)

    losses, started = [], time.perf_counter()
    model.train()
    while global_step < train["max_train_steps"]:
        batch = next(batches)
        generator = step_generator(seed, micro_step, accelerator.process_index)
        micro_step += 1
        with accelerator.accumulate(model):
            latents = cached_latents(cache, batch, vae, accelerator.unwrap_model(model), names, generator)
            states, mask = encode_prompts(tokenizer, text_encoder, batch["caption"], accelerator.device)
            states, mask, pose_latent = drop_conditions(
                states, mask, latents["pose"], empty_states, empty_mask, text_dropout, pose_dropout, generator
            )
            loss, branch_losses, per_sample = v_prediction_loss(
                model, noise_scheduler, latents, names, states, mask, pose_latent, generator, weights
            )
            if efficiency is not None:
                efficiency.record_losses(batch["key"], per_sample)
            optimizer_step(accelerator, model, optimizer, lr_scheduler, loss, train.get("max_grad_norm"), efficiency)
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        if ema is not None:
            ema.step(model.parameters())
        losses.append(loss.item())
        logs = {"loss": losses[-1], "lr": lr_scheduler.get_last_lr()[0]}
        logs.update({f"loss_{name}": value for name, value in zip(names, branch_losses, strict=True)})
        accelerator.log(logs, step=global_step)
        if global_step % train.get("log_every", 10) == 0 or global_step == 1:
            accelerator.print(f"[train-lsdm] step {global_step}/{train['max_train_steps']} loss {losses[-1]:.4f}")
        if global_step % train["checkpointing_steps"] == 0:
            save_checkpoint(accelerator, output, global_step, micro_step, batches, train.get("checkpoints_total_limit"))
        if validation_batch is not None and global_step % validation["every"] == 0:
            pipeline = make_pipeline(
                accelerator, model, ema, vae, tokenizer, text_encoder, config.get("scheduler", {}), efficiency
            )
            run_validation(accelerator, pipeline, validation, validation_batch, output, global_step)

    accelerator.wait_for_everyone()
    report = {"steps": global_step, "wall_s": round(time.perf_counter() - started, 2), "losses": losses}
    report["weights_sha256_per_process"] = check_processes_agree(
        accelerator, accelerator.unwrap_model(model), "train-lsdm"
    )
    if efficiency is not None:
        report["efficiency"] = efficiency.report(accelerator.num_processes)
    if accelerator.is_main_process:
        pipeline = make_pipeline(
            accelerator, model, ema, vae, tokenizer, text_encoder, config.get("scheduler", {}), efficiency
        )
        pipeline.save_pretrained(output / "pipeline")
        if losses:
            report.update(first_loss=losses[0], last_loss=losses[-1])
        (output / "train_report.json").write_text(json.dumps(report, indent=1))
    accelerator.end_training()
    return report


def cached_latents(cache, batch, vae, model, names, generator) -> dict:
    if cache is None:
        return encode_batch(vae, model, batch, names, generator)
    missing = [index for index, key in enumerate(batch["key"]) if key not in cache]
    if missing:
        subset = {k: (v[missing] if isinstance(v, torch.Tensor) else [v[i] for i in missing]) for k, v in batch.items()}
        fresh = encode_batch(vae, model, subset, names, None)
        for position, index in enumerate(missing):
            cache[batch["key"][index]] = {name: value[position] for name, value in fresh.items()}
    return {name: torch.stack([cache[key][name] for key in batch["key"]]) for name in [*names, "pose"]}


def make_pipeline(
    accelerator, model, ema, vae, tokenizer, text_encoder, scheduler_config: dict, efficiency=None
) -> HyperHumanPipeline:
    """A pipeline over a copy of the trained weights (the EMA weights when EMA is on, pruned by the
    sparse masks when sparsity is on) with the run's noise schedule (the ``scheduler:`` section)."""
    unet = trained_copy(accelerator, model, ema, efficiency).to(vae.device, vae.dtype)
    return HyperHumanPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=make_scheduler(**scheduler_config)
    )


def first_samples(data: dict, count: int, seed: int) -> dict:
    """The first ``count`` samples at a fixed centre crop: the validation prompts and poses."""
    return next(Batches({**data, "random_crop": False, "flip_prob": 0.0, "shuffle_buffer": 0}, count, seed))


@torch.no_grad()
def run_validation(accelerator, pipeline, validation, batch, output, step) -> Path:
    pipeline.set_progress_bar_config(disable=True)
    resolution = batch["pixel_values"].shape[-1]
    poses = [
        {"width": resolution, "height": resolution, "people": [{"keypoints": k.tolist()} for k in kps[: int(n)]]}
        for kps, n in zip(batch["keypoints"], batch["num_people"], strict=True)
    ]
    result = pipeline(
        list(batch["caption"]),
        pose=poses,
        height=resolution,
        width=resolution,
        num_inference_steps=validation.get("num_inference_steps", 20),
        guidance_scale=validation.get("guidance_scale", 4.0),
        generator=torch.Generator().manual_seed(0),
        output_type="pil",
    )
    rows = [
        [result.pose[i], result.rgb[i], result.depth[i].convert("RGB"), result.normal[i]] for i in range(len(poses))
    ]
    grid = image_grid(rows)
    path = output / "validation" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    tracker = accelerator.get_tracker("tensorboard", unwrap=True)
    if tracker is not None:
        tracker.add_image("validation", np.asarray(grid), step, dataformats="HWC")
    return path


def describe(model: LatentStructuralUNet) -> dict:
    """Parameter counts: the trunk, each branch, and what the branches add over one UNet."""
    trunk = sum(p.numel() for p in model.trunk.parameters())
    branch = {name: sum(p.numel() for p in b.parameters()) for name, b in model.branch.items()}
    one = next(iter(branch.values()))
    return {
        "trunk": trunk,
        "per_branch": one,
        "total": trunk + sum(branch.values()),
        "added": sum(branch.values()) - one,
    }
