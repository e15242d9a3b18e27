"""``hyperhuman train-sgr``: the Structure-Guided Refiner's training recipe (HyperHuman sec. 3.3).

The base UNet is frozen; only the refiner (condition embedders, the trainable encoder copy, the
zero convs) learns. Each step encodes the image with the frozen VAE, draws one timestep and noise
per sample, drops each condition (pose render, depth, normal) and the text independently per
sample (``train.drop``; paper: 0.5 each) so that any subset of conditions works at inference, and
regresses the base UNet's target (v or noise, as ``scheduler.prediction_type`` says) through
``refiner_forward``. Conditions come from our shards at the training resolution, through the same
reader and conversions as the LSDM (:func:`hyperhuman.modalities.batch_to_units`).

The machinery is the LSDM recipe's (:mod:`hyperhuman.training`): accelerate (one CPU process
here, ``accelerate launch`` on GPUs), gradient accumulation and clipping, AdamW, EMA, checkpoints
every N steps with a limit, ``--resume latest`` reproducing the uninterrupted run exactly,
TensorBoard logs, validation grids. Output: ``checkpoints/``, ``logs/``, ``validation/step-STEP.png``
(pose | depth | normal | refined per validation sample), ``refiner/`` (``StructureGuidedRefiner``,
EMA weights when EMA is on), ``pipeline/`` (``StructureGuidedRefinerPipeline``: the frozen base,
VAE, text encoder(s) and the trained refiner) and ``train_report.json``.

SDXL-style bases (``addition_embed_type: text_time``) take ``model.text_encoder`` and
``model.text_encoder_2``: the two encoders' penultimate states, the pooled embedding and size
``time_ids`` are computed as SDXL's pipeline does (``configs/sgr/sdxl-1024.yaml``).

Offline there is no pretrained base UNet, so ``configs/sgr/tiny.yaml`` freezes a randomly
initialised one (``model.unet``): it exercises the machinery, it does not make a useful refiner.
Real runs give ``model.pretrained_unet`` (the SD-2 or SDXL ``unet/`` folder).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from hyperhuman import modalities
from hyperhuman.config import ConfigError, check_known_keys
from hyperhuman.lsdm.data import Batches, check_data
from hyperhuman.lsdm.pipeline import SCHEDULER_DEFAULTS, make_scheduler
from hyperhuman.lsdm.train import first_samples
from hyperhuman.sgr.model import CONDITIONS, PAPER_DROP_PROBABILITIES, TEXT, StructureGuidedRefiner, drop_conditions
from hyperhuman.sgr.model import refiner_forward as run_refiner
from hyperhuman.skeleton import RENDERER_VERSION
from hyperhuman.training import (
    DATA_KEYS,
    TRAIN_KEYS,
    VALIDATION_KEYS,
    check_processes_agree,
    check_train_counts,
    gather_from_processes,
    image_grid,
    make_accelerator,
    optimizer_step,
    prepare_for_training,
    restore,
    save_checkpoint,
    step_generator,
    trained_copy,
)

SECTIONS = ("output", "data", "model", "train")
KNOWN_KEYS = {
    "output": None,
    "seed": None,
    "data": DATA_KEYS,
    "model": dict.fromkeys(
        [
            "pretrained_unet",
            "unet",
            "conditions",
            "embedder_channels",
            "embedder_strides",
            "vae",
            "text_encoder",
            "text_encoder_2",
        ]
    ),  # fmt: skip
    "scheduler": dict.fromkeys(SCHEDULER_DEFAULTS),
    "train": {**TRAIN_KEYS, "drop": None},
    "validation": VALIDATION_KEYS,
}


def check_config(config: dict, check_paths: bool = True) -> None:
    """Everything that would fail an hour in fails here, naming the key to fix."""
    for section in SECTIONS:
        if section not in config:
            raise ConfigError(f"training config lacks {section!r}; see configs/sgr/tiny.yaml")
    check_known_keys(config, KNOWN_KEYS, "configs/sgr/tiny.yaml")
    model, train, data = config["model"], config["train"], config["data"]
    conditions = list(model.get("conditions", CONDITIONS))
    if unknown := [name for name in conditions if name not in CONDITIONS]:
        raise ConfigError(f"model.conditions has unknown names {unknown}; choose from {list(CONDITIONS)}")
    drop = train.get("drop", PAPER_DROP_PROBABILITIES)
    if unknown := sorted(set(drop) - {*conditions, TEXT}):
        raise ConfigError(f"train.drop names {unknown}, which are not model.conditions {conditions} or 'text'")
    if not model.get("vae"):
        raise ConfigError("model.vae is not set: a VAE directory (SD's vae/, or one made by `hyperhuman train-vae`)")
    if not model.get("pretrained_unet") and not model.get("unet"):
        raise ConfigError("set model.pretrained_unet (the base UNet's folder) or model.unet (an architecture)")
    check_train_counts(train)
    if check_paths:
        check_data(data)
        if not os.path.isdir(model["vae"]):
            raise ConfigError(f"model.vae={model['vae']!r} is not a directory; train one with `hyperhuman train-vae`")
        if model.get("pretrained_unet") and not os.path.isdir(model["pretrained_unet"]):
            raise ConfigError(f"model.pretrained_unet={model['pretrained_unet']!r} is not a directory")
        if model.get("pretrained_unet"):
            check_schedule_matches_the_base(config.get("scheduler", {}), model["pretrained_unet"])


SCHEDULE_KEYS = ("prediction_type", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
                 "rescale_betas_zero_snr")  # fmt: skip


def check_schedule_matches_the_base(scheduler_config: dict, pretrained_unet: str) -> None:
    """The frozen base only understands its own noise schedule and target: the refiner must train on
    them. Compared with the base's ``scheduler/scheduler_config.json`` (beside its ``unet/``, the
    diffusers layout) when there is one; a disagreement names the ``scheduler.`` keys to set."""
    path = Path(pretrained_unet).resolve().parent / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        print(f"[train-sgr] note: no {path}; the scheduler: section is trusted to be the base's own schedule")
        return
    base = json.loads(path.read_text())
    base.setdefault("prediction_type", "epsilon")  # every diffusers scheduler's default
    ours = make_scheduler(**scheduler_config).config

    def same(a, b) -> bool:
        return math.isclose(a, b, rel_tol=1e-9) if isinstance(a, float) and isinstance(b, float) else a == b

    differ = [key for key in SCHEDULE_KEYS if key in base and not same(ours[key], base[key])]
    if differ:
        fixes = " ".join(f"--set scheduler.{key}={json.dumps(base[key])}" for key in differ)
        found = ", ".join(f"{key}: ours {ours[key]!r}, the base's {base[key]!r}" for key in differ)
        raise ConfigError(
            f"the scheduler: section disagrees with the base model's {path} ({found}); the frozen base was "
            f"trained on its own schedule, so train the refiner on it: {fixes}"
        )


def build_models(model_config: dict, seed: int):
    """The frozen base UNet and a refiner copied from it."""
    from diffusers import UNet2DConditionModel

    if model_config.get("pretrained_unet"):
        base = UNet2DConditionModel.from_pretrained(model_config["pretrained_unet"])
    else:
        torch.manual_seed(seed)
        base = UNet2DConditionModel(**model_config["unet"])
    torch.manual_seed(seed + 1)
    refiner = StructureGuidedRefiner.from_unet(
        base,
        conditions=tuple(model_config.get("conditions", CONDITIONS)),
        pose_renderer=RENDERER_VERSION,  # the drawing of the pose conditions this refiner learns
        **{key: tuple(model_config[key]) for key in ("embedder_channels", "embedder_strides") if key in model_config},
    )
    return base.requires_grad_(False).eval(), refiner


def load_prompt_encoder(model_config: dict):
    """``(tokenizers, encoders, encode)``: ``encode(prompts, device) → (states, mask, pooled or None)``.

    SD-style bases: one text encoder (``model.text_encoder``: CLIP by path, or the packaged MiniLM).
    SDXL bases (``addition_embed_type: text_time``): ``model.text_encoder`` and ``model.text_encoder_2``,
    encoded as SDXL's pipeline does, plus its pooled embedding."""
    from hyperhuman.text import encode_prompts, encode_sdxl_prompts, load_sdxl_text_encoders, load_text_encoder

    if model_config.get("text_encoder_2"):
        tokenizers, encoders = load_sdxl_text_encoders(model_config["text_encoder"], model_config["text_encoder_2"])
        return tokenizers, encoders, lambda prompts, device: encode_sdxl_prompts(tokenizers, encoders, prompts, device)
    tokenizer, encoder = load_text_encoder(model_config.get("text_encoder", "minilm"))
    encode = lambda prompts, device: (*encode_prompts(tokenizer, encoder, prompts, device), None)  # noqa: E731
    return [tokenizer], [encoder], encode


def check_text_conditioning(base, encoders: list, pooled_dim: int | None) -> None:
    if base.config.addition_embed_type == "text_time":
        if pooled_dim is None:
            raise ConfigError(
                "the base UNet is SDXL-style (addition_embed_type: text_time): set model.text_encoder and "
                "model.text_encoder_2 to its two text encoders (the second gives the pooled embedding)"
            )
        expected = base.config.projection_class_embeddings_input_dim - 6 * base.config.addition_time_embed_dim
        if pooled_dim != expected:
            raise ConfigError(
                f"text_encoder_2 gives {pooled_dim}-d pooled embeddings; the base UNet expects {expected}"
            )
    width = sum(encoder.config.hidden_size for encoder in encoders)
    if base.config.cross_attention_dim != width:
        raise ConfigError(
            f"the base UNet's cross_attention_dim is {base.config.cross_attention_dim} but the text encoder(s) give "
            f"{width}-d states; use the base model's own text encoder(s)"
        )


def check_resolution(resolution: int, vae_factor: int, unet: torch.nn.Module) -> None:
    step = vae_factor * 2 ** (len(unet.config.block_out_channels) - 1)
    if resolution % step:
        raise ConfigError(
            f"data.resolution={resolution} is not divisible by {step} (VAE factor {vae_factor} × UNet down factor "
            f"{step // vae_factor}); use a multiple such as {max(step, resolution // step * step)}"
        )


def training_target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        return noise
    raise ConfigError(f"scheduler.prediction_type={scheduler.config.prediction_type!r}: use v_prediction or epsilon")


def train_sgr(config: dict, resume: str | None = None) -> dict:
    from hyperhuman.vae import load_vae

    check_config(config)
    output = Path(config["output"])
    data, model_config, train = config["data"], config["model"], config["train"]
    seed = config.get("seed", 0)
    accelerator = make_accelerator(train, output)
    vae = load_vae(model_config["vae"]).requires_grad_(False).eval()
    tokenizers, text_encoders, encode = load_prompt_encoder(model_config)
    base, refiner = build_models(model_config, seed)
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    check_resolution(data["resolution"], vae_factor, base)
    strides = list(refiner.config.embedder_strides)
    if math.prod(strides) != vae_factor:
        raise ConfigError(
            f"model.embedder_strides={strides} downsample the conditions {math.prod(strides)}× but the VAE's latents "
            f"are {vae_factor}× smaller than the image: make the strides' product {vae_factor}"
        )
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for frozen in (vae, *text_encoders, base):
        frozen.to(accelerator.device)
        if weight_dtype != torch.float32:
            frozen.to(dtype=weight_dtype)
    empty = encode([""], accelerator.device)  # what a dropped text becomes
    check_text_conditioning(base, text_encoders, None if empty[2] is None else empty[2].shape[-1])
    if train.get("gradient_checkpointing"):
        refiner.enable_gradient_checkpointing()
    noise_scheduler = make_scheduler(**config.get("scheduler", {}))

    refiner, optimizer, lr_scheduler, ema = prepare_for_training(accelerator, refiner, train)
    state = restore(accelerator, output, resume, "train-sgr")
    global_step, micro_step = state["global_step"], state["micro_step"]
    batches = Batches(data, train["batch_size"], seed, **state["data"])
    drop = dict(train.get("drop", PAPER_DROP_PROBABILITIES))
    names = list(model_config.get("conditions", CONDITIONS))
    validation = config.get("validation", {})
    validation_batch = None
    if accelerator.is_main_process:
        accelerator.init_trackers("sgr", config={"max_train_steps": train["max_train_steps"]})
        if validation.get("every"):
            validation_batch = first_samples(data, validation.get("num_samples", 2), seed)
    components = {"vae": vae, "tokenizers": tokenizers, "text_encoders": text_encoders, "base": base}
    scheduler_config = config.get("scheduler", {})

    losses, started, micro_batches_without_conditions = [], time.perf_counter(), 0
    refiner.train()
    while global_step < train["max_train_steps"]:
        batch = next(batches)
        generator = step_generator(seed, micro_step, accelerator.process_index)
        micro_step += 1
        with accelerator.accumulate(refiner):
            loss, unconditioned = refiner_loss(
                refiner, base, vae, noise_scheduler, batch, names, drop, generator,
                encode=encode, empty=empty, dtype=weight_dtype,
            )  # fmt: skip
            optimizer_step(accelerator, refiner, optimizer, lr_scheduler, loss, train.get("max_grad_norm"))
        micro_batches_without_conditions += int(unconditioned == train["batch_size"])
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        if ema is not None:
            ema.step(refiner.parameters())
        losses.append(loss.item())
        accelerator.log({"loss": losses[-1], "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
        if global_step % train.get("log_every", 10) == 0 or global_step == 1:
            accelerator.print(f"[train-sgr] step {global_step}/{train['max_train_steps']} loss {losses[-1]:.4f}")
        if global_step % train["checkpointing_steps"] == 0:
            save_checkpoint(accelerator, output, global_step, micro_step, batches, train.get("checkpoints_total_limit"))
        if validation_batch is not None and global_step % validation["every"] == 0:
            pipeline = make_pipeline(trained_copy(accelerator, refiner, ema), components, scheduler_config)
            run_validation(accelerator, pipeline, validation, validation_batch, output, global_step)

    accelerator.wait_for_everyone()
    report = {"steps": global_step, "wall_s": round(time.perf_counter() - started, 2), "losses": losses}
    # robust conditioning drops every condition of a whole micro-batch now and then: those steps still train
    report["micro_batches_without_conditions_per_process"] = gather_from_processes(
        accelerator, micro_batches_without_conditions
    )
    report["weights_sha256_per_process"] = check_processes_agree(
        accelerator, accelerator.unwrap_model(refiner), "train-sgr"
    )
    if accelerator.is_main_process:
        final = trained_copy(accelerator, refiner, ema)
        final.save_pretrained(output / "refiner")
        make_pipeline(final, components, scheduler_config).save_pretrained(output / "pipeline")
        if losses:
            report.update(first_loss=losses[0], last_loss=losses[-1])
        (output / "train_report.json").write_text(json.dumps(report, indent=1))
    accelerator.end_training()
    return report


def refiner_loss(refiner, base, vae, scheduler, batch, names, drop, generator, *, encode, empty, dtype):
    """One micro-batch: encode, noise, drop conditions and text per sample, regress the base's target.
    Returns the loss and how many samples lost every condition (those train the base's path only)."""
    empty_states, empty_mask, empty_pooled = empty
    device = base.device
    units = modalities.batch_to_units(batch)
    with torch.no_grad():
        posterior = vae.encode(units["rgb"].to(device, dtype)).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(device)
        latents = latents * vae.config.scaling_factor
        states, mask, pooled = encode(list(batch["caption"]), device)
    batch_size = latents.shape[0]
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator).to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    dropped = drop_conditions(
        {name: units[name].to(device, dtype) for name in names},
        states.to(dtype),
        drop,
        generator,
        empty_text_states=empty_states.to(dtype),
    )
    mask = torch.where(dropped.text_kept[:, None].to(mask.device), mask, empty_mask)
    added_cond_kwargs = None
    if pooled is not None:  # SDXL: the pooled text follows the text's drop; size micro-conditioning
        pooled = torch.where(dropped.text_kept[:, None], pooled, empty_pooled).to(dtype)
        height, width = units["rgb"].shape[-2:]
        # the crops' original sizes are not tracked: the target size stands in (SDXL's usual default)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]] * batch_size, dtype=dtype, device=device)
        added_cond_kwargs = {"text_embeds": pooled, "time_ids": time_ids}
    prediction = run_refiner(
        base,
        refiner,
        noisy,
        timesteps,
        dropped.text_states,
        dropped.conditions,
        condition_masks=dropped.condition_masks,
        encoder_attention_mask=mask,
        added_cond_kwargs=added_cond_kwargs,
    )
    target = training_target(scheduler, latents, noise, timesteps)
    present = torch.stack(list(dropped.condition_masks.values())).any(dim=0)
    return F.mse_loss(prediction.float(), target.float()), int((~present).sum())


def make_pipeline(refiner: StructureGuidedRefiner, components: dict, scheduler_config: dict):
    """A sampling pipeline around the frozen base and a trained refiner."""
    from hyperhuman.sgr.pipeline import StructureGuidedRefinerPipeline

    tokenizers, encoders, base = components["tokenizers"], components["text_encoders"], components["base"]
    second = {"text_encoder_2": encoders[1], "tokenizer_2": tokenizers[1]} if len(encoders) == 2 else {}
    return StructureGuidedRefinerPipeline(
        vae=components["vae"], text_encoder=encoders[0], tokenizer=tokenizers[0], unet=base,
        refiner=refiner.to(base.device, base.dtype), scheduler=make_scheduler(**scheduler_config), **second,
    )  # fmt: skip


@torch.no_grad()
def run_validation(accelerator, pipeline, validation: dict, batch: dict, output: Path, step: int) -> Path:
    """Sample the first validation samples from their own pose, depth and normal; rows of
    pose | depth | normal | refined image in ``validation/step-STEP.png`` and TensorBoard."""
    pipeline.set_progress_bar_config(disable=True)
    resolution = batch["pixel_values"].shape[-1]
    units = modalities.batch_to_units(batch)
    poses = [
        {"width": resolution, "height": resolution, "people": [{"keypoints": k.tolist()} for k in kps[: int(n)]]}
        for kps, n in zip(batch["keypoints"], batch["num_people"], strict=True)
    ]
    nearness = ((units["depth"][:, 0] + 1) / 2).numpy()
    normals = units["normal"].permute(0, 2, 3, 1).numpy()
    result = pipeline(
        list(batch["caption"]), pose=poses, depth=nearness, normal=normals, height=resolution, width=resolution,
        num_inference_steps=validation.get("num_inference_steps", 20),
        guidance_scale=validation.get("guidance_scale", 4.0), generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    maps = {name: modalities.unit_to_image(units[name]) for name in ("pose", "depth", "normal")}
    rows = [
        [*(PIL.Image.fromarray(maps[name][i]) for name in ("pose", "depth", "normal")), result.images[i]]
        for i in range(len(poses))
    ]
    grid = image_grid(rows)
    path = output / "validation" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    tracker = accelerator.get_tracker("tensorboard", unwrap=True)
    if tracker is not None:
        tracker.add_image("validation", np.asarray(grid), step, dataformats="HWC")
    return path
