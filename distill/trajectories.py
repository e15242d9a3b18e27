"""The teacher's own sampling paths as step-distillation data (``steps.source: trajectories``).

With targets computed online (``steps.source: data``), every training step noises a shard latent to
a student timestep and runs the frozen teacher ``N / K`` guided DDIM steps from there: on a direct
32 → 4 round that is 70% of the step's time, paid again for every sample the student sees. And the
states the student learns from are forward-noised *data*, not where sampling takes it: a teacher
that models its training photos imperfectly samples somewhere else, and from the first step on the
student meets the teacher's states, not the data's.

A trajectory bank samples the round's teacher once, from pure noise as the pipeline does, along the
whole ``N``-step path (the student's ``K`` grid split into ``N / K`` teacher steps each, exactly
the path :func:`distill.steps.distillation_pair` takes), on shard conditions with guidance scales
drawn as the CFG-aware mix, and keeps the latents at the student's grid points. A training sample
is then a (path, student step) pair and its target is the v between two recorded points
(:func:`distill.ddim.distillation_target`): no teacher call while training, and the states are the
ones sampling visits (the first exactly: the same pure noise). A student without guidance folded in
learns unguided paths (w = 1), conditional and, for a share of them, with the text dropped, the two
predictions classifier-free guidance combines at sampling time.

Each process samples ``ceil(count / processes)`` paths from its own data stream and writes them
to the round's ``trajectories/``; every process then trains on all of them. A resumed round
reloads the files instead of sampling again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distill.ddim import ddim_step, distillation_target, student_grid, teacher_path
from distill.guidance import guided_v


def teacher_landing(teacher, scheduler, latents, starts, ends, substeps: int, conditions, unconditional, scales):
    """Where the teacher's ``substeps`` guided DDIM steps from ``latents`` at ``starts`` land at ``ends``."""
    with torch.no_grad():
        path = teacher_path(starts, ends, substeps)
        for here, there in zip(path[:-1], path[1:], strict=True):
            v = guided_v(teacher, latents, here, conditions, unconditional, scales)
            latents = ddim_step(scheduler, latents, v.to(latents.dtype), here, there)
    return latents


@dataclass
class TrajectoryBank:
    """``latents[i, k]``: path ``i`` at the ``k``-th point of the student's grid (``k = 0``: the
    initial noise, ``k = K``: the sample); ``scales[i]``: the guidance it was sampled at;
    ``conditions[name][i]``: the model inputs it was sampled with."""

    latents: torch.Tensor
    scales: torch.Tensor
    conditions: dict[str, torch.Tensor]
    _grid: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def student_steps(self) -> int:
        return self.latents.shape[1] - 1

    def draw(self, scheduler, batch_size: int, generator: torch.Generator, device) -> tuple:
        """``(latents, timesteps, conditions, scales, target v)`` of ``batch_size`` random
        (path, student step) pairs: the student's input at ``timesteps`` and the v whose one DDIM
        step lands on the path's next grid point."""
        if self._grid is None:  # set_timesteps once, not on every training step
            self._grid = student_grid(scheduler, self.student_steps)
        starts, ends = self._grid
        paths = torch.randint(len(self), (batch_size,), generator=generator)
        steps = torch.randint(self.student_steps, (batch_size,), generator=generator)
        latents = self.latents[paths, steps].to(device)
        landed = self.latents[paths, steps + 1].to(device)
        start, end = starts[steps].to(device), ends[steps].to(device)
        target = distillation_target(scheduler, latents, start, landed, end)
        conditions = {name: value[paths].to(device) for name, value in self.conditions.items()}
        return latents, start, conditions, self.scales[paths].to(device), target

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")  # a crash mid-write leaves no half file behind
        torch.save({"latents": self.latents, "scales": self.scales, "conditions": self.conditions}, partial)
        partial.replace(path)

    @classmethod
    def load(cls, path: Path) -> TrajectoryBank:
        return cls(**torch.load(path, map_location="cpu", weights_only=True))

    @classmethod
    def concatenate(cls, banks: list[TrajectoryBank]) -> TrajectoryBank:
        return cls(
            latents=torch.cat([bank.latents for bank in banks]),
            scales=torch.cat([bank.scales for bank in banks]),
            conditions={name: torch.cat([bank.conditions[name] for bank in banks]) for name in banks[0].conditions},
        )


def sample_paths(
    family, scheduler, batches, count: int, student_steps: int, substeps: int, draw_scales, text_dropout, generator
):
    """``count`` teacher paths, ``batches``' batch size at a time: conditions from the next shard
    batch (``family.inputs``, the text dropped for a share ``text_dropout``), scales from
    ``draw_scales(n, generator)``, pure noise to start."""
    from distill.step_models import LatentCache

    starts, ends = student_grid(scheduler, student_steps)
    cache, parts = LatentCache(False), []
    while sum(len(part) for part in parts) < count:
        clean, conditions, unconditional = family.inputs(next(batches), cache, text_dropout, generator)
        scales = draw_scales(clean.shape[0], generator)
        latents = torch.randn(clean.shape, generator=generator).to(clean.device, clean.dtype)
        points = [latents]
        for start, end in zip(starts, ends, strict=True):
            rows = clean.shape[0]
            at = start.expand(rows).to(clean.device), end.expand(rows).to(clean.device)
            points.append(teacher_landing(family.unet, scheduler, points[-1], *at, substeps, conditions,
                                          unconditional, scales))  # fmt: skip
        parts.append(TrajectoryBank(torch.stack(points, dim=1).cpu(), scales.cpu(), _cpu(conditions)))
    bank = TrajectoryBank.concatenate(parts)
    return TrajectoryBank(bank.latents[:count], bank.scales[:count], {k: v[:count] for k, v in bank.conditions.items()})


def _cpu(conditions: dict) -> dict[str, torch.Tensor]:
    return {name: value.detach().cpu() for name, value in conditions.items() if value is not None}


def trajectory_bank(accelerator, folder: Path, count: int, sample, log=print) -> TrajectoryBank:
    """The round's bank: this process's share (``sample(n)``, or its file from an earlier try), then
    every process's, in process order."""
    processes, rank = accelerator.num_processes, accelerator.process_index
    share = math.ceil(count / processes)
    files = [folder / f"part-{index}-of-{processes}.pt" for index in range(processes)]
    if not files[rank].is_file():
        log(f"sampling {share} teacher paths ...")
        sample(share).save(files[rank])
    accelerator.wait_for_everyone()
    return TrajectoryBank.concatenate([TrajectoryBank.load(file) for file in files])
