"""``hyperhuman distill gan-search``: the E2GAN generator's widths searched to a latency target on
this machine, removed, and fine-tuned from the unpruned generator.

1. **cost** (``OUTPUT/cost.json``): what the generator's widths cost at one ``timing.resolution``²
   frame, in ``target.cost`` units (MACs, or ms on a runtime of :mod:`distill.latency`, its units
   timed through the machine's latency table): :func:`distill.e2gan.search.fit_generator_cost`.
2. **search** (``OUTPUT/search/generator``): ``search.steps`` of the pair loss (``loss.l1_weight``
   · L1 + ``loss.l2_weight`` · MSE to the teacher editor's edit) + ``kd.output_weight`` · L1 to
   the unpruned generator's output + ``search.resource_weight`` · max(cost / target − 1, 0), masks
   and weights together; forced drops if the steps ran out above the target, what was dropped given
   back while it stays met; removal. It runs on the main process (it is short); every process then
   loads its result.
3. **fine-tune** (``OUTPUT/generator``): the smaller generator trains on the same pair + KD loss for
   ``train.max_train_steps`` on the shared machinery (accelerate, EMA, checkpoints with exact
   ``--resume``; a finished search is kept). No adversarial term: the unpruned generator's output,
   the KD target, already carries what its discriminator taught it, and a discriminator started
   afresh would need more steps than this fine-tune has.

``OUTPUT/gan_search_report.json``: the widths, parameters and MACs of both generators, their latency
predicted and measured side by side (:func:`distill.latency.alternating_ms`) with the prediction's
error, and the held-out PSNR against the teacher editor's edits of both, and of the searched
generator against the unpruned one. ``OUTPUT/generator`` loads with
:func:`distill.e2gan.generator.load_generator` (its ``widths`` in its config) and carries the
teacher's ``concepts.json``, so ``hyperhuman edit`` takes it as it takes the base run.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState

from hyperhuman.config import ConfigError, check_known_keys
from hyperhuman.training import (
    DATA_KEYS,
    TRAIN_KEYS,
    check_processes_agree,
    make_accelerator,
    optimizer_step,
    prepare_for_training,
    restore,
    save_checkpoint,
    trained_copy,
)

REFERENCE = "configs/distill/gan-search-tiny.yaml"
KNOWN_KEYS = {
    "output": None,
    "seed": None,
    "teacher": None,
    "text_encoder": None,
    "target": dict.fromkeys(["cost", "fraction", "ms"]),
    "timing": dict.fromkeys(["resolution", "repeats"]),
    "search": dict.fromkeys(["steps", "mask_learning_rate", "resource_weight", "min_channels"]),
    "kd": dict.fromkeys(["output_weight"]),
    "loss": dict.fromkeys(["l1_weight", "l2_weight"]),
    "data": {**DATA_KEYS, "concepts": None},
    "train": TRAIN_KEYS,
    "validation": dict.fromkeys(["heldout", "num_per_concept"]),
}
COST_FILE = "cost.json"
COMMAND = "distill gan-search"


# --- configuration ---------------------------------------------------------------------------------
def teacher_folder(teacher) -> Path:
    """The unpruned generator: a ``distill gan`` run (its ``generator/``) or a generator folder."""
    path = Path(str(teacher))
    for candidate in (path, path / "generator"):
        config = candidate / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("_class_name") == "E2GANGenerator":
            return candidate
    raise ConfigError(f"teacher={str(teacher)!r} is not a `hyperhuman distill gan` run or an E2GANGenerator folder")


def check_config(config: dict, check_paths: bool = True) -> None:
    """Everything that would fail an hour in fails here, naming the key to fix."""
    from distill.e2gan.train import check_training_sections
    from distill.width_cost import COST_UNITS

    for section in ("output", "teacher", "target", "timing", "search", "data", "train"):
        if config.get(section) is None:
            raise ConfigError(f"gan-search config lacks {section!r} (e.g. --set {section}=...); see {REFERENCE}")
    check_known_keys(config, KNOWN_KEYS, REFERENCE)
    target, timing, search = config["target"], config["timing"], config["search"]
    if target.get("cost") not in COST_UNITS:
        raise ConfigError(
            f"target.cost must be one of {COST_UNITS} (MACs or ms on a runtime), got {target.get('cost')!r}"
        )
    fraction, ms = target.get("fraction"), target.get("ms")
    if (fraction is None) == (ms is None):
        raise ConfigError(
            f"give exactly one of target.fraction (of the full generator's cost) and target.ms; got {target}"
        )
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, int | float)
                                 or not 0 < fraction < 1):  # fmt: skip
        raise ConfigError(f"target.fraction must be in (0, 1), got {fraction!r}")
    if ms is not None and (target["cost"] == "macs" or isinstance(ms, bool) or not isinstance(ms, int | float)
                           or ms <= 0):  # fmt: skip
        raise ConfigError(f"target.ms={ms!r}: a positive latency, with target.cost a runtime (not macs)")
    for section, key, least in (("search", "steps", 1), ("search", "min_channels", 1), ("timing", "repeats", 1)):
        value = config[section].get(key, least)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{section}.{key} must be an integer ≥ {least}, got {value!r}")
    for key, default in (("mask_learning_rate", 0.05), ("resource_weight", 5.0)):
        value = search.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"search.{key} must be a number > 0, got {value!r}")
    concepts = config["data"].get("concepts")
    if concepts is not None and (not isinstance(concepts, list) or not all(isinstance(c, str) for c in concepts)):
        raise ConfigError(f"data.concepts must be a list of concept names (null: all), got {concepts!r}")
    kd = (config.get("kd") or {}).get("output_weight", 1.0)
    if isinstance(kd, bool) or not isinstance(kd, int | float) or kd < 0:
        raise ConfigError(f"kd.output_weight must be a number ≥ 0, got {kd!r}")
    factor = None
    if check_paths:
        teacher = json.loads((teacher_folder(config["teacher"]) / "config.json").read_text())
        factor = 2 ** (teacher["num_downsamples"] + 1)
    resolution = timing.get("resolution")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < (factor or 1) or (
        resolution % (factor or 1)
    ):  # fmt: skip
        raise ConfigError(
            f"timing.resolution={resolution!r} must be a positive multiple of {factor or 1} (the teacher's "
            "2**(num_downsamples + 1))"
        )
    check_training_sections(config, factor, check_paths)


# --- the recipe ------------------------------------------------------------------------------------
def search_gan(config: dict, resume: str | None = None) -> dict:
    """Cost, search, removal, fine-tune, measures; returns the report (also
    ``OUTPUT/gan_search_report.json``)."""
    from distill.e2gan.generator import E2GANGenerator
    from distill.width_cost import WidthCost

    check_config(config)
    output, started = Path(config["output"]), time.perf_counter()
    folder = teacher_folder(config["teacher"])
    teacher = E2GANGenerator.from_pretrained(str(folder)).eval()
    searched = output / "search" / "generator"
    state = PartialState()
    text = prompt_states(config, teacher, state.device)
    if state.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        cost = fitted_cost(config, teacher, text)  # on this CPU: the teacher is there still
        if resume and (searched / "config.json").is_file():
            print(f"[{COMMAND}] search: done earlier ({searched})")
        else:
            run_search(config, teacher.to(state.device), text, cost, searched)
    state.wait_for_everyone()
    cost = WidthCost.from_json(json.loads((output / COST_FILE).read_text()))
    search_report = json.loads((searched.parent / "search_report.json").read_text())
    student = E2GANGenerator.from_pretrained(str(searched))
    finetune = finetune_generator(config, student, teacher, text, resume)
    if not state.is_main_process:
        return finetune
    final = E2GANGenerator.from_pretrained(str(output / "generator")).eval()
    if (folder / "concepts.json").is_file():
        shutil.copy(folder / "concepts.json", output / "generator" / "concepts.json")
    report = measure(config, teacher.cpu(), final, cost, text)  # latency on this CPU
    report.update(search=search_report, finetune=finetune, wall_s=round(time.perf_counter() - started, 2))
    (output / "gan_search_report.json").write_text(json.dumps(report, indent=1))
    return report


def prompt_states(config: dict, teacher, device):
    """Prompts → text states through the teacher's text encoder (or ``text_encoder``, when set)."""
    from distill.e2gan.train import PromptStates
    from hyperhuman.text import load_text_encoder

    tokenizer, encoder = load_text_encoder(config.get("text_encoder") or teacher.config.text_encoder)
    return PromptStates(tokenizer, encoder.to(device), device)


def frame_inputs(config: dict, teacher, text) -> dict:
    """One ``timing.resolution``² frame with the first concept's prompt: what the cost is fitted at
    (a deployed editor runs one frame a call)."""
    folder = teacher_folder(config["teacher"])
    concepts = json.loads((folder / "concepts.json").read_text()) if (folder / "concepts.json").is_file() else {}
    states, mask = (tensor.cpu() for tensor in text([next(iter(concepts.values()), "")]))
    side = config["timing"]["resolution"]
    image = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return {"image": image, "encoder_hidden_states": states, "encoder_attention_mask": mask}


def fitted_cost(config: dict, teacher, text):
    """The teacher's width cost, fitted once (``OUTPUT/cost.json``), and the target in its unit."""
    from distill.e2gan.search import fit_generator_cost
    from distill.latency import LatencyTable
    from distill.width_cost import WidthCost

    path, unit = Path(config["output"]) / COST_FILE, config["target"]["cost"]
    if not path.is_file():
        table = None if unit == "macs" else LatencyTable.load()
        print(f"[{COMMAND}] fitting the {unit} cost of the generator's widths ...", flush=True)
        repeats = config["timing"].get("repeats", 10)
        cost = fit_generator_cost(teacher, frame_inputs(config, teacher, text), unit, table, repeats=repeats)
        if table is not None:
            table.save()
        path.write_text(json.dumps(cost.to_json(), indent=1))
    cost = WidthCost.from_json(json.loads(path.read_text()))
    if cost.unit != unit:
        raise ConfigError(f"{path} holds a {cost.unit} cost, the config asks for target.cost={unit}: use a new output")
    return cost


def target_of(config: dict, cost) -> float:
    target = config["target"]
    return float(target["ms"]) if target.get("ms") is not None else target["fraction"] * cost.full


def run_search(config: dict, teacher, text, cost, searched: Path) -> dict:
    from distill.e2gan.data import PairBatches
    from distill.e2gan.search import fill_to_target, kept_widths, remove, search
    from distill.prune import meet_target

    train, search_config, loss = config["train"], config["search"], config.get("loss") or {}
    seed, target = config.get("seed", 0), target_of(config, cost)
    batches = PairBatches(config["data"], train["batch_size"], seed, split_by_node=False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    masks, log = search(
        student, teacher, batches, text, cost, target, search_config["steps"],
        learning_rate=float(train.get("learning_rate", 1e-4)),
        mask_learning_rate=float(search_config.get("mask_learning_rate", 0.05)),
        resource_weight=float(search_config.get("resource_weight", 5.0)),
        output_weight=float((config.get("kd") or {}).get("output_weight", 1.0)),
        l1_weight=float(loss.get("l1_weight", 10.0)), l2_weight=float(loss.get("l2_weight", 0.0)),
        min_channels=search_config.get("min_channels", 1), seed=seed,
    )  # fmt: skip
    forced = meet_target(masks, cost, target)
    restored = fill_to_target(masks, cost, target)
    widths = kept_widths(masks)
    predicted = cost.predict(widths)
    if predicted > target:
        print(f"[{COMMAND}] WARNING: every width is at its minimum (search.min_channels) and the predicted "
              f"{cost.unit} cost is {predicted / cost.full:.1%} of the full generator's, above the target "
              f"{target / cost.full:.1%}: what no width changes (the trunk, the transformer's convolutions) "
              "costs more")  # fmt: skip
    if searched.exists():
        shutil.rmtree(searched)
    remove(student, masks).save_pretrained(searched, safe_serialization=True)
    report = {"steps": len(log), "target": target, "cost_unit": cost.unit, "full_cost": cost.full,
              "predicted_cost": predicted, "target_met": predicted <= target, "forced_groups": forced,
              "restored_groups": restored, "widths": widths, "first_loss": log[0]["loss"],
              "last_loss": log[-1]["loss"]}  # fmt: skip
    (searched.parent / "search_report.json").write_text(json.dumps(report, indent=1))
    return report


def finetune_generator(config: dict, student, teacher, text, resume: str | None) -> dict:
    """The searched generator trained on the pair loss + L1 to ``teacher``'s output (exact resume);
    ``text``: prompts → states on this process's device."""
    from distill.e2gan.data import PairBatches

    output, train, loss_config = Path(config["output"]), config["train"], config.get("loss") or {}
    seed = config.get("seed", 0)
    l1_weight, l2_weight = float(loss_config.get("l1_weight", 10.0)), float(loss_config.get("l2_weight", 0.0))
    output_weight = float((config.get("kd") or {}).get("output_weight", 1.0))
    accelerator = make_accelerator(train, output)
    model, optimizer, lr_scheduler, ema = prepare_for_training(accelerator, student.requires_grad_(True), train)
    teacher = teacher.to(accelerator.device).requires_grad_(False).eval()
    state = restore(accelerator, output, resume, COMMAND)
    global_step, micro_step = state["global_step"], state["micro_step"]
    batches = PairBatches(config["data"], train["batch_size"], seed, **state["data"])
    if accelerator.is_main_process:
        accelerator.init_trackers("distill-gan-search", config={"max_train_steps": train["max_train_steps"]})
    losses, started = [], time.perf_counter()
    model.train()
    while global_step < train["max_train_steps"]:
        batch = next(batches)
        micro_step += 1
        inputs, targets = batch["input"].to(accelerator.device), batch["target"].to(accelerator.device)
        states, mask = text(batch["prompt"])
        with accelerator.accumulate(model):
            edited = model(inputs, states, mask)
            with torch.no_grad():
                reference = teacher(inputs, states, mask)
            loss = (l1_weight * F.l1_loss(edited, targets) + l2_weight * F.mse_loss(edited, targets)
                    + output_weight * F.l1_loss(edited, reference))  # fmt: skip
            optimizer_step(accelerator, model, optimizer, lr_scheduler, loss, train.get("max_grad_norm"))
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        if ema is not None:
            ema.step(model.parameters())
        losses.append(loss.item())
        accelerator.log({"loss": losses[-1]}, step=global_step)
        if global_step % train.get("log_every", 10) == 0 or global_step == 1:
            accelerator.print(
                f"[{COMMAND}] fine-tune step {global_step}/{train['max_train_steps']} loss {losses[-1]:.4f}"
            )
        if global_step % train["checkpointing_steps"] == 0:
            save_checkpoint(accelerator, output, global_step, micro_step, batches, train.get("checkpoints_total_limit"))
    accelerator.wait_for_everyone()
    report = {"steps": global_step, "wall_s": round(time.perf_counter() - started, 2), "losses": losses}
    report["weights_sha256_per_process"] = check_processes_agree(accelerator, accelerator.unwrap_model(model), COMMAND)
    if losses:
        report.update(first_loss=losses[0], last_loss=losses[-1])
    if accelerator.is_main_process:
        trained_copy(accelerator, model, ema).save_pretrained(output / "generator", safe_serialization=True)
    accelerator.end_training()
    return report


# --- measures --------------------------------------------------------------------------------------
def measure(config: dict, teacher, searched, cost, text) -> dict:
    """Both generators side by side: widths, parameters, MACs, latency (predicted; measured in
    alternation on the cost's runtime, eager for a MACs cost), held-out PSNR."""
    from distill.e2gan.data import read_pairs
    from distill.e2gan.search import generator_widths
    from distill.e2gan.train import edit, heldout_psnr, psnr
    from distill.latency import alternating_ms, runner
    from distill.width_cost import count_macs

    frame = frame_inputs(config, teacher, text)
    models = {"full": teacher.eval(), "searched": searched.eval()}
    runtime = "eager" if cost.unit == "macs" else cost.unit
    repeats = config["timing"].get("repeats", 10)
    ms = alternating_ms({name: runner(model, runtime) for name, model in models.items()},
                        dict.fromkeys(models, frame), rounds=3, repeats=repeats)  # fmt: skip
    predicted = {name: cost.predict(generator_widths(model)) for name, model in models.items()}
    macs = {name: float(count_macs(model, frame)) for name, model in models.items()}
    report = {
        "cost_unit": cost.unit, "target": target_of(config, cost), "runtime": runtime,
        "resolution": config["timing"]["resolution"],
        "widths": {name: generator_widths(model) for name, model in models.items()},
        "params": {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()},
        "macs": macs, "macs_ratio": macs["full"] / macs["searched"],
        "predicted_cost": predicted, "measured_ms": ms, "speedup": ms["full"] / ms["searched"],
        "fps": {name: 1000.0 / value for name, value in ms.items()},
    }  # fmt: skip
    if cost.unit != "macs":
        report["prediction_error"] = {name: predicted[name] / ms[name] - 1 for name in models}
    validation, data = config.get("validation") or {}, config["data"]
    source = validation.get("heldout") or data["train"]
    pairs = read_pairs(str(source), data["resolution"], validation.get("num_per_concept", 4), data.get("concepts"))
    if pairs:
        report["psnr_on"] = "validation.heldout" if validation.get("heldout") else "data.train (no held-out pairs)"
        report["psnr_db"] = {name: heldout_psnr(model, pairs, text)["psnr_db"] for name, model in models.items()}
        agreement = F.mse_loss(edit(searched, pairs, text).double(), edit(teacher, pairs, text).double()).item()
        report["searched_vs_full_psnr_db"] = psnr(agreement)
    return report
