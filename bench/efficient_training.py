"""SpFDE's cheaper training, measured: the same training dense, with each SpFDE component alone and
with all of them (``train.efficiency``, :mod:`hyperhuman.efficiency`), side by side in one run.

    .venv/bin/python bench/efficient_training.py [--steps 240] [--batch-size 4] [--models lsdm]

One function per model (:data:`MODELS`); the student annotator's joins the LSDM's.

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

Measured: wall time of the training loop less the FLOP probes' (``train_s``; this CPU runs a masked
layer with dense kernels, so only freezing and sieving save wall time here), training FLOPs counted
by the runs' own ledger (``torch.utils.flop_counter`` on the meta device, sparse layers × density;
the dense run's is its steps × the dense micro-step), and quality: the shared held-out v-loss
(``distill.measure``) of the saved EMA weights on the teacher's held-out photos, ``--heldout-seeds``
draws of (timestep, noise) per photo.

Prints a table; writes ``bench/results/efficient_training.json`` whose ``summary`` holds per model
``compute_saving`` (1 − the all-run's FLOPs / the dense run's), ``quality_loss`` (its held-out v-loss
/ the dense run's − 1), ``shares`` (each component's part of that saving, from the all-run's ledger)
and each component alone; ``compute_saved_fraction`` / ``quality_loss_fraction`` are the same two
numbers, and the flat ``summary`` keys are the worst model's. Goal: ≥ 40 % less compute at ≤ 2 %
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


def lsdm_variants(args) -> dict[str, tuple[int, int, list[str]]]:
    """name → (steps, seed, the SpFDE components on)."""
    short = max(1, round(args.steps * args.sieve_fraction))
    variants = {
        "dense": (args.steps, 0, []),
        "sparsity": (args.steps, 0, ["sparsity"]),
        "freezing": (args.steps, 0, ["freezing"]),
        "sieving": (short, 0, ["sieving"]),
        "dense-short": (short, 0, []),
        "all": (short, 0, ["sparsity", "freezing", "sieving"]),
    }
    if args.noise_run:
        variants["dense-seed1"] = (args.steps, 1, [])
    return variants


def lsdm_section(args, teacher: dict, runs: Path, log=print) -> dict:
    from distill.measure import HeldOut, load_pipeline, v_loss
    from hyperhuman.lsdm.train import train_lsdm

    latent_norm, rows = None, {}
    for name, (steps, seed, parts) in lsdm_variants(args).items():
        config = apply_overrides(load_config("lsdm/tiny"), LSDM_OVERRIDES)
        config.update(output=str(runs / name), seed=seed)
        config["data"]["train"] = str(teacher["train_shards"])
        config["model"].update(vae=str(teacher["vae"] / "vae"), latent_norm=latent_norm)
        train = config["train"]
        train.update(batch_size=args.batch_size, max_train_steps=steps, checkpointing_steps=steps)
        settings = efficiency_settings(args, steps)
        for part in parts:
            train["efficiency"][part] = settings[part]
        log(f"[efficient_training] lsdm {name}: {steps} steps, {parts or 'dense'} ...")
        report = train_lsdm(config)
        latent_norm = latent_norm or str(runs / name / "latent_stats.json")  # the same data: computed once
        counting_s = report["efficiency"]["counting_s"] if "efficiency" in report else 0.0
        rows[name] = {"variant": name, "steps": steps, "seed": seed, "components": parts, "wall_s": report["wall_s"]}
        # the FLOP probes (meta device, one per freezing state) are reporting, not training
        rows[name].update(counting_s=counting_s, train_s=round(report["wall_s"] - counting_s, 2))
        rows[name]["efficiency"] = report.get("efficiency")

    # every run's FLOPs in one frame: an efficiency run's ledger, a dense run's steps × the dense micro-step
    dense_micro_step = next(r["efficiency"]["flops"]["dense_micro_step"] for r in rows.values() if r["efficiency"])
    for row in rows.values():
        row["flops"] = row["efficiency"]["flops"]["counted"] if row["efficiency"] else row["steps"] * dense_micro_step

    reference = load_pipeline(runs / "dense")
    heldouts = [
        HeldOut.from_shards(teacher["heldout_shards"], reference, num=args.heldout_num, seed=seed)
        for seed in range(args.heldout_seeds)
    ]
    for name, row in rows.items():
        pipeline = load_pipeline(runs / name)
        row["v_loss"] = sum(v_loss(pipeline, heldout)["v_loss"] for heldout in heldouts) / len(heldouts)
    for row in rows.values():
        row["compute_saving"] = round(1 - row["flops"] / rows["dense"]["flops"], 4)
        row["wall_saving"] = round(1 - row["train_s"] / rows["dense"]["train_s"], 4)
        row["quality_loss"] = round(row["v_loss"] / rows["dense"]["v_loss"] - 1, 4)
    return {"rows": list(rows.values()), "summary": lsdm_summary(rows), "heldout": heldout_description(heldouts)}


def lsdm_summary(rows: dict) -> dict:
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


MODELS = {"lsdm": lsdm_section}  # the student annotator's section (COCO OKS AP) joins here


def print_table(model: str, section: dict) -> None:
    header = ("variant", "steps", "train s", "GFLOP", "saved", "v-loss", "loss Δ")
    print(f"\n{model}: {header[0]:<12}" + "".join(f"{title:>9}" for title in header[1:]))
    for row in section["rows"]:
        print(
            f"{'':{len(model) + 2}}{row['variant']:<12}{row['steps']:>9}{row['train_s']:>9.1f}"
            f"{row['flops'] / 1e9:>9.1f}{row['compute_saving']:>9.1%}{row['v_loss']:>9.4f}{row['quality_loss']:>+9.2%}"
        )
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
