"""``hyperhuman prune``: Pruning-as-Search (Li et al. 2022) to a MACs or latency target, then a
knowledge-distilled fine-tune of the physically smaller model.

The teacher is an LSDM run or a diffusers ``StableDiffusionPipeline`` folder (:mod:`distill.step_models`:
one interface for both). Two phases, each an ordinary training run on the shared machinery
(accelerate multi-process, checkpoints with exact ``--resume``, TensorBoard, validation grids):

1. **search** (``OUTPUT/search/``): a copy of the teacher with a binary channel mask in every
   ResNet, attention and feed-forward (:mod:`distill.pas`) trains on

       task_weight · Σ_branch MSE(v̂, v) + output_weight · Σ_branch MSE(v̂, v̂_teacher)
     + feature_weight · (BK-SDM's normalised block-feature KD, :mod:`distill.kd`)
     + resource_weight · max(cost(masks) / target − 1, 0)

   where ``cost`` is the model's MACs or its latency on a runtime as a function of the masks'
   widths (:mod:`distill.width_cost`, fitted once before the search and kept in
   ``OUTPUT/cost.json``, so every process and every resumed run weighs the same costs). The masks
   learn at their own rate (``search.mask_learning_rate``), the weights at ``train.learning_rate``.
   When the steps run out above the target, the kept groups with the smallest mask weights are
   dropped until the predicted cost meets it (``forced_groups`` in the report says how many). The
   masked channels are then removed: ``OUTPUT/search/pipeline`` holds the smaller model, which
   computes exactly what the masked one did, its config recording its widths.
2. **fine-tune** (``OUTPUT/``): the pruned model trains with the same task + KD loss (no masks,
   EMA as configured) for ``train.max_train_steps``; ``OUTPUT/pipeline`` is the result, a pipeline
   of the teacher's kind that ``HyperHumanPipeline.from_pretrained`` / ``hyperhuman eval`` (or
   ``StableDiffusionPipeline.from_pretrained``) load unchanged.

``OUTPUT/prune_report.json`` has the widths, the teacher's and the pruned model's cost (predicted
and, for latency, measured), parameters and both phases' losses. ``--resume latest`` continues an
unfinished search, or skips a finished one and continues the fine-tune.

Widths chosen some other way (a baseline: uniform scaling, magnitude ranking) get the very same
fine-tune: :func:`start_from` puts their model where a finished search leaves its own, and
``prune(config, resume="latest")`` fine-tunes it.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import torch
from accelerate import PartialState

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
from hyperhuman.unet_widths import widths

REFERENCE = "configs/prune/tiny.yaml"
NETWORKS = ("unet", "sr")  # `network: sr` prunes the SR network (distill/sr_prune.py)
KNOWN_KEYS = {
    "network": None,
    "output": None,
    "seed": None,
    "teacher": None,
    "target": dict.fromkeys(["cost", "fraction", "ms"]),
    "search": dict.fromkeys(["steps", "mask_learning_rate", "resource_weight", "min_groups"]),
    "data": {**DATA_KEYS, "cache_latents": None},
    "kd": dict.fromkeys(["task_weight", "output_weight", "feature_weight", "feature_norm"]),
    "train": {**TRAIN_KEYS, **dict.fromkeys(["condition_dropout"])},
    "validation": {**VALIDATION_KEYS, **dict.fromkeys(["heldout", "heldout_num"])},
}
COST_FILE = "cost.json"
SEARCH_FOLDER = "search"
PHASE_REPORT = "train_report.json"  # each phase's, in its folder
# What the fine-tune and prune_report.json take from the search phase's report.
SEARCH_RESULT_KEYS = ("target", "cost_unit", "teacher_cost", "predicted_cost", "widths", "target_met", "forced_groups")


# --- configuration ---------------------------------------------------------------------------------
def check_config(config: dict, check_paths: bool = True) -> None:
    """Everything that would fail an hour in fails here, naming the key to fix."""
    if config.get("network", "unet") not in NETWORKS:
        raise ConfigError(f"network={config.get('network')!r}: prune a diffusion UNet (unet) or the SR network (sr)")
    if config.get("network") == "sr":
        from distill.sr_prune import check_config as check_sr_config

        return check_sr_config(config, check_paths)
    from distill.kd import check_kd_loss
    from distill.width_cost import COST_UNITS
    from hyperhuman.lsdm.data import check_data

    for section in ("output", "teacher", "target", "search", "data", "train"):
        if config.get(section) is None:
            raise ConfigError(f"prune config lacks {section!r} (e.g. --set {section}=...); see {REFERENCE}")
    check_known_keys(config, KNOWN_KEYS, REFERENCE)
    target, search = config["target"], config["search"]
    if target.get("cost") not in COST_UNITS:
        raise ConfigError(f"target.cost must be one of {COST_UNITS} (MACs or ms), got {target.get('cost')!r}")
    fraction, ms = target.get("fraction"), target.get("ms")
    if (fraction is None) == (ms is None):
        raise ConfigError(f"give exactly one of target.fraction (of the teacher's cost) and target.ms; got {target}")
    if fraction is not None and (not isinstance(fraction, int | float) or not 0 < fraction < 1):
        raise ConfigError(f"target.fraction must be in (0, 1), got {fraction!r}")
    if ms is not None and (target["cost"] == "macs" or not isinstance(ms, int | float) or ms <= 0):
        raise ConfigError(f"target.ms={ms!r}: a positive latency, with target.cost a runtime (not macs)")
    steps = search.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"search.steps must be a positive integer, got {steps!r}")
    for key, default in (("mask_learning_rate", 0.05), ("resource_weight", 5.0)):
        value = search.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"search.{key} must be a number > 0, got {value!r}")
    groups = search.get("min_groups", 1)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ConfigError(f"search.min_groups must be an integer ≥ 1 (groups every block keeps), got {groups!r}")
    check_kd_loss(config.get("kd") or {})
    check_train_counts(config["train"])
    check_train_counts({**config["train"], "max_train_steps": steps})
    if check_paths:
        from distill.measure import check_teacher_run

        check_teacher_run(config["teacher"])
        check_data(config["data"])


# --- the two phases --------------------------------------------------------------------------------
def prune(config: dict, resume: str | None = None) -> dict:
    """Search, remove, fine-tune; returns the report (also ``OUTPUT/prune_report.json``)."""
    if config.get("network") == "sr":
        from distill.sr_prune import prune_sr

        return prune_sr(config, resume)
    check_config(config)
    output = Path(config["output"])
    search_folder = output / SEARCH_FOLDER
    started = time.perf_counter()
    finished = (search_folder / PHASE_REPORT).is_file() and (search_folder / "pipeline").is_dir()
    if resume and finished:
        print(f"[prune] search: done earlier ({search_folder})")
        search = json.loads((search_folder / PHASE_REPORT).read_text())
    else:
        search = train_phase(config, search_folder, resume, search=True)
        resume = "latest" if resume else None  # a checkpoint path named the phase it belongs to
    finetune = train_phase(config, output, resume, search=False)
    report = {key: search[key] for key in SEARCH_RESULT_KEYS}
    report.update(
        params=finetune["params"],
        search={key: search.get(key) for key in ("steps", "first_loss", "last_loss", "wall_s")},
        finetune={key: finetune.get(key) for key in ("steps", "first_loss", "last_loss", "wall_s", "heldout")},
        selection=search.get("selection", {"method": "pas", "forced_groups": search["forced_groups"]}),
        wall_s=round(time.perf_counter() - started, 2),
    )
    for key in ("measured_cost", "prediction_error"):
        if key in finetune:
            report[key] = finetune[key]
    if PartialState().is_main_process:
        (output / "prune_report.json").write_text(json.dumps(report, indent=1))
    return report


def start_from(config: dict, unet: torch.nn.Module, selection: dict) -> dict:
    """Make ``unet``, a narrowed copy of the teacher's UNet (e.g. sliced with
    :func:`hyperhuman.unet_widths.shrink_to_widths`), this run's pruned model in place of a search;
    ``prune(config, resume="latest")`` then only fine-tunes it, exactly as it fine-tunes a searched one.

    ``selection`` says how the widths were chosen (``{"method": "uniform", ...}``); it lands in the
    report. The widths are priced by ``OUTPUT/cost.json``, fitted here if it is not there yet (copy
    another run's to price several runs alike). Returns the search report written."""
    from distill.pas import with_widths_recorded
    from distill.step_models import load_teacher

    check_config(config)
    if config.get("network", "unet") != "unet":
        raise ConfigError(f"start_from narrows a diffusion UNet; network={config.get('network')!r}")
    family = load_teacher(config["teacher"])
    teacher_widths, kept = widths(family.unet), widths(unet)
    if set(kept) != set(teacher_widths) or any(kept[name] > teacher_widths[name] for name in kept):
        raise ValueError("start_from takes a narrowed copy of the teacher's UNet: its blocks or widths differ")
    cost, target = fitted_cost(config, family, PartialState())
    predicted = cost.predict(kept)
    report = {
        "phase": "search",
        "steps": 0,  # no search: the training budget is all the fine-tune's
        "target": target,
        "cost_unit": cost.unit,
        "teacher_cost": cost.full,
        "predicted_cost": predicted,
        "widths": kept,
        "target_met": predicted <= target,
        "forced_groups": 0,
        "params": _count(unet),
        "selection": selection,
    }
    folder = Path(config["output"]) / SEARCH_FOLDER
    if PartialState().is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "pipeline").exists():
            shutil.rmtree(folder / "pipeline")
        family.make_pipeline(with_widths_recorded(unet).eval()).save_pretrained(folder / "pipeline")
        (folder / PHASE_REPORT).write_text(json.dumps(report, indent=1))
    PartialState().wait_for_everyone()
    return report


def train_phase(config: dict, output: Path, resume: str | None, search: bool) -> dict:
    """The search (masks on a copy of the teacher) or the fine-tune (of the search's pruned model)."""
    from distill.kd import LOSS_WEIGHTS, FeatureTaps, feature_loss
    from distill.measure import HeldOut, v_loss
    from distill.pas import insert_masks, masks_of
    from distill.step_models import LatentCache, load_teacher
    from distill.students import feature_pairs
    from hyperhuman.lsdm.data import Batches
    from hyperhuman.lsdm.train import check_resolution, first_samples

    data, train, kd, search_config = config["data"], dict(config["train"]), config.get("kd") or {}, config["search"]
    seed = config.get("seed", 0)
    command = "prune search" if search else "prune fine-tune"
    if search:  # the masks binarise the weights they are trained as: no averaged copy
        train.update(max_train_steps=search_config["steps"], ema={"use": False})
    accelerator = make_accelerator(train, output)
    torch.manual_seed(seed)
    family = load_teacher(config["teacher"])
    teacher = family.unet
    down_factor = 2 ** getattr(teacher, "trunk", teacher).num_upsamplers
    check_resolution(data["resolution"], family.pipeline.vae_scale_factor, down_factor)
    family.to(accelerator.device)
    if search:
        student = copy.deepcopy(teacher).requires_grad_(True).train()
        insert_masks(student, search_config.get("min_groups", 1))  # from torch's generator, seeded above
    else:
        student = load_teacher(Path(config["output"]) / SEARCH_FOLDER).unet.requires_grad_(True).train()
    cost, target = fitted_cost(config, family, accelerator)
    masks = masks_of(student)
    pairs = feature_pairs(student, teacher)
    student_taps = FeatureTaps(student, [name for name, _ in pairs])
    teacher_taps = FeatureTaps(teacher, [name for _, name in pairs])
    if train.get("gradient_checkpointing"):
        student.enable_gradient_checkpointing()

    groups = None
    if search:
        mask_parameters = {id(mask.weight) for mask in masks.values()}
        weights = [p for p in student.parameters() if id(p) not in mask_parameters]
        mask_rate = float(search_config.get("mask_learning_rate", 0.05))
        mask_weights = [mask.weight for mask in masks.values()]
        groups = [{"params": weights}, {"params": mask_weights, "lr": mask_rate, "weight_decay": 0.0}]
    model, optimizer, lr_scheduler, ema = prepare_for_training(accelerator, student, train, param_groups=groups)
    masks = masks_of(accelerator.unwrap_model(model))
    state = restore(accelerator, output, resume, command)
    global_step, micro_step = state["global_step"], state["micro_step"]
    batches = Batches(data, train["batch_size"], seed, **state["data"])
    loss_weights = {key: float(kd.get(key, 1.0)) for key in LOSS_WEIGHTS}
    resource_weight = float(search_config.get("resource_weight", 5.0))
    norm = kd.get("feature_norm", "teacher")
    text_dropout = train.get("condition_dropout", 0.15)
    cache = LatentCache(bool(data.get("cache_latents")))
    scheduler = family.pipeline.scheduler

    validation = config.get("validation") or {}
    validation_batch = heldout = None
    report = {"phase": "search" if search else "fine-tune", "heldout": [], "params": _count(student)}
    if accelerator.is_main_process:
        accelerator.init_trackers(command.replace(" ", "-"), config={"max_train_steps": train["max_train_steps"]})
        if validation.get("every"):
            validation_batch = first_samples(data, validation.get("num_samples", 2), seed)
            if global_step == 0 and search:
                grid = family.validate(accelerator, family.pipeline, validation, validation_batch, output, 0)
                grid.rename(grid.with_name("teacher.png"))
        if validation.get("heldout"):
            if family.kind != "lsdm":
                raise ConfigError("validation.heldout measures an LSDM's v-loss; set it to null for this teacher")
            heldout = HeldOut.from_shards(validation["heldout"], family.pipeline, num=validation.get("heldout_num", 16))

    def pipeline_now():
        return family.make_pipeline(exported(accelerator.unwrap_model(model), ema))

    fixed_cost = None if search else torch.tensor(cost.predict(widths(student)))  # no masks: the widths stay
    terms = {"task": [], "output": [], "feature": [], "resource": [], "cost": []}
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
                teacher_prediction = teacher(noisy, timesteps, **conditions).sample
            teacher_features = teacher_taps.take()
            prediction = model(noisy, timesteps, **conditions).sample
            task = family.loss(prediction, target_v)
            distilled = family.loss(prediction, teacher_prediction)
            features = feature_loss(student_taps.take(), teacher_features, pairs, norm)
            loss = (
                loss_weights["task_weight"] * task
                + loss_weights["output_weight"] * distilled
                + loss_weights["feature_weight"] * features
            )
            expected = cost.expected(masks) if search else fixed_cost
            resource = torch.relu(expected / target - 1)
            if search:
                loss = loss + resource_weight * resource
            optimizer_step(accelerator, model, optimizer, lr_scheduler, loss, train.get("max_grad_norm"))
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        if ema is not None:
            ema.step(model.parameters())
        losses.append(loss.item())
        for key, value in (("task", task), ("output", distilled), ("feature", features), ("resource", resource)):
            terms[key].append(value.item())
        terms["cost"].append(expected.item())
        accelerator.log({"loss": losses[-1], **{f"loss_{k}": v[-1] for k, v in terms.items()}}, step=global_step)
        if global_step % train.get("log_every", 10) == 0 or global_step == 1:
            accelerator.print(
                f"[{command}] step {global_step}/{train['max_train_steps']} loss {losses[-1]:.4f} "
                f"(task {terms['task'][-1]:.4f}, output {terms['output'][-1]:.4f}, feature {terms['feature'][-1]:.4f}"
                f"); {cost.unit} {expected.item() / cost.full:.1%} of the teacher's (target {target / cost.full:.1%})"
            )
        if global_step % train["checkpointing_steps"] == 0:
            save_checkpoint(accelerator, output, global_step, micro_step, batches, train.get("checkpoints_total_limit"))
        if accelerator.is_main_process and validation.get("every") and global_step % validation["every"] == 0:
            pipeline = pipeline_now()
            if validation_batch is not None:
                family.validate(accelerator, pipeline, validation, validation_batch, output, global_step)
            if heldout is not None:
                measured = v_loss(pipeline, heldout)["v_loss"]
                report["heldout"].append({"step": global_step, "v_loss": measured})
                accelerator.log({"heldout_v_loss": measured}, step=global_step)

    student_taps.remove()
    teacher_taps.remove()
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    report.update(steps=global_step, wall_s=round(time.perf_counter() - started, 2), losses=losses, terms=terms)
    report["weights_sha256_per_process"] = check_processes_agree(accelerator, unwrapped, command)
    if search:
        report["forced_groups"] = meet_target(masks, cost, target)
        kept = {name: len(mask.kept_indices()) for name, mask in masks.items()}
    else:
        kept = widths(unwrapped)
    report.update(target=target, cost_unit=cost.unit, teacher_cost=cost.full, predicted_cost=cost.predict(kept))
    report.update(widths=kept, target_met=report["predicted_cost"] <= target)
    if search and not report["target_met"]:
        accelerator.print(
            f"[{command}] WARNING: every block is at its minimum width (search.min_groups) and the predicted "
            f"{cost.unit} cost is still {report['predicted_cost'] / cost.full:.1%} of the teacher's, above the target "
            f"{target / cost.full:.1%}: what stays (the time embedding, convolutions outside the blocks, overheads) "
            "costs more than the target allows"
        )
    if accelerator.is_main_process:
        pipeline = pipeline_now()
        if (output / "pipeline").exists():
            shutil.rmtree(output / "pipeline")
        pipeline.save_pretrained(output / "pipeline")
        report["params"] = _count(pipeline.unet)
        if not search and cost.unit != "macs":
            from distill.width_cost import prediction_error

            checked = prediction_error(cost, pipeline.unet, cost_inputs(family, config))
            report.update(measured_cost=checked["measured"], prediction_error=checked["error"])
        if losses:
            report.update(first_loss=losses[0], last_loss=losses[-1])
        (output / PHASE_REPORT).write_text(json.dumps(report, indent=1))
    accelerator.end_training()
    return report


# --- pieces --------------------------------------------------------------------------------------
def noised_sample(scheduler, clean: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``clean`` noised at one random timestep per sample (all branches share it, as the LSDM
    samples), the regression target the scheduler's prediction type asks for, and the timesteps."""
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), generator=generator)
    timesteps = timesteps.to(clean.device)
    noise = torch.randn(clean.shape, generator=generator).to(clean.device, clean.dtype)
    noisy = scheduler.add_noise(clean, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        return noisy, scheduler.get_velocity(clean, noise, timesteps), timesteps
    if scheduler.config.prediction_type == "epsilon":
        return noisy, noise, timesteps
    raise ConfigError(f"the teacher predicts {scheduler.config.prediction_type!r}; pruning trains v or epsilon models")


def cost_inputs(family, config: dict) -> dict:
    """One guided step's denoiser inputs (batch 2: the unconditional and the conditional half) at
    the data resolution, from the first training sample: the shapes the cost is counted or timed at."""
    from distill.step_models import LatentCache
    from hyperhuman.lsdm.train import first_samples

    batch = first_samples(config["data"], 1, config.get("seed", 0))
    clean, conditions, unconditional = family.inputs(batch, LatentCache(False), 0.0, torch.Generator().manual_seed(0))
    inputs = {key: torch.cat([unconditional[key], value]) for key, value in conditions.items()}
    return {"sample": clean.repeat(2, *[1] * (clean.ndim - 1)), "timestep": torch.tensor(500), **inputs}


def fitted_cost(config: dict, family, accelerator):
    """The teacher's :class:`distill.width_cost.WidthCost` and the target in its unit: fitted by the
    main process once (``OUTPUT/cost.json``), read by every process and every resumed phase."""
    from distill.latency import LatencyTable
    from distill.width_cost import WidthCost, fit_cost

    path = Path(config["output"]) / COST_FILE
    if accelerator.is_main_process and not path.is_file():
        unit = config["target"]["cost"]
        table = None if unit == "macs" else LatencyTable.load()
        print(f"[prune] fitting the {unit} cost of every block's width ...", flush=True)
        cost = fit_cost(family.unet, cost_inputs(family, config), unit, table)
        if table is not None:
            table.save()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cost.to_json(), indent=1))
    accelerator.wait_for_everyone()
    cost = WidthCost.from_json(json.loads(path.read_text()))
    target = config["target"]
    goal = target["ms"] if target.get("ms") is not None else target["fraction"] * cost.full
    if cost.unit != target["cost"]:
        raise ConfigError(f"{path} holds a {cost.unit} cost, the config asks for {target['cost']}: use a new output")
    return cost, float(goal)


def meet_target(masks: dict, cost, target: float) -> int:
    """Drop kept groups, smallest mask weight first (never below a mask's minimum), until the
    predicted cost is at most ``target``; returns how many were dropped (0 when the search met it)."""
    from distill.pas import THRESHOLD

    predicted = cost.expected(masks).item()
    kept = {name: int(mask.keep().sum()) for name, mask in masks.items()}
    candidates = sorted(
        (mask.weight[index].item(), name, index)
        for name, mask in masks.items()
        for index in torch.nonzero(mask.keep()).flatten().tolist()
    )
    forced = 0
    with torch.no_grad():
        for _, name, index in candidates:
            if predicted <= target:
                break
            mask = masks[name]
            if kept[name] <= mask.min_groups:
                continue
            mask.weight[index] = THRESHOLD - 1e-3  # just below: a fine-tune would not see it anyway
            kept[name] -= 1
            predicted = cost.expected(masks).item()  # not slope · group alone: chained widths couple
            forced += 1
    return forced


def exported(model: torch.nn.Module, ema) -> torch.nn.Module:
    """A copy of the trained UNet (the EMA weights when EMA is on) in eval mode, masks removed and
    its widths recorded: the model a pipeline holds."""
    from distill.pas import masks_of, remove_masked, with_widths_recorded

    unet = copy.deepcopy(model)
    if ema is not None:
        ema.copy_to(unet.parameters())
    masks = masks_of(unet)
    if masks:
        remove_masked(unet, masks)
    return with_widths_recorded(unet).eval()


def _count(model: torch.nn.Module) -> int:
    """Parameters of the model itself (a search model's mask weights not counted)."""
    from distill.pas import MASK_ATTRIBUTE

    return sum(p.numel() for name, p in model.named_parameters() if MASK_ATTRIBUTE not in name)
