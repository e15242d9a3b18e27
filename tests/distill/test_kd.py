"""`hyperhuman distill unet` at toy size: KD training of BK-SDM and edited students from a teacher
run folder, checkpoints, exact resume, robust training, the saved pipeline, config errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from distill.kd import check_config, distill_unet, feature_loss
from hyperhuman.config import ConfigError
from hyperhuman.eval.evaluate import run_eval
from hyperhuman.lsdm.pipeline import HyperHumanPipeline


def config_for(output, teacher_run, shards, student="bk-small", **train):
    return {
        "output": str(output),
        "seed": 0,
        "teacher": str(teacher_run),
        "student": student,
        "data": {"train": str(shards), "resolution": 16, "shuffle_buffer": 4, "num_workers": 0},
        "kd": {"task_weight": 1.0, "output_weight": 1.0, "feature_weight": 1.0},
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
        "validation": {"every": 3, "num_samples": 2, "num_inference_steps": 2},
    }


def weights(folder):
    return load_file(folder / "model.safetensors")


@pytest.mark.slow
def test_kd_trains_a_bk_student_checkpoints_and_resumes_exactly(teacher_run, distill_shards, tmp_path):
    output = tmp_path / "run"
    config = config_for(output, teacher_run, distill_shards)
    config["validation"].update(heldout=str(distill_shards), heldout_num=2)
    report = distill_unet(config)
    assert report["steps"] == 6 and len(report["losses"]) == 6
    assert all(len(values) == 6 for values in report["terms"].values())
    assert report["params"]["student"] < report["params"]["teacher"]
    assert ["trunk.mid_block", "trunk.mid_block"] not in report["feature_pairs"]  # bk-small has none
    assert [entry["step"] for entry in report["heldout"]] == [3, 6] and report["heldout_teacher"] > 0
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert {p.name for p in (output / "validation").iterdir()} == {"teacher.png", "step-3.png", "step-6.png"}
    assert list((output / "logs").rglob("events.out.tfevents.*"))

    pipeline = HyperHumanPipeline.from_pretrained(output / "pipeline")  # loads like the teacher's
    assert pipeline.unet.trunk.mid_block is None
    teacher = HyperHumanPipeline.from_pretrained(teacher_run / "pipeline")
    assert pipeline.scheduler.config == teacher.scheduler.config
    assert pipeline.unet.config.latent_norm == teacher.unet.config.latent_norm
    pose = {"width": 16, "height": 16, "people": []}
    result = pipeline("a person", pose=pose, height=16, width=16, num_inference_steps=2, output_type="np")
    assert result.rgb.shape == (1, 16, 16, 3)
    settings = {"num": 2, "num_inference_steps": 2, "batch_size": 2, "pose_resolution": 64}
    evaluated = run_eval(str(output), str(distill_shards), str(tmp_path / "eval"), settings)  # hyperhuman eval
    assert evaluated["info"]["samples"] == 2

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(output / "checkpoints" / "checkpoint-4", resumed / "checkpoints" / "checkpoint-4")
    again = distill_unet(config_for(resumed, teacher_run, distill_shards), resume="latest")
    assert again["losses"] == report["losses"][4:]
    for name, value in weights(output / "checkpoints" / "checkpoint-6").items():
        assert torch.equal(value, weights(resumed / "checkpoints" / "checkpoint-6")[name]), name
    original = load_file(output / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    replayed = load_file(resumed / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(original[name], replayed[name]) for name in original)  # the EMA weights


@pytest.mark.slow
def test_robust_training_bypasses_parts_at_random_and_an_edited_student_trains(teacher_run, distill_shards, tmp_path):
    config = config_for(tmp_path / "robust", teacher_run, distill_shards, student="teacher", max_train_steps=3)
    config["kd"]["skip_prob"] = 0.5
    config["validation"] = {}
    report = distill_unet(config)
    assert report["params"]["student"] == report["params"]["teacher"]
    assert sum(report["skipped"]) > 0 and all(torch.isfinite(torch.tensor(report["losses"])))

    evolved = tmp_path / "evolve.json"
    removed = ["branch.rgb.down_blocks.0.attentions.1", "trunk.up_blocks.1.attentions.2"]
    evolved.write_text(json.dumps({"student": {"remove": removed}}))
    config = config_for(tmp_path / "edited", teacher_run, distill_shards, student=str(evolved))
    config["student_init"] = str(tmp_path / "robust")  # the weights the edits were chosen on
    config["train"].update(max_train_steps=1, learning_rate=0.0, ema={"use": False})
    config["validation"] = {}
    distill_unet(config)
    unet = HyperHumanPipeline.from_pretrained(tmp_path / "edited" / "pipeline").unet
    robust = HyperHumanPipeline.from_pretrained(tmp_path / "robust" / "pipeline").unet.state_dict()
    assert unet.config.removed_parts == removed
    assert all(torch.equal(value, robust[key]) for key, value in unet.state_dict().items())  # kept from the robust run


def test_the_feature_term_is_normalised_per_layer_by_the_teacher_scale():
    generator = torch.Generator().manual_seed(0)
    teacher = {
        "small": torch.randn(2, 4, 8, 8, generator=generator),
        "large": torch.randn(2, 4, 4, 4, generator=generator),
    }
    student = {name: value + 0.1 * torch.randn(value.shape, generator=generator) for name, value in teacher.items()}
    pairs = [("small", "small"), ("large", "large")]
    base = feature_loss(student, teacher, pairs, "teacher")
    scaled_teacher = {"small": teacher["small"], "large": 1000 * teacher["large"]}
    scaled_student = {"small": student["small"], "large": 1000 * student["large"]}
    assert torch.isclose(feature_loss(scaled_student, scaled_teacher, pairs, "teacher"), base, rtol=1e-4)
    assert feature_loss(scaled_student, scaled_teacher, pairs, "none") > 1e4 * feature_loss(
        student, teacher, pairs, "none"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(teacher=None), r"lacks 'teacher'.*--set teacher="),
        (lambda c: c.update(teacher="/nonexistent/run"), "not a run folder with pipeline/"),
        (lambda c: c.update(student="bk-huge"), "student='bk-huge': one of teacher, bk-base"),
        (lambda c: c["kd"].update(skip_prob=1.5), r"kd.skip_prob must be in \[0, 1\)"),
        (lambda c: c["kd"].update(feature_norm="batch"), "kd.feature_norm must be one of"),
        (lambda c: c["kd"].update(feature_wieght=1.0), "unknown config key 'kd.feature_wieght'"),
        (lambda c: c["train"].update(max_train_steps=0), "train.max_train_steps must be a positive integer"),
    ],
)
def test_bad_configs_fail_at_start_naming_the_key(change, message, teacher_run, distill_shards, tmp_path):
    config = config_for(tmp_path / "run", teacher_run, distill_shards)
    change(config)
    with pytest.raises(ConfigError, match=message):
        check_config(config)
    assert not (tmp_path / "run").exists()
