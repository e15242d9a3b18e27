"""Structured pruning of the bench teacher: Pruning-as-Search against two classic baselines, at one
latency target and one training budget (the helper of ``bench/prune.py``).

    section = run(_teacher.teacher(), work_dir, search_steps=200, finetune_steps=300, fraction=0.5)
    print_table(section)

Three ways to take the bench teacher (``bench/_teacher.py``: a three-branch LSDM) to ``fraction`` ×
its latency on ``runtime`` (ms of one guided step, batch 2, as :mod:`distill.width_cost` measures it):

1. ``pas``: ``hyperhuman prune`` itself (:func:`distill.prune.prune`): ``search_steps`` of mask search
   (task + KD + resource hinge), removal, ``finetune_steps`` of KD fine-tune.
2. ``uniform``: every prunable block (:func:`hyperhuman.unet_widths.prunable`) at the same fraction
   of its groups (rounded to whole groups), keeping each block's first channels (what scaling a
   network's width means).
3. ``l1``: magnitude pruning: each group scored by the L1 norm of the weights that produce it
   (a ResNet's conv1 rows, an attention head's to_q/to_k/to_v rows, a feed-forward's input
   projection rows, value and gate), divided by its block's mean score so blocks of different
   sizes compare, ranked over the whole model; the lowest go until the predicted latency meets
   a budget.

The baselines' width fraction and L1 budget are set so that their *measured* step matches the
fine-tuned PaS model's (:func:`matched`: bisection, each candidate timed in alternation with the
PaS model). Equal predicted latency would not do: a search that optimises against a cost model
finds where that model errs, and PaS's widths did time slower than predicted while the baselines'
timed faster, which made equal predictions unequal latencies.

Why the comparison is fair:

- **one latency**: PaS searches to ``fraction`` × the teacher's fitted step with the
  :class:`distill.width_cost.WidthCost` it fitted (``pas/cost.json``); the baselines are matched
  to the PaS model's measured step; at the end each model's step is measured in one alternating
  loop beside the others, and the table reports every model's predicted latency as well.
- **one training budget**: PaS trains ``search_steps`` with masks and ``finetune_steps`` after
  removal; each baseline fine-tunes for ``search_steps + finetune_steps``. The baselines' fine-tune
  *is* PaS's fine-tune phase: :func:`distill.prune.start_from` makes their sliced model the run's
  pruned model (priced by PaS's ``cost.json``, copied beside it) and :func:`distill.prune.prune`
  resumed only fine-tunes it. Same loss (task + output + feature KD), optimiser, schedule, EMA,
  data stream and seed.
- **one data recipe**: batch size, crops, flips and text dropout as the teacher was trained
  (``lsdm/tiny`` with ``_teacher.LSDM_OVERRIDES``), the resolution the teacher samples at.
- **one quality measure** (:mod:`distill.measure`): held-out v-loss on the held-out photos' fixed
  seeded triples, and the PSNR of samples against the unpruned teacher's from the same noise,
  captions and poses (``PSNR_NUM`` held-out samples, ``PSNR_STEPS`` DDIM steps, the teacher's CFG).
- every method keeps at least ``search.min_groups`` groups of every block, as PaS's masks do.

Finished runs in ``work_dir`` are kept when their settings (``bench_settings.json``) match, so a
rerun only measures again; anything else there is retrained from scratch.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import _teacher  # noqa: E402

from distill.prune import COST_FILE, PHASE_REPORT, SEARCH_FOLDER  # noqa: E402

METHODS = ("pas", "uniform", "l1")
HELDOUT_NUM = 16  # v-loss samples: all of the bench teacher's held-out split (every 5th of 70 photos, at most 14)
PSNR_NUM = 8
PSNR_STEPS = 20
NO_CHECKPOINTS = 10**9  # checkpoint interval: a benchmark run restarts, it does not resume mid-phase
SETTINGS_FILE = "bench_settings.json"
REPORT_FILE = "prune_report.json"


def run(
    teacher_paths: dict,
    work_dir: Path,
    search_steps: int,
    finetune_steps: int,
    fraction: float = 0.5,
    runtime: str = "eager",
    repeats: int = 5,
) -> dict:
    """Prune the teacher three ways, fine-tune each on the same budget, measure all four models.

    ``teacher_paths``: what ``_teacher.teacher()`` returns (``lsdm``, ``train_shards``,
    ``heldout_shards``); ``repeats``: alternating timing rounds per model. Returns
    ``{"rows", "summary", "budgets", "times_s"}``; each row's ``latency_error`` is predicted /
    measured − 1, ``calibrated_error`` the same with the predictions scaled by the teacher's
    measured step over the fitted one (the machine's drift since the fit taken out)."""
    from distill.measure import load_pipeline
    from distill.prune import cost_inputs, start_from
    from distill.step_models import load_teacher
    from distill.width_cost import WidthCost

    work_dir = Path(work_dir)
    total = search_steps + finetune_steps
    times, started = {}, time.perf_counter()
    family = load_teacher(teacher_paths["lsdm"])
    config = prune_config(teacher_paths, family, work_dir / "pas", search_steps, finetune_steps, fraction, runtime)
    settings = {"teacher": str(teacher_paths["lsdm"]), "config": config}

    stage = time.perf_counter()
    reports = {"pas": kept_run(work_dir / "pas", settings) or trained(work_dir / "pas", settings, config)}
    times["pas_s"] = time.perf_counter() - stage
    cost_path = work_dir / "pas" / COST_FILE
    cost = WidthCost.from_json(json.loads(cost_path.read_text()))
    target = reports["pas"]["target"]
    min_groups = config["search"].get("min_groups", 1)

    pas_unet = load_pipeline(work_dir / "pas").unet.eval()
    inputs = cost_inputs(family, config)
    narrowest = cost.predict(uniform_widths(family.unet, 0.0, min_groups))
    selections = {
        "uniform": lambda: matched(
            lambda fraction: uniform_model_at(family.unet, fraction, min_groups), 0.0, 1.0, pas_unet, inputs, runtime
        ),
        "l1": lambda: matched(
            lambda budget: magnitude_model(family.unet, cost, budget, min_groups), narrowest, cost.full, pas_unet,
            inputs, runtime,
        ),
    }  # fmt: skip
    for name, select in selections.items():
        stage = time.perf_counter()
        output = work_dir / name
        baseline = finetune_config(config, output, total)
        # The cost model and the PaS model are part of the settings: a new PaS run re-selects the widths.
        baseline_settings = {**settings, "config": baseline, "cost": cost.to_json(), "match": "pas measured step",
                             "pas_widths": reports["pas"]["widths"]}  # fmt: skip
        reports[name] = kept_run(output, baseline_settings)
        if reports[name] is None:
            unet, selection = select()
            output.mkdir(parents=True)
            shutil.copy(cost_path, output / COST_FILE)
            start_from(baseline, unet, selection)
            reports[name] = trained(output, baseline_settings, baseline)
        times[f"{name}_s"] = time.perf_counter() - stage

    stage = time.perf_counter()
    rows = measure_rows(family, teacher_paths["heldout_shards"], work_dir, config, cost, reports, runtime, repeats)
    times["measure_s"] = time.perf_counter() - stage
    times["total_s"] = time.perf_counter() - started
    budgets = {
        "search_steps": search_steps,
        "finetune_steps": finetune_steps,
        "total_steps": total,
        "per_method": {
            "pas": {"search": search_steps, "finetune": finetune_steps},
            **{name: {"search": 0, "finetune": total} for name in selections},
        },
        "batch_size": config["train"]["batch_size"],
        "resolution": config["data"]["resolution"],
        "fraction": fraction,
        "runtime": runtime,
        "teacher_ms": cost.full,
        "target_ms": target,
        "repeats": repeats,
        "heldout_num": HELDOUT_NUM,
        "psnr_num": PSNR_NUM,
        "psnr_steps": PSNR_STEPS,
        "guidance_scale": teacher_recipe()["validation"]["guidance_scale"],
    }
    return {
        "rows": rows,
        "summary": summary(rows),
        "budgets": budgets,
        "times_s": {key: round(value, 1) for key, value in times.items()},
    }


# --- configuration -----------------------------------------------------------------------------------
def teacher_recipe() -> dict:
    """The bench teacher's own ``train-lsdm`` config: the batch, augmentation, text dropout and
    guidance scale every pruned model keeps."""
    from hyperhuman.config import apply_overrides, load_config

    return apply_overrides(load_config("lsdm/tiny"), _teacher.LSDM_OVERRIDES)


def prune_config(
    teacher_paths: dict, family, output: Path, search_steps: int, finetune_steps: int, fraction: float, runtime: str
) -> dict:
    """``configs/prune/tiny.yaml`` on the bench teacher: its data recipe, the target on ``runtime``,
    the two phases' steps, no checkpoints and no validation (the benchmark measures at the end)."""
    from hyperhuman.config import apply_overrides, load_config

    recipe = teacher_recipe()
    pipeline = family.pipeline
    # The resolution the teacher samples at (64 for the bench teacher; a toy teacher's own).
    resolution = pipeline.unet.config.unet["sample_size"] * pipeline.vae_scale_factor
    config = apply_overrides(load_config("prune/tiny"), [
        f"target.cost={runtime}", f"target.fraction={fraction}", "target.ms=null",
        f"search.steps={search_steps}", f"train.max_train_steps={finetune_steps}",
        f"train.batch_size={recipe['train']['batch_size']}",
        f"train.condition_dropout={recipe['train']['condition_dropout']}",
        f"train.checkpointing_steps={NO_CHECKPOINTS}",
        f"train.log_every={max(1, (search_steps + finetune_steps) // 10)}",
        "validation.every=0", "validation.heldout=null", f"data.resolution={resolution}",
    ])  # fmt: skip
    for key in ("random_crop", "min_crop_scale", "flip_prob", "shuffle_buffer", "num_workers", "cache_latents"):
        config["data"][key] = recipe["data"][key]
    config["data"]["train"] = str(teacher_paths["train_shards"])
    config.update(output=str(output), teacher=str(teacher_paths["lsdm"]))
    return config


def finetune_config(config: dict, output: Path, steps: int) -> dict:
    """The PaS config with another output and the whole budget as fine-tune steps (the search
    keys stay valid but are never read: the run starts from a baseline's widths)."""
    config = copy.deepcopy(config)
    config["output"] = str(output)
    config["train"]["max_train_steps"] = steps
    return config


# --- runs ------------------------------------------------------------------------------------------
def kept_run(folder: Path, settings: dict) -> dict | None:
    """The report of a finished run made with these settings; otherwise the folder is cleared."""
    marker, report = folder / SETTINGS_FILE, folder / REPORT_FILE
    normalised = json.loads(json.dumps(settings, default=str))
    if report.is_file() and marker.is_file() and json.loads(marker.read_text()) == normalised:
        print(f"[bench prune] {folder.name}: finished earlier with these settings ({folder})")
        return json.loads(report.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    return None


def trained(folder: Path, settings: dict, config: dict) -> dict:
    """``hyperhuman prune`` on ``config``; a baseline's folder holds its pruned model already
    (:func:`distill.prune.start_from`), so resuming only fine-tunes (from scratch: no checkpoint yet)."""
    from distill.prune import prune

    baseline = (folder / SEARCH_FOLDER / PHASE_REPORT).is_file()
    report = prune(config, resume="latest" if baseline else None)
    (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=1, default=str))
    return report


# --- uniform width -----------------------------------------------------------------------------------
def uniform_widths(model, fraction: float, min_groups: int) -> dict[str, int]:
    """Every prunable block at ``fraction`` of its groups, rounded to the nearest whole group
    (at least ``min_groups``, or all of a block's groups where it has fewer)."""
    from hyperhuman.unet_widths import group_size, prunable, width

    result = {}
    for name, block in prunable(model).items():
        group = group_size(block)
        groups = width(block) // group
        count = math.floor(fraction * groups + 0.5)
        result[name] = min(groups, max(count, min_groups)) * group
    return result


def uniform_model_at(teacher, fraction: float, min_groups: int) -> tuple:
    """A copy of ``teacher`` with every block at ``fraction`` of its groups, first channels kept."""
    from distill.pas import with_widths_recorded
    from hyperhuman.unet_widths import shrink_to_widths

    kept = uniform_widths(teacher, fraction, min_groups)
    unet = shrink_to_widths(copy.deepcopy(teacher), kept)
    return with_widths_recorded(unet).eval(), {"method": "uniform", "width_fraction": fraction}


# --- matching a measured latency ---------------------------------------------------------------------
def matched(build, low: float, high: float, reference, inputs: dict, runtime: str, rounds: int = 8) -> tuple:
    """The ``build(parameter)`` model whose measured step is closest to ``reference``'s, found by
    bisection over ``[low, high]`` (the step grows with the parameter); each candidate is timed in
    alternation with ``reference`` (:func:`alternating_step_ms`), so machine drift cancels in the
    ratio. Returns ``(model, selection)``, the selection recording the parameter and the ratio."""
    best = None
    for _ in range(rounds):
        middle = (low + high) / 2
        model, selection = build(middle)
        ms = alternating_step_ms({"reference": reference, "candidate": model}, inputs, runtime, repeats=3)
        ratio = ms["candidate"] / ms["reference"]
        print(f"[bench prune] {selection['method']} at {middle:.4g}: {ratio:.3f} × the PaS step", flush=True)
        if best is None or abs(ratio - 1) < abs(best[2] - 1):
            best = (model, selection, ratio, middle)
        low, high = (low, middle) if ratio > 1 else (middle, high)
    model, selection, ratio, parameter = best
    return model, {**selection, "matched_parameter": parameter, "measured_vs_pas": ratio}


# --- magnitude (L1) ------------------------------------------------------------------------------------
@torch.no_grad()
def group_scores(block) -> torch.Tensor:
    """Per group of a block's inner width, the L1 norm of the weights that produce it: conv1's
    output rows (ResNet), the head's to_q/to_k/to_v rows (attention), the input projection's rows,
    value and gate half, of the channel (feed-forward)."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    from hyperhuman.unet_widths import GATED_ACTIVATIONS, group_size, width

    if isinstance(block, ResnetBlock2D):
        per_channel = block.conv1.weight.abs().flatten(1).sum(1)
    elif isinstance(block, Attention):
        per_channel = sum(layer.weight.abs().sum(1) for layer in (block.to_q, block.to_k, block.to_v))
    else:
        activation, inner = block.net[0], width(block)
        rows = activation.proj.weight.abs().sum(1)
        per_channel = rows[:inner] + rows[inner:] if isinstance(activation, GATED_ACTIVATIONS) else rows
    return per_channel.float().cpu().view(-1, group_size(block)).sum(1)


def magnitude_keep(model, cost, target: float, min_groups: int) -> tuple[dict[str, torch.Tensor], int]:
    """Which groups of every block survive global L1 ranking (each block's scores over its mean),
    lowest first dropped until the predicted cost meets ``target``; and how many were dropped.

    A block keeps at least ``min_groups`` groups. Groups of a block whose fitted slope is 0 (too
    small to time any faster narrowed) are passed over: dropping them would lose quality and buy
    no latency, which no magnitude pruner aiming at a latency would do."""
    from hyperhuman.unet_widths import group_size, prunable, widths

    blocks = prunable(model)
    keep, ranked = {}, []
    for name, block in blocks.items():
        scores = group_scores(block)
        mean = scores.mean()
        normalised = scores / mean if mean > 0 else scores
        keep[name] = torch.ones(len(scores), dtype=torch.bool)
        ranked += [(score, name, index) for index, score in enumerate(normalised.tolist())]
    predicted = cost.predict(widths(model))
    dropped = 0
    for _, name, index in sorted(ranked):  # ties: by block path, then group index
        if predicted <= target:
            break
        floor = min(min_groups, len(keep[name]))
        if cost.slopes[name] <= 0 or int(keep[name].sum()) <= floor:
            continue
        keep[name][index] = False
        predicted -= cost.slopes[name] * group_size(blocks[name])
        dropped += 1
    return keep, dropped


def magnitude_model(teacher, cost, target: float, min_groups: int) -> tuple:
    """A copy of ``teacher`` with each block sliced to its groups that survive the L1 ranking."""
    from distill.pas import with_widths_recorded
    from hyperhuman.unet_widths import group_size, prunable, slice_block

    keep, dropped = magnitude_keep(teacher, cost, target, min_groups)
    unet = copy.deepcopy(teacher)
    for name, block in prunable(unet).items():
        if keep[name].all():
            continue
        group = group_size(block)
        groups = torch.nonzero(keep[name]).flatten()
        channels = (groups[:, None] * group + torch.arange(group)).flatten()
        slice_block(block, channels.to(next(block.parameters()).device))
    return with_widths_recorded(unet).eval(), {"method": "l1", "dropped_groups": dropped}


# --- measuring ---------------------------------------------------------------------------------------
def measure_rows(
    family, heldout_shards, work_dir: Path, config: dict, cost, reports: dict, runtime: str, repeats: int
) -> list[dict]:
    """Latency (measured and predicted), parameters, held-out v-loss and sample PSNR against the
    teacher, for the teacher and each method's fine-tuned model."""
    from distill.measure import HeldOut, initial_noise, load_pipeline, psnr, sample_outputs, unit_range, v_loss
    from distill.prune import cost_inputs
    from hyperhuman.unet_widths import widths

    teacher = family.pipeline
    pipelines = {"teacher": teacher, **{name: load_pipeline(work_dir / name) for name in METHODS}}
    heldout = HeldOut.from_shards(heldout_shards, teacher, num=HELDOUT_NUM)
    guidance = teacher_recipe()["validation"]["guidance_scale"]
    noise = initial_noise(heldout, teacher.unet.config.latent_channels, min(PSNR_NUM, len(heldout)), seed=0)

    def samples(pipeline):
        return sample_outputs(pipeline, heldout, noise, PSNR_STEPS, guidance, batch_size=PSNR_NUM, seed=0)

    print(f"[bench prune] measuring: held-out v-loss, PSNR ({PSNR_STEPS} steps, CFG {guidance}), {runtime} step")
    reference = samples(teacher)
    # The cost model's inputs (one guided step at the data resolution), so measured and predicted
    # latencies are of the same call.
    inputs = cost_inputs(family, config)
    measured = alternating_step_ms({name: p.unet for name, p in pipelines.items()}, inputs, runtime, repeats)
    # The fitted full step was timed once, before the search; the teacher timed now, beside the
    # others, says how far the machine has drifted since. Scaling every prediction by that one
    # factor leaves the error of the per-block lines alone (the teacher's calibrated error is 0).
    drift = measured["teacher"] / cost.full
    full_params = _count(teacher.unet)
    full_channels = sum(cost.full_widths.values())
    rows = []
    for name, pipeline in pipelines.items():
        unet = pipeline.unet.eval()
        predicted = cost.predict(widths(unet))
        report = reports.get(name, {})
        ours = None if name == "teacher" else samples(pipeline)
        scores = None if ours is None else {k: psnr(unit_range(k, ours[k]), unit_range(k, reference[k])) for k in ours}
        rows.append({
            "model": name,
            "search_steps": (report.get("search") or {}).get("steps") or 0,
            "finetune_steps": (report.get("finetune") or {}).get("steps") or 0,
            "channels_kept": sum(widths(unet).values()) / full_channels,
            "params": _count(unet),
            "params_ratio": _count(unet) / full_params,
            "measured_ms": measured[name],
            "predicted_ms": predicted,
            "latency_error": predicted / measured[name] - 1,
            "calibrated_error": predicted * drift / measured[name] - 1,
            "speedup": measured["teacher"] / measured[name],
            "target_ms": cost.full if name == "teacher" else reports["pas"]["target"],
            "target_met": name == "teacher" or predicted <= reports["pas"]["target"],
            **v_loss(pipeline, heldout),
            "psnr": scores,
            "selection": report.get("selection"),  # PaS's forced drops, the uniform fraction, the L1 drops
        })  # fmt: skip
    return rows


def alternating_step_ms(models: dict, inputs: dict, runtime: str, repeats: int) -> dict[str, float]:
    """Median ms of one step per model: ``distill.latency.measure_step``'s timing, the models taken
    in turn for ``repeats`` rounds (3 calls each) so drift on a shared machine hits all alike."""
    from distill.latency import alternating_ms, runner, time_call

    calls = {name: runner(model, runtime) for name, model in models.items()}  # compiled once each
    for call in calls.values():
        time_call(call, (), inputs, warmup=2, repeats=1)
    return alternating_ms(calls, dict.fromkeys(calls, inputs), rounds=max(1, repeats), repeats=3)


def summary(rows: list[dict]) -> dict:
    by = {row["model"]: row for row in rows}
    result = {f"{name}_loss": by[name]["v_loss"] for name in ("teacher", *METHODS)}
    result.update({f"{name}_psnr": by[name]["psnr"]["rgb"] for name in METHODS})
    result.update({f"{name}_speedup": by[name]["speedup"] for name in METHODS})
    result["latency_error_max"] = max(abs(by[name]["latency_error"]) for name in METHODS)
    result["latency_error_max_calibrated"] = max(abs(by[name]["calibrated_error"]) for name in METHODS)
    result["best_loss"] = min(METHODS, key=lambda name: by[name]["v_loss"])
    return result


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- the table ---------------------------------------------------------------------------------------
def print_table(section: dict) -> None:
    budgets = section["budgets"]
    print(
        f"\npruning to {budgets['fraction']:.0%} of the teacher's {budgets['runtime']} step "
        f"({budgets['teacher_ms']:.2f} ms → target {budgets['target_ms']:.2f} ms, as fitted); "
        f"{budgets['total_steps']} training steps each (PaS {budgets['search_steps']} search + "
        f"{budgets['finetune_steps']} fine-tune), batch {budgets['batch_size']} at {budgets['resolution']} px"
    )
    print(
        f"{'model':8} {'search':>6} {'tune':>5} {'chan %':>6} {'params k':>9} {'meas ms':>8} {'pred ms':>8} "
        f"{'error':>7} {'cal.':>6} {'speed-up':>8} {'met':>3} {'v-loss':>7} {'PSNR rgb':>8} {'depth':>6} {'normal':>6}"
    )
    for row in section["rows"]:
        psnr = row["psnr"] or {}
        widths = (("rgb", 8), ("depth", 6), ("normal", 6))
        cells = " ".join(f"{psnr[name]:{w}.1f}" if name in psnr else "-".rjust(w) for name, w in widths)
        print(
            f"{row['model']:8} {row['search_steps']:6d} {row['finetune_steps']:5d} {row['channels_kept']:6.1%} "
            f"{row['params'] / 1e3:9.1f} {row['measured_ms']:8.2f} {row['predicted_ms']:8.2f} "
            f"{row['latency_error']:+7.1%} {row['calibrated_error']:+6.1%} {row['speedup']:7.2f}x "
            f"{'yes' if row['target_met'] else 'no':>3} "
            f"{row['v_loss']:7.4f} {cells}"
        )
    print(f"summary: {json.dumps(section['summary'])}")
