"""``hyperhuman quantize qat``: quantization-aware fine-tuning of a denoiser, with knowledge
distillation from its fp32 self, on the shared training machinery.

A copy of the model gets fake-quantized convolutions and linears (:mod:`distill.quant.layers`:
``scheme.weight`` and ``scheme.activation`` from :mod:`distill.quant.schemes`, layers matching
``scheme.keep_float`` left float) and, with ``pim``, PIM quantization on the fixed-point ones
(:mod:`distill.quant.pim`: PIM-QAT). It trains on

    task_weight · Σ_branch MSE(v̂, v) + output_weight · Σ_branch MSE(v̂, v̂_fp32)

where ``v̂_fp32`` is the frozen float model's prediction; straight-through gradients reach the
float master weights. Accelerate (multi-process), EMA, checkpoints with exact ``--resume``,
TensorBoard, as every recipe here.

``OUTPUT/pipeline`` holds the trained float master weights (a pipeline of the model's kind:
``hyperhuman quantize ptq --set model=OUTPUT`` takes it to the int8 runtime when the scheme is
int8-representable); ``OUTPUT/quantizers.safetensors`` and ``OUTPUT/qat.json`` hold what
:func:`load_qat_model` needs to rebuild the fake-quantized model exactly (activation ranges, the
mixed scheme's row choice, PIM gains). ``OUTPUT/qat_report.json``: the scheme, whether it is
int8-representable, the losses and, with ``validation.heldout``, the held-out v-loss of the fp32
model, of the fake-quantized model before training (its ranges from the first batches: what
quantizing without training gives) and after, each under PIM too when ``pim`` is set.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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

REFERENCE = "configs/quantize/qat-tiny.yaml"
KNOWN_KEYS = {
    "output": None,
    "seed": None,
    "model": None,
    "scheme": {"weight": None, "activation": None, "keep_float": None},
    "pim": None,
    "calibration_batches": None,
    "data": {**DATA_KEYS, "cache_latents": None},
    "kd": dict.fromkeys(["task_weight", "output_weight"]),
    "train": {**TRAIN_KEYS, **dict.fromkeys(["condition_dropout"])},
    "validation": {**VALIDATION_KEYS, **dict.fromkeys(["heldout", "heldout_num"])},
}
STATE_FILE = "quantizers.safetensors"
SCHEME_FILE = "qat.json"
REPORT_FILE = "qat_report.json"


def check_config(config: dict, check_paths: bool = True) -> None:
    """Everything that would fail an hour in fails here, naming the key to fix."""
    from distill.quant.layers import check_scheme
    from distill.quant.pim import PIMConfig
    from hyperhuman.lsdm.data import check_data

    for section in ("output", "model", "scheme", "data", "train"):
        if config.get(section) is None:
            raise ConfigError(f"qat config lacks {section!r} (e.g. --set {section}=...); see {REFERENCE}")
    check_known_keys(config, KNOWN_KEYS, REFERENCE)
    scheme = config["scheme"]
    try:
        check_scheme(scheme.get("weight"), "weight")
        check_scheme(scheme.get("activation"), "activation")
        if config.get("pim") is not None:
            PIMConfig.from_config(config["pim"])
    except ValueError as error:
        raise ConfigError(f"{error} (see {REFERENCE})") from None
    if config.get("pim") is not None and (scheme.get("activation") or {}).get("scheme") != "fixed":
        raise ConfigError("pim runs the crossbars on integer inputs: give scheme.activation a fixed-point scheme")
    batches = config.get("calibration_batches", 4)
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ConfigError(f"calibration_batches={batches!r}: batches that set the activation ranges before training")
    for key in ("task_weight", "output_weight"):
        value = (config.get("kd") or {}).get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"kd.{key} must be a number ≥ 0, got {value!r}")
    check_train_counts(config["train"])
    if check_paths:
        from distill.measure import check_teacher_run

        check_teacher_run(config["model"])
        check_data(config["data"])


def fake_quantized(model: torch.nn.Module, config: dict) -> torch.nn.Module:
    """A copy of ``model`` with the config's fake quantizers (and PIM) in place."""
    from distill.quant.layers import insert_fake_quant
    from distill.quant.pim import PIMConfig, enable_pim

    scheme = config["scheme"]
    quantized = copy.deepcopy(model)
    insert_fake_quant(quantized, scheme["weight"], scheme.get("activation"), tuple(scheme.get("keep_float") or ()))
    if config.get("pim") is not None:
        enable_pim(quantized, PIMConfig.from_config(config["pim"]))
    return quantized


def quantize_qat(config: dict, resume: str | None = None) -> dict:
    """Fine-tune the fake-quantized model; returns the report (also ``OUTPUT/qat_report.json``)."""
    from distill.measure import HeldOut, v_loss
    from distill.prune import noised_sample
    from distill.quant.layers import fake_quant_layers
    from distill.step_models import LatentCache, load_teacher
    from hyperhuman.lsdm.data import Batches
    from hyperhuman.lsdm.train import check_resolution

    check_config(config)
    output = Path(config["output"])
    data, train, kd = config["data"], dict(config["train"]), config.get("kd") or {}
    seed = config.get("seed", 0)
    accelerator = make_accelerator(train, output)
    torch.manual_seed(seed)
    family = load_teacher(config["model"])
    teacher = family.unet
    down_factor = 2 ** getattr(teacher, "trunk", teacher).num_upsamplers
    check_resolution(data["resolution"], family.pipeline.vae_scale_factor, down_factor)
    family.to(accelerator.device)
    student = fake_quantized(teacher, config).requires_grad_(True).train()
    cache = LatentCache(bool(data.get("cache_latents")))
    scheduler = family.pipeline.scheduler
    text_dropout = train.get("condition_dropout", 0.15)

    if resume is None:  # the activation ranges start from real inputs (a resumed run has its own)
        probe = Batches(data, train["batch_size"], seed + 1)  # not the training stream: it stays as it would be
        observe_ranges(student, family, probe, cache, config.get("calibration_batches", 4), seed)

    validation = config.get("validation") or {}
    heldout = None
    report = {"scheme": config["scheme"], "pim": config.get("pim"), "heldout": {}}
    if accelerator.is_main_process and validation.get("heldout"):
        heldout = HeldOut.from_shards(validation["heldout"], family.pipeline, num=validation.get("heldout_num", 16))
        report["heldout"]["fp32"] = v_loss(family.pipeline, heldout)["v_loss"]
        if resume is None:  # quantized without training (a resumed run's ranges come with its checkpoint)
            report["heldout"]["before"] = v_loss(family.make_pipeline(student.eval()), heldout)["v_loss"]
            student.train()

    model, optimizer, lr_scheduler, ema = prepare_for_training(accelerator, student, train)
    state = restore(accelerator, output, resume, "quantize qat")
    global_step, micro_step = state["global_step"], state["micro_step"]
    batches = Batches(data, train["batch_size"], seed, **state["data"])
    weights = {key: float(kd.get(key, 1.0)) for key in ("task_weight", "output_weight")}
    if accelerator.is_main_process:
        accelerator.init_trackers("quantize-qat", config={"max_train_steps": train["max_train_steps"]})

    losses, started = [], time.perf_counter()
    model.train()
    while global_step < train["max_train_steps"]:
        batch = next(batches)
        generator = step_generator(seed, micro_step, accelerator.process_index)
        micro_step += 1
        with accelerator.accumulate(model):
            clean, conditions, _ = family.inputs(batch, cache, text_dropout, generator)
            noisy, target_v, timesteps = noised_sample(scheduler, clean, generator)
            with torch.no_grad():
                reference = teacher(noisy, timesteps, **conditions).sample
            prediction = model(noisy, timesteps, **conditions).sample
            task, distilled = family.loss(prediction, target_v), family.loss(prediction, reference)
            loss = weights["task_weight"] * task + weights["output_weight"] * distilled
            optimizer_step(accelerator, model, optimizer, lr_scheduler, loss, train.get("max_grad_norm"))
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        if ema is not None:
            ema.step(model.parameters())
        losses.append(loss.item())
        accelerator.log({"loss": losses[-1]}, step=global_step)
        if global_step % train.get("log_every", 10) == 0 or global_step == 1:
            accelerator.print(f"[quantize qat] step {global_step}/{train['max_train_steps']} loss {losses[-1]:.4f}")
        if global_step % train["checkpointing_steps"] == 0:
            save_checkpoint(accelerator, output, global_step, micro_step, batches, train.get("checkpoints_total_limit"))

    accelerator.wait_for_everyone()
    report["weights_sha256_per_process"] = check_processes_agree(accelerator, accelerator.unwrap_model(model), "qat")
    report.update(steps=global_step, wall_s=round(time.perf_counter() - started, 2), losses=losses)
    if accelerator.is_main_process:
        trained = copy.deepcopy(accelerator.unwrap_model(model))  # with its quantizers: not rebuilt from config
        if ema is not None:
            ema.copy_to(trained.parameters())
        trained.eval()
        layers = fake_quant_layers(trained)
        report["int8_representable"] = all(layer.int8_representable for layer in layers.values())
        report["quantized_layers"] = len(layers)
        if heldout is not None:
            report["heldout"]["after"] = v_loss(family.make_pipeline(trained), heldout)["v_loss"]
        save_qat_model(family, trained, config, output)
        if losses:
            report.update(first_loss=losses[0], last_loss=losses[-1])
        (output / REPORT_FILE).write_text(json.dumps(report, indent=1))
    accelerator.end_training()
    return report


@torch.no_grad()
def observe_ranges(student, family, batches, cache, count: int, seed: int) -> None:
    """Run ``count`` training-style batches through the student in train mode, so every activation
    quantizer's running range (and PIM layer's ADC range and gain) starts at the inputs it will see."""
    student.train()
    for noisy, timesteps, conditions in training_inputs(family, batches, cache, count, seed):
        student(noisy, timesteps, **conditions)


def training_inputs(family, batches, cache, count: int, seed: int):
    """``count`` denoiser inputs ``(noisy latents, timesteps, conditions)`` as training draws them
    (no text dropout), from ``batches`` of shard samples."""
    from distill.prune import noised_sample

    generator = torch.Generator().manual_seed(seed + 12345)
    for _ in range(count):
        clean, conditions, _ = family.inputs(next(batches), cache, 0.0, generator)
        noisy, _, timesteps = noised_sample(family.pipeline.scheduler, clean, generator)
        yield noisy, timesteps, conditions


def calibrate_chip(
    model: torch.nn.Module, run: str | Path, data: dict, count: int = 4, batch_size: int = 4, seed: int = 0
) -> int:
    """Set up the PIM chip for a fake-quantized ``model`` as it is (:func:`distill.quant.pim.calibrate_adc`:
    ADC ranges and rescaling gains), on ``count`` training-style batches of ``data`` (a config's
    ``data`` section, batches of ``batch_size``) encoded by the pipeline at ``run``; nothing trained.
    Returns how many PIM layers it set."""
    from distill.quant.pim import calibrate_adc
    from distill.step_models import LatentCache, load_teacher
    from hyperhuman.lsdm.data import Batches

    family = load_teacher(run)
    batches = Batches({**data, "num_workers": 0}, batch_size, seed + 1)
    inputs = training_inputs(family, batches, LatentCache(False), count, seed)
    return calibrate_adc(model, inputs, lambda module, item: module(item[0], item[1], **item[2]))


def save_qat_model(family, trained: torch.nn.Module, config: dict, output: Path) -> None:
    """``OUTPUT/pipeline`` with the float master weights, and the quantizer state beside it."""
    from distill.quant.layers import remove_fake_quant

    state = {key: value.contiguous() for key, value in trained.state_dict().items() if _quantizer_key(key)}
    plain = remove_fake_quant(copy.deepcopy(trained))
    if (output / "pipeline").exists():
        shutil.rmtree(output / "pipeline")
    family.make_pipeline(plain).save_pretrained(output / "pipeline")
    save_file(state, output / STATE_FILE)
    (output / SCHEME_FILE).write_text(json.dumps({"scheme": config["scheme"], "pim": config.get("pim")}, indent=1))


def _quantizer_key(key: str) -> bool:
    return any(part in key.split(".") for part in ("weight_quantizer", "input_quantizer", "pim"))


def load_qat_model(output: str | Path):
    """The pipeline of a ``quantize qat`` run with its fake-quantized (and PIM) denoiser rebuilt,
    ranges and row choices as trained; eval mode."""
    from distill.measure import load_pipeline
    from distill.quant.ptq import with_denoiser

    output = Path(output)
    pipeline = load_pipeline(output)
    saved = json.loads((output / SCHEME_FILE).read_text())
    model = fake_quantized(pipeline.unet, saved)
    missing, unexpected = model.load_state_dict(load_file(output / STATE_FILE), strict=False)
    if unexpected or any(_quantizer_key(key) for key in missing):
        raise ValueError(f"{output / STATE_FILE} does not fit the scheme in {output / SCHEME_FILE}")
    return with_denoiser(pipeline, model.eval())
