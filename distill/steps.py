"""``hyperhuman distill steps``: step distillation — a student that samples in K DDIM steps what the
teacher samples in N, optionally with classifier-free guidance folded in.

The teacher is an LSDM run or a diffusers ``StableDiffusionPipeline`` folder
(:mod:`distill.step_models`). Each training sample is a latent ``z_t`` at a student step ``t → s``
of the K-step grid (for the LSDM all branches' latents stacked, as it samples them: one timestep
shared by the branches) and where the frozen teacher's ``N / K`` DDIM steps take it, ``z_s``; the
student learns the v whose single DDIM step lands there (:func:`distill.ddim.distillation_target`).
Two modes (``steps.mode``):

- ``progressive`` (Salimans & Ho 2022): rounds that halve the steps, N → N/2 → … → K, each
  round's student starting from, and then teaching, the next;
- ``direct`` (SnapFusion found it better): one round, N → K, ``N / K`` teacher steps per target.

Where the student's training states come from (``steps.source``):

- ``trajectories``: the round's teacher samples ``steps.trajectories`` paths from pure noise once,
  and each training sample is two recorded points of one (:mod:`distill.trajectories`): the states
  sampling visits, and no teacher call in the training loop;
- ``data``: a shard latent noised to the student step, and the teacher run across it at every
  training step.

**Guidance folded in** (``guidance.fold``): the student gets the guidance scale as an input
(:mod:`distill.guidance`) and learns the teacher's guided output — SnapFusion's CFG-aware loss,
with ``w ~ U[scale_min, scale_max]`` for a share ``cfg_prob`` of the samples and plain (w = 1)
distillation for the rest — so it samples with one evaluation per step instead of two. Without it
the student is distilled on conditional and (``train.condition_dropout``) unconditional samples
and is guided at sampling time like the teacher.

Output: ``OUTPUT/rounds/steps-K/`` per round (checkpoints, TensorBoard logs, validation grids —
``teacher.png`` at the round teacher's steps, ``step-S.png`` of the student at K — the teacher paths
in ``trajectories/``, its ``pipeline/`` and ``train_report.json``), ``OUTPUT/pipeline/`` = the last
round's, which ``HyperHumanPipeline.from_pretrained`` and ``hyperhuman eval`` load like any other:
the student's config records ``distilled_steps`` (the pipeline's and ``hyperhuman eval``'s default
step count), the schedule is the teacher's. A Stable Diffusion teacher gives a
``StableDiffusionPipeline`` (sample it with ``num_inference_steps=K``; with guidance folded in,
diffusers' pipeline feeds the scale through ``timestep_cond`` and skips the unconditional pass
itself). ``--resume latest`` skips the finished rounds and continues the current one exactly.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from distill.ddim import distillation_target, noised, student_grid
from distill.guidance import DEFAULT_DIM, add_guidance_input, guidance_dim, guided_v
from distill.trajectories import TrajectoryBank, sample_paths, teacher_landing, trajectory_bank
from hyperhuman.config import ConfigError, check_known_keys
from hyperhuman.training import (
    DATA_KEYS,
    TRAIN_KEYS,
    VALIDATION_KEYS,
    check_processes_agree,
    check_train_counts,
    make_accelerator,
    optimizer_step,
    prepare_for_training,
    restore,
    save_checkpoint,
    step_generator,
    trained_copy,
)

REFERENCE = "configs/distill/steps-tiny.yaml"
MODES = ("progressive", "direct")
SOURCES = ("trajectories", "data")
KNOWN_KEYS = {
    "output": None,
    "seed": None,
    "teacher": None,
    "data": {**DATA_KEYS, "cache_latents": None},
    "steps": dict.fromkeys(["mode", "teacher_steps", "student_steps", "source", "trajectories", "trajectory_batch"]),
    "guidance": dict.fromkeys(["fold", "dim", "scale_min", "scale_max", "cfg_prob"]),
    "train": {**TRAIN_KEYS, **dict.fromkeys(["condition_dropout"])},
    # the step counts come from steps: (teacher.png at the round teacher's, step-S.png at the student's)
    "validation": {key: None for key in VALIDATION_KEYS if key != "num_inference_steps"},
}


# --- configuration ---------------------------------------------------------------------------------
def check_config(config: dict, check_paths: bool = True) -> None:
    """Everything that would fail an hour in fails here, naming the key to fix."""
    from hyperhuman.lsdm.data import check_data

    for section in ("output", "teacher", "steps", "data", "train"):
        if config.get(section) is None:
            raise ConfigError(f"distill config lacks {section!r} (e.g. --set {section}=...); see {REFERENCE}")
    check_known_keys(config, KNOWN_KEYS, REFERENCE)
    rounds(config["steps"])
    check_source(config["steps"])
    guidance = config.get("guidance") or {}
    if not isinstance(guidance.get("fold", False), bool):
        raise ConfigError(f"guidance.fold must be true or false, got {guidance.get('fold')!r}")
    dim = guidance.get("dim", DEFAULT_DIM)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ConfigError(f"guidance.dim must be an integer ≥ 2 (the width of the scale's embedding), got {dim!r}")
    low, high = guidance.get("scale_min", 2.0), guidance.get("scale_max", 8.0)
    if not all(isinstance(v, int | float) for v in (low, high)) or not 1 <= low <= high:
        raise ConfigError(f"guidance.scale_min/scale_max must satisfy 1 ≤ min ≤ max, got {low!r}, {high!r}")
    share = guidance.get("cfg_prob", 0.5)
    if not isinstance(share, int | float) or not 0 <= share <= 1:
        raise ConfigError(f"guidance.cfg_prob must be in [0, 1], got {share!r}")
    train = config["train"]
    check_train_counts(train)
    if check_paths:
        from distill.measure import check_teacher_run

        check_teacher_run(config["teacher"])
        check_data(config["data"])


def check_source(steps: dict) -> None:
    source = steps.get("source", "data")
    if source not in SOURCES:
        raise ConfigError(f"steps.source must be one of {SOURCES}, got {source!r}")
    for key in ("trajectories", "trajectory_batch"):
        value = steps.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"steps.{key} must be a positive integer (teacher paths), got {value!r}")


def rounds(steps: dict) -> list[tuple[int, int]]:
    """``[(teacher steps, student steps), ...]`` of ``steps:``: halvings, or one direct round."""
    mode, teacher, student = steps.get("mode", "progressive"), steps.get("teacher_steps"), steps.get("student_steps")
    if mode not in MODES:
        raise ConfigError(f"steps.mode must be one of {MODES}, got {mode!r}")
    for key, value in (("teacher_steps", teacher), ("student_steps", student)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"steps.{key} must be a positive integer, got {value!r}")
    if student >= teacher or teacher % student:
        raise ConfigError(
            f"steps.student_steps={student} must be smaller than steps.teacher_steps={teacher} and divide it "
            "(each student step replaces a whole number of teacher steps)"
        )
    if mode == "direct":
        return [(teacher, student)]
    ratio = teacher // student
    if ratio & (ratio - 1):
        raise ConfigError(
            f"progressive distillation halves the steps: teacher_steps / student_steps = {ratio} must be a power of 2 "
            f"(e.g. teacher_steps={student * 2 ** ratio.bit_length() // 2}), or use steps.mode=direct"
        )
    pairs, current = [], teacher
    while current > student:
        pairs.append((current, current // 2))
        current //= 2
    return pairs


# --- the student and its loss ----------------------------------------------------------------------
def make_student(teacher, steps: int, fold_dim: int | None):
    """A copy of ``teacher`` (an LSDM records ``distilled_steps=steps``); with ``fold_dim``, and a teacher
    without one, a guidance input of that width (zero: the student starts as the teacher)."""
    if fold_dim and guidance_dim(teacher) is None:
        teacher = add_guidance_input(teacher, fold_dim)
    config = {key: value for key, value in dict(teacher.config).items() if not key.startswith("_")}
    if "distilled_steps" in config:  # the LSDM records it; a plain UNet's config has no such key
        config["distilled_steps"] = steps
    student = type(teacher).from_config(config).to(teacher.device, teacher.dtype)
    student.load_state_dict(teacher.state_dict())
    return student


def guidance_scales(batch: int, guidance: dict, generator: torch.Generator) -> torch.Tensor:
    """Per sample: ``w ~ U[scale_min, scale_max]`` with probability ``cfg_prob``, else 1 (plain);
    all 1 when guidance is not folded into the student."""
    if not guidance.get("fold", False):
        return torch.ones(batch)
    low, high = float(guidance.get("scale_min", 2.0)), float(guidance.get("scale_max", 8.0))
    scales = low + (high - low) * torch.rand(batch, generator=generator)
    guided = torch.rand(batch, generator=generator) < float(guidance.get("cfg_prob", 0.5))
    return torch.where(guided, scales, torch.ones(batch))


def distillation_pair(
    student,
    teacher,
    scheduler,
    clean: torch.Tensor,
    conditions: dict,
    unconditional: dict,
    student_steps: int,
    substeps: int,
    scales: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(student v, target v)`` for a batch of clean latents: a random step of the student's
    ``student_steps`` grid per sample, the teacher's ``substeps`` DDIM steps across it (guided at
    ``scales``), and the v that takes the student there in one step. Works for the LSDM and a
    plain ``UNet2DConditionModel`` alike (``conditions``: the model's keyword inputs)."""
    starts, ends = student_grid(scheduler, student_steps)
    index = torch.randint(len(starts), (clean.shape[0],), generator=generator)
    start, end = starts[index].to(clean.device), ends[index].to(clean.device)
    noise = torch.randn(clean.shape, generator=generator).to(clean.device, clean.dtype)
    latents = noised(scheduler, clean, noise, start)
    landed = teacher_landing(teacher, scheduler, latents, start, end, substeps, conditions, unconditional, scales)
    target = distillation_target(scheduler, latents, start, landed, end)
    return guided_v(student, latents, start, conditions, unconditional, scales), target


# --- the recipe ------------------------------------------------------------------------------------
def distill_steps(config: dict, resume: str | None = None) -> dict:
    """Every round in turn; returns the report (also ``OUTPUT/train_report.json``)."""
    from distill.step_models import load_teacher

    check_config(config)
    output = Path(config["output"])
    plan = rounds(config["steps"])
    report = {"mode": config["steps"].get("mode", "progressive"), "rounds": []}
    source, started = Path(config["teacher"]), time.perf_counter()  # each round's teacher
    for teacher_steps, student_steps in plan:
        folder = output / "rounds" / f"steps-{student_steps}"
        finished = (folder / "train_report.json").is_file() and (folder / "pipeline" / "model_index.json").is_file()
        if resume and finished:
            print(f"[distill steps] round {teacher_steps} → {student_steps} steps: done earlier ({folder})")
            round_report = json.loads((folder / "train_report.json").read_text())
        else:
            round_report = train_round(config, source, folder, teacher_steps, student_steps, resume)
            resume = "latest" if resume else None  # a checkpoint path named the round it belongs to
        report["rounds"].append({key: round_report.get(key) for key in ROUND_SUMMARY})
        source = folder
    final = load_teacher(source).pipeline
    if (output / "pipeline").exists():
        shutil.rmtree(output / "pipeline")
    final.save_pretrained(output / "pipeline")
    report.update(student_steps=plan[-1][1], teacher_steps=plan[0][0], wall_s=round(time.perf_counter() - started, 2))
    report["guidance_folded"] = guidance_dim(final.unet) is not None
    (output / "train_report.json").write_text(json.dumps(report, indent=1))
    return report


ROUND_SUMMARY = ("teacher_steps", "student_steps", "steps", "first_loss", "last_loss", "wall_s")


def train_round(config: dict, teacher_run: Path, output: Path, teacher_steps: int, student_steps: int, resume):
    """One round: the teacher at ``teacher_steps`` → a student at ``student_steps``."""
    from distill.step_models import LatentCache, load_teacher
    from hyperhuman.lsdm.data import Batches
    from hyperhuman.lsdm.train import check_resolution, first_samples

    data, train, guidance = config["data"], config["train"], config.get("guidance") or {}
    seed = config.get("seed", 0)
    accelerator = make_accelerator(train, output)
    torch.manual_seed(seed)
    family = load_teacher(teacher_run)
    teacher, scheduler = family.unet, family.pipeline.scheduler
    fold = bool(guidance.get("fold", False))
    student = make_student(teacher, student_steps, guidance.get("dim", DEFAULT_DIM) if fold else None)
    down_factor = 2 ** getattr(teacher, "trunk", teacher).num_upsamplers  # the LSDM's branches share a trunk
    check_resolution(data["resolution"], family.pipeline.vae_scale_factor, down_factor)
    family.to(accelerator.device)

    model, optimizer, lr_scheduler, ema = prepare_for_training(accelerator, student, train)
    state = restore(accelerator, output, resume, "distill steps")
    global_step, micro_step = state["global_step"], state["micro_step"]
    batches = Batches(data, train["batch_size"], seed, **state["data"])
    substeps = teacher_steps // student_steps
    # Folded guidance always sees the prompt (w carries the guidance); a plain student also learns
    # the unconditional prediction it will be guided with.
    text_dropout = 0.0 if fold else train.get("condition_dropout", 0.15)
    cache = LatentCache(bool(data.get("cache_latents")))
    bank = None
    if config["steps"].get("source", "data") == "trajectories":
        bank = round_bank(accelerator, family, config, output, teacher_steps, student_steps, text_dropout)

    validation = config.get("validation", {})
    validation_batch = None
    if accelerator.is_main_process:
        accelerator.init_trackers("distill-steps", config={"teacher_steps": teacher_steps, "student": student_steps})
        if validation.get("every"):
            validation_batch = first_samples(data, validation.get("num_samples", 2), seed)
            if global_step == 0:
                at_teacher = {**validation, "num_inference_steps": teacher_steps}
                grid = family.validate(accelerator, family.pipeline, at_teacher, validation_batch, output, 0)
                grid.rename(grid.with_name("teacher.png"))
    at_student = {**validation, "num_inference_steps": student_steps}

    losses, started = [], time.perf_counter()
    model.train()
    while global_step < train["max_train_steps"]:
        generator = step_generator(seed, micro_step, accelerator.process_index)
        micro_step += 1
        with accelerator.accumulate(model):
            if bank is None:  # the teacher from noised shard latents, every step
                clean, conditions, unconditional = family.inputs(next(batches), cache, text_dropout, generator)
                scales = guidance_scales(clean.shape[0], guidance, generator)
                prediction, target = distillation_pair(
                    model, teacher, scheduler, clean, conditions, unconditional, student_steps, substeps, scales,
                    generator,
                )  # fmt: skip
            else:  # two recorded points of a teacher path
                latents, start, conditions, scales, target = bank.draw(
                    scheduler, train["batch_size"], generator, accelerator.device
                )
                prediction = guided_v(model, latents, start, conditions, {}, scales)
            loss = family.loss(prediction, target)
            optimizer_step(accelerator, model, optimizer, lr_scheduler, loss, train.get("max_grad_norm"))
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        if ema is not None:
            ema.step(model.parameters())
        losses.append(loss.item())
        accelerator.log({"loss": losses[-1], "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
        if global_step % train.get("log_every", 10) == 0 or global_step == 1:
            accelerator.print(
                f"[distill steps] {teacher_steps} → {student_steps} steps: "
                f"step {global_step}/{train['max_train_steps']} loss {losses[-1]:.4f}"
            )
        if global_step % train["checkpointing_steps"] == 0:
            save_checkpoint(accelerator, output, global_step, micro_step, batches, train.get("checkpoints_total_limit"))
        if accelerator.is_main_process and validation_batch is not None and global_step % validation["every"] == 0:
            pipeline = family.make_pipeline(trained_copy(accelerator, model, ema))
            family.validate(accelerator, pipeline, at_student, validation_batch, output, global_step)

    accelerator.wait_for_everyone()
    report = {"teacher": str(teacher_run), "teacher_steps": teacher_steps, "student_steps": student_steps}
    report.update(steps=global_step, wall_s=round(time.perf_counter() - started, 2), losses=losses)
    report["weights_sha256_per_process"] = check_processes_agree(
        accelerator, accelerator.unwrap_model(model), "distill steps"
    )
    if accelerator.is_main_process:
        family.make_pipeline(trained_copy(accelerator, model, ema)).save_pretrained(output / "pipeline")
        if losses:
            report.update(first_loss=losses[0], last_loss=losses[-1])
        (output / "train_report.json").write_text(json.dumps(report, indent=1))
    accelerator.end_training()
    return report


def round_bank(accelerator, family, config: dict, output: Path, teacher_steps: int, student_steps: int,
               text_dropout: float) -> TrajectoryBank:  # fmt: skip
    """The round teacher's paths (:mod:`distill.trajectories`), from this process's own data stream."""
    from hyperhuman.lsdm.data import Batches

    steps, guidance, seed = config["steps"], config.get("guidance") or {}, config.get("seed", 0)
    batches = Batches(config["data"], steps.get("trajectory_batch", 8), seed + 1)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + 7) * 1009 + accelerator.process_index)

    def draw_scales(size: int, generator: torch.Generator) -> torch.Tensor:
        return guidance_scales(size, guidance, generator)

    def sample(count: int) -> TrajectoryBank:
        return sample_paths(family, family.pipeline.scheduler, batches, count, student_steps,
                            teacher_steps // student_steps, draw_scales, text_dropout, generator)  # fmt: skip

    def log(text: str) -> None:
        accelerator.print(f"[distill steps] {teacher_steps} → {student_steps} steps: {text}")

    started = time.perf_counter()
    bank = trajectory_bank(accelerator, output / "trajectories", steps.get("trajectories", 256), sample, log)
    log(f"{len(bank)} teacher paths ready ({time.perf_counter() - started:.0f} s)")
    return bank
