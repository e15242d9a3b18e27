"""Calibration data for post-training quantization of a denoiser: its own inputs along its own
sampling trajectories (Q-Diffusion), not noised training images at one timestep.

A diffusion denoiser's activations change with the timestep: ranges fitted at one step clip or
waste levels at the others. Q-Diffusion calibrates on inputs drawn across the whole trajectory:
the fp32 model samples (DDIM, classifier-free guidance, so every call holds the unconditional and
the conditional half of its batch) from shard conditions (captions and poses), and the denoiser's
calls at evenly spaced steps are recorded. The comparison it is measured against, ``single``,
records the same number of calls all at one step.

    calibration = trajectory_calibration(pipeline, "runs/shards/train", num_samples=8)
    for args, kwargs in calibration.calls:
        prepared(*args, **kwargs)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MODES = ("spread", "single")


@dataclass
class Calibration:
    """Recorded denoiser calls ``(args, kwargs)`` and the sampling step index of each; with
    trajectories run to the end (``spread``), the VAE decoder's inputs too: each finished batch's
    latents of every branch, denormalised as the pipeline hands them to ``vae.decode``."""

    calls: list[tuple[tuple, dict]] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    mode: str = "spread"
    decoder_inputs: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.calls)

    @property
    def example(self) -> tuple[tuple, dict]:
        """One call: the inputs a program is exported with."""
        return self.calls[0]


class _Enough(Exception):
    """Raised by the recorder once a trajectory has given all it is asked for."""


def trajectory_calibration(
    pipeline,
    shards: str,
    num_samples: int = 8,
    steps: int = 20,
    timesteps: int = 4,
    guidance_scale: float = 3.0,
    mode: str = "spread",
    single_step: int | None = None,
    batch_size: int = 4,
    seed: int = 0,
) -> Calibration:
    """The denoiser's inputs for ``num_samples × timesteps`` guided samples of ``pipeline`` sampling
    ``steps`` DDIM steps from the conditions of ``shards``, as its calls (``batch_size`` samples,
    so ``2 × batch_size`` rows with the unconditional halves, a call).

    ``mode="spread"``: ``num_samples`` trajectories, each recorded at ``timesteps`` step indices
    evenly spaced over the trajectory, first and last step included. ``mode="single"``:
    ``num_samples × timesteps`` trajectories, each recorded at step ``single_step`` only (default:
    the middle), and cut there. Conditions cycle over the shards' first samples; every trajectory
    starts from its own seeded noise."""
    from distill.measure import HeldOut, initial_noise

    if mode not in MODES:
        raise ValueError(f"calibration mode={mode!r}; choose one of {MODES}")
    for name, value in (("num_samples", num_samples), ("steps", steps), ("timesteps", timesteps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"calibration {name}={value!r}; give a positive integer")
    if timesteps > steps:
        raise ValueError(f"calibration timesteps={timesteps} is more than the {steps} sampling steps")
    single_step = steps // 2 if single_step is None else single_step
    if not 0 <= single_step < steps:
        raise ValueError(f"calibration single_step={single_step}; give a step index in [0, {steps})")
    if mode == "spread":
        recorded = sorted({round(i * (steps - 1) / max(1, timesteps - 1)) for i in range(timesteps)})
        trajectories = num_samples
    else:
        recorded, trajectories = [single_step], num_samples * timesteps

    conditions = HeldOut.from_shards(shards, pipeline, num=min(trajectories, 64), seed=seed)
    names = list(pipeline.unet.config.branches)
    noise = initial_noise(conditions, pipeline.unet.config.latent_channels, trajectories, seed=seed + 1)
    calibration = Calibration(mode=mode)
    last = max(recorded)
    state = {"step": 0}

    def record(module, args, kwargs):
        step = state["step"]
        state["step"] += 1
        if step in recorded:
            calibration.calls.append((_detached(args), _detached(kwargs)))
            calibration.steps.append(step)
        if step == last and last < steps - 1:
            raise _Enough

    hook = pipeline.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for start in range(0, trajectories, batch_size):
            rows = range(start, min(start + batch_size, trajectories))
            state["step"] = 0
            try:
                final = pipeline(
                    [conditions.captions[i % len(conditions)] for i in rows],
                    pose=[conditions.poses[i % len(conditions)] for i in rows],
                    height=conditions.resolution,
                    width=conditions.resolution,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    latents=torch.cat([noise[name][rows.start : rows.stop] for name in names], dim=1),
                    generator=torch.Generator().manual_seed(seed),
                    output_type="latent",
                ).rgb  # with output_type="latent": every branch's latents, stacked along channels
            except _Enough:
                continue
            chunks = final.split(pipeline.unet.config.latent_channels, dim=1)
            for name, chunk in zip(names, chunks, strict=True):
                calibration.decoder_inputs.append(pipeline.unet.denormalize(name, chunk).detach().clone())
    finally:
        hook.remove()
    return calibration


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple | list):
        return type(value)(_detached(item) for item in value)
    if isinstance(value, dict):
        return {key: _detached(item) for key, item in value.items()}
    return value
