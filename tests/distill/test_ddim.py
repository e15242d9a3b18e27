"""Step distillation's arithmetic: DDIM as the scheduler steps it, the student's grid, the
progressive target (one student step lands where the teacher's steps landed, the t = T endpoint
included), and the guidance input folded into a student."""

import pytest
import torch

from distill.ddim import (
    alpha_sigma,
    ddim_step,
    distillation_target,
    noised,
    predicted_clean,
    student_grid,
    teacher_path,
)
from distill.guidance import add_guidance_input, guidance_dim, guidance_embedding, guided_v
from hyperhuman.lsdm.model import LatentStructuralUNet
from hyperhuman.lsdm.pipeline import make_scheduler
from hyperhuman.lsdm.testing import IDENTITY_NORM, tiny_unet


def toy_teacher(latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear v-predictor: enough to make two steps differ from one."""
    t = timesteps.float().reshape(-1, 1, 1, 1) / 1000
    return torch.tanh(latents * (1 + t)) - 0.3 * t * latents.flip(-1)


def teacher_steps(scheduler, latents, path):
    for start, end in zip(path[:-1], path[1:], strict=True):
        latents = ddim_step(scheduler, latents, toy_teacher(latents, start), start, end)
    return latents


@pytest.mark.parametrize("steps", [4, 16])
def test_ddim_step_is_what_the_scheduler_steps(steps):
    scheduler = make_scheduler()
    starts, ends = student_grid(scheduler, steps)
    assert starts.tolist() == scheduler.timesteps.tolist() and ends[-1] == -1
    torch.manual_seed(0)
    latents = torch.randn(2, 12, 8, 8)
    for start, end in zip(starts, ends, strict=True):
        v = toy_teacher(latents, start)
        expected = scheduler.step(v, start, latents).prev_sample
        ours = ddim_step(scheduler, latents, v, start.expand(2), end.expand(2))
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        latents = expected


def test_zero_terminal_snr_starts_from_pure_noise():
    scheduler = make_scheduler()
    alpha, sigma = alpha_sigma(scheduler, torch.tensor([999, -1]))
    assert alpha[0] == 0 and sigma[0] == 1
    assert alpha[1] ** 2 == pytest.approx(float(scheduler.final_alpha_cumprod))
    clean, noise = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(noised(scheduler, clean, noise, torch.tensor([999])), noise)


def test_teacher_path_splits_each_student_step_evenly():
    path = teacher_path(torch.tensor([999, 249]), torch.tensor([749, -1]), 2)
    assert path.tolist() == [[999, 249], [874, 124], [749, -1]]
    assert teacher_path(torch.tensor([999]), torch.tensor([499]), 4)[:, 0].tolist() == [999, 874, 749, 624, 499]


@pytest.mark.parametrize("substeps", [2, 4])
def test_a_student_predicting_the_target_lands_where_the_teacher_landed_in_one_step(substeps):
    scheduler = make_scheduler()
    starts, ends = student_grid(scheduler, 4)  # 999 → 749 (α_T = 0) … 249 → -1 (the grid's end)
    torch.manual_seed(0)
    clean, noise = torch.randn(4, 12, 8, 8), torch.randn(4, 12, 8, 8)
    latents = noised(scheduler, clean, noise, starts)
    path = teacher_path(starts, ends, substeps)
    landed = teacher_steps(scheduler, latents, path)
    target = distillation_target(scheduler, latents, starts, landed, ends)
    assert torch.isfinite(target).all()
    one_step = ddim_step(scheduler, latents, target, starts, ends)
    torch.testing.assert_close(one_step, landed, rtol=1e-4, atol=1e-4)
    # and the teacher's own single step does not: two steps are not one
    assert (ddim_step(scheduler, latents, toy_teacher(latents, starts), starts, ends) - landed).abs().max() > 1e-2
    # at t = T (α = 0, σ = 1) the target in x is −v, nothing divided by α_t
    torch.testing.assert_close(predicted_clean(scheduler, latents[:1], target[:1], starts[:1]), -target[:1])


def test_guidance_embedding_is_lcms_embedding_of_w_minus_one():
    from diffusers import LatentConsistencyModelPipeline

    scales = torch.tensor([1.0, 2.5, 7.5, 14.0])
    expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, scales - 1, embedding_dim=32)
    torch.testing.assert_close(guidance_embedding(scales, 32), expected)
    assert guidance_embedding(scales, 33).shape == (4, 33)


def models():
    unet = tiny_unet().eval()
    lsdm = LatentStructuralUNet.from_unet(tiny_unet(), latent_norm=dict(IDENTITY_NORM)).eval()
    return unet, lsdm


def inputs_of(model, batch=2):
    torch.manual_seed(1)
    channels = 12 if isinstance(model, LatentStructuralUNet) else 4
    conditions = {"encoder_hidden_states": torch.randn(batch, 5, 32)}
    unconditional = {"encoder_hidden_states": torch.zeros(batch, 5, 32)}
    if isinstance(model, LatentStructuralUNet):
        conditions["pose_latent"] = unconditional["pose_latent"] = torch.randn(batch, 4, 8, 8)
    return torch.randn(batch, channels, 8, 8), torch.tensor([999, 499]), conditions, unconditional


@pytest.mark.parametrize("kind", [0, 1], ids=["unet", "lsdm"])
def test_a_student_with_a_guidance_input_starts_as_its_teacher(kind):
    teacher = models()[kind]
    student = add_guidance_input(teacher, dim=16).eval()
    assert guidance_dim(teacher) is None and guidance_dim(student) == 16
    latents, timesteps, conditions, unconditional = inputs_of(teacher)
    with torch.no_grad():
        plain = teacher(latents, timesteps, **conditions).sample
        for scale in (1.0, 7.5):
            folded = guided_v(student, latents, timesteps, conditions, unconditional, torch.full((2,), scale))
            torch.testing.assert_close(folded, plain)
        torch.nn.init.normal_(student.get_submodule(time_embedding_of(student)).cond_proj.weight)
        low = guided_v(student, latents, timesteps, conditions, unconditional, torch.full((2,), 1.0))
        high = guided_v(student, latents, timesteps, conditions, unconditional, torch.full((2,), 7.5))
    assert (low - high).abs().max() > 1e-3  # the scale reaches the output
    with pytest.raises(ValueError, match="already has a guidance input"):
        add_guidance_input(student)


def time_embedding_of(model):
    return "trunk.time_embedding" if isinstance(model, LatentStructuralUNet) else "time_embedding"


def test_the_lsdm_refuses_a_guidance_input_it_cannot_read():
    lsdm = models()[1]
    latents, timesteps, conditions, _ = inputs_of(lsdm)
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        lsdm(latents, timesteps, **conditions, timestep_cond=torch.zeros(2, 16))


@pytest.mark.parametrize("kind", [0, 1], ids=["unet", "lsdm"])
def test_guided_v_is_classifier_free_guidance_for_a_teacher_without_the_input(kind):
    teacher = models()[kind]
    latents, timesteps, conditions, unconditional = inputs_of(teacher)
    calls = []
    teacher.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    scale = torch.tensor([1.0, 5.0])
    with torch.no_grad():
        guided = guided_v(teacher, latents, timesteps, conditions, unconditional, scale)
        cond = teacher(latents, timesteps, **conditions).sample
        uncond = teacher(latents, timesteps, **unconditional).sample
    torch.testing.assert_close(guided, uncond + scale.reshape(-1, 1, 1, 1) * (cond - uncond), rtol=1e-4, atol=1e-5)
    assert calls[0] == 4  # the conditional and the unconditional half in one batch
    calls.clear()
    with torch.no_grad():
        guided_v(teacher, latents, timesteps, conditions, unconditional, torch.ones(2))
    assert calls == [2]  # no guidance: the conditional pass alone
