"""``hyperhuman quantize ptq``: int8 post-training quantization of a denoiser (an LSDM run, a
distilled student, a pruned model) on the x86 runtime, with timestep-aware calibration.

1. the float pipeline samples from the calibration shards' conditions and the denoiser's inputs
   are recorded along its trajectories (:mod:`distill.quant.calibration`: ``spread`` over the
   steps, as Q-Diffusion calibrates, or ``single``: all at one step, the comparison);
2. PT2E quantizes the denoiser (:mod:`distill.quant.ptq`) and the int8 program is saved:
   ``OUTPUT/unet_int8.pt2``, beside ``OUTPUT/pipeline`` (the float pipeline: text encoder, VAE,
   scheduler, and the float denoiser whose config the int8 one answers with);
3. with ``evaluation.heldout``: the held-out v-loss (:mod:`distill.measure`) of both, the PSNR of
   int8 samples against fp32 samples from the same noise, and one guided step's latency on each
   of ``evaluation.runtimes`` (fp32 ``eager`` / ``compiled`` / ``bf16`` autocast, ``int8``:
   the program compiled with inductor freezing, whose compile time is reported on its own).

``OUTPUT/quantize_report.json`` holds it all; :func:`load_quantized_pipeline` gives back a
``HyperHumanPipeline`` that samples with the int8 program.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from hyperhuman.config import ConfigError, check_known_keys

REFERENCE = "configs/quantize/ptq-tiny.yaml"
PROGRAM_FILE = "unet_int8.pt2"
ONNX_FILES = {"fp32": "unet.onnx", "int8": "unet_int8.onnx"}
DECODER_FILES = {"fp32": "vae_decoder.onnx", "int8": "vae_decoder_int8.onnx"}
ONNX_RUNTIMES = {"onnx": "fp32", "onnx-int8": "int8"}  # load_quantized_pipeline's runtime → its ONNX file
REPORT_FILE = "quantize_report.json"
RUNTIMES = ("eager", "compiled", "bf16", "int8")
CALIBRATION_KEYS = dict.fromkeys(
    ["shards", "mode", "num_samples", "steps", "timesteps", "single_step", "guidance_scale", "batch_size", "seed"]
)
EVALUATION_KEYS = dict.fromkeys(
    ["heldout", "heldout_num", "psnr_num", "psnr_steps", "guidance_scale", "runtimes", "int8_runtime", "repeats"]
)
KNOWN_KEYS = {
    "output": None, "model": None, "split_skip": None, "onnx": None,
    "calibration": CALIBRATION_KEYS, "evaluation": EVALUATION_KEYS,
}  # fmt: skip


def check_ptq_config(config: dict, check_paths: bool = True) -> None:
    """Everything that would fail after minutes of calibration fails here, naming the key."""
    from distill.quant.calibration import MODES
    from distill.quant.ptq import RUNTIMES as INT8_RUNTIMES

    for section in ("output", "model", "calibration"):
        if config.get(section) is None:
            raise ConfigError(f"quantize config lacks {section!r} (e.g. --set {section}=...); see {REFERENCE}")
    check_known_keys(config, KNOWN_KEYS, REFERENCE)
    calibration, evaluation = config["calibration"], config.get("evaluation") or {}
    if calibration.get("shards") is None:
        raise ConfigError(f"calibration.shards: the shards whose captions and poses to sample; see {REFERENCE}")
    if calibration.get("mode", "spread") not in MODES:
        raise ConfigError(f"calibration.mode={calibration.get('mode')!r}; choose one of {MODES}")
    for key in ("num_samples", "steps", "timesteps", "batch_size"):
        value = calibration.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"calibration.{key}={value!r}; give a positive integer")
    runtimes = evaluation.get("runtimes") or []
    unknown = [runtime for runtime in runtimes if runtime not in RUNTIMES]
    if unknown:
        raise ConfigError(f"evaluation.runtimes has {unknown}; choose from {RUNTIMES}")
    if runtimes and not evaluation.get("heldout"):
        raise ConfigError("evaluation.runtimes times a step at the held-out resolution: set evaluation.heldout too")
    if not isinstance(config.get("split_skip", False), bool):
        raise ConfigError(f"split_skip={config['split_skip']!r}; true: a scale per half of each skip concat; or false")
    if not isinstance(config.get("onnx", False), bool):
        raise ConfigError(f"onnx={config['onnx']!r}; give true (also export ONNX fp32 and int8 QDQ) or false")
    if evaluation.get("int8_runtime", "eager") not in INT8_RUNTIMES:
        raise ConfigError(f"evaluation.int8_runtime={evaluation.get('int8_runtime')!r}; choose one of {INT8_RUNTIMES}")
    if check_paths:
        from distill.measure import check_teacher_run

        check_teacher_run(config["model"])


def quantize_ptq(config: dict) -> dict:
    """Calibrate, quantize, save, evaluate; returns the report (also ``OUTPUT/quantize_report.json``)."""
    from distill.measure import load_pipeline
    from distill.quant.calibration import trajectory_calibration
    from distill.quant.ptq import (
        QuantizedDenoiser,
        canonical_call,
        compiled,
        quantize_int8,
        save_program,
        with_denoiser,
    )

    check_ptq_config(config)
    output = Path(config["output"])
    calibration_config, evaluation = dict(config["calibration"]), config.get("evaluation") or {}
    started = time.perf_counter()
    pipeline = load_pipeline(config["model"])
    pipeline.set_progress_bar_config(disable=True)
    unet = pipeline.unet.eval()

    stage = time.perf_counter()
    shards = calibration_config.pop("shards")
    calibration = trajectory_calibration(pipeline, str(shards), **calibration_config)
    calibration_s = time.perf_counter() - stage
    steps = sorted(set(calibration.steps))
    print(f"[quantize ptq] {len(calibration)} calibration calls ({calibration.mode}, steps {steps})")

    stage = time.perf_counter()
    program = quantize_int8(unet, calibration, split_skip=config.get("split_skip", False))
    quantize_s = time.perf_counter() - stage
    output.mkdir(parents=True, exist_ok=True)
    save_program(program, canonical_call(unet, *calibration.example), output / PROGRAM_FILE)
    if (output / "pipeline").exists():
        shutil.rmtree(output / "pipeline")
    pipeline.save_pretrained(output / "pipeline")

    report = {
        "model": str(config["model"]),
        "program": str(output / PROGRAM_FILE),
        "split_skip": config.get("split_skip", False),
        "calibration": {
            "mode": calibration.mode,
            "calls": len(calibration),
            "rows": sum(args[0].shape[0] for args, _ in calibration.calls),
            "steps": sorted(set(calibration.steps)),
            "relative_error": calibration_error(unet, program, calibration),
        },
        "ops": quantized_ops(program),
        "times_s": {"calibration": round(calibration_s, 2), "quantize": round(quantize_s, 2)},
    }
    if config.get("onnx"):
        stage = time.perf_counter()
        report["onnx"] = onnx_models(unet, calibration, output, config.get("split_skip", False))
        if calibration.decoder_inputs:
            report["onnx"]["vae_decoder"] = onnx_decoders(pipeline.vae, calibration.decoder_inputs, output)
        report["times_s"]["onnx"] = round(time.perf_counter() - stage, 2)
    if evaluation.get("heldout"):
        int8_runtime = evaluation.get("int8_runtime", "eager")
        int8_pipeline = with_denoiser(pipeline, QuantizedDenoiser(compiled(program, int8_runtime), unet))
        report["evaluation"] = evaluate(pipeline, int8_pipeline, program, evaluation)
        report["evaluation"]["int8_runtime"] = int8_runtime
    report["times_s"]["total"] = round(time.perf_counter() - started, 2)
    (output / REPORT_FILE).write_text(json.dumps(report, indent=1))
    return report


@torch.no_grad()
def calibration_error(unet, program, calibration) -> float:
    """Mean over the calibration calls of ‖int8 − fp32‖ / ‖fp32‖ of the denoiser's prediction."""
    from distill.quant.ptq import canonical_call

    errors = []
    for args, kwargs in calibration.calls:
        reference = unet(*args, **kwargs).sample
        ours = program(**canonical_call(unet, args, kwargs)).sample
        errors.append(((ours - reference).norm() / reference.norm().clamp_min(1e-12)).item())
    return sum(errors) / len(errors)


def onnx_models(unet, calibration, output: Path, split_skip: bool = False) -> dict:
    """The ONNX Runtime route: the denoiser exported at the calibration's shapes (``unet.onnx``)
    and its static QDQ int8 (``unet_int8.onnx``) calibrated on the same calls, with its error."""
    from distill.quant.onnx_runtime import OnnxDenoiser, export_onnx, quantize_qdq
    from distill.quant.ptq import canonical_call
    from distill.quant.split_skip import with_split_skip

    calls = [canonical_call(unet, args, kwargs) for args, kwargs in calibration.calls]
    exported = with_split_skip(unet, calls[0]) if split_skip else unet
    fp32 = export_onnx(exported, calls[0], output / ONNX_FILES["fp32"])
    int8 = quantize_qdq(fp32, calls, output / ONNX_FILES["int8"])
    error = calibration_error(unet, OnnxDenoiser(int8), calibration)
    return {"fp32": str(fp32), "int8": str(int8), "relative_error": error}


@torch.no_grad()
def onnx_decoders(vae, decoder_inputs: list[torch.Tensor], output: Path) -> dict:
    """The VAE decoder on the same route (``vae_decoder.onnx``, ``vae_decoder_int8.onnx``),
    calibrated on the trajectories' final latents; the int8 decoder's mean relative error on them."""
    from distill.quant.onnx_runtime import OnnxDenoiser, export_vae_decoder, quantize_qdq

    fp32 = export_vae_decoder(vae, decoder_inputs[0], output / DECODER_FILES["fp32"])
    int8 = quantize_qdq(fp32, [{"latents": latents} for latents in decoder_inputs], output / DECODER_FILES["int8"])
    session, errors = OnnxDenoiser(int8), []
    for latents in decoder_inputs:
        reference = vae.decode(latents).sample
        errors.append(((session(latents=latents).sample - reference).norm() / reference.norm()).item())
    return {"fp32": str(fp32), "int8": str(int8), "relative_error": sum(errors) / len(errors)}


def quantized_ops(program) -> dict[str, int]:
    """How many of each quantize / dequantize op the converted graph holds."""
    counts: dict[str, int] = {}
    for node in program.graph.nodes:
        target = str(node.target)
        if node.op == "call_function" and "quantize" in target:
            counts[target] = counts.get(target, 0) + 1
    return counts


def evaluate(pipeline, int8_pipeline, program, evaluation: dict) -> dict:
    """Held-out v-loss of both, sample PSNR of int8 against fp32, step latencies."""
    from distill.measure import HeldOut, sample_psnr, v_loss

    heldout = HeldOut.from_shards(evaluation["heldout"], pipeline, num=evaluation.get("heldout_num", 16))
    guidance = evaluation.get("guidance_scale", 3.0)
    result = {
        "heldout": str(evaluation["heldout"]),
        "heldout_num": len(heldout),
        "fp32_v_loss": v_loss(pipeline, heldout)["v_loss"],
        "int8_v_loss": v_loss(int8_pipeline, heldout)["v_loss"],
        "psnr_vs_fp32": sample_psnr(
            int8_pipeline,
            pipeline,
            heldout,
            steps=evaluation.get("psnr_steps", 20),
            guidance_scale=guidance,
            num=evaluation.get("psnr_num", 4),
        ),  # fmt: skip
    }
    runtimes = evaluation.get("runtimes") or []
    if runtimes:
        result["step_ms"], result["compile_s"] = step_latencies(pipeline, program, heldout, runtimes, evaluation)
        ms = result["step_ms"]
        if "int8" in ms and "compiled" in ms:
            result["int8_speedup_vs_compiled"] = ms["compiled"] / ms["int8"]
    return result


def step_latencies(pipeline, program, heldout, runtimes: list[str], evaluation: dict) -> tuple[dict, dict]:
    """Median ms of one guided step (batch 2) per runtime, and each compiled runtime's first call
    (its compile) in seconds, kept apart from the step times."""
    from distill.latency import runner, time_call
    from distill.measure import step_inputs
    from distill.quant.ptq import canonical_call, compiled

    inputs = step_inputs(pipeline, heldout)
    repeats = evaluation.get("repeats", 5)
    step_ms, compile_s = {}, {}
    for runtime in runtimes:
        if runtime == "int8":
            call, kwargs = compiled(program, "compiled"), canonical_call(pipeline.unet, (), inputs)
        else:
            call, kwargs = runner(pipeline.unet, runtime), inputs
        started = time.perf_counter()
        with torch.inference_mode():
            call(**kwargs)
        if runtime in ("compiled", "int8"):
            compile_s[runtime] = round(time.perf_counter() - started, 2)
        step_ms[runtime] = time_call(call, (), kwargs, warmup=1, repeats=repeats)
    return step_ms, compile_s


def load_quantized_pipeline(output: str | Path, runtime: str = "compiled"):
    """The ``HyperHumanPipeline`` of a ``quantize ptq`` run, denoising with its int8 program
    (``runtime``: ``compiled``, the int8 kernels; ``eager``: simulated in fp32; ``onnx`` /
    ``onnx-int8``: the run's ONNX models in ONNX Runtime, written with ``onnx: true``)."""
    from distill.measure import load_pipeline
    from distill.quant.ptq import QuantizedDenoiser, compiled, load_program, with_denoiser

    output = Path(output)
    pipeline = load_pipeline(output)
    if runtime in ONNX_RUNTIMES:
        from distill.quant.onnx_runtime import OnnxDenoiser

        path = output / ONNX_FILES[ONNX_RUNTIMES[runtime]]
        if not path.is_file():
            raise FileNotFoundError(f"runtime={runtime!r} needs {path}: run quantize ptq with --set onnx=true")
        return with_denoiser(pipeline, QuantizedDenoiser(OnnxDenoiser(path), pipeline.unet))
    return with_denoiser(
        pipeline, QuantizedDenoiser(compiled(load_program(output / PROGRAM_FILE), runtime), pipeline.unet)
    )
