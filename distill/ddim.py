"""DDIM on the teacher's noise schedule, as step distillation needs it: α/σ at any timestep, one
deterministic step, the student's grid, and the progressive-distillation target.

A latent at timestep ``t`` is ``z_t = α_t·x + σ_t·ε`` with ``α_t = √ᾱ_t``, ``σ_t = √(1 − ᾱ_t)``; the
models predict ``v = α_t·ε − σ_t·x``, so ``x̂ = α_t·z_t − σ_t·v`` and ``ε̂ = σ_t·z_t + α_t·v``, and a
DDIM step (η = 0) to ``s`` is ``z_s = α_s·x̂ + σ_s·ε̂`` — what ``DDIMScheduler.step`` computes for a
v-prediction model (checked by the tests). Timestep ``-1`` is the end of the trailing grid: the
scheduler's ``final_alpha_cumprod`` (ᾱ_0 with ``set_alpha_to_one=False``).

**The student's grid** is what the pipeline will run: ``scheduler.set_timesteps(K)`` and, from each
``t``, DDIM's ``t − num_train_timesteps // K``. **The teacher's path** over one student step
``t → s`` is ``r`` DDIM steps through ``r − 1`` points evenly spaced between them (``r`` = 2 for a
progressive round, ``N / K`` for direct distillation), so the student is trained on exactly the
transitions it will take.

**The target** (Salimans & Ho 2022): the ``x̃`` that makes one DDIM step from ``z_t`` land on the
teacher's ``z_s``,

    x̃ = (z_s − (σ_s/σ_t)·z_t) / (α_s − (σ_s/σ_t)·α_t),   as v:  ṽ = (α_t·z_t − x̃) / σ_t,

and the loss is the MSE on v (Salimans' "SNR + 1" weighting on x). With zero terminal SNR the first
step starts at ``α_T = 0``, ``σ_T = 1``: ``z_T`` is pure noise, the denominator is ``α_s`` and
``ṽ = −x̃``, so nothing divides by ``α_t``; σ_t > 0 at every timestep of the schedule.
"""

from __future__ import annotations

import torch


def alpha_sigma(scheduler, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(α_t, σ_t)`` per timestep (float64 for the arithmetic; ``-1`` is the grid's end)."""
    timesteps = torch.as_tensor(timesteps)
    cumprod = scheduler.alphas_cumprod.to(torch.float64)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    alpha_bar = torch.where(timesteps >= 0, cumprod[timesteps.clamp_min(0).cpu()].to(timesteps.device), final)
    return alpha_bar.sqrt(), (1 - alpha_bar).clamp_min(0).sqrt()


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    value = value.reshape(-1, *([1] * (like.ndim - 1))) if value.ndim else value
    return value.to(like.device, like.dtype)


def noised(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``z_t = α_t·x + σ_t·ε``."""
    alpha, sigma = alpha_sigma(scheduler, timesteps)
    return _per_sample(alpha, clean) * clean + _per_sample(sigma, clean) * noise


def predicted_clean(scheduler, latents: torch.Tensor, v: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    alpha, sigma = alpha_sigma(scheduler, timesteps)
    return _per_sample(alpha, latents) * latents - _per_sample(sigma, latents) * v


def ddim_step(
    scheduler, latents: torch.Tensor, v: torch.Tensor, timesteps: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """One deterministic DDIM step of a v-prediction from ``timesteps`` to ``targets`` (per sample)."""
    alpha_t, sigma_t = (_per_sample(value, latents) for value in alpha_sigma(scheduler, timesteps))
    alpha_s, sigma_s = (_per_sample(value, latents) for value in alpha_sigma(scheduler, targets))
    clean = alpha_t * latents - sigma_t * v
    noise = sigma_t * latents + alpha_t * v
    return alpha_s * clean + sigma_s * noise


def student_grid(scheduler, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(from, to)`` timesteps of the ``steps`` DDIM steps the pipeline takes (``to`` ends at -1)."""
    scheduler.set_timesteps(steps)
    starts = scheduler.timesteps.clone().long()
    ends = starts - scheduler.config.num_train_timesteps // steps
    return starts, ends.clamp_min(-1)


def teacher_path(starts: torch.Tensor, ends: torch.Tensor, substeps: int) -> torch.Tensor:
    """``(substeps + 1, B)`` timesteps from ``starts`` to ``ends``, evenly spaced (rounded)."""
    fractions = torch.linspace(0, 1, substeps + 1, dtype=torch.float64)[:, None]
    path = starts.double()[None] + fractions * (ends.double() - starts.double())[None]
    path = path.round().long()
    path[0], path[-1] = starts, ends
    return path


def distillation_target(
    scheduler, latents: torch.Tensor, timesteps: torch.Tensor, teacher_latents: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """ṽ: the v whose single DDIM step from ``latents`` at ``timesteps`` lands on ``teacher_latents``
    at ``targets`` (see the module docstring)."""
    alpha_t, sigma_t = (_per_sample(value, latents) for value in alpha_sigma(scheduler, timesteps))
    alpha_s, sigma_s = (_per_sample(value, latents) for value in alpha_sigma(scheduler, targets))
    ratio = sigma_s / sigma_t
    clean = (teacher_latents - ratio * latents) / (alpha_s - ratio * alpha_t)
    return (alpha_t * latents - clean) / sigma_t
