"""Training-recipe machinery shared by ``train-lsdm`` and ``train-sgr``: checkpoints that resume
exactly, per-step seeded randomness, image grids for validation.

A run folder keeps ``checkpoints/checkpoint-STEP/`` (accelerate state plus ``trainer_state.json``:
the step, the micro-step and the data stream's position), at most ``checkpoints_total_limit`` of
them, oldest removed first.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import PIL.Image
import torch

STATE_FILE = "trainer_state.json"


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
        raise ValueError(f"--resume {resume!r} is not a checkpoint folder (no {STATE_FILE}); use 'latest' or a path")
    return path


def prune_checkpoints(output: Path, limit: int | None) -> None:
    """Keep room for one more under ``limit`` (the oldest go first)."""
    if not limit:
        return
    existing = checkpoint_dirs(output)
    for old in existing[: max(0, len(existing) - limit + 1)]:
        shutil.rmtree(old)


def save_checkpoint(accelerator, output: Path, step: int, micro_step: int, batches, limit) -> Path:
    """accelerate's state plus where the step counter and the data stream (``batches.state()``) were."""
    prune_checkpoints(output, limit)
    path = output / "checkpoints" / f"checkpoint-{step}"
    accelerator.save_state(str(path))
    state = {"global_step": step, "micro_step": micro_step, "data": batches.state()}
    (path / STATE_FILE).write_text(json.dumps(state, indent=1))
    return path


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
