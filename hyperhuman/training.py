"""Training-recipe machinery shared by ``train-lsdm`` and ``train-sgr``: checkpoints that resume
exactly, per-step seeded randomness, image grids for validation.

A run folder keeps ``checkpoints/checkpoint-STEP/`` (accelerate state plus ``trainer_state.json``:
the step, the micro-step and every process's data-stream position), at most
``checkpoints_total_limit`` of them, oldest removed first.

Multi-process (``accelerate launch --num_processes N``): every process calls :func:`save_checkpoint`
(the data positions are gathered), the main process alone writes the checkpoint; each process reads
its own shards (``split_by_node``) and resumes at its own position. :func:`weights_digest` lets a
recipe check at the end that every process holds the same weights.

SpFDE (``train.efficiency``: sparse masks, progressive freezing, data sieving; :mod:`hyperhuman.efficiency`)
is an option of this machinery: :func:`make_efficiency` builds it (``None`` when off, and then every
function here behaves exactly as without it), :func:`prepare_for_training` puts its state (masks,
frozen units, FLOP ledger) into the checkpoints, :func:`data_stream` sieves the recipe's batches (the
sieve's pool and scores travel with each process's data position) and :func:`optimizer_step` runs its
hooks around the optimizer step. Recipes import that API from here, with the rest of the machinery.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import PIL.Image
import torch

from hyperhuman.config import ConfigError
from hyperhuman.efficiency import EFFICIENCY_KEYS, check_efficiency, efficiency_on, make_efficiency  # noqa: F401

STATE_FILE = "trainer_state.json"

# The keys the training recipes share (one vocabulary across train-vae, train-lsdm, train-sgr and
# the distillation recipes), for `hyperhuman.config.check_known_keys`: a key no recipe reads is
# refused at start. Each recipe adds its own; its shipped config documents them all (tested).
DATA_KEYS = dict.fromkeys(
    ["train", "resolution", "random_crop", "min_crop_scale", "flip_prob", "shuffle_buffer", "num_workers"]
)
TRAIN_KEYS = {
    **dict.fromkeys(
        [
            "batch_size",
            "gradient_accumulation_steps",
            "max_train_steps",
            "learning_rate",
            "adam_beta1",
            "adam_beta2",
            "adam_epsilon",
            "weight_decay",
            "lr_scheduler",
            "lr_warmup_steps",
            "max_grad_norm",
            "mixed_precision",
            "gradient_checkpointing",
            "checkpointing_steps",
            "checkpoints_total_limit",
            "log_every",
        ]
    ),  # fmt: skip
    "ema": {"use": None, "decay": None},
}
VALIDATION_KEYS = dict.fromkeys(["every", "num_samples", "num_inference_steps", "guidance_scale"])


def check_train_counts(train: dict) -> None:
    """The ``train:`` counts every recipe needs: positive integers, or a ConfigError naming the key."""
    for key in ("batch_size", "max_train_steps", "checkpointing_steps"):
        if not isinstance(train.get(key), int) or train[key] < 1:
            raise ConfigError(f"train.{key} must be a positive integer, got {train.get(key)!r}")


def check_shards(value, key: str, how_to_make: str) -> None:
    """``value`` names complete shards, or a ConfigError naming ``key`` and ``how_to_make`` them."""
    from shards.reader import expand_urls

    try:
        found = expand_urls(value) if value else []
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"{key}={value!r}: {exc}; {how_to_make}") from exc
    if not found:
        raise ConfigError(f"{key}={value!r} names no shards; {how_to_make}")


def checkpoint_dirs(output: Path) -> list[Path]:
    found = [p for p in (output / "checkpoints").glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def resolve_resume(output: Path, resume: str | None) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        found = [p for p in checkpoint_dirs(output) if (p / STATE_FILE).is_file()]
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"--resume {resume!r} is not a checkpoint folder (no {STATE_FILE}); use 'latest' or a path")
    return path


def prune_checkpoints(output: Path, limit: int | None) -> None:
    """Keep room for one more under ``limit`` (the oldest go first)."""
    if not limit:
        return
    existing = checkpoint_dirs(output)
    for old in existing[: max(0, len(existing) - limit + 1)]:
        shutil.rmtree(old)


def gather_from_processes(accelerator, value) -> list:
    """``[value of process 0, value of process 1, ...]``; every process must call it."""
    if accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def save_checkpoint(accelerator, output: Path, step: int, micro_step: int, batches, limit) -> Path:
    """accelerate's state plus where the step counter and every process's data stream
    (``batches.state()``) were. Call it on every process; the main process writes."""
    data_per_process = gather_from_processes(accelerator, batches.state())
    path = output / "checkpoints" / f"checkpoint-{step}"
    if accelerator.is_main_process:
        prune_checkpoints(output, limit)
        accelerator.save_state(str(path))
        state = {"global_step": step, "micro_step": micro_step, "data_per_process": data_per_process}
        (path / STATE_FILE).write_text(json.dumps(state, indent=1))
    return path


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes)."""
    hasher = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        hasher.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def check_processes_agree(accelerator, model: torch.nn.Module, command: str) -> list[str]:
    """Every process's :func:`weights_digest` of ``model``; a loud message when they differ (a
    data-parallel run whose replicas drifted apart). Call it on every process."""
    digests = gather_from_processes(accelerator, weights_digest(model))
    if len(set(digests)) > 1:
        accelerator.print(f"[{command}] WARNING: the processes ended with different weights: {digests}")
    return digests


def step_generator(seed: int, micro_step: int, process: int) -> torch.Generator:
    """The generator of every random draw of one micro-step: resuming at a step redraws the same."""
    return torch.Generator().manual_seed((seed * 1_000_003 + micro_step) * 1009 + process)


def image_grid(rows: list[list[PIL.Image.Image]]) -> PIL.Image.Image:
    width, height = rows[0][0].size
    grid = PIL.Image.new("RGB", (width * len(rows[0]), height * len(rows)))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB"), (c * width, r * height))
    return grid


def make_accelerator(train: dict, output: Path, find_unused_parameters: bool = False):
    """accelerate with the recipe's accumulation and precision, TensorBoard logs in ``OUTPUT/logs``.
    ``find_unused_parameters``: some parameters get no gradient in some steps (blocks skipped at
    random), which data-parallel training must be told."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    # Freezing takes parameters out of the backward mid-run; DDP must look for the unused ones.
    find_unused_parameters = find_unused_parameters or efficiency_on(train, "freezing")
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    return Accelerator(
        gradient_accumulation_steps=train.get("gradient_accumulation_steps", 1),
        mixed_precision=train.get("mixed_precision", "no"),
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "logs")),
        kwargs_handlers=handlers,
    )


def prepare_for_training(accelerator, model, train: dict, param_groups: list[dict] | None = None, efficiency=None):
    """AdamW and its LR schedule over ``model`` (or over ``param_groups``, torch's optimizer groups
    with their own options, e.g. a learning rate of their own), an EMA copy when ``train.ema.use``
    (registered so checkpoints hold it), all prepared by accelerate: ``(model, optimizer,
    lr_scheduler, ema)``. ``efficiency`` (:func:`make_efficiency`) is registered for the checkpoints
    too, after the EMA, and given the optimizer."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    optimizer = torch.optim.AdamW(
        model.parameters() if param_groups is None else param_groups,
        lr=float(train.get("learning_rate", 1e-5)),
        betas=(train.get("adam_beta1", 0.9), train.get("adam_beta2", 0.999)),
        weight_decay=float(train.get("weight_decay", 0.01)),
        eps=float(train.get("adam_epsilon", 1e-8)),
    )
    lr_scheduler = get_scheduler(
        train.get("lr_scheduler", "constant"),
        optimizer=optimizer,
        num_warmup_steps=train.get("lr_warmup_steps", 0) * accelerator.num_processes,
        num_training_steps=train["max_train_steps"] * accelerator.num_processes,
    )
    ema = None
    if train.get("ema", {}).get("use", False):
        ema = EMAModel(
            model.parameters(),
            decay=train["ema"].get("decay", 0.9999),
            model_cls=type(model),
            model_config=model.config,
        )
        accelerator.register_for_checkpointing(ema)
    if efficiency is not None:
        accelerator.register_for_checkpointing(efficiency)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
    if efficiency is not None:
        efficiency.attach(accelerator, optimizer)
    return model, optimizer, lr_scheduler, ema


def trained_copy(accelerator, model, ema, efficiency=None) -> torch.nn.Module:
    """A copy of the prepared ``model`` as trained (its EMA weights when EMA is on, pruned by the
    sparse masks when ``efficiency`` has them), in eval mode: what a recipe saves or validates with,
    leaving the training copy untouched."""
    unwrapped = accelerator.unwrap_model(model)
    final = type(unwrapped).from_config(unwrapped.config)
    final.load_state_dict(unwrapped.state_dict())
    if ema is not None:
        ema.copy_to(final.parameters())
    if efficiency is not None:
        efficiency.apply_masks(final)
    return final.to(unwrapped.device).eval()


def restore(accelerator, output: Path, resume: str | None, command: str) -> dict:
    """Load the checkpoint ``resume`` names (``latest`` or a path) into the prepared objects; returns
    ``global_step``, ``micro_step`` and the data stream's position (zeros for a fresh run)."""
    checkpoint = resolve_resume(output, resume)
    if checkpoint is None:
        if resume and resume != "latest":
            raise ConfigError(f"--resume {resume!r} not found")
        return {"global_step": 0, "micro_step": 0, "data": {"epoch": 0, "batches_in_epoch": 0}}
    accelerator.load_state(str(checkpoint))
    state = json.loads((checkpoint / STATE_FILE).read_text())
    positions = state.pop("data_per_process", None) or [state.get("data")]
    sieves = [p.pop("sieve", None) if isinstance(p, dict) else None for p in positions]  # a sieving run's part
    if len(positions) == accelerator.num_processes:
        state["data"], state["sieve"] = positions[accelerator.process_index], sieves[accelerator.process_index]
    else:  # another process count splits the shards differently: the stream cannot continue exactly
        state["data"], state["sieve"] = positions[0], sieves[0]
        accelerator.print(
            f"[{command}] WARNING: {checkpoint} was written by {len(positions)} process(es), this run has "
            f"{accelerator.num_processes}: each process continues at process 0's data position, not exactly"
        )
    accelerator.print(f"[{command}] resumed from {checkpoint} at step {state['global_step']}")
    return state


def data_stream(make_stream, state: dict, efficiency=None):
    """The recipe's batch stream at the restored position: ``make_stream(state["data"])``, or with
    sieving on, that stream wrapped in the sieve (which may rebuild it at an earlier position to
    replay the samples it had waiting; ``make_stream`` takes any position the stream's ``state()``
    gave)."""
    if efficiency is None:
        return make_stream(state["data"])
    return efficiency.data_stream(make_stream, state)


def optimizer_step(
    accelerator, model, optimizer, lr_scheduler, loss, max_grad_norm: float | None, efficiency=None
) -> None:
    """Backward, clip on the synchronising micro-step, step the optimizer and the LR schedule;
    ``efficiency``'s hooks mask the gradients before the clipping and the weights after the step."""
    accelerator.backward(loss)
    if efficiency is not None:
        efficiency.before_optimizer_step(accelerator)
    if accelerator.sync_gradients and max_grad_norm:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    if efficiency is not None:
        efficiency.after_optimizer_step(accelerator)
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
