"""Post-training quantization of one denoiser on both runtimes (the helper of ``bench/quantize.py``).

    section = denoiser_section("student", run, teacher_paths, work_dir, args)

1. Calibration from the model's own guided trajectories on the training shards' conditions:
   ``spread`` (Q-Diffusion: steps evenly over each trajectory) and, with ``compare_calibration``,
   ``single`` (as many calls, all at the middle step) and ``spread`` with split skip scales.
2. PT2E int8 (X86 inductor) of each; ONNX export at one guided step's batch (2) and ORT static
   QDQ int8 calibrated on the same calls (cut to that batch).
3. One guided step (batch 2, held-out resolution) timed on fp32 eager, fp32 compiled (inductor
   with freezing, the strongest fp32 baseline), bf16 autocast, int8 compiled (the spread
   calibration's program, frozen the same way), ORT fp32 and ORT int8, the runtimes in alternation
   for ``rounds`` rounds (median of the rounds' medians; these machines are noisy). Compile and
   export times apart.
4. Quality against the fp32 model: held-out v-loss (the shared measure) and the PSNR of samples
   from the same noise (``psnr_steps`` DDIM steps, CFG) for bf16, int8 compiled (the kernels that
   are timed) and ORT int8. v-loss of PT2E programs runs their graph uncompiled (the same
   quantize / dequantize arithmetic, simulated in fp32), since its batches differ from the
   compiled step's; the calibration comparison runs every variant that way (one runtime).
5. With ``sides``: fp32 compiled against int8 compiled at larger latents (:func:`size_section`),
   timing only: where convolutions outweigh the fixed per-op costs of a small step.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

GUIDANCE = 3.0


def calibrate(pipeline, shards, mode: str, args):
    from distill.quant.calibration import trajectory_calibration

    return trajectory_calibration(
        pipeline, str(shards), num_samples=args.calibration_samples, steps=args.calibration_steps,
        timesteps=args.calibration_timesteps, guidance_scale=GUIDANCE, mode=mode, batch_size=4, seed=0,
    )  # fmt: skip


def first_call_s(call, kwargs: dict) -> float:
    """Seconds of ``call``'s first call: its compile, for compiled runtimes."""
    from distill.latency import time_call

    return time_call(call, (), kwargs, warmup=0, repeats=1) / 1000


def denoiser_section(
    name: str, run: Path, teacher_paths: dict, work_dir: Path, args, compare_calibration=False, decoder=False,
    sides: tuple[int, ...] = (),
):  # fmt: skip
    from distill.latency import alternating_ms, runner
    from distill.measure import HeldOut, load_pipeline, reference_samples, sample_psnr, step_inputs, v_loss
    from distill.quant.onnx_runtime import OnnxDenoiser, export_onnx, quantize_qdq, rebatched
    from distill.quant.ptq import QuantizedDenoiser, canonical_call, compiled, quantize_int8, with_denoiser

    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    times = {}
    pipeline = load_pipeline(run)
    pipeline.set_progress_bar_config(disable=True)
    unet = pipeline.unet.eval()
    heldout = HeldOut.from_shards(teacher_paths["heldout_shards"], pipeline, num=args.heldout_num)
    params = sum(p.numel() for p in unet.parameters())

    stage = time.perf_counter()
    spread = calibrate(pipeline, teacher_paths["train_shards"], "spread", args)
    times["calibration_s"] = time.perf_counter() - stage
    stage = time.perf_counter()
    programs = {"spread": quantize_int8(unet, spread)}
    times["pt2e_quantize_s"] = time.perf_counter() - stage
    if compare_calibration:
        single = calibrate(pipeline, teacher_paths["train_shards"], "single", args)
        programs["single"] = quantize_int8(unet, single)
        programs["spread+split"] = quantize_int8(unet, spread, split_skip=True)

    step = step_inputs(pipeline, heldout)
    call = canonical_call(unet, (), step)
    stage = time.perf_counter()
    onnx_fp32 = export_onnx(unet, call, work_dir / "unet.onnx")
    times["onnx_export_s"] = time.perf_counter() - stage
    stage = time.perf_counter()
    calls = rebatched([canonical_call(unet, a, k) for a, k in spread.calls], call["sample"].shape[0])
    onnx_int8 = quantize_qdq(onnx_fp32, calls, work_dir / "unet_int8.onnx")
    times["onnx_qdq_s"] = time.perf_counter() - stage

    runtimes = {
        "fp32 eager": runner(unet, "eager"),
        "fp32 compiled": compiled(unet),  # frozen, C++ wrapper: as int8 gets, the strongest fp32
        "bf16": runner(unet, "bf16"),
        "int8 compiled": compiled(programs["spread"]),
        "ORT fp32": OnnxDenoiser(onnx_fp32),
        "ORT int8": OnnxDenoiser(onnx_int8),
    }
    kwargs = {key: (step if key in ("fp32 eager", "fp32 compiled", "bf16") else call) for key in runtimes}
    compile_s = {}
    for key, runtime in runtimes.items():  # the first call compiles (and warms everything else up)
        seconds = first_call_s(runtime, kwargs[key])
        if "compiled" in key:
            compile_s[key] = round(seconds, 1)
    step_ms = alternating_ms(runtimes, kwargs, args.rounds, args.repeats)

    stage = time.perf_counter()
    # v-loss batches the held-out triples 8 at a time, which the compiled step (batch 2) would
    # recompile for: PT2E programs are scored uncompiled there (the same quantize / dequantize
    # arithmetic, simulated in fp32), and so are the calibration variants' samples (one runtime).
    simulated = {f"int8 ({v})": with_denoiser(pipeline, QuantizedDenoiser(p, unet)) for v, p in programs.items()}
    timed = {
        "bf16": with_denoiser(pipeline, QuantizedDenoiser(runtimes["bf16"], unet)),
        "int8 compiled": with_denoiser(pipeline, QuantizedDenoiser(runtimes["int8 compiled"], unet)),
        "ORT int8": with_denoiser(pipeline, QuantizedDenoiser(runtimes["ORT int8"], unet)),
    }
    scorers, scored_as = {**timed, **simulated}, {"int8 compiled": "int8 (spread)"}  # the same program
    sampling = {"steps": args.psnr_steps, "guidance_scale": GUIDANCE, "num": args.psnr_num, "batch_size": 1}
    fp32_samples = reference_samples(pipeline, heldout, **sampling)  # once, for every runtime's PSNR
    v_losses = {"fp32": v_loss(pipeline, heldout)["v_loss"]}
    quality = {"fp32": {"v_loss": v_losses["fp32"]}}
    for key, sampler in {**timed, **(simulated if compare_calibration else {})}.items():
        scorer = scored_as.get(key, key)
        if scorer not in v_losses:
            v_losses[scorer] = v_loss(scorers[scorer], heldout)["v_loss"]
        quality[key] = {
            "v_loss": v_losses[scorer],
            # batch 1: every guided call is the timed step's batch of 2, so nothing recompiles
            "psnr": sample_psnr(sampler, pipeline, heldout, **sampling, reference_outputs=fp32_samples),
        }  # fmt: skip
    times["quality_s"] = time.perf_counter() - stage
    decoded = decoder_section(pipeline.vae, spread.decoder_inputs, work_dir, args) if decoder else None
    stage = time.perf_counter()
    by_side = size_section(unet, spread, sides, args) if sides else None
    times["sides_s"] = time.perf_counter() - stage
    times["total_s"] = time.perf_counter() - started
    return {
        "sides": by_side,
        "decoder": decoded,
        "model": name,
        "run": str(run),
        "params": params,
        "step_ms": step_ms,
        "compile_s": compile_s,
        "quality": quality,
        "calibration": {
            "calls": len(spread),
            "rows": sum(a[0].shape[0] for a, _ in spread.calls),
            "steps": sorted(set(spread.steps)),
        },
        "times_s": {key: round(value, 1) for key, value in times.items()},
    }


@torch.no_grad()
def decoder_section(vae, latents: list[torch.Tensor], work_dir: Path, args) -> dict:
    """The VAE decoder on both runtimes at the calibration batch: ms for torch eager / compiled and
    ORT fp32 / int8 (QDQ calibrated on the trajectories' final latents), and the PSNR of the ORT
    int8 decoder's images against torch's on all of them."""
    from distill.latency import alternating_ms, runner
    from distill.measure import psnr
    from distill.quant.onnx_runtime import OnnxDenoiser, VaeDecoder, export_vae_decoder, quantize_qdq
    from distill.quant.ptq import compiled

    fp32 = export_vae_decoder(vae, latents[0], work_dir / "vae_decoder.onnx")
    int8 = quantize_qdq(fp32, [{"latents": z} for z in latents], work_dir / "vae_decoder_int8.onnx")
    decode = VaeDecoder(vae).eval()
    runtimes = {"fp32 eager": runner(decode, "eager"), "fp32 compiled": compiled(decode),
                "ORT fp32": OnnxDenoiser(fp32), "ORT int8": OnnxDenoiser(int8)}  # fmt: skip
    kwargs = dict.fromkeys(runtimes, {"latents": latents[0]})
    compile_s = {"fp32 compiled": round(first_call_s(runtimes["fp32 compiled"], kwargs["fp32 compiled"]), 1)}
    ms = alternating_ms(runtimes, kwargs, args.rounds, args.repeats)
    session = runtimes["ORT int8"]
    reference = torch.cat([vae.decode(z).sample for z in latents]).clamp(-1, 1)
    ours = torch.cat([session(latents=z).sample for z in latents]).clamp(-1, 1)
    quality_db = psnr(((ours + 1) / 2).numpy(), ((reference + 1) / 2).numpy())
    return {"batch": latents[0].shape[0], "latents": len(latents), "ms": ms, "compile_s": compile_s,
            "int8_psnr_db": quality_db}  # fmt: skip


def print_section(section: dict) -> None:
    ms, quality = section["step_ms"], section["quality"]
    base = ms["fp32 compiled"]

    def scores(key: str) -> str:
        scored = quality.get(key) or (quality["fp32"] if key.startswith("fp32") else None)
        if not scored:
            return ""
        row = f" {scored['v_loss']:8.4f}"
        if "psnr" in scored:
            row += "  " + " / ".join(f"{scored['psnr'][m]:.1f}" for m in ("rgb", "depth", "normal"))
        return row

    print(f"\n{section['model']}: {section['params'] / 1e6:.2f}M params, one guided step (batch 2)")
    print(f"{'runtime':22} {'ms':>8} {'× compiled fp32':>16} {'v-loss':>8}  PSNR vs fp32 rgb / depth / normal")
    for key, value in ms.items():
        print(f"{key:22} {value:8.1f} {base / value:15.2f}×" + scores(key))
    variants = [key for key in quality if key.startswith("int8 (")]
    if variants:
        print("calibration (int8 simulated, one runtime):")
        for key in variants:
            print(f"{key:22} {'':8} {'':16}" + scores(key))
    print(f"compile / first call s: {section['compile_s']}; stages s: {section['times_s']}")
    for side, row in (section.get("sides") or {}).items():
        ms = row["step_ms"]
        print(f"at {side}² latents (timing only): fp32 compiled {ms['fp32 compiled']:.1f} ms, int8 compiled "
              f"{ms['int8 compiled']:.1f} ms: {row['int8_speedup']:.2f}×")  # fmt: skip
    decoded = section.get("decoder")
    if decoded:
        ms = decoded["ms"]
        print(f"VAE decoder, batch {decoded['batch']}: " + ", ".join(
            f"{key} {value:.1f} ms ({ms['fp32 compiled'] / value:.2f}×)" for key, value in ms.items()
        ) + f"; ORT int8 images vs fp32: {decoded['int8_psnr_db']:.1f} dB")  # fmt: skip


@torch.no_grad()
def size_section(unet, calibration, sides: tuple[int, ...], args) -> dict:
    """int8's speed-up over compiled fp32 at larger latents than the model trained on (how the same
    student scales to a deployment resolution): one guided step (batch 2) per latent side in
    ``sides``, the two runtimes timed in alternation. The int8 program is exported and calibrated
    at that size on the calibration's calls resized to it (bilinear): the scales set the int8
    values, not the kernels' speed, and only speed is measured here (the samples' quality is the
    trained size's, above)."""
    from distill.latency import alternating_ms
    from distill.quant.ptq import canonical_call, compiled, export_denoiser, quantize_exported

    rows = {}
    for side in sides:
        calls = [resized(canonical_call(unet, a, k), side) for a, k in calibration.calls]
        step = {name: value[:2] for name, value in calls[0].items()}  # the guided step's batch of 2
        started = time.perf_counter()
        program = quantize_exported(export_denoiser(unet, calls[0]), calls)
        quantize_s = time.perf_counter() - started
        runtimes = {"fp32 compiled": compiled(unet), "int8 compiled": compiled(program)}
        # the float model's forward was compiled at the trained size already: a new shape would
        # make dynamo recompile it with dynamic shapes (slower kernels); static, as int8 gets
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
            compile_s = {key: round(first_call_s(runtime, step), 1) for key, runtime in runtimes.items()}
        ms = alternating_ms(runtimes, dict.fromkeys(runtimes, step), args.rounds, args.repeats)
        rows[side] = {"step_ms": ms, "int8_speedup": ms["fp32 compiled"] / ms["int8 compiled"],
                      "compile_s": compile_s, "quantize_s": round(quantize_s, 1)}  # fmt: skip
        print(f"[bench quantize] {side}² latents: fp32 compiled {ms['fp32 compiled']:.1f} ms, "
              f"int8 compiled {ms['int8 compiled']:.1f} ms ({rows[side]['int8_speedup']:.2f}×)")  # fmt: skip
    return rows


def resized(call: dict, side: int) -> dict:
    """A denoiser call with its spatial inputs (latents, pose latents) resized to ``side``²."""
    import torch.nn.functional as F

    return {
        name: F.interpolate(value, size=(side, side), mode="bilinear") if value.ndim == 4 else value
        for name, value in call.items()
    }
