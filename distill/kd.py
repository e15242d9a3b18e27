"""``hyperhuman distill unet``: a student LSDM trained by knowledge distillation from a frozen teacher.

BK-SDM's recipe (Kim et al. 2023), with its users' complaint fixed: the loss is

    task_weight · Σ_branch MSE(v̂_s, v)            the LSDM's own v-prediction loss
  + output_weight · Σ_branch MSE(v̂_s, v̂_t)        the teacher's prediction as the target
  + feature_weight · mean_pairs MSE(f_s, f_t) / mean(f_t²)

where the feature pairs are every down, mid and up block's output (each branch's own blocks and the
shared trunk's), paired by the student's weight remap (:func:`distill.students.feature_pairs`).
Each feature term is divided by the mean square of the teacher feature, so a block with large
activations does not outweigh the others, nor the feature sum the task (BK-SDM issue #21).

The student is a BK-SDM variant (``bk-base``, ``bk-small``, ``bk-tiny``), the parts removed by
architecture evolving (an ``evolve.json`` from ``hyperhuman distill evolve``, or ``{remove: [...]}``),
or ``teacher`` (a copy: with ``kd.skip_prob > 0`` this is SnapFusion's robust training, each
removable ResNet and attention bypassed at random in every step so the network stays usable with
any of them removed; ``distill evolve`` then scores removals on it). The kept weights come from the
teacher, or from ``student_init`` (a run of the teacher's architecture, e.g. the robust-trained
one an evolved student was searched on).

Same recipe qualities as ``train-lsdm``: accelerate (multi-process), EMA, checkpoints with exact
``--resume``, TensorBoard, validation grids (``validation/teacher.png`` once, then
``validation/step-STEP.png`` of the student from the same noise), the held-out measure of
:mod:`distill.measure` when ``validation.heldout`` names shards, and a final ``pipeline/`` that
``HyperHumanPipeline.from_pretrained`` and ``hyperhuman eval`` load like the teacher's: the
teacher's VAE, text encoder and noise schedule with the student's UNet.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

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
)

REFERENCE = "configs/distill/unet-tiny.yaml"
KNOWN_KEYS = {
    "output": None,
    "seed": None,
    "teacher": None,
    "student": None,
    "student_init": None,
    "data": {**DATA_KEYS, "cache_latents": None},
    "kd": dict.fromkeys(["task_weight", "output_weight", "feature_weight", "feature_norm", "skip_prob"]),
    "train": {**TRAIN_KEYS, **dict.fromkeys(["condition_dropout", "pose_dropout"])},
    "validation": {**VALIDATION_KEYS, **dict.fromkeys(["heldout", "heldout_num"])},
}
FEATURE_NORMS = ("teacher", "none")
LOSS_WEIGHTS = ("task_weight", "output_weight", "feature_weight")


# --- configuration ---------------------------------------------------------------------------------
def check_config(config: dict, check_paths: bool = True) -> None:
    """Everything that would fail an hour in fails here, naming the key to fix."""
    from hyperhuman.lsdm.data import check_data

    for section in ("output", "teacher", "student", "data", "train"):
        if config.get(section) is None:
            raise ConfigError(f"distill config lacks {section!r} (e.g. --set {section}=...); see {REFERENCE}")
    check_known_keys(config, KNOWN_KEYS, REFERENCE)
    kd, train = config.get("kd", {}), config["train"]
    check_kd_loss(kd)
    skip = kd.get("skip_prob", 0.0)
    if not isinstance(skip, int | float) or not 0 <= skip < 1:
        raise ConfigError(f"kd.skip_prob must be in [0, 1), got {skip!r}")
    check_train_counts(train)
    if check_paths:
        from distill.measure import check_teacher_run

        check_teacher_run(config["teacher"])
        student_spec(config["student"])
        init = config.get("student_init")
        if init is not None and not (Path(init) / "pipeline" / "model_index.json").is_file():
            raise ConfigError(f"student_init={init!r} is not a run folder with pipeline/; null = the teacher's weights")
        check_data(config["data"])


def check_kd_loss(kd: dict) -> None:
    """The ``kd:`` loss weights and feature norm (shared with ``hyperhuman prune``)."""
    for key in LOSS_WEIGHTS:
        if not isinstance(kd.get(key, 1.0), int | float) or kd.get(key, 1.0) < 0:
            raise ConfigError(f"kd.{key} must be a number ≥ 0, got {kd.get(key)!r}")
    if kd.get("feature_norm", "teacher") not in FEATURE_NORMS:
        raise ConfigError(f"kd.feature_norm must be one of {FEATURE_NORMS}, got {kd.get('feature_norm')!r}")


def student_spec(value):
    """The ``student:`` value as :func:`distill.students.make_student` takes it, or ``"teacher"``."""
    from distill.students import BK_VARIANTS

    if value == "teacher" or value in BK_VARIANTS:
        return value
    if isinstance(value, dict) and set(value) == {"remove"} and isinstance(value["remove"], list):
        return {"remove": list(value["remove"])}
    if isinstance(value, str) and (Path(value).is_file() or (Path(value) / "evolve.json").is_file()):
        from distill.evolve import read_student

        return read_student(value)
    raise ConfigError(
        f"student={value!r}: one of teacher, {', '.join(BK_VARIANTS)}, an evolve.json (from `hyperhuman distill "
        "evolve`) or {remove: [part, ...]}"
    )


# --- the losses ------------------------------------------------------------------------------------
class FeatureTaps:
    """Forward hooks keeping the outputs of named modules during a forward pass."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        from distill.students import feature

        self.values: dict[str, torch.Tensor] = {}
        self.handles = [
            model.get_submodule(name).register_forward_hook(
                lambda module, args, output, name=name: self.values.__setitem__(name, feature(output))
            )
            for name in names
        ]

    def take(self) -> dict[str, torch.Tensor]:
        values, self.values = self.values, {}
        return values

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def feature_loss(student: dict, teacher: dict, pairs: list[tuple[str, str]], norm: str) -> torch.Tensor:
    """Mean over the pairs of MSE(student feature, teacher feature), each divided by the teacher
    feature's mean square when ``norm == "teacher"``."""
    terms = []
    for student_name, teacher_name in pairs:
        target = teacher[teacher_name].float()
        error = torch.nn.functional.mse_loss(student[student_name].float(), target)
        terms.append(error / target.square().mean().clamp_min(1e-8) if norm == "teacher" else error)
    return torch.stack(terms).mean()


def skipped_parts(candidates: list[str], probability: float, generator: torch.Generator) -> list[str]:
    """Robust training's random bypass: each candidate part independently with ``probability``."""
    if not probability or not candidates:
        return []
    draws = torch.rand(len(candidates), generator=generator)
    return [name for name, draw in zip(candidates, draws.tolist(), strict=True) if draw < probability]


# --- the recipe ------------------------------------------------------------------------------------
def distill_unet(config: dict, resume: str | None = None) -> dict:
    from distill.measure import HeldOut, load_pipeline, v_loss
    from distill.students import feature_pairs, make_student
    from hyperhuman.lsdm.data import Batches
    from hyperhuman.lsdm.model import LatentStructuralUNet
    from hyperhuman.lsdm.train import (
        branch_losses,
        cached_latents,
        check_resolution,
        drop_conditions,
        first_samples,
        make_pipeline,
        noisy_latents,
        run_validation,
    )
    from hyperhuman.text import encode_prompts
    from hyperhuman.unet_parts import removable_parts, skipping

    check_config(config)
    output = Path(config["output"])
    data, train, kd = config["data"], config["train"], config.get("kd", {})
    seed = config.get("seed", 0)
    skip_prob = float(kd.get("skip_prob", 0.0))
    accelerator = make_accelerator(train, output, find_unused_parameters=skip_prob > 0)
    torch.manual_seed(seed)

    teacher_pipeline = load_pipeline(config["teacher"])
    teacher = teacher_pipeline.unet.requires_grad_(False).eval()
    if not isinstance(teacher, LatentStructuralUNet):
        raise ConfigError(f"teacher={config['teacher']!r} holds a {type(teacher).__name__}, not an LSDM")
    vae, tokenizer, text_encoder = teacher_pipeline.vae, teacher_pipeline.tokenizer, teacher_pipeline.text_encoder
    scheduler_config = {k: v for k, v in teacher_pipeline.scheduler.config.items() if not k.startswith("_")}
    noise_scheduler = teacher_pipeline.scheduler
    spec = student_spec(config["student"])
    source = teacher if config.get("student_init") is None else load_pipeline(config["student_init"]).unet
    if architecture(source) != architecture(teacher):
        raise ConfigError(
            f"student_init={config['student_init']!r} is not of the teacher's architecture (its UNet config differs); "
            "it must be the run the student's edits were chosen on (e.g. the robust-trained copy of the teacher)"
        )
    student = make_student(source, {"remove": []} if spec == "teacher" else spec)
    del source
    pairs = feature_pairs(student, teacher)
    skip_candidates = removable_parts(student) if skip_prob else []
    check_resolution(data["resolution"], teacher_pipeline.vae_scale_factor, 2**student.trunk.num_upsamplers)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for frozen in (vae, text_encoder, teacher):
        frozen.requires_grad_(False).to(accelerator.device)
        if weight_dtype != torch.float32:  # diffusers warns about a cast to the dtype a model already has
            frozen.to(dtype=weight_dtype)
    if train.get("gradient_checkpointing"):
        student.enable_gradient_checkpointing()

    student_taps = FeatureTaps(student, [s for s, _ in pairs])
    teacher_taps = FeatureTaps(teacher, [t for _, t in pairs])
    model, optimizer, lr_scheduler, ema = prepare_for_training(accelerator, student, train)
    state = restore(accelerator, output, resume, "distill unet")
    global_step, micro_step = state["global_step"], state["micro_step"]
    batches = Batches(data, train["batch_size"], seed, **state["data"])
    names = list(teacher.config.branches)
    weights = {key: float(kd.get(key, 1.0)) for key in LOSS_WEIGHTS}
    norm = kd.get("feature_norm", "teacher")
    empty_states, empty_mask = encode_prompts(tokenizer, text_encoder, [""], accelerator.device)
    text_dropout, pose_dropout = train.get("condition_dropout", 0.15), train.get("pose_dropout", 0.0)
    cache = {} if data.get("cache_latents") else None

    validation = config.get("validation", {})
    validation_batch = heldout = None
    report = {"student": spec, "feature_pairs": pairs, "heldout": []}
    report["params"] = {"teacher": _count(teacher), "student": _count(student)}
    if accelerator.is_main_process:
        accelerator.init_trackers("distill-unet", config={"max_train_steps": train["max_train_steps"]})
        if validation.get("every"):
            validation_batch = first_samples(data, validation.get("num_samples", 2), seed)
            if global_step == 0:
                teacher_grid = run_validation(accelerator, teacher_pipeline, validation, validation_batch, output, 0)
                teacher_grid.rename(teacher_grid.with_name("teacher.png"))
        if validation.get("heldout"):
            heldout = HeldOut.from_shards(
                validation["heldout"], teacher_pipeline, num=validation.get("heldout_num", 16)
            )
            report["heldout_teacher"] = v_loss(teacher_pipeline, heldout)["v_loss"]

    terms = {"task": [], "output": [], "feature": []}
    losses, skipped, started = [], [], time.perf_counter()
    model.train()
    while global_step < train["max_train_steps"]:
        batch = next(batches)
        generator = step_generator(seed, micro_step, accelerator.process_index)
        micro_step += 1
        with accelerator.accumulate(model):
            latents = cached_latents(cache, batch, vae, teacher, names, generator)
            states, mask = encode_prompts(tokenizer, text_encoder, batch["caption"], accelerator.device)
            states, mask, pose_latent = drop_conditions(
                states, mask, latents["pose"], empty_states, empty_mask, text_dropout, pose_dropout, generator
            )
            noisy, targets, timesteps = noisy_latents(noise_scheduler, latents, names, generator)
            inputs = {"encoder_hidden_states": states, "pose_latent": pose_latent, "encoder_attention_mask": mask}
            with torch.no_grad():
                teacher_prediction = teacher(noisy.to(weight_dtype), timesteps, **inputs).sample
            teacher_features = teacher_taps.take()
            bypassed = skipped_parts(skip_candidates, skip_prob, generator)
            bypass = skipping(accelerator.unwrap_model(model), bypassed) if bypassed else contextlib.nullcontext()
            with bypass:
                prediction = model(noisy, timesteps, **inputs).sample
                task = sum(branch_losses(prediction, targets))
                distilled = sum(branch_losses(prediction, list(teacher_prediction.chunk(len(names), dim=1))))
                features = feature_loss(student_taps.take(), teacher_features, pairs, norm)
                loss = (
                    weights["task_weight"] * task
                    + weights["output_weight"] * distilled
                    + weights["feature_weight"] * features
                )
                optimizer_step(accelerator, model, optimizer, lr_scheduler, loss, train.get("max_grad_norm"))
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        if ema is not None:
            ema.step(model.parameters())
        losses.append(loss.item())
        skipped.append(len(bypassed))
        for key, value in (("task", task), ("output", distilled), ("feature", features)):
            terms[key].append(value.item())
        logs = {"loss": losses[-1], "lr": lr_scheduler.get_last_lr()[0], "skipped_parts": len(bypassed)}
        logs.update({f"loss_{key}": values[-1] for key, values in terms.items()})
        accelerator.log(logs, step=global_step)
        if global_step % train.get("log_every", 10) == 0 or global_step == 1:
            accelerator.print(
                f"[distill unet] step {global_step}/{train['max_train_steps']} loss {losses[-1]:.4f} "
                f"(task {terms['task'][-1]:.4f}, output {terms['output'][-1]:.4f}, feature {terms['feature'][-1]:.4f})"
            )
        if global_step % train["checkpointing_steps"] == 0:
            save_checkpoint(accelerator, output, global_step, micro_step, batches, train.get("checkpoints_total_limit"))
        if accelerator.is_main_process and validation.get("every") and global_step % validation["every"] == 0:
            pipeline = make_pipeline(accelerator, model, ema, vae, tokenizer, text_encoder, scheduler_config)
            if validation_batch is not None:
                run_validation(accelerator, pipeline, validation, validation_batch, output, global_step)
            if heldout is not None:
                measured = v_loss(pipeline, heldout)["v_loss"]
                report["heldout"].append({"step": global_step, "v_loss": measured})
                accelerator.log({"heldout_v_loss": measured}, step=global_step)

    student_taps.remove()
    teacher_taps.remove()
    accelerator.wait_for_everyone()
    report.update(
        steps=global_step, wall_s=round(time.perf_counter() - started, 2), losses=losses, terms=terms, skipped=skipped
    )
    report["weights_sha256_per_process"] = check_processes_agree(
        accelerator, accelerator.unwrap_model(model), "distill unet"
    )
    if accelerator.is_main_process:
        pipeline = make_pipeline(accelerator, model, ema, vae, tokenizer, text_encoder, scheduler_config)
        pipeline.save_pretrained(output / "pipeline")
        if losses:
            report.update(first_loss=losses[0], last_loss=losses[-1])
        (output / "train_report.json").write_text(json.dumps(report, indent=1))
    accelerator.end_training()
    return report


def architecture(model) -> dict:
    """A model's config without bookkeeping (``_``-keys), no removed parts written as ``[]``."""
    config = {key: value for key, value in dict(model.config).items() if not key.startswith("_")}
    config["removed_parts"] = list(config.get("removed_parts") or [])
    return json.loads(json.dumps(config))  # tuples and lists alike


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
