"""``hyperhuman prune`` on the SR network (``network: sr``): fit the speed model, search widths and
depth under a latency hinge (:mod:`distill.sr_search`), remove, fine-tune with KD.

1. **speed model** (``OUTPUT/speed.json``): fitted to whole networks (the teacher and pruned
   versions of it) timed on ``target.cost`` (a runtime of :mod:`distill.latency`) at the
   low-resolution input ``timing.height × timing.width`` (360 × 640 for a 1280 × 720 output at
   ×2), with its error on random pruned networks it was not fitted on.
2. **search** (``OUTPUT/search/sr``): ``search.steps`` of L1 to the photo + L1 to the teacher +
   ``resource_weight`` · max(predicted / target − 1, 0); forced drops when the steps run out above
   the target, and what was dropped taken back, most wanted first, while the target stays met
   (``restored`` in the search report); removal. It runs on the main process (it is short); every process then loads it.
3. **fine-tune** (``OUTPUT/sr``): the smaller network trains on task + KD L1 for
   ``train.max_train_steps`` on the shared machinery (accelerate, EMA, checkpoints, exact
   ``--resume``; a finished search is kept).

``OUTPUT/prune_report.json``: the architecture, predicted and measured latency of both networks,
the speed model's held-out error, PSNR / SSIM of teacher, pruned network and bicubic on
``validation.photos``.
"""

from __future__ import annotations

import json
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
    check_train_counts,
    make_accelerator,
    optimizer_step,
    prepare_for_training,
    restore,
    save_checkpoint,
    trained_copy,
)

REFERENCE = "configs/prune/sr-tiny.yaml"
KNOWN_KEYS = {
    "network": None,
    "output": None,
    "seed": None,
    "teacher": None,
    "target": dict.fromkeys(["cost", "fraction", "ms"]),
    "timing": dict.fromkeys(["height", "width", "repeats", "held_out_networks"]),
    "search": dict.fromkeys(["steps", "mask_learning_rate", "resource_weight", "min_channels"]),
    "data": DATA_KEYS,
    "kd": dict.fromkeys(["task_weight", "output_weight"]),
    "train": TRAIN_KEYS,
    "validation": dict.fromkeys(["photos", "max_side"]),
}
SPEED_FILE = "speed.json"


def teacher_folder(teacher: str | Path) -> Path:
    """A ``SuperResolutionNet`` folder, or a ``train-sr`` run holding one in ``sr/``."""
    path = Path(teacher)
    for candidate in (path, path / "sr"):
        config = candidate / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("_class_name") == "SuperResolutionNet":
            return candidate
    raise ConfigError(
        f"teacher={str(teacher)!r} is not a SuperResolutionNet folder or a `hyperhuman train-sr` run (no sr/); "
        "train one with `hyperhuman train-sr`"
    )


def check_config(config: dict, check_paths: bool = True) -> None:
    from distill.latency import RUNTIMES
    from hyperhuman.lsdm.data import check_data
    from hyperhuman.sr.data import photo_paths

    for section in ("output", "teacher", "target", "timing", "search", "data", "train"):
        if config.get(section) is None:
            raise ConfigError(f"SR prune config lacks {section!r} (e.g. --set {section}=...); see {REFERENCE}")
    check_known_keys(config, KNOWN_KEYS, REFERENCE)
    target = config["target"]
    if target.get("cost") not in RUNTIMES:
        raise ConfigError(f"target.cost must be a runtime of {RUNTIMES} for the SR search, got {target.get('cost')!r}")
    fraction, ms = target.get("fraction"), target.get("ms")
    if (fraction is None) == (ms is None):
        raise ConfigError(f"give exactly one of target.fraction (of the teacher's latency) and target.ms; got {target}")
    if fraction is not None and not 0 < fraction < 1:
        raise ConfigError(f"target.fraction must be in (0, 1), got {fraction!r}")
    if ms is not None and ms <= 0:
        raise ConfigError(f"target.ms must be a positive latency, got {ms!r}")
    for key in ("height", "width"):
        if not isinstance(config["timing"].get(key), int) or config["timing"][key] < 1:
            raise ConfigError(f"timing.{key} must be a positive integer (the low-resolution input's size)")
    check_train_counts(config["train"])
    check_train_counts({**config["train"], "max_train_steps": config["search"].get("steps")})
    if check_paths:
        teacher_folder(config["teacher"])
        check_data(config["data"])
        if photos := (config.get("validation") or {}).get("photos"):
            try:
                photo_paths(photos)
            except FileNotFoundError as exc:
                raise ConfigError(f"validation.photos: {exc}") from exc


def target_ms(config: dict, speed) -> float:
    target = config["target"]
    return float(target["ms"]) if target.get("ms") is not None else target["fraction"] * speed.full


def pairs(batches, scale: int, device):
    from hyperhuman.sr.data import batch_pairs

    for batch in batches:
        low, high = batch_pairs(batch, scale)
        yield low.to(device), high.to(device)


def prune_sr(config: dict, resume: str | None = None) -> dict:
    from distill.sr_search import (
        SRSpeedModel,
        fill_to_target,
        fit_speed_model,
        kept_architecture,
        meet_target,
        remove,
        search,
    )
    from hyperhuman.lsdm.data import Batches
    from hyperhuman.sr.model import SuperResolutionNet

    check_config(config)
    output, seed = Path(config["output"]), config.get("seed", 0)
    train, timing, search_config, kd = config["train"], config["timing"], config["search"], config.get("kd") or {}
    started = time.perf_counter()
    teacher = SuperResolutionNet.from_pretrained(teacher_folder(config["teacher"])).eval()
    scale = teacher.config.scale
    input_shape = (1, 3, timing["height"], timing["width"])
    repeats = timing.get("repeats", 5)
    state = PartialState()
    speed_path, searched = output / SPEED_FILE, output / "search" / "sr"
    if state.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        if not speed_path.is_file():
            print(f"[prune sr] fitting the {config['target']['cost']} speed model at {input_shape[2:]} input ...")
            speed = fit_speed_model(teacher, input_shape, config["target"]["cost"], repeats=repeats)
            speed_path.write_text(json.dumps(speed.to_json(), indent=1))
        speed = SRSpeedModel.from_json(json.loads(speed_path.read_text()))
        if not (resume and (searched / "config.json").is_file()):
            net = SuperResolutionNet.from_pretrained(teacher_folder(config["teacher"]))
            batches = Batches(config["data"], train["batch_size"], seed, split_by_node=False)
            masks, log = search(
                net, teacher, pairs(batches, scale, "cpu"), speed, target_ms(config, speed), search_config["steps"],
                learning_rate=float(train.get("learning_rate", 1e-4)),
                mask_learning_rate=search_config.get("mask_learning_rate", 0.05),
                resource_weight=search_config.get("resource_weight", 5.0),
                output_weight=kd.get("output_weight", 1.0), min_channels=search_config.get("min_channels", 1),
                seed=seed,
            )  # fmt: skip
            forced = meet_target(masks, speed, target_ms(config, speed))
            restored = fill_to_target(masks, speed, target_ms(config, speed))
            met = speed.predict(kept_architecture(masks)) <= target_ms(config, speed)
            if not met:
                print(
                    f"[prune sr] WARNING: the target {target_ms(config, speed):.2f} ms is below what the network "
                    f"costs without any block ({speed.fixed:.2f} ms): every block is skipped; raise target."
                )
            remove(net, masks).save_pretrained(searched)
            (searched.parent / "search_report.json").write_text(json.dumps({
                "steps": len(log), "forced_channels": forced, "restored": restored,
                "architecture": kept_architecture(masks),
                "target_met": met,
                "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"],
            }, indent=1))  # fmt: skip
    state.wait_for_everyone()
    speed = SRSpeedModel.from_json(json.loads(speed_path.read_text()))
    search_report = json.loads((searched.parent / "search_report.json").read_text())
    finetune = finetune_sr(config, SuperResolutionNet.from_pretrained(searched), teacher, resume)
    if not state.is_main_process:
        return finetune
    pruned = SuperResolutionNet.from_pretrained(output / "sr").eval()
    report = measure(config, teacher, pruned, speed, timing)
    report.update(target_met=search_report["target_met"], search=search_report, finetune=finetune,
                  target_ms=target_ms(config, speed), wall_s=round(time.perf_counter() - started, 2))  # fmt: skip
    (output / "prune_report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def finetune_sr(config: dict, student, teacher, resume: str | None) -> dict:
    from hyperhuman.lsdm.data import Batches
    from hyperhuman.sr.data import batch_pairs

    output, train, kd = Path(config["output"]), config["train"], config.get("kd") or {}
    seed, scale = config.get("seed", 0), student.config.scale
    accelerator = make_accelerator(train, output)
    model, optimizer, lr_scheduler, ema = prepare_for_training(accelerator, student, train)
    teacher = teacher.to(accelerator.device).requires_grad_(False)
    state = restore(accelerator, output, resume, "prune")
    global_step, micro_step = state["global_step"], state["micro_step"]
    batches = Batches(config["data"], train["batch_size"], seed, **state["data"])
    losses, started = [], time.perf_counter()
    model.train()
    while global_step < train["max_train_steps"]:
        low, high = (tensor.to(accelerator.device) for tensor in batch_pairs(next(batches), scale))
        micro_step += 1
        with accelerator.accumulate(model):
            output_image = model(low)
            with torch.no_grad():
                reference = teacher(low)
            loss = kd.get("task_weight", 1.0) * F.l1_loss(output_image, high) + kd.get(
                "output_weight", 1.0
            ) * F.l1_loss(output_image, reference)
            optimizer_step(accelerator, model, optimizer, lr_scheduler, loss, train.get("max_grad_norm"))
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        if ema is not None:
            ema.step(model.parameters())
        losses.append(loss.item())
        if global_step % train.get("log_every", 10) == 0 or global_step == 1:
            accelerator.print(
                f"[prune sr] fine-tune step {global_step}/{train['max_train_steps']} loss {losses[-1]:.4f}"
            )
        if global_step % train["checkpointing_steps"] == 0:
            save_checkpoint(accelerator, output, global_step, micro_step, batches, train.get("checkpoints_total_limit"))
    accelerator.wait_for_everyone()
    report = {"steps": global_step, "wall_s": round(time.perf_counter() - started, 2)}
    report["weights_sha256_per_process"] = check_processes_agree(accelerator, accelerator.unwrap_model(model), "prune")
    if losses:
        report.update(first_loss=losses[0], last_loss=losses[-1])
    if accelerator.is_main_process:
        trained_copy(accelerator, model, ema).save_pretrained(output / "sr")
    accelerator.end_training()
    return report


def measure(config: dict, teacher, pruned, speed, timing: dict) -> dict:
    """Latency of both networks (measured side by side, and predicted), the speed model's held-out
    error, quality on the validation photos."""
    from distill.latency import measure_step
    from distill.sr_search import held_out_error
    from hyperhuman.sr.data import photo_paths
    from hyperhuman.sr.metrics import evaluate

    low = {"low_resolution": torch.rand(speed.input_shape)}
    repeats = timing.get("repeats", 5)
    measured = {name: measure_step(net, low, speed.runtime, 2, repeats) for name, net in
                (("teacher", teacher), ("pruned", pruned))}  # fmt: skip
    predicted = {"teacher": speed.predict(teacher.block_widths()), "pruned": speed.predict(pruned.block_widths())}
    held_out = held_out_error(speed, teacher, count=timing.get("held_out_networks", 3), repeats=repeats)
    report = {
        "runtime": speed.runtime,
        "input_shape": list(speed.input_shape),
        "architecture": {"teacher": teacher.block_widths(), "pruned": pruned.block_widths()},
        "skipped_blocks": list(pruned.config.skipped_blocks),
        "params": {
            name: sum(p.numel() for p in net.parameters()) for name, net in (("teacher", teacher), ("pruned", pruned))
        },  # fmt: skip
        "measured_ms": measured,
        "predicted_ms": predicted,
        "speedup": measured["teacher"] / measured["pruned"],
        "latency_error": {name: predicted[name] / measured[name] - 1 for name in measured},
        "speed_model": {
            **speed.to_json(),
            "held_out": held_out,
            "held_out_error_max": max(abs(row["error"]) for row in held_out),
        },  # fmt: skip
    }
    if photos := (config.get("validation") or {}).get("photos"):
        paths, side = photo_paths(photos), config["validation"].get("max_side")
        report["quality"] = {"teacher": evaluate(teacher, paths, side), "pruned": evaluate(pruned, paths, side)}
    return report
