"""``hyperhuman distill vae-decoder``: SnapFusion's efficient VAE decoder, by data distillation.

The student is the teacher VAE with a channel-reduced decoder
(:class:`hyperhuman.slim_vae.AutoencoderKLSlimDecoder`): every decoder width is scaled by
``student.width`` and the encoder and ``quant_conv`` are the teacher's, bit for bit, so the student
encodes exactly as the teacher and the LSDM's latents keep their meaning. It is trained on the
teacher decoder's outputs only (no image loss: L1 + MSE between the two decoders' outputs) for
latents of two kinds, mixed by ``data.sampled_fraction``:

- shard images of all four modalities (rgb, depth, normal, pose) encoded by the frozen encoder:
  posterior *samples*, drawn afresh every step, so the decoder sees the spread of the latents;
- latents sampled by the teacher LSDM (``teacher:``, optional) from shard captions and poses with a
  few steps, denormalised per branch (``unet.denormalize``): what the decoder meets in the
  pipeline. They are sampled once and cached in ``OUTPUT/sampled_latents.pt`` (resumes reuse it).

Widths. Channels and GroupNorm groups both scale by the width (groups rounded to a whole number,
at least one, channels to a multiple of it), so a group keeps the teacher's number of channels.
Rounding channels to multiples of the teacher's ``norm_num_groups`` instead would refuse to halve
a first block of 8 channels in 8 groups (the offline VAE's) and would keep the high-resolution
block, the costly one, wide.

Init: the decoder is sliced from the teacher's: every tensor keeps its first channels in every
dimension (``student.init: slice``; ``random`` for diffusers' default init). No decoder tensor
mixes channels across a skip or a concatenation, so slicing is one rule for every weight, and the
first channels are whole teacher groups. At width 1 the sliced student *is* the teacher (tested).
Measured (the 2-core development CPU, busy): the tiny config at width 0.5 on a 300-step ``train-vae``
of the bench photos, 300 steps, 9 held-out photos: slice ends at rgb 23.5, depth 25.1, normal 26.5,
pose 30.0 dB against random's 22.0, 23.5, 22.5, 24.8 dB (both still rising; slice starts lower on
rgb and normal, 8–10 dB against 12–13, but learns faster). With ``teacher:`` (a 500-step toy LSDM):
23.8, 25.0, 30.0, 29.0 dB, and 25.3, 23.5, 29.7 dB on its held-out samples; 94 s wall.

Output: ``OUTPUT/vae/`` (the student, ``hyperhuman.vae.load_vae``), ``OUTPUT/pipeline/`` with a teacher
(its pipeline with the student VAE, ``HyperHumanPipeline.from_pretrained``), checkpoints with exact
``--resume``, TensorBoard logs, ``validation/step-STEP.png`` (per modality: teacher decode above
student decode) and ``OUTPUT/vae_decoder_report.json``. Keys: ``configs/distill/vae-decoder-tiny.yaml``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch.utils.data import default_collate

from hyperhuman.config import ConfigError, check_known_keys, json_digest
from hyperhuman.slim_vae import AutoencoderKLSlimDecoder
from hyperhuman.training import (
    DATA_KEYS,
    TRAIN_KEYS,
    check_processes_agree,
    image_grid,
    make_accelerator,
    optimizer_step,
    prepare_for_training,
    restore,
    save_checkpoint,
    step_generator,
    weights_digest,
)
from hyperhuman.vae import load_vae

REFERENCE = "configs/distill/vae-decoder-tiny.yaml"
KNOWN_KEYS = {
    "output": None,
    "seed": None,
    "vae": None,
    "teacher": None,
    "student": dict.fromkeys(["width", "init"]),
    "data": {**DATA_KEYS, "sampled_fraction": None},
    "sampling": dict.fromkeys(["num_samples", "num_inference_steps", "guidance_scale"]),
    "loss": dict.fromkeys(["l1_weight", "mse_weight"]),
    "train": TRAIN_KEYS,
    "validation": dict.fromkeys(["every", "num_samples", "heldout", "decode_runtime"]),
}
INITS = ("slice", "random")
PSNR_CLAMP_DB = 100.0  # identical outputs: infinite PSNR, which JSON cannot hold (as distill.measure)
BATCH = 8  # latents per decode or sampling call outside training
DECODE_REPEATS = 5


# --- the student ---------------------------------------------------------------------------------
def student_widths(channels, groups: int, width) -> tuple[list[int], int]:
    """``(decoder channels, decoder groups)`` for a ``width`` in (0, 1]: groups ``round(groups · width)``
    (at least 1), each channel count ``channels · width`` rounded to a multiple of them (at least one)."""
    if isinstance(width, bool) or not isinstance(width, int | float) or not 0 < width <= 1:
        raise ConfigError(
            f"student.width={width!r}: the decoder's share of the teacher's channels, in (0, 1], e.g. 0.5"
        )
    new_groups = max(1, math.floor(groups * width + 0.5))
    return [new_groups * max(1, math.floor(c * width / new_groups + 0.5)) for c in channels], new_groups


def make_student_vae(teacher_vae: AutoencoderKL, width: float, init: str = "slice") -> AutoencoderKLSlimDecoder:
    """The teacher with its decoder's channels scaled by ``width``; encoder and ``quant_conv``
    copied, decoder and ``post_quant_conv`` sliced from the teacher's (``init="slice"``) or left as
    diffusers initialises them (``"random"``: seed with ``torch.manual_seed``). On the CPU, float32."""
    if init not in INITS:
        raise ConfigError(f"student.init={init!r}: one of {INITS}")
    config = {key: value for key, value in teacher_vae.config.items() if not key.startswith("_")}
    base_channels = config.get("decoder_block_out_channels") or config["block_out_channels"]
    base_groups = config.get("decoder_norm_num_groups") or config["norm_num_groups"]
    channels, groups = student_widths(base_channels, base_groups, width)
    student = AutoencoderKLSlimDecoder(**{**config, "decoder_block_out_channels": channels,
                                          "decoder_norm_num_groups": groups})  # fmt: skip
    teacher_state = {name: value.detach().cpu().float() for name, value in teacher_vae.state_dict().items()}
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            if not name.startswith(("decoder.", "post_quant_conv.")):
                tensor.copy_(teacher_state[name])  # the encoder side: the very same tensors
            elif init == "slice":
                tensor.copy_(teacher_state[name][tuple(slice(0, size) for size in tensor.shape)])
    return student


# --- the measures the benchmark calls ------------------------------------------------------------
@torch.no_grad()
def decoded(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """``vae.decode`` in batches of :data:`BATCH`, clamped to [-1, 1] as the pipeline does, float32 CPU."""
    chunks = [vae.decode(chunk.to(vae.device, vae.dtype)).sample for chunk in latents.split(BATCH)]
    return torch.cat(chunks).float().clamp(-1, 1).cpu()


def decoder_psnr(student_vae, teacher_vae, latents: dict | torch.Tensor) -> dict[str, float]:
    """PSNR (dB, peak-to-peak 2, pooled over all samples, clamped at 100) of the student decoder's
    outputs against the teacher decoder's for the same raw VAE latents: one per entry of a
    ``{modality: (N, C, h, w)}`` dict, or ``{"all": ...}`` for one tensor."""
    latents = latents if isinstance(latents, dict) else {"all": latents}
    result = {}
    for name, values in latents.items():
        mse = F.mse_loss(decoded(student_vae, values).double(), decoded(teacher_vae, values).double()).item()
        result[name] = PSNR_CLAMP_DB if mse == 0 else min(PSNR_CLAMP_DB, 10 * math.log10(4.0 / mse))
    return result


def decode_ms(vae: AutoencoderKL, latents: torch.Tensor, repeats: int = DECODE_REPEATS, runtime="eager") -> float:
    """Median milliseconds of one ``vae.decode(latents)`` (the whole batch, no grad) after one warm-up
    call, on ``runtime``: ``eager``, ``compiled`` (``torch.compile`` of the decode; the warm-up
    compiles) or ``bf16`` (autocast). ``latents`` should already be on the VAE's device."""
    from distill.latency import RUNTIMES

    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is not one of {RUNTIMES}")
    vae = vae.eval()

    def decode(z):
        with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=runtime == "bf16"):
            return vae.decode(z).sample

    call = torch.compile(decode) if runtime == "compiled" else decode
    times = []
    with torch.inference_mode():
        for index in range(1 + repeats):
            started = time.perf_counter()
            call(latents)
            if latents.device.type == "cuda":
                torch.cuda.synchronize(latents.device)
            if index:
                times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


# --- configuration -------------------------------------------------------------------------------
def check_config(config: dict, check_paths: bool = True) -> None:
    """Everything that would fail an hour in fails here, naming the key to fix."""
    for section in ("output", "student", "data", "train"):
        if config.get(section) is None:
            raise ConfigError(f"vae-decoder config lacks {section!r}; see {REFERENCE}")
    check_known_keys(config, KNOWN_KEYS, REFERENCE)
    if not config.get("vae") and not config.get("teacher"):
        raise ConfigError("set vae (the teacher VAE: a vae/ folder or a run holding one) or teacher (an LSDM run)")
    student, data = config["student"], config["data"]
    student_widths([8], 8, student.get("width"))  # the width alone; the VAE's channels are checked below
    if student.get("init", "slice") not in INITS:
        raise ConfigError(f"student.init={student.get('init')!r}: one of {INITS}")
    fraction = data.get("sampled_fraction", 0.0)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction < 1:
        raise ConfigError(f"data.sampled_fraction must be in [0, 1) (the share of sampled latents), got {fraction!r}")
    weights = config.get("loss", {})
    for key in ("l1_weight", "mse_weight"):
        if not isinstance(weights.get(key, 1.0), int | float) or weights.get(key, 1.0) < 0:
            raise ConfigError(f"loss.{key} must be a number ≥ 0, got {weights.get(key)!r}")
    sections = [("train", k) for k in ("batch_size", "max_train_steps", "checkpointing_steps")]
    sections += [("sampling", "num_samples"), ("sampling", "num_inference_steps"), ("validation", "num_samples")]
    for section, key in sections:
        value = config.get(section, {}).get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{section}.{key} must be a positive integer, got {value!r}")
    from distill.latency import RUNTIMES

    if config.get("validation", {}).get("decode_runtime", "eager") not in RUNTIMES:
        raise ConfigError(
            f"validation.decode_runtime must be one of {RUNTIMES}, got {config['validation']['decode_runtime']!r}"
        )
    if check_paths:
        from hyperhuman.vae import shard_urls

        if config.get("teacher") and not (Path(config["teacher"]) / "pipeline" / "model_index.json").is_file():
            raise ConfigError(
                f"teacher={config['teacher']!r} is not a run folder with pipeline/; null: no sampled latents"
            )
        factor = 2 ** (len(teacher_vae_config(config)["block_out_channels"]) - 1)
        if data.get("resolution", 0) % factor:
            raise ConfigError(
                f"data.resolution={data.get('resolution')!r} is not a multiple of the VAE factor {factor}"
            )
        shard_urls(data.get("train"), "data.train")
        if config.get("validation", {}).get("heldout"):
            shard_urls(config["validation"]["heldout"], "validation.heldout")


def teacher_vae_config(config: dict) -> dict:
    """The teacher VAE's config.json: ``vae:`` (a vae/ folder or a folder holding one), else the teacher's."""
    path = Path(config["vae"]) if config.get("vae") else Path(config["teacher"]) / "pipeline" / "vae"
    for candidate in (path / "config.json", path / "vae" / "config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise ConfigError(f"vae={str(path)!r} holds no VAE (no config.json there or in vae/): train one with train-vae")


# --- the latents ---------------------------------------------------------------------------------
@torch.no_grad()
def shard_latents(vae, batch: dict, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """Raw latents of every modality of a shard batch: posterior samples (``generator=None``: modes)."""
    from hyperhuman import modalities

    latents = {}
    for name, units in modalities.batch_to_units(batch).items():
        posterior = vae.encode(units.to(vae.device, vae.dtype)).latent_dist
        if generator is None:
            latents[name] = posterior.mode().float()
        else:
            noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
            latents[name] = (posterior.mean + posterior.std * noise).float()
    return latents


@torch.no_grad()
def sampled_latents(pipeline, samples: list[dict], sampling: dict, seed: int) -> dict[str, torch.Tensor]:
    """Raw VAE latents of every branch that ``pipeline`` samples for the samples' captions and poses
    (``output_type="latent"``, then ``unet.denormalize``), on the CPU: ``{branch: (N, C, h, w)}``."""
    from distill.measure import pose_annotation

    unet, names = pipeline.unet, list(pipeline.unet.config.branches)
    chunks = {name: [] for name in names}
    for start in range(0, len(samples), BATCH):
        rows = samples[start : start + BATCH]
        resolution = rows[0]["pixel_values"].shape[-1]
        stacked = pipeline(
            [row["caption"] for row in rows],
            pose=[pose_annotation(row, resolution) for row in rows],
            height=resolution,
            width=resolution,
            num_inference_steps=sampling.get("num_inference_steps", 8),
            guidance_scale=sampling.get("guidance_scale", 3.0),
            generator=torch.Generator().manual_seed(seed * 1009 + start),
            output_type="latent",
        ).rgb
        for name, chunk in zip(names, stacked.split(unet.config.latent_channels, dim=1), strict=True):
            chunks[name].append(unet.denormalize(name, chunk).float().cpu())
    return {name: torch.cat(values) for name, values in chunks.items()}


def cached(path: Path, settings: dict, make, write: bool = True) -> dict:
    """``make()``'s tensors, kept in ``path`` with the digest of the ``settings`` they came from."""
    digest = json_digest(settings)
    if path.is_file():
        stored = torch.load(path, weights_only=True)
        if stored.get("digest") == digest:
            return stored["latents"]
    latents = make()
    if write:  # one process writes, atomically: another may be reading it
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"digest": digest, "settings": json.dumps(settings), "latents": latents}, f"{path}.tmp")
        Path(f"{path}.tmp").replace(path)
    return latents


# --- the recipe ----------------------------------------------------------------------------------
class DecodePath(torch.nn.Module):
    """The student VAE whose ``forward`` decodes: what accelerate wraps, so that data-parallel
    training synchronises the decoder's gradients (``AutoencoderKL.forward`` would encode first)."""

    def __init__(self, vae: AutoencoderKLSlimDecoder):
        super().__init__()
        self.vae = vae
        self.config = vae.config  # for the EMA copy of prepare_for_training

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample


def distill_vae_decoder(config: dict, resume: str | None = None) -> dict:
    from hyperhuman.lsdm.data import Batches

    check_config(config)
    output, seed = Path(config["output"]), config.get("seed", 0)
    data, train, validation = config["data"], config["train"], config.get("validation", {})
    accelerator = make_accelerator(train, output)
    torch.manual_seed(seed)  # the student's random init, if asked for
    teacher, heldout, pool = teacher_and_latents(config, accelerator)
    student = make_student_vae(teacher, config["student"]["width"], config["student"].get("init", "slice"))
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    report = {"vae": config.get("vae"), "teacher": config.get("teacher"), "width": config["student"]["width"],
              "init": config["student"].get("init", "slice"), "initial_psnr_db": evaluate(student, teacher, heldout),
              "decoder_block_out_channels": list(student.config.decoder_block_out_channels),
              "decoder_norm_num_groups": student.config.decoder_norm_num_groups, "heldout": []}  # fmt: skip
    if weight_dtype != torch.float32:  # diffusers warns about a cast to the dtype a model already has
        teacher.to(dtype=weight_dtype)
    student.encoder.requires_grad_(False)  # encoding stays the teacher's
    if student.quant_conv is not None:
        student.quant_conv.requires_grad_(False)
    if train.get("gradient_checkpointing"):
        student.enable_gradient_checkpointing()
    model, optimizer, lr_scheduler, ema = prepare_for_training(accelerator, DecodePath(student), train)
    state = restore(accelerator, output, resume, "distill vae-decoder")
    global_step, micro_step = state["global_step"], state["micro_step"]
    batches = Batches(data, train["batch_size"], seed, **state["data"])
    # a fraction f of each step's latents sampled: 4 · batch_size from the shards, this many from the pool
    fraction = float(data.get("sampled_fraction", 0.0))
    per_step = round(4 * train["batch_size"] * fraction / (1 - fraction)) if len(pool) else 0
    report["sampled"] = {"pool": len(pool), "per_step": per_step, "shard_per_step": 4 * train["batch_size"]}
    weights = {key: float(config.get("loss", {}).get(key, 1.0)) for key in ("l1_weight", "mse_weight")}
    if accelerator.is_main_process:
        accelerator.init_trackers("distill-vae-decoder", config={"max_train_steps": train["max_train_steps"]})

    losses, terms, started = [], {"l1": [], "mse": []}, time.perf_counter()
    model.train()
    while global_step < train["max_train_steps"]:
        batch = next(batches)
        generator = step_generator(seed, micro_step, accelerator.process_index)
        micro_step += 1
        with accelerator.accumulate(model):
            latents = torch.cat(list(shard_latents(teacher, batch, generator).values()))
            if per_step:
                drawn = pool[torch.randint(len(pool), (per_step,), generator=generator)]
                latents = torch.cat([latents, drawn.to(latents)])
            with torch.no_grad():
                target = teacher.decode(latents.to(weight_dtype)).sample.float()
            prediction = model(latents).float()
            l1, mse = F.l1_loss(prediction, target), F.mse_loss(prediction, target)
            loss = weights["l1_weight"] * l1 + weights["mse_weight"] * mse
            optimizer_step(accelerator, model, optimizer, lr_scheduler, loss, train.get("max_grad_norm"))
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        if ema is not None:
            ema.step(model.parameters())
        losses.append(loss.item())
        terms["l1"].append(l1.item())
        terms["mse"].append(mse.item())
        logs = {"loss": losses[-1], "loss_l1": l1.item(), "loss_mse": mse.item(), "lr": lr_scheduler.get_last_lr()[0]}
        accelerator.log(logs, step=global_step)
        if global_step % train.get("log_every", 10) == 0 or global_step == 1:
            accelerator.print(f"[distill vae-decoder] step {global_step}/{train['max_train_steps']} loss "
                              f"{losses[-1]:.4f} (l1 {l1.item():.4f}, mse {mse.item():.5f})")  # fmt: skip
        if global_step % train["checkpointing_steps"] == 0:
            save_checkpoint(accelerator, output, global_step, micro_step, batches, train.get("checkpoints_total_limit"))
        if accelerator.is_main_process and validation.get("every") and global_step % validation["every"] == 0:
            measured = validate(accelerator, trained(accelerator, model, ema), teacher, heldout, output, global_step)
            report["heldout"].append({"step": global_step, **measured})

    accelerator.wait_for_everyone()
    report.update(steps=global_step, train_s=round(time.perf_counter() - started, 2), losses=losses, terms=terms)
    if losses:
        report.update(first_loss=losses[0], last_loss=losses[-1])
    unwrapped = accelerator.unwrap_model(model)
    report["weights_sha256_per_process"] = check_processes_agree(accelerator, unwrapped, "distill vae-decoder")
    if accelerator.is_main_process:
        write_outputs(config, trained(accelerator, model, ema), teacher, heldout, report)
    accelerator.end_training()
    return report


def teacher_and_latents(config: dict, accelerator) -> tuple[AutoencoderKL, dict, torch.Tensor]:
    """The frozen teacher VAE on the device; the held-out latents ``{"shards": {modality: modes},
    "sampled": {branch: latents}}``; the pool of sampled training latents ``(N, C, h, w)`` (empty
    without a teacher). Sampling happens here, before training, with the same draws on every process."""
    from distill.measure import load_pipeline, read_samples
    from hyperhuman.lsdm.train import check_resolution

    data, validation, sampling = config["data"], config.get("validation", {}), config.get("sampling", {})
    source = validation.get("heldout") or data["train"]
    heldout_samples = read_samples(str(source), validation.get("num_samples", 4), data["resolution"])
    if not heldout_samples:
        raise ConfigError(f"{source!r} holds no samples for the held-out PSNR: set validation.heldout")
    pipeline = load_pipeline(config["teacher"]) if config.get("teacher") else None
    teacher = load_vae(config["vae"]) if config.get("vae") else pipeline.vae
    if pipeline is not None and config.get("vae") and weights_digest(teacher) != weights_digest(pipeline.vae):
        raise ConfigError(f"vae={config['vae']!r} is not the VAE of teacher={config['teacher']!r}: leave vae null")
    teacher.requires_grad_(False).eval().to(accelerator.device)
    heldout = {"shards": shard_latents(teacher, default_collate(heldout_samples), None)}
    if pipeline is None:
        if data.get("sampled_fraction"):
            accelerator.print("[distill vae-decoder] no teacher: every latent comes from the shards")
        return teacher, heldout, torch.zeros(0)
    check_resolution(data["resolution"], pipeline.vae_scale_factor, 2**pipeline.unet.trunk.num_upsamplers)
    pipeline.to(accelerator.device)
    samples = read_samples(str(data["train"]), sampling.get("num_samples", 8), data["resolution"])
    seed = config.get("seed", 0)
    heldout_set = [validation.get("heldout"), validation.get("num_samples", 4)]
    settings = {"teacher": weights_digest(pipeline.unet), "data": data["train"], "resolution": data["resolution"],
                "seed": seed, "heldout": heldout_set, **sampling}  # fmt: skip

    def sample() -> dict:  # the held-out ones with other noise than the training pool's
        return {"train": sampled_latents(pipeline, samples, sampling, seed),
                "heldout": sampled_latents(pipeline, heldout_samples, sampling, seed + 1)}  # fmt: skip

    latents = cached(Path(config["output"]) / "sampled_latents.pt", settings, sample, accelerator.is_main_process)
    heldout["sampled"] = latents["heldout"]
    return teacher, heldout, torch.cat(list(latents["train"].values()))


def write_outputs(config: dict, final, teacher, heldout: dict, report: dict) -> None:
    """``OUTPUT/vae/``, ``OUTPUT/pipeline/`` (with a teacher) and the report's measures, then the report."""
    from distill.measure import load_pipeline

    output, validation = Path(config["output"]), config.get("validation", {})
    measured = evaluate(final, teacher, heldout)
    report.update(psnr_db=measured["shards"], psnr_db_sampled=measured.get("sampled"))
    report["psnr_on"] = "validation.heldout" if validation.get("heldout") else "data.train (no held-out shards)"
    probe = heldout["shards"]["rgb"][:1].to(final.device)  # one latent at the training resolution
    runtime = validation.get("decode_runtime", "eager")
    timings = {"teacher": decode_ms(teacher, probe.to(teacher.dtype), runtime=runtime),
               "student": decode_ms(final, probe, runtime=runtime)}  # fmt: skip
    report["decode_ms"] = {**timings, "speedup": timings["teacher"] / timings["student"], "runtime": runtime,
                           "latent_shape": list(probe.shape), "repeats": DECODE_REPEATS}  # fmt: skip
    report["params"] = {"teacher": _count(teacher), "student": _count(final),
                        "teacher_decoder": _count(teacher.decoder) + _count(teacher.post_quant_conv),
                        "student_decoder": _count(final.decoder) + _count(final.post_quant_conv)}  # fmt: skip
    final.save_pretrained(output / "vae", safe_serialization=True)
    report["output"] = {"vae": str(output / "vae")}
    if config.get("teacher"):  # reloaded: its UNet did not sit in memory during training
        pipeline = load_pipeline(config["teacher"])
        pipeline.register_modules(vae=final)
        pipeline.save_pretrained(output / "pipeline")
        report["output"]["pipeline"] = str(output / "pipeline")
    (output / "vae_decoder_report.json").write_text(json.dumps(report, indent=1))


def trained(accelerator, model, ema) -> AutoencoderKLSlimDecoder:
    """A copy of the student with the trained weights (the EMA weights when EMA is on), in eval mode."""
    unwrapped = accelerator.unwrap_model(model).vae
    copy = AutoencoderKLSlimDecoder.from_config(unwrapped.config)
    copy.load_state_dict(unwrapped.state_dict())
    if ema is not None:
        ema.copy_to(copy.parameters())  # DecodePath's parameters are the VAE's, in the same order
    return copy.to(unwrapped.device).eval()


def evaluate(student, teacher, heldout: dict) -> dict:
    """Held-out PSNR vs the teacher decoder per source (``shards``, ``sampled``) and modality."""
    return {source: decoder_psnr(student, teacher, latents) for source, latents in heldout.items()}


def validate(accelerator, student, teacher, heldout: dict, output: Path, step: int) -> dict:
    """:func:`evaluate`, logged, and ``validation/step-STEP.png``: for each source and modality a row
    of the teacher's decodes above a row of the student's (the first 4 held-out latents)."""
    import numpy as np
    import PIL.Image

    from hyperhuman import modalities

    measured = evaluate(student, teacher, heldout)
    rows = []
    for latents in heldout.values():
        for values in latents.values():
            for vae in (teacher, student):
                rows.append([PIL.Image.fromarray(i) for i in modalities.unit_to_image(decoded(vae, values[:4]))])
    grid, path = image_grid(rows), output / "validation" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    accelerator.log({f"heldout_psnr/{s}_{n}": v for s, values in measured.items() for n, v in values.items()}, step)
    if (tracker := accelerator.get_tracker("tensorboard", unwrap=True)) is not None:
        tracker.add_image("validation", np.asarray(grid), step, dataformats="HWC")
    return measured


def _count(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())
