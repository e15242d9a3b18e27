"""The mobile UNet: BK-SDM's students against SnapFusion's architecture evolving, from one teacher,
side by side in one run on this CPU.

    .venv/bin/python bench/mobile_unet.py [--kd-steps 200] [--robust-steps 300] [--budget 0.4]
                                          [--search-runtime eager] [--no-sd2]

1. The bench teacher (``bench/_teacher.py``: an SD-layout LSDM trained on the real photos of
   ``../shared/data/humans``, cached; the first run trains it).
2. Robust training (SnapFusion): a copy of the teacher trained by KD with each removable ResNet and
   attention bypassed at random (``kd.skip_prob``) for ``--robust-steps``.
3. Architecture evolving on the robust model: greedy removals by Δ(held-out v-loss) / Δ(latency),
   latencies from this machine's per-block table on ``--search-runtime``, until the predicted step
   is under ``--budget`` × the teacher's.
4. KD (task + output + normalised feature terms, ``hyperhuman distill unet``), the same
   ``--kd-steps`` for every student: BK-SDM base/small/tiny from the teacher's weights, the evolved
   one from the robust model's.
5. For the teacher and each student: parameters, MACs, measured step latency (eager and
   ``torch.compile``; one guided step, batch 2, the models timed in alternation), the latency
   predicted from the table and its error (blocks timed in this stage, beside the steps); eager
   also calibrated (one factor fitted on the teacher's measured step: eager blocks timed alone
   run with warm caches; the students' calibrated errors are out of sample), held-out v-loss
   (the held-out photos, fixed seeded triples) and its ratio to the teacher's, the same ratio on
   training photos ("train": how closely it follows the teacher where the teacher has learnt the
   data), PSNR of its samples against the teacher's from the same noise.
6. SD-2-base at 512² as the LSDM (latent 64², batch 2), teacher and the same students: parameters
   and MACs counted on the meta device, the step predicted from this machine's eager table (each
   block timed once at its real shapes).

Prints the tables; writes ``bench/results/mobile_unet.json`` whose ``summary`` holds
``evolved_speedup`` (teacher / evolved step, compiled, measured), ``evolved_loss_ratio`` and
``bk_nearest_loss_ratio`` (held-out v-loss / the teacher's, for the evolved student and for the
BK-SDM student of nearest compiled latency) and ``latency_error_max`` (largest of the students'
calibrated eager errors and every compiled error; ``latency_error_max_raw``: uncalibrated). Skips (exit 0) without
``../shared``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import _teacher  # noqa: E402

from distill.latency import LatencyTable, machine, predict, runner, time_call  # noqa: E402

STUDENTS = ("bk-base", "bk-small", "bk-tiny", "evolved")
ERRORS = ("error_eager", "error_compiled")  # predicted / measured step − 1, per runtime (and calibrated_…)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kd-steps", type=int, default=200)
    parser.add_argument("--robust-steps", type=int, default=300)
    parser.add_argument("--skip-prob", type=float, default=0.15)
    parser.add_argument("--budget", type=float, default=0.4)
    parser.add_argument("--search-runtime", default="eager", choices=["eager", "compiled", "bf16"])
    parser.add_argument("--heldout-num", type=int, default=16)
    parser.add_argument("--psnr-steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds per model and runtime")
    parser.add_argument(
        "--predict-compiled", nargs="*", default=["teacher", "evolved"],
        help="models whose compiled step is also predicted (each block compiled: ~15 s a block here)",
    )  # fmt: skip
    parser.add_argument("--no-sd2", action="store_true", help="skip the SD-2-base-512 section")
    parser.add_argument(
        "--reuse-runs",
        action="store_true",
        help="keep the finished runs of an earlier run (same settings)",
    )
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "mobile_unet.json"))
    args = parser.parse_args()
    if not (_teacher.PHOTOS / "keypoints_coco.json").is_file():
        print(f"mobile_unet: skipped, no photo set at {_teacher.PHOTOS} (../shared beside the repository)")
        return

    started = time.perf_counter()
    times = {}
    teacher = _teacher.teacher()
    times["teacher_s"] = time.perf_counter() - started
    runs = teacher["root"] / "mobile_unet"
    if not args.reuse_runs:
        shutil.rmtree(runs, ignore_errors=True)  # students are retrained every run; the teacher is kept

    from distill.evolve import evolve, write
    from distill.kd import distill_unet
    from distill.measure import HeldOut, load_pipeline

    teacher_run = teacher["lsdm"]
    stage = time.perf_counter()
    print(f"mobile_unet: robust training ({args.robust_steps} steps, skip_prob {args.skip_prob}) ...", flush=True)
    if not done(runs / "robust"):
        distill_unet(kd_config(runs / "robust", teacher_run, teacher, "teacher", args.robust_steps, args.skip_prob))
    times["robust_s"] = time.perf_counter() - stage

    stage = time.perf_counter()
    robust = load_pipeline(runs / "robust")
    heldout = HeldOut.from_shards(teacher["heldout_shards"], robust, num=args.heldout_num)
    # A table of this run's own timings (quiet machine): the machine's cache may hold entries timed
    # while something else ran, and the prediction error is what this benchmark reports.
    table = LatencyTable.load(runs / "latency_table.json")
    print(f"mobile_unet: architecture evolving to {args.budget:.0%} on {args.search_runtime} ...", flush=True)
    evolve_path = runs / "evolve" / "evolve.json"
    if not evolve_path.is_file():
        write(evolve(robust, heldout, table, runtime=args.search_runtime, budget=args.budget), evolve_path.parent)
    evolution = json.loads(evolve_path.read_text())
    times["evolve_s"] = time.perf_counter() - stage
    del robust

    for name in STUDENTS:
        stage = time.perf_counter()
        print(f"mobile_unet: KD of {name} ({args.kd_steps} steps) ...", flush=True)
        spec, init = (str(evolve_path), runs / "robust") if name == "evolved" else (name, None)
        config = kd_config(runs / name, teacher_run, teacher, spec, args.kd_steps, 0.0)
        config["student_init"] = None if init is None else str(init)
        if not done(runs / name):
            distill_unet(config)
        times[f"kd_{name}_s"] = time.perf_counter() - stage

    stage = time.perf_counter()
    pipelines = {"teacher": load_pipeline(teacher_run), **{name: load_pipeline(runs / name) for name in STUDENTS}}
    # The prediction error is measured against blocks timed now, beside the end-to-end steps: an
    # entry of the search's table may have been timed in another run, under other load.
    measure_table = LatencyTable(path=runs / "measure_table.json")
    training = HeldOut.from_shards(teacher["train_shards"], pipelines["teacher"], num=args.heldout_num)
    rows = measure_models(pipelines, heldout, training, measure_table, args)
    measure_table.save()
    times["measure_s"] = time.perf_counter() - stage
    sd2 = []
    if not args.no_sd2:
        stage = time.perf_counter()
        sd2 = sd2_rows(evolution["removed"], table)
        table.save()
        times["sd2_s"] = time.perf_counter() - stage
    times["total_s"] = time.perf_counter() - started

    report(rows, sd2, evolution, teacher, times, args)


def done(run: Path) -> bool:
    return (run / "train_report.json").is_file() and (run / "pipeline" / "model_index.json").is_file()


def kd_config(output: Path, teacher_run: Path, teacher: dict, student, steps: int, skip_prob: float) -> dict:
    from hyperhuman.config import apply_overrides, load_config

    config = apply_overrides(load_config("distill/unet-tiny"), [
        f"data.resolution={_teacher.RESOLUTION}", "data.random_crop=false", "data.flip_prob=0.0",
        "data.cache_latents=true", "data.num_workers=0", "train.batch_size=4", f"train.max_train_steps={steps}",
        "train.learning_rate=2e-4", f"train.checkpointing_steps={steps}", "train.log_every=100",
        "validation.every=0", f"kd.skip_prob={skip_prob}",
    ])  # fmt: skip
    config.update(output=str(output), teacher=str(teacher_run), student=student)
    config["data"]["train"] = str(teacher["train_shards"])
    return config


# --- measuring -------------------------------------------------------------------------------------
def macs(model, inputs: dict) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(**inputs)
    return counter.get_total_flops() // 2


def measure_models(pipelines: dict, heldout, training, table: LatencyTable, args) -> list[dict]:
    """``heldout``: the held-out photos' measure; ``training``: the same on training photos (how
    closely each student follows the teacher where the teacher has learnt the data)."""
    from distill.measure import sample_psnr, step_inputs, v_loss

    inputs = step_inputs(pipelines["teacher"], heldout)
    rows = {}
    for name, pipeline in pipelines.items():
        unet = pipeline.unet.eval()
        print(f"mobile_unet: measuring {name} ...", flush=True)
        rows[name] = {
            "model": name,
            "params": sum(p.numel() for p in unet.parameters()),
            "macs": macs(unet, inputs),
            "removed_parts": list(unet.config.removed_parts or []),
            **v_loss(pipeline, heldout),
            "v_loss_train": v_loss(pipeline, training)["v_loss"],
            "psnr": None
            if name == "teacher"
            else sample_psnr(pipeline, pipelines["teacher"], heldout, steps=args.psnr_steps),  # fmt: skip
        }
        for runtime in ("eager", "compiled"):
            if runtime == "eager" or name in args.predict_compiled:
                predicted = predict(unet, inputs, runtime, table, warmup=3, repeats=10)
                rows[name][f"predicted_{runtime}_ms"] = predicted.total_ms
                table.save()
    for runtime in ("eager", "compiled"):
        timed = alternating_step_times({name: p.unet for name, p in pipelines.items()}, inputs, runtime, args.rounds)
        for name, ms in timed.items():
            rows[name][f"{runtime}_ms"] = ms
            if f"predicted_{runtime}_ms" in rows[name]:
                rows[name][f"error_{runtime}"] = rows[name][f"predicted_{runtime}_ms"] / ms - 1
        # Eager blocks timed alone run with warm caches: the table under-predicts a whole eager step
        # by a steady ~10% here. One factor fitted on the teacher's measured step corrects it (the
        # students' calibrated errors are out of sample). A compiled step fuses across blocks, which
        # per-block compiles cannot see, and its offset is not steady between runs: left raw.
        if runtime != "eager":
            continue
        factor = rows["teacher"][f"{runtime}_ms"] / rows["teacher"][f"predicted_{runtime}_ms"]
        for row in rows.values():
            if f"predicted_{runtime}_ms" in row:
                row[f"calibration_{runtime}"] = factor
                row[f"calibrated_{runtime}_ms"] = row[f"predicted_{runtime}_ms"] * factor
                row[f"calibrated_error_{runtime}"] = row[f"calibrated_{runtime}_ms"] / row[f"{runtime}_ms"] - 1
    return list(rows.values())


def alternating_step_times(models: dict, inputs: dict, runtime: str, rounds: int) -> dict[str, float]:
    """Median step ms per model, the models timed in turn round after round (drift hits all alike)."""
    calls = {name: runner(model, runtime) for name, model in models.items()}
    for call in calls.values():  # compile and warm up
        time_call(call, (), inputs, warmup=2, repeats=1)
    samples = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            samples[name].append(time_call(call, (), inputs, warmup=1, repeats=3))
    return {name: statistics.median(values) for name, values in samples.items()}


def sd2_rows(evolved_removed: list[str], table: LatencyTable, unet: dict | None = None) -> list[dict]:
    """SD-2-base-512 as the LSDM: counted on the meta device, the step predicted from the table
    (``unet``: another architecture in its place, for a dry run)."""
    from distill.students import make_student
    from hyperhuman.config import load_config
    from hyperhuman.lsdm.model import LatentStructuralUNet
    from hyperhuman.unet_parts import removable_parts

    unet = dict(unet or load_config("lsdm/sd2-base-512")["model"]["unet"])
    unet["in_channels"] = 8
    size, batch, width = unet["sample_size"], 2, unet["cross_attention_dim"]
    norm = {name: [0.0, 1.0] for name in ("rgb", "depth", "normal", "pose")}

    def inputs(device):
        return {
            "sample": torch.randn(batch, 12, size, size, device=device),
            "timestep": torch.tensor(500, device=device),
            "encoder_hidden_states": torch.randn(batch, 77, width, device=device),
            "pose_latent": torch.randn(batch, 4, size, size, device=device),
        }

    rows = []
    torch.manual_seed(0)
    teacher = LatentStructuralUNet(unet=unet, latent_norm=norm).eval()
    kept = [part for part in evolved_removed if part in removable_parts(teacher)]
    for name in ("teacher", *STUDENTS):
        print(f"mobile_unet: SD-2-base-512 {name} ...", flush=True)
        model = teacher if name == "teacher" else make_student(teacher, {"remove": kept} if name == "evolved" else name)
        model.eval()
        with torch.device("meta"):
            meta = LatentStructuralUNet.from_config(model.config)
        predicted = predict(model, inputs("cpu"), "eager", table, warmup=1, repeats=1)
        table.save()
        rows.append({"model": name, "params": sum(p.numel() for p in meta.parameters()),
                     "macs": macs(meta, inputs("meta")), "predicted_eager_ms": predicted.total_ms})  # fmt: skip
        if model is not teacher:
            del model
    return rows


# --- the report ------------------------------------------------------------------------------------
def optional(row: dict, key: str, spec: str) -> str:
    width = int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()) or 0)
    return format(row[key], spec) if key in row else "-".rjust(width)


def report(rows: list[dict], sd2: list[dict], evolution, teacher: dict, times: dict, args) -> None:
    by_name = {row["model"]: row for row in rows}
    base = by_name["teacher"]
    print(f"\nteacher: {teacher['root']} ({json.dumps(teacher['report'].get('samples'))} samples, "
          f"{teacher['report'].get('lsdm_steps')} steps); KD {args.kd_steps} steps per student; robust "
          f"{args.robust_steps} steps; search on {args.search_runtime}, budget {args.budget:.0%}")  # fmt: skip
    header = (f"{'model':10} {'params M':>8} {'GMACs':>6} {'eager ms':>9} {'compiled':>9} {'speed-up':>8} "
              f"{'pred eager':>10} {'err':>6} {'cal err':>7} {'pred comp':>9} {'err':>6} "
              f"{'v-loss':>7} {'ratio':>6} {'train':>6} "
              f"{'PSNR rgb/depth/normal':>22}")  # fmt: skip
    print(header)
    for row in rows:
        psnr = "/".join(f"{value:.1f}" for value in row["psnr"].values()) if row["psnr"] else "-"
        row["speedup_compiled"] = base["compiled_ms"] / row["compiled_ms"]
        row["v_loss_ratio"] = row["v_loss"] / base["v_loss"]
        row["v_loss_train_ratio"] = row["v_loss_train"] / base["v_loss_train"]
        print(f"{row['model']:10} {row['params'] / 1e6:8.2f} {row['macs'] / 1e9:6.2f} {row['eager_ms']:9.1f} "
              f"{row['compiled_ms']:9.1f} {row['speedup_compiled']:7.2f}x {row['predicted_eager_ms']:10.1f} "
              f"{row['error_eager']:+6.1%} {row['calibrated_error_eager']:+7.1%} "
              f"{optional(row, 'predicted_compiled_ms', '9.1f')} {optional(row, 'error_compiled', '+6.1%')} "
              f"{row['v_loss']:7.4f} {row['v_loss_ratio']:6.3f} "
              f"{row['v_loss_train_ratio']:6.3f} "
              f"{psnr:>22}")  # fmt: skip
    if sd2:
        print("\nSD-2-base-512 as the LSDM (latent 64², batch 2), eager step predicted from this machine's table "
              f"(calibrated: × {base['calibration_eager']:.3f}, the bench teacher's factor)")  # fmt: skip
        print(f"{'model':10} {'params M':>9} {'GMACs':>8} {'predicted s':>12} {'calibrated s':>13} {'speed-up':>9}")
        for row in sd2:
            row["predicted_speedup"] = sd2[0]["predicted_eager_ms"] / row["predicted_eager_ms"]
            row["calibrated_eager_ms"] = row["predicted_eager_ms"] * base["calibration_eager"]
            print(f"{row['model']:10} {row['params'] / 1e6:9.1f} {row['macs'] / 1e9:8.1f} "
                  f"{row['predicted_eager_ms'] / 1000:12.2f} {row['calibrated_eager_ms'] / 1000:13.2f} "
                  f"{row['predicted_speedup']:8.2f}x")  # fmt: skip
    evolved = by_name["evolved"]
    bk = [by_name[name] for name in STUDENTS if name != "evolved"]
    nearest = min(bk, key=lambda row: abs(row["compiled_ms"] - evolved["compiled_ms"]))
    summary = {
        "evolved_speedup": evolved["speedup_compiled"],
        "evolved_loss_ratio": evolved["v_loss_ratio"],
        "bk_nearest": nearest["model"],
        "bk_nearest_loss_ratio": nearest["v_loss_ratio"],
        "evolved_train_loss_ratio": evolved["v_loss_train_ratio"],
        "bk_nearest_train_loss_ratio": nearest["v_loss_train_ratio"],
        "latency_error_max": max(
            [abs(row["calibrated_error_eager"]) for row in rows if row["model"] != "teacher"]
            + [abs(row["error_compiled"]) for row in rows if "error_compiled" in row]
        ),
        "latency_error_max_raw": max(abs(row[key]) for row in rows for key in ERRORS if key in row),
        "calibration_eager": base["calibration_eager"],
    }
    summary["goals"] = {
        "evolved_speedup >= 2.5": summary["evolved_speedup"] >= 2.5,
        "evolved_loss_ratio <= 1.1": summary["evolved_loss_ratio"] <= 1.1,
        "evolved better than bk_nearest": summary["evolved_loss_ratio"] < summary["bk_nearest_loss_ratio"],
        "latency_error_max <= 0.1": summary["latency_error_max"] <= 0.1,
    }
    result = {
        "summary": summary,
        "models": rows,
        "sd2_base_512": sd2,
        "evolution": {key: value for key, value in evolution.items() if key != "parts_ms"},
        "teacher": {**teacher["report"], "root": str(teacher["root"])},
        "settings": vars(args),
        "times_s": {key: round(value, 1) for key, value in times.items()},
        "machine": {**machine(), "platform": platform.platform()},
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1, default=str))
    print(f"\ntimes: {json.dumps(result['times_s'])}")
    print(f"summary: {json.dumps(summary)}\nwrote {output}")


if __name__ == "__main__":
    main()
