"""SpFDE's cheaper training, measured: the same training dense, with each SpFDE component alone and
with all of them (``train.efficiency``, :mod:`hyperhuman.efficiency`), side by side in one run.

    .venv/bin/python bench/efficient_training.py [--steps 240] [--student-steps 80] [--models lsdm student]

One function per model (:data:`MODELS`), the same seven runs each (:func:`variants`).

**LSDM** (:func:`lsdm_section`): ``configs/lsdm/tiny.yaml``'s three-branch LSDM (UNet 32/64/64) at
64 px on the bench teacher's VAE (``bench/_teacher.py``, cached: the teacher is not retrained), trained
from scratch on the teacher's training photos (latents cached: fixed crops) for ``--steps`` steps:

- ``dense``; ``sparsity`` (``--density`` of every layer but conv_in / conv_out, RigL prune/regrow);
  ``freezing`` (the first 2 units from half the run, 3 from three quarters: time embedding + conv_in,
  the branches' first down blocks, the trunk's first down block);
- ``sieving`` (``--sieve-fraction`` of the photos in use, a fifth of the pool swapped every tenth of
  the run) for ``--sieve-fraction`` × the steps: the same *data* budget as the dense run (as many
  samples read from the stream; sieving saves compute by the steps its smaller pool needs, SpFDE's
  accounting), with ``dense-short``, the dense run cut to those steps, as its control;
- ``all``: the three together at the sieving run's steps;
- ``dense-seed1`` (``--no-noise-run`` drops it): the dense run with another seed, so a quality
  difference can be read against the seed-to-seed spread.

**Pose student** (:func:`student_section`): ``hyperhuman distill annotator``'s EfficientFormerV2-S0
student (``configs/distill/pose-student.yaml``, from scratch) for ``--student-steps`` steps of
``--student-batch-size`` crops on the offline job's pseudo-labels of the photos *without* ground truth
(``bench/student_annotator.py``'s cached job output); the 44 photos with COCO ground truth are held
out. Freezing's units are the backbone's stem, then its stages (the same schedule: 2 units from half
the run, 3 from three quarters); sieving keeps or holds back whole photos. Quality: the held-out mean
OKS against the teacher's keypoints on the held-out photos' people (``oks_vs_teacher``, every
person the teacher labelled), and COCO AP against the ground truth (``ap``, the student annotator
with its own boxes): after so short a run from scratch AP is near zero and moves by whole detections,
so the relative quality loss is read on the OKS (``ap_loss`` is reported beside it).

Measured: wall time of the training loop less the FLOP probes' (``train_s``; this CPU runs a masked
layer with dense kernels, so only freezing and sieving save wall time here), training FLOPs counted
by the runs' own ledger (``torch.utils.flop_counter`` on the meta device, sparse layers × density;
the dense run's is its steps × the dense micro-step), and quality: for the LSDM the shared held-out
v-loss (``distill.measure``) of the saved EMA weights on the teacher's held-out photos, ``--heldout-seeds``
draws of (timestep, noise) per photo; for the student as above.

Prints a table; writes ``bench/results/efficient_training.json`` whose ``summary`` holds per model
``compute_saving`` (1 − the all-run's FLOPs / the dense run's), ``quality_loss`` (its relative loss
of held-out quality against the dense run's), ``shares`` (each component's part of that saving, from
the all-run's ledger) and each component alone; ``compute_saved_fraction`` /
``quality_loss_fraction`` are the same two numbers, and the flat ``summary`` keys are the worst
model's. Goal: ≥ 40 % less compute at ≤ 2 %
quality loss. Skips (exit 0) without ``../shared``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import _teacher  # noqa: E402

from distill.latency import machine  # noqa: E402
from hyperhuman.config import apply_overrides, load_config  # noqa: E402

GOAL = {"compute_saving_min": 0.40, "quality_loss_max": 0.02}
LSDM_OVERRIDES = [
    f"data.resolution={_teacher.RESOLUTION}",
    f"model.unet.sample_size={_teacher.RESOLUTION // 4}",  # the teacher's VAE: factor 4
    "data.cache_latents=true",
    "data.random_crop=false",
    "data.flip_prob=0",
    "data.num_workers=0",
    "train.learning_rate=3e-4",
    "train.lr_warmup_steps=10",
    "train.log_every=100",
    "validation.every=0",
]


def efficiency_settings(args, steps: int) -> dict[str, dict]:
    """Each component's ``train.efficiency`` part for a run of ``steps`` steps."""
    sparsity = {"density": args.density, "update_every": max(1, steps // 12), "drop_fraction": 0.3, "stop_at": 0.75}
    freezing = {"mode": "schedule", "schedule": [[steps // 2, 2], [3 * steps // 4, 3]]}
    sieving = {"fraction": args.sieve_fraction, "swap_every": max(1, steps // 10), "swap_fraction": 0.2}
    return {
        "sparsity": {"use": True, **sparsity},
        "freezing": {"use": True, **freezing},
        "sieving": {"use": True, **sieving},
    }


def variants(args, steps: int) -> dict[str, tuple[int, int, list[str]]]:
    """name → (steps, seed, the SpFDE components on), for a model whose dense run takes ``steps``."""
    short = max(1, round(steps * args.sieve_fraction))
    runs = {
        "dense": (steps, 0, []),
        "sparsity": (steps, 0, ["sparsity"]),
        "freezing": (steps, 0, ["freezing"]),
        "sieving": (short, 0, ["sieving"]),
        "dense-short": (short, 0, []),
        "all": (short, 0, ["sparsity", "freezing", "sieving"]),
    }
    if args.noise_run:
        runs["dense-seed1"] = (steps, 1, [])
    return runs


def switch_on(train: dict, parts: list[str], settings: dict) -> None:
    """The components ``parts`` on in ``train.efficiency``, over the config's own values (e.g. its
    sparsity ``exclude``)."""
    for part in parts:
        train["efficiency"][part] = {**(train["efficiency"].get(part) or {}), **settings[part]}


def run_row(name: str, steps: int, seed: int, parts: list[str], report: dict) -> dict:
    counting_s = report["efficiency"]["counting_s"] if "efficiency" in report else 0.0
    row = {"variant": name, "steps": steps, "seed": seed, "components": parts, "wall_s": report["wall_s"]}
    # the FLOP probes (meta device, one per freezing state) are reporting, not training
    row.update(counting_s=counting_s, train_s=round(report["wall_s"] - counting_s, 2))
    row["efficiency"] = report.get("efficiency")
    return row


def count_flops(rows: dict) -> None:
    """Every run's FLOPs in one frame: an efficiency run's ledger, a dense run's steps × the dense
    micro-step (any efficiency run's probe of the dense model)."""
    dense_micro_step = next(r["efficiency"]["flops"]["dense_micro_step"] for r in rows.values() if r["efficiency"])
    for row in rows.values():
        row["flops"] = row["efficiency"]["flops"]["counted"] if row["efficiency"] else row["steps"] * dense_micro_step


def savings(rows: dict, quality_loss) -> None:
    """Each row's saving against the dense run; ``quality_loss(row, dense)`` the relative loss."""
    dense = rows["dense"]
    for row in rows.values():
        row["compute_saving"] = round(1 - row["flops"] / dense["flops"], 4)
        row["wall_saving"] = round(1 - row["train_s"] / dense["train_s"], 4)
        row["quality_loss"] = round(quality_loss(row, dense), 4)


def lsdm_section(args, teacher: dict, runs: Path, log=print) -> dict:
    from distill.measure import HeldOut, load_pipeline, v_loss
    from hyperhuman.lsdm.train import train_lsdm

    latent_norm, rows = None, {}
    for name, (steps, seed, parts) in variants(args, args.steps).items():
        config = apply_overrides(load_config("lsdm/tiny"), LSDM_OVERRIDES)
        config.update(output=str(runs / name), seed=seed)
        config["data"]["train"] = str(teacher["train_shards"])
        config["model"].update(vae=str(teacher["vae"] / "vae"), latent_norm=latent_norm)
        train = config["train"]
        train.update(batch_size=args.batch_size, max_train_steps=steps, checkpointing_steps=steps)
        switch_on(train, parts, efficiency_settings(args, steps))
        log(f"[efficient_training] lsdm {name}: {steps} steps, {parts or 'dense'} ...")
        report = train_lsdm(config)
        latent_norm = latent_norm or str(runs / name / "latent_stats.json")  # the same data: computed once
        rows[name] = run_row(name, steps, seed, parts, report)
    count_flops(rows)

    reference = load_pipeline(runs / "dense")
    heldouts = [
        HeldOut.from_shards(teacher["heldout_shards"], reference, num=args.heldout_num, seed=seed)
        for seed in range(args.heldout_seeds)
    ]
    for name, row in rows.items():
        pipeline = load_pipeline(runs / name)
        row["v_loss"] = sum(v_loss(pipeline, heldout)["v_loss"] for heldout in heldouts) / len(heldouts)
        row["quality"] = row["v_loss"]
    savings(rows, lambda row, dense: row["v_loss"] / dense["v_loss"] - 1)
    return {"rows": list(rows.values()), "summary": summarise(rows), "heldout": heldout_description(heldouts),
            "quality": "held-out v-loss (lower is better)"}  # fmt: skip


def summarise(rows: dict) -> dict:
    everything, dense = rows["all"], rows["dense"]
    ledger = everything["efficiency"]["flops"]
    saved = dense["flops"] - everything["flops"]
    parts = {  # the all-run's saving split: fewer steps (sieving), then its own ledger's two terms
        "sieving": dense["flops"] - ledger["dense"],
        "freezing": ledger["freezing_backward_skipped"],
        "sparsity": ledger["sparsity_saved"],
    }
    summary = {
        "compute_saving": everything["compute_saving"],
        "quality_loss": everything["quality_loss"],
        "wall_saving": everything["wall_saving"],
        "shares": {part: round(value / saved, 4) if saved else None for part, value in parts.items()},
        "alone": {
            part: {key: rows[part][key] for key in ("compute_saving", "quality_loss", "wall_saving")}
            for part in ("sparsity", "freezing", "sieving")
        },
        "sieving_control_quality_loss": rows["dense-short"]["quality_loss"],
        "goal": GOAL,
    }
    summary["goal_met"] = (
        summary["compute_saving"] >= GOAL["compute_saving_min"] and summary["quality_loss"] <= GOAL["quality_loss_max"]
    )
    if "dense-seed1" in rows:
        summary["seed_spread"] = abs(rows["dense-seed1"]["quality_loss"])
    summary.update(compute_saved_fraction=summary["compute_saving"], quality_loss_fraction=summary["quality_loss"])
    return summary


def heldout_description(heldouts) -> dict:
    first = heldouts[0]
    return {"source": first.source, "photos": len(first), "draws_per_photo": len(heldouts), "keys": first.keys}


def student_data(log=print) -> tuple[list[str], list[str], dict, list[dict]]:
    """The pose student's data, as ``bench/student_annotator.py`` makes it (its cached job output
    reused): training shards = the pseudo-labels of the photos without ground truth; held out = the
    photos with COCO ground truth (their pseudo-labelled shards, the ground truth, its images)."""
    from student_annotator import job_folder, pseudo_labels

    data = _teacher.PHOTOS
    tars = pseudo_labels(data, job_folder(data))
    ground_truth = json.loads((data / "keypoints_coco.json").read_text())
    scored = {image["file_name"] for image in ground_truth["images"]}
    train = sorted(url for name, url in tars.items() if name not in scored)
    heldout = sorted(url for name, url in tars.items() if name in scored)
    log(f"[efficient_training] student: {len(train)} photos' pseudo-labels to train on, {len(scored)} held out")
    return train, heldout, ground_truth, ground_truth["images"]


def student_section(args, teacher: dict, runs: Path, log=print) -> dict:
    from pose_accuracy import coco_eval, run_annotator

    from annotators.registry import build_annotator
    from distill.annotator_student.train import train_pose_student

    train_tars, heldout_tars, ground_truth, images = student_data(log)
    image_ids = [image["id"] for image in images]
    rows = {}
    for name, (steps, seed, parts) in variants(args, args.student_steps).items():
        config = load_config("distill/pose-student")
        config.update(output=str(runs / name), seed=seed)
        config["data"].update(train=train_tars, crops_per_person=8, shuffle_buffer=256)
        train = config["train"]
        train.update(batch_size=args.student_batch_size, max_train_steps=steps, checkpointing_steps=steps,
                     lr_warmup_steps=max(1, steps // 20), log_every=max(1, steps // 4))  # fmt: skip
        switch_on(train, parts, efficiency_settings(args, steps))
        config["validation"].update(every=0, heldout=heldout_tars, num_crops=256)
        log(f"[efficient_training] student {name}: {steps} steps, {parts or 'dense'} ...")
        report = train_pose_student(config)
        rows[name] = run_row(name, steps, seed, parts, report)
        annotator = build_annotator({"name": "efficientformer-pose", "weights": str(runs / name)})
        detections = run_annotator(annotator, images, _teacher.PHOTOS)[0]
        rows[name].update(oks=report["oks_vs_teacher"], ap=coco_eval(ground_truth, detections, image_ids)["AP"])
        rows[name]["quality"] = rows[name]["oks"]
    count_flops(rows)
    savings(rows, lambda row, dense: 1 - row["oks"] / dense["oks"])
    for row in rows.values():
        row["ap_loss"] = round(1 - row["ap"] / rows["dense"]["ap"], 4) if rows["dense"]["ap"] else None
    return {
        "rows": list(rows.values()),
        "summary": summarise(rows),
        "heldout": {"photos": len(images), "people_measured": report.get("people"), "train_photos": len(train_tars)},
        "quality": "held-out mean OKS against the teacher's keypoints on the ground-truth photos' people (higher is "
                   "better); COCO AP against ground truth is each row's `ap` (near zero after so short a run from "
                   "scratch, so its relative change is mostly noise: see `ap_loss`)",
    }  # fmt: skip


MODELS = {"lsdm": lsdm_section, "student": student_section}


def print_table(model: str, section: dict) -> None:
    header = ("variant", "steps", "train s", "GFLOP", "saved", "quality", "loss")
    print(f"\n{model}: {header[0]:<12}" + "".join(f"{title:>9}" for title in header[1:]))
    for row in section["rows"]:
        print(
            f"{'':{len(model) + 2}}{row['variant']:<12}{row['steps']:>9}{row['train_s']:>9.1f}"
            f"{row['flops'] / 1e9:>9.1f}{row['compute_saving']:>9.1%}{row['quality']:>9.4f}{row['quality_loss']:>+9.2%}"
        )
    print(f"  quality: {section['quality']}")
    summary = section["summary"]
    print(
        f"  all together: {summary['compute_saving']:.1%} less compute, quality loss {summary['quality_loss']:+.2%} "
        f"(goal ≥ 40 %, ≤ 2 %: {'met' if summary['goal_met'] else 'missed'}); shares {summary['shares']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=240, help="the dense run's optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--student-steps", type=int, default=80, help="the pose student's dense run's steps")
    parser.add_argument("--student-batch-size", type=int, default=16, help="the pose student's crops per step")
    parser.add_argument("--density", type=float, default=0.7, help="sparsity: kept fraction of each layer")
    parser.add_argument("--sieve-fraction", type=float, default=0.75, help="sieving: share of the data in use")
    parser.add_argument("--heldout-num", type=int, default=16, help="held-out photos (the teacher's: 9)")
    parser.add_argument("--heldout-seeds", type=int, default=8, help="(timestep, noise) draws per photo")
    parser.add_argument("--no-noise-run", dest="noise_run", action="store_false", help="skip dense-seed1")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "efficient_training.json"))
    args = parser.parse_args()
    if not (_teacher.PHOTOS / "keypoints_coco.json").is_file():
        print(f"efficient_training: skipped, no photo set at {_teacher.PHOTOS} (../shared beside the repository)")
        return

    started = time.perf_counter()
    teacher = _teacher.teacher()
    results = {"machine": machine(), "args": vars(args), "summary": {}}
    for model in args.models:
        runs = teacher["root"] / "efficient_training" / model
        shutil.rmtree(runs, ignore_errors=True)  # retrained every run; the teacher is kept
        results[model] = MODELS[model](args, teacher, runs)
        results["summary"][model] = results[model]["summary"]
        print_table(model, results[model])
    # the figures, flat: the worst model's (every model must meet the goal)
    for key, worst in (("compute_saving", min), ("quality_loss", max)):
        results["summary"][key] = worst(results["summary"][m][key] for m in args.models)
    results["summary"].update(
        compute_saved_fraction=results["summary"]["compute_saving"],
        quality_loss_fraction=results["summary"]["quality_loss"],
        total_s=round(time.perf_counter() - started, 1),
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwrote {output} ({results['summary']['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
