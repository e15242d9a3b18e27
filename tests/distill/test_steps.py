"""`hyperhuman distill steps` at toy size: the rounds of each mode, the distillation pair for the
LSDM and a plain UNet, the teacher-path bank, e2e training with checkpoints and exact resume (from
noised data and from teacher paths), progressive rounds with guidance folded in, the saved pipeline
sampling at its own step count, config errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from distill.ddim import ddim_step, student_grid
from distill.guidance import add_guidance_input, guidance_dim
from distill.step_models import load_teacher
from distill.steps import check_config, distill_steps, distillation_pair, guidance_scales, make_student, rounds
from distill.trajectories import TrajectoryBank, sample_paths, teacher_landing
from hyperhuman.config import ConfigError
from hyperhuman.eval.evaluate import run_eval
from hyperhuman.lsdm.data import Batches
from hyperhuman.lsdm.pipeline import HyperHumanPipeline, make_scheduler
from hyperhuman.lsdm.testing import tiny_unet
from tests.distill.conftest import teacher_lsdm


def config_for(
    output, teacher_run, shards, mode="direct", teacher_steps=4, student_steps=2, fold=False, source="data", **train
):
    steps = {"mode": mode, "teacher_steps": teacher_steps, "student_steps": student_steps, "source": source}
    return {
        "output": str(output),
        "seed": 0,
        "teacher": str(teacher_run),
        "steps": {**steps, "trajectories": 6, "trajectory_batch": 2},
        "guidance": {"fold": fold, "dim": 16, "scale_min": 2.0, "scale_max": 6.0, "cfg_prob": 0.5},
        "data": {"train": str(shards), "resolution": 16, "shuffle_buffer": 4, "num_workers": 0},
        "train": {
            "batch_size": 2,
            "max_train_steps": 6,
            "checkpointing_steps": 2,
            "checkpoints_total_limit": 2,
            "learning_rate": 1e-3,
            "ema": {"use": True, "decay": 0.9},
            "log_every": 100,
            **train,
        },
        "validation": {"every": 3, "num_samples": 2, "guidance_scale": 3.0},
    }


def test_rounds_halve_or_go_direct():
    assert rounds({"mode": "progressive", "teacher_steps": 32, "student_steps": 4}) == [(32, 16), (16, 8), (8, 4)]
    assert rounds({"mode": "direct", "teacher_steps": 48, "student_steps": 4}) == [(48, 4)]
    with pytest.raises(ConfigError, match="power of 2"):
        rounds({"mode": "progressive", "teacher_steps": 24, "student_steps": 4})
    with pytest.raises(ConfigError, match="divide it"):
        rounds({"mode": "direct", "teacher_steps": 10, "student_steps": 4})
    with pytest.raises(ConfigError, match="steps.mode"):
        rounds({"mode": "consistency", "teacher_steps": 8, "student_steps": 4})


@pytest.mark.parametrize("kind", ["unet", "lsdm"])
def test_one_teacher_step_per_student_step_makes_the_teachers_own_v_the_target(kind):
    teacher = (tiny_unet() if kind == "unet" else teacher_lsdm()).eval()
    channels = 4 if kind == "unet" else 12
    torch.manual_seed(0)
    conditions = {"encoder_hidden_states": torch.randn(2, 5, 32)}
    if kind == "lsdm":
        conditions["pose_latent"] = torch.randn(2, 4, 8, 8)
    unconditional = {**conditions, "encoder_hidden_states": torch.zeros(2, 5, 32)}
    clean, scheduler = torch.randn(2, channels, 8, 8), make_scheduler()
    student = add_guidance_input(teacher, 16).eval()
    with torch.no_grad():
        prediction, target = distillation_pair(
            student, teacher, scheduler, clean, conditions, unconditional, 4, 1, torch.ones(2), torch.Generator()
        )
    torch.testing.assert_close(target, prediction, rtol=1e-3, atol=1e-4)  # the student starts as the teacher
    with torch.no_grad():
        _, two_step_target = distillation_pair(
            student, teacher, scheduler, clean, conditions, unconditional, 4, 2, torch.ones(2), torch.Generator()
        )
    assert (two_step_target - target).abs().max() > 1e-3


def test_guidance_scales_mix_guided_and_plain_samples():
    generator = torch.Generator().manual_seed(0)
    scales = guidance_scales(1000, {"fold": True, "scale_min": 2.0, "scale_max": 14.0, "cfg_prob": 0.3}, generator)
    plain = scales == 1
    assert 0.6 < plain.float().mean() < 0.8 and scales[~plain].min() >= 2 and scales.max() <= 14
    assert torch.equal(guidance_scales(4, {"fold": False}, generator), torch.ones(4))


def test_a_student_records_its_steps_and_starts_as_its_teacher():
    teacher = teacher_lsdm().eval()
    student = make_student(teacher, 4, 16)
    assert student.config.distilled_steps == 4 and guidance_dim(student) == 16
    again = make_student(student, 2, 16)  # a later round keeps its input
    assert again.config.distilled_steps == 2 and guidance_dim(again) == 16
    assert all(torch.equal(again.state_dict()[k], v) for k, v in student.state_dict().items())


def test_a_teacher_path_bank_starts_at_pure_noise_and_its_targets_land_on_the_next_point(teacher_run, distill_shards):
    family = load_teacher(teacher_run)
    scheduler, guidance = family.pipeline.scheduler, {"fold": True, "scale_min": 2.0, "scale_max": 6.0, "cfg_prob": 1}
    data = {"train": str(distill_shards), "resolution": 16, "num_workers": 0}
    bank = sample_paths(family, scheduler, Batches(data, 2, 0), 3, 2, 2, lambda n, g: guidance_scales(n, guidance, g),
                        0.0, torch.Generator().manual_seed(0))  # fmt: skip
    assert bank.latents.shape == (3, 3, 12, 8, 8) and len(bank) == 3 and bank.student_steps == 2
    assert bank.scales.min() >= 2 and set(bank.conditions) >= {"encoder_hidden_states", "pose_latent"}
    assert 0.5 < bank.latents[:, 0].std() < 1.5  # sampling's start: pure noise (α_T = 0)

    # each recorded point is where the teacher's two guided DDIM steps from the one before land
    starts, ends = student_grid(scheduler, 2)
    empty_states, empty_mask = family.empty
    unconditional = {
        "encoder_hidden_states": empty_states.expand(3, -1, -1),
        "encoder_attention_mask": empty_mask.expand(3, -1),
        "pose_latent": bank.conditions["pose_latent"],
    }
    for k in range(2):
        landed = teacher_landing(family.unet, scheduler, bank.latents[:, k], starts[k].expand(3), ends[k].expand(3),
                                 2, bank.conditions, unconditional, bank.scales)  # fmt: skip
        torch.testing.assert_close(landed, bank.latents[:, k + 1], rtol=1e-4, atol=1e-5)

    # a student predicting the drawn target v lands on its path's next point in one DDIM step
    latents, start, conditions, scales, target = bank.draw(scheduler, 8, torch.Generator().manual_seed(1), "cpu")
    assert latents.shape == (8, 12, 8, 8) and conditions["pose_latent"].shape[0] == 8 and scales.shape == (8,)
    k = torch.tensor([starts.tolist().index(t) for t in start.tolist()])
    stepped = ddim_step(scheduler, latents, target, start, ends[k])
    for row, step in zip(stepped, k, strict=True):
        assert min((row - point).abs().max() for point in bank.latents[:, step + 1]) < 1e-4


def weights(folder):
    return load_file(folder / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("source", ["data", "trajectories"])
def test_direct_distillation_trains_checkpoints_and_resumes_exactly(teacher_run, distill_shards, tmp_path, source):
    output = tmp_path / "run"
    report = distill_steps(config_for(output, teacher_run, distill_shards, source=source))
    run = output / "rounds" / "steps-2"
    assert [r["steps"] for r in report["rounds"]] == [6] and report["student_steps"] == 2
    assert not report["guidance_folded"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert {p.name for p in (run / "validation").iterdir()} == {"teacher.png", "step-3.png", "step-6.png"}
    assert list((run / "logs").rglob("events.out.tfevents.*"))

    resumed = tmp_path / "resumed"
    checkpoints = resumed / "rounds" / "steps-2" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "checkpoint-4", checkpoints / "checkpoint-4")
    bank = run / "trajectories" / "part-0-of-1.pt"
    assert bank.is_file() == (source == "trajectories")
    if source == "trajectories":  # the interrupted round's paths are reused, not sampled again
        assert len(TrajectoryBank.load(bank)) == 6
        shutil.copytree(run / "trajectories", resumed / "rounds" / "steps-2" / "trajectories")
        kept = (resumed / "rounds" / "steps-2" / "trajectories" / bank.name).stat().st_mtime_ns
    again = distill_steps(config_for(resumed, teacher_run, distill_shards, source=source), resume="latest")
    if source == "trajectories":
        assert (resumed / "rounds" / "steps-2" / "trajectories" / bank.name).stat().st_mtime_ns == kept
    first = json.loads((run / "train_report.json").read_text())["losses"]
    assert json.loads((resumed / "rounds" / "steps-2" / "train_report.json").read_text())["losses"] == first[4:]
    assert again["rounds"][0]["last_loss"] == report["rounds"][0]["last_loss"]
    for name, value in weights(run / "checkpoints" / "checkpoint-6").items():
        assert torch.equal(value, weights(resumed / "rounds" / "steps-2" / "checkpoints" / "checkpoint-6")[name])
    original = load_file(output / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    replayed = load_file(resumed / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(original[name], replayed[name]) for name in original)  # the EMA weights


@pytest.mark.slow
def test_progressive_rounds_with_guidance_folded_in_make_a_one_evaluation_pipeline(
    teacher_run, distill_shards, tmp_path
):
    output = tmp_path / "run"
    config = config_for(output, teacher_run, distill_shards, "progressive", 4, 1, fold=True, max_train_steps=2)
    config["validation"]["every"] = 2
    report = distill_steps(config)
    assert [(r["teacher_steps"], r["student_steps"]) for r in report["rounds"]] == [(4, 2), (2, 1)]
    assert report["guidance_folded"] and (output / "rounds" / "steps-2" / "pipeline").is_dir()
    assert (output / "rounds" / "steps-1" / "validation" / "teacher.png").is_file()

    pipeline = HyperHumanPipeline.from_pretrained(output / "pipeline")  # loads like the teacher's
    pipeline.set_progress_bar_config(disable=True)
    teacher = HyperHumanPipeline.from_pretrained(teacher_run / "pipeline")
    assert pipeline.scheduler.config == teacher.scheduler.config
    assert pipeline.unet.config.distilled_steps == 1 and guidance_dim(pipeline.unet) == 16
    calls = []
    pipeline.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    pose = {"width": 16, "height": 16, "people": []}
    result = pipeline("a person", pose=pose, height=16, width=16, guidance_scale=4.0, output_type="np")
    assert result.rgb.shape == (1, 16, 16, 3) and calls == [1]  # one step, no unconditional half
    settings = {"num": 2, "batch_size": 2, "pose_resolution": 64}  # hyperhuman eval, no step count given
    evaluated = run_eval(str(output), str(distill_shards), str(tmp_path / "eval"), settings)
    assert evaluated["info"]["samples"] == 2 and evaluated["info"]["num_inference_steps"] == 1

    # --resume skips the finished rounds: nothing is retrained
    before = (output / "rounds" / "steps-1" / "train_report.json").stat().st_mtime_ns
    distill_steps(config, resume="latest")
    assert (output / "rounds" / "steps-1" / "train_report.json").stat().st_mtime_ns == before


def test_bad_configs_name_the_key(teacher_run, distill_shards, tmp_path):
    good = config_for(tmp_path / "run", teacher_run, distill_shards)
    check_config(good)
    cases = [
        ({"teacher": str(tmp_path / "nothing")}, "not a run folder"),
        ({"steps": {"mode": "direct", "teacher_steps": 4, "student_steps": 4}}, "smaller than"),
        ({"guidance": {"fold": "yes"}}, "guidance.fold"),
        ({"guidance": {"scale_min": 8.0, "scale_max": 2.0}}, "scale_min"),
        ({"guidance": {"cfg_prob": 1.5}}, "cfg_prob"),
        ({"steps": {"mode": "direct", "teacher_steps": 4, "student_steps": 2, "rounds": 3}}, "rounds"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_config({**good, **change})


@pytest.mark.slow
def test_a_stable_diffusion_teacher_distils_into_a_one_evaluation_stable_diffusion_pipeline(
    sd_teacher_run, distill_shards, tmp_path
):
    from diffusers import StableDiffusionPipeline

    output = tmp_path / "run"
    config = config_for(output, sd_teacher_run, distill_shards, "direct", 4, 2, fold=True, max_train_steps=4)
    report = distill_steps(config)
    assert report["guidance_folded"] and report["rounds"][0]["steps"] == 4
    assert {p.name for p in (output / "rounds" / "steps-2" / "validation").iterdir()} == {"teacher.png", "step-3.png"}

    pipeline = StableDiffusionPipeline.from_pretrained(output / "pipeline")  # an ordinary SD pipeline
    pipeline.set_progress_bar_config(disable=True)
    teacher = StableDiffusionPipeline.from_pretrained(sd_teacher_run)
    assert pipeline.scheduler.config == teacher.scheduler.config and guidance_dim(pipeline.unet) == 16
    trained = pipeline.unet.state_dict()
    assert any(not torch.equal(value, trained[name]) for name, value in teacher.unet.state_dict().items())
    calls = []
    pipeline.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    image = pipeline("a person", height=16, width=16, num_inference_steps=2, guidance_scale=4.0, output_type="np")
    assert image.images.shape == (1, 16, 16, 3) and calls == [1, 1]  # one evaluation a step, no unconditional half
