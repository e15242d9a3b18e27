"""Step distillation and the distilled VAE decoder, side by side in one run on this CPU.

    .venv/bin/python bench/step_distill.py [--round-steps 100] [--direct-steps 600] [--trajectories 128]
                                           [--decoder-steps 300] [--variants progressive direct-cfg]

1. The bench teacher (``bench/_teacher.py``: an SD-layout LSDM trained on the real photos of
   ``../shared/data/humans``, cached; shared with ``bench/mobile_unet.py``).
2. The reference: the teacher at 50 DDIM steps with classifier-free guidance (w = ``--guidance``)
   on the held-out photos' captions and poses, from fixed seeded initial noise.
3. Students, all from the teacher at 32 steps (``hyperhuman distill steps``), trained on the round
   teacher's own sampling paths (``steps.source=trajectories``: ``--trajectories`` paths from pure
   noise per round, on random crops and flips of the training photos' conditions):
   ``progressive`` (32 → 16 → 8 → 4 → 2, guided at sampling like the teacher: two evaluations a
   step) and ``direct-cfg`` (32 → 4 in one round, guidance folded in: SnapFusion's CFG-aware loss,
   w ~ U[2, 8] for half the samples; one evaluation a step). ``--round-steps`` training steps per
   progressive round, ``--direct-steps`` for the direct round. ``--variants`` adds others:
   ``progressive-cfg`` (the progressive rounds with guidance folded in; off by default, as at 100
   steps a round its w input stays unlearned) and ``direct-cfg-data`` (the direct round from noised
   shard latents with the teacher run at every training step, the earlier source; ``--data-steps``
   steps, 6.5 s each).
4. For the teacher at K ∈ {16, 8, 4, 2} (with CFG) and every student at its K: PSNR of RGB, depth
   and normal against the reference, UNet evaluations per image, wall time per image (UNet and
   decoder, batch 1, median of ``--repeats``). The per-image speed-up of the goal is timed apart:
   the teacher at 50 steps with CFG and the deployed student (4 steps, the 0.5-width decoder)
   in ``--timing-rounds`` alternating rounds, so that the machine's drift hits both alike.
5. The decoder (``hyperhuman distill vae-decoder``): students at width 0.5 and 0.25 trained on the
   teacher decoder's outputs for shard latents and the teacher's samples; decode time (batch 8,
   eager and compiled; speed-ups quoted on compiled) and PSNR against the teacher decoder on the
   held-out photos' latents (worst modality) and on the reference's latents.

Prints the tables; writes ``bench/results/step_distill.json`` whose ``summary`` holds
``student_cfg_4_psnr`` and ``teacher_16_psnr`` (RGB PSNR vs the reference, dB),
``per_image_speedup`` (teacher 50 steps with CFG and its decoder / the CFG-aware 4-step student
with the 0.5-width decoder, timed in alternation), ``decoder_half_speedup`` and
``decoder_half_psnr``. Runs are cached in ``TEACHER_ROOT/step_distill/``, each variant's folder keyed
by its training settings; ``--reuse-runs`` keeps the finished ones (e.g. to try ``--trajectories``
on one variant without retraining the others or the decoders). Skips (exit 0) without ``../shared``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import _teacher  # noqa: E402

from distill.latency import alternating_ms, time_call  # noqa: E402
from hyperhuman.config import json_digest  # noqa: E402

TEACHER_STEPS = 32
STEP_COUNTS = (16, 8, 4, 2)
REFERENCE_STEPS = 50
VARIANTS = {  # name → (steps.mode, student steps, guidance folded, steps.source)
    "progressive": ("progressive", 2, False, "trajectories"),
    "progressive-cfg": ("progressive", 2, True, "trajectories"),
    "direct-cfg": ("direct", 4, True, "trajectories"),
    "direct-cfg-data": ("direct", 4, True, "data"),  # the earlier source: the teacher run every step
}
DEFAULT_VARIANTS = ("progressive", "direct-cfg")
WIDTHS = (0.5, 0.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round-steps", type=int, default=100, help="training steps per progressive round")
    parser.add_argument("--direct-steps", type=int, default=600, help="training steps of the direct round")
    parser.add_argument("--trajectories", type=int, default=128, help="teacher paths sampled per round")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=8, help="training batch of every round")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(DEFAULT_VARIANTS))
    parser.add_argument(
        "--data-steps",
        type=int,
        default=100,
        help="training steps of direct-cfg-data (each runs 8 guided teacher steps on its batch)",
    )
    parser.add_argument("--decoder-steps", type=int, default=300)
    parser.add_argument("--guidance", type=float, default=4.0, help="the reference's and the evaluations' w")
    parser.add_argument("--heldout-num", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=3, help="timed images per model (median)")
    parser.add_argument("--timing-rounds", type=int, default=3, help="alternating rounds of the per-image speed-up")
    parser.add_argument("--reuse-runs", action="store_true", help="keep the finished runs of an earlier run")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "step_distill.json"))
    args = parser.parse_args()
    if not any(VARIANTS[name][2] for name in args.variants):
        parser.error("--variants: name at least one with guidance folded in (direct-cfg, progressive-cfg)")
    if not (_teacher.PHOTOS / "keypoints_coco.json").is_file():
        print(f"step_distill: skipped, no photo set at {_teacher.PHOTOS} (../shared beside the repository)")
        return

    import shutil

    from distill.measure import HeldOut, initial_noise, load_pipeline
    from distill.steps import distill_steps
    from hyperhuman.vae import load_vae

    started, times = time.perf_counter(), {}
    teacher = _teacher.teacher()
    times["teacher_s"] = time.perf_counter() - started
    runs = teacher["root"] / "step_distill"
    if not args.reuse_runs:
        shutil.rmtree(runs, ignore_errors=True)

    folders = {}  # each variant's run, keyed by its training settings: --reuse-runs keeps only the same
    for name in args.variants:
        mode, student_steps, fold, source = VARIANTS[name]
        stage = time.perf_counter()
        steps = {"direct": args.direct_steps, "progressive": args.round_steps}[mode]
        steps = args.data_steps if source == "data" else steps
        trained_by = [VARIANTS[name], steps, args.trajectories, args.learning_rate, args.batch_size, args.guidance]
        folders[name] = runs / f"{name}-{json_digest(trained_by)[:8]}"
        print(f"step_distill: {name} ({TEACHER_STEPS} → {student_steps} steps, {steps} training steps a round) ...")
        if not (folders[name] / "train_report.json").is_file():
            distill_steps(steps_config(folders[name], teacher, VARIANTS[name], steps, args))
        times[f"{name}_s"] = time.perf_counter() - stage

    stage = time.perf_counter()
    reference = load_pipeline(teacher["lsdm"])
    heldout = HeldOut.from_shards(teacher["heldout_shards"], reference, num=args.heldout_num)
    noise = initial_noise(heldout, reference.unet.config.latent_channels, len(heldout), seed=0)
    rows, reference_latents = step_rows(reference, folders, heldout, noise, args)
    times["steps_eval_s"] = time.perf_counter() - stage

    stage = time.perf_counter()
    decoders = decoder_rows(teacher, runs, heldout, reference_latents, args)
    times["decoder_s"] = time.perf_counter() - stage
    # Per image as deployed: the CFG-aware 4-step student closest to the reference, with the
    # half-width decoder in place of the teacher's.
    by = {(row["method"], row["steps"]): row for row in rows}
    folded = [by[(name, 4)] for name in args.variants if VARIANTS[name][2]]
    best = max(folded, key=lambda row: row["psnr"]["rgb"])
    student = with_vae(load_pipeline(folders[best["method"]] / "rounds" / "steps-4"),
                       load_vae(runs / "decoder-0.5" / "vae").eval())  # fmt: skip
    stage = time.perf_counter()
    deployed = {"method": best["method"], **per_image_seconds(reference, student, heldout, args)}
    times["per_image_timing_s"] = time.perf_counter() - stage
    times["total_s"] = time.perf_counter() - started
    report(rows, decoders, deployed, teacher, times, args)


def steps_config(output: Path, teacher: dict, variant: tuple, steps: int, args):
    from hyperhuman.config import apply_overrides, load_config

    mode, student_steps, fold, source = variant
    # The paths' conditions: random crops and flips of the training photos, as the teacher trained on
    # (more poses than the 24 photos' own); noised data is cached at fixed crops, as before.
    crops = ["data.random_crop=true", "data.min_crop_scale=0.7", "data.flip_prob=0.5", "data.cache_latents=false"]
    config = apply_overrides(load_config("distill/steps-tiny"), [
        f"data.resolution={_teacher.RESOLUTION}", "data.num_workers=0", f"train.batch_size={args.batch_size}",
        f"train.max_train_steps={steps}", f"train.checkpointing_steps={steps}", "train.log_every=50",
        f"train.learning_rate={args.learning_rate}", "validation.every=0",
        f"steps.mode={mode}", f"steps.teacher_steps={TEACHER_STEPS}", f"steps.student_steps={student_steps}",
        f"steps.source={source}", f"steps.trajectories={args.trajectories}", "steps.trajectory_batch=16",
        f"guidance.fold={str(fold).lower()}", "guidance.scale_min=2.0", "guidance.scale_max=8.0",
        f"validation.guidance_scale={args.guidance}", *(crops if source == "trajectories" else []),
    ])  # fmt: skip
    config.update(output=str(output), teacher=str(teacher["lsdm"]))
    config["data"]["train"] = str(teacher["train_shards"])
    return config


# --- sampling: agreement with the reference and time per image ------------------------------------
def step_rows(reference, folders: dict[str, Path], heldout, noise: dict, args) -> tuple[list[dict], dict]:
    from distill.guidance import guidance_dim
    from distill.measure import load_pipeline, psnr, sample_outputs, unit_range

    def outputs(pipeline, steps):
        return sample_outputs(pipeline, heldout, noise, steps, args.guidance, batch_size=9, seed=0)

    print(f"step_distill: the reference (teacher, {REFERENCE_STEPS} steps, CFG w = {args.guidance}) ...")
    target = outputs(reference, REFERENCE_STEPS)

    def row(method: str, pipeline, steps: int) -> dict:
        ours = outputs(pipeline, steps)
        folded = guidance_dim(pipeline.unet) is not None
        return {
            "method": method,
            "steps": steps,
            "unet_evals": steps * (1 if folded else 2),
            "psnr": {name: psnr(unit_range(name, ours[name]), unit_range(name, target[name])) for name in target},
            "image_s": image_seconds(pipeline, heldout, steps, args),
        }

    rows = [{**row("teacher", reference, REFERENCE_STEPS), "psnr": None}]
    for steps in STEP_COUNTS:
        print(f"step_distill: teacher at {steps} steps ...")
        rows.append(row("teacher", reference, steps))
    for name in args.variants:
        mode, final = VARIANTS[name][:2]
        counts = [s for s in STEP_COUNTS if s >= final] if mode == "progressive" else [final]
        for steps in counts:
            print(f"step_distill: {name} at {steps} steps ...")
            rows.append(row(name, load_pipeline(folders[name] / "rounds" / f"steps-{steps}"), steps))
    latents = reference_latents(reference, heldout, noise, args)
    return rows, latents


def one_image(pipeline, heldout, steps: int, args):
    """One image as a user asks for it (batch 1: text, UNet steps, all three decodes), as a call."""

    def call():
        pipeline(heldout.captions[0], pose=heldout.poses[0], height=heldout.resolution, width=heldout.resolution,
                 num_inference_steps=steps, guidance_scale=args.guidance, output_type="np",
                 generator=torch.Generator().manual_seed(0))  # fmt: skip

    return call


def image_seconds(pipeline, heldout, steps: int, args) -> float:
    """Median wall seconds of one image, after one warm-up image."""
    return time_call(one_image(pipeline, heldout, steps, args), (), {}, warmup=1, repeats=args.repeats) / 1000


def per_image_seconds(reference, student, heldout, args) -> dict:
    """The goal's timing: the teacher at 50 steps with CFG and the deployed student at 4, in
    ``--timing-rounds`` alternating rounds (median of the rounds' medians)."""
    calls = {"teacher_image_s": one_image(reference, heldout, REFERENCE_STEPS, args),
             "image_s": one_image(student, heldout, 4, args)}  # fmt: skip
    ms = alternating_ms(calls, {name: {} for name in calls}, rounds=args.timing_rounds, repeats=args.repeats)
    return {name: value / 1000 for name, value in ms.items()}


def with_vae(pipeline, vae):
    """``pipeline`` decoding with ``vae`` (e.g. a distilled decoder)."""
    pipeline = type(pipeline)(**{**pipeline.components, "vae": vae})
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def reference_latents(reference, heldout, noise: dict, args) -> torch.Tensor:
    """The reference's final latents (VAE space, every branch): what a decoder meets in the pipeline."""
    names = list(reference.unet.config.branches)
    result = reference(heldout.captions, pose=heldout.poses, height=heldout.resolution, width=heldout.resolution,
                       num_inference_steps=REFERENCE_STEPS, guidance_scale=args.guidance, output_type="latent",
                       latents=torch.cat([noise[name] for name in names], dim=1))  # fmt: skip
    chunks = result.rgb.split(reference.unet.config.latent_channels, dim=1)
    return torch.cat([reference.unet.denormalize(name, chunk) for name, chunk in zip(names, chunks, strict=True)])


# --- the decoder -----------------------------------------------------------------------------------
def decoder_rows(teacher: dict, runs: Path, heldout, sampled: torch.Tensor, args) -> list[dict]:
    from distill.vae_decoder import decode_ms, decoder_psnr, distill_vae_decoder
    from hyperhuman.config import apply_overrides, load_config
    from hyperhuman.vae import load_vae

    teacher_vae = load_vae(teacher["vae"] / "vae").eval()
    photos = dict(heldout.latents)  # posterior modes of rgb, depth, normal and pose
    batch = torch.cat(list(photos.values()))[:8]

    def timed(vae) -> dict:
        return {f"decode_{runtime}_ms": decode_ms(vae, batch, runtime=runtime) for runtime in ("eager", "compiled")}

    rows = [{"width": 1.0, "params": _count(teacher_vae.decoder), **timed(teacher_vae),
             "psnr_photos": None, "psnr_sampled": None}]  # fmt: skip
    for width in WIDTHS:
        output = runs / f"decoder-{width}"
        print(f"step_distill: decoder at width {width} ({args.decoder_steps} steps) ...")
        if not (output / "vae_decoder_report.json").is_file():
            config = apply_overrides(load_config("distill/vae-decoder-tiny"), [
                f"student.width={width}", f"data.resolution={_teacher.RESOLUTION}", "train.batch_size=4",
                f"train.max_train_steps={args.decoder_steps}", f"train.checkpointing_steps={args.decoder_steps}",
                "validation.every=0", "sampling.num_samples=24",
            ])  # fmt: skip
            config.update(output=str(output), vae=str(teacher["vae"] / "vae"), teacher=str(teacher["lsdm"]))
            config["data"]["train"] = str(teacher["train_shards"])
            config["validation"]["heldout"] = str(teacher["heldout_shards"])
            distill_vae_decoder(config)
        student = load_vae(output / "vae").eval()
        rows.append({
            "width": width,
            "params": _count(student.decoder),
            **timed(student),
            "psnr_photos": decoder_psnr(student, teacher_vae, photos),
            "psnr_sampled": decoder_psnr(student, teacher_vae, sampled),
        })  # fmt: skip
    for row in rows:
        for runtime in ("eager", "compiled"):
            row[f"speedup_{runtime}"] = rows[0][f"decode_{runtime}_ms"] / row[f"decode_{runtime}_ms"]
    return rows


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- the report ------------------------------------------------------------------------------------
def report(rows: list[dict], decoders: list[dict], deployed: dict, teacher: dict, times: dict, args) -> None:
    print(f"\nteacher: {teacher['root']}; reference: teacher at {REFERENCE_STEPS} steps, CFG w = {args.guidance}; "
          f"students ({', '.join(args.variants)}) from the teacher at {TEACHER_STEPS} steps "
          f"on {args.trajectories} teacher paths per round, "
          f"{args.round_steps} training steps per progressive round, {args.direct_steps} for direct "
          f"(batch {args.batch_size}, lr {args.learning_rate})")  # fmt: skip
    print(f"{'method':16} {'steps':>5} {'UNet evals':>10} {'PSNR rgb':>8} {'depth':>6} {'normal':>6} {'s/image':>8}")
    for row in rows:
        psnr = row["psnr"] or {}
        cells = " ".join(f"{psnr[name]:{w}.1f}" if name in psnr else "-".rjust(w)
                         for name, w in (("rgb", 8), ("depth", 6), ("normal", 6)))  # fmt: skip
        print(f"{row['method']:16} {row['steps']:5d} {row['unet_evals']:10d} {cells} {row['image_s']:8.3f}")
    print("\ndecoder (batch 8): decode ms eager and compiled, PSNR vs the teacher decoder (worst modality "
          "of the held-out photos' latents; the reference's latents)")  # fmt: skip
    print(f"{'width':>6} {'params k':>9} {'eager ms':>9} {'speed-up':>8} {'compiled':>9} {'speed-up':>8} "
          f"{'PSNR photos':>12} {'sampled':>8}")  # fmt: skip
    for row in decoders:
        photos = row["psnr_photos"] and min(row["psnr_photos"].values())
        sampled = row["psnr_sampled"] and min(row["psnr_sampled"].values())
        print(f"{row['width']:6.2f} {row['params'] / 1e3:9.1f} {row['decode_eager_ms']:9.1f} "
              f"{row['speedup_eager']:7.2f}x {row['decode_compiled_ms']:9.1f} {row['speedup_compiled']:7.2f}x "
              f"{photos or float('nan'):12.1f} {sampled or float('nan'):8.1f}")  # fmt: skip

    by = {(row["method"], row["steps"]): row for row in rows}
    cfg_4 = by[(deployed["method"], 4)]
    half = next(row for row in decoders if row["width"] == 0.5)
    student_image_s = deployed["image_s"]
    summary = {
        "student_cfg_4_psnr": cfg_4["psnr"]["rgb"],
        "student_cfg_4_method": cfg_4["method"],
        "teacher_16_psnr": by[("teacher", 16)]["psnr"]["rgb"],
        "teacher_50_image_s": deployed["teacher_image_s"],
        "student_cfg_4_half_decoder_image_s": student_image_s,
        "per_image_speedup": deployed["teacher_image_s"] / student_image_s,
        "per_image_timing": f"{args.timing_rounds} alternating rounds of {args.repeats} images each",
        "decoder_half_speedup": half["speedup_compiled"],
        "decoder_half_speedup_eager": half["speedup_eager"],
        "decoder_half_psnr": min(half["psnr_photos"].values()),
        "decoder_half_psnr_sampled": min(half["psnr_sampled"].values()),
    }
    summary["goals"] = {
        "student_cfg_4_psnr > teacher_16_psnr": summary["student_cfg_4_psnr"] > summary["teacher_16_psnr"],
        "per_image_speedup >= 12": summary["per_image_speedup"] >= 12,
        "decoder_half_speedup >= 2": summary["decoder_half_speedup"] >= 2,
        "decoder_half_psnr >= 30": summary["decoder_half_psnr"] >= 30,
    }
    result = {
        "summary": summary,
        "sampling": rows,
        "decoders": decoders,
        "teacher": {**teacher["report"], "root": str(teacher["root"])},
        "settings": vars(args),
        "times_s": {key: round(value, 1) for key, value in times.items()},
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nper image: teacher {summary['teacher_50_image_s']:.3f} s (50 steps, CFG) vs {cfg_4['method']} at 4 steps "
          f"with the 0.5-width decoder {student_image_s:.3f} s: {summary['per_image_speedup']:.1f}x")  # fmt: skip
    print(f"times: {json.dumps(result['times_s'])}")
    print(f"summary: {json.dumps(summary)}\nwrote {output}")


if __name__ == "__main__":
    main()
