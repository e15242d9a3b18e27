"""`hyperhuman prune` at toy size: search → removal → KD fine-tune on an LSDM (MACs target) with
exact resume of either phase, a Stable Diffusion teacher at a latency target, the pruned pipelines
loading as their teacher's kind, the forced drops that meet a target, and config errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from distill.pas import insert_masks
from distill.prune import check_config, meet_target, prune, start_from
from distill.width_cost import fit_cost
from hyperhuman.config import ConfigError
from hyperhuman.lsdm.pipeline import HyperHumanPipeline
from hyperhuman.unet_widths import group_size, prunable, shrink_to_widths, widths

from .conftest import teacher_unet
from .test_pas import inputs_for


def config_for(output, teacher_run, shards, cost="macs", fraction=0.6, search_steps=4, **train):
    return {
        "output": str(output),
        "seed": 0,
        "teacher": str(teacher_run),
        "target": {"cost": cost, "fraction": fraction},
        "search": {"steps": search_steps, "mask_learning_rate": 0.2, "resource_weight": 5.0},
        "data": {"train": str(shards), "resolution": 16, "shuffle_buffer": 4, "num_workers": 0},
        "train": {
            "batch_size": 2,
            "max_train_steps": 4,
            "checkpointing_steps": 2,
            "checkpoints_total_limit": 2,
            "learning_rate": 1e-3,
            "ema": {"use": True, "decay": 0.9},
            "log_every": 100,
            **train,
        },
        "validation": {"every": 2, "num_samples": 2, "num_inference_steps": 2, "guidance_scale": 3.0},
    }


def weights(folder):
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def same_weights(first, second):
    a, b = weights(first), weights(second)
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.fixture(scope="module")
def pruned_run(teacher_run, distill_shards, tmp_path_factory):
    output = tmp_path_factory.mktemp("prune") / "run"
    report = prune(config_for(output, teacher_run, distill_shards))
    return output, report


def test_an_lsdm_is_searched_pruned_to_its_target_and_fine_tuned(pruned_run, teacher_run):
    output, report = pruned_run
    assert report["cost_unit"] == "macs" and report["predicted_cost"] <= report["target"]
    assert report["target"] == pytest.approx(0.6 * report["teacher_cost"])
    assert report["search"]["steps"] == 4 and report["finetune"]["steps"] == 4
    assert json.loads((output / "prune_report.json").read_text())["widths"] == report["widths"]
    teacher = HyperHumanPipeline.from_pretrained(teacher_run / "pipeline")
    pipeline = HyperHumanPipeline.from_pretrained(output / "pipeline")  # loads like the teacher's
    assert pipeline.unet.config.widths == widths(pipeline.unet) == report["widths"]
    assert widths(pipeline.unet) != widths(teacher.unet)
    params = sum(p.numel() for p in pipeline.unet.parameters())
    assert params == report["params"] < sum(p.numel() for p in teacher.unet.parameters())
    assert pipeline.scheduler.config == teacher.scheduler.config
    # the search's pruned model is where the fine-tune started, and the fine-tune moved it
    searched = HyperHumanPipeline.from_pretrained(output / "search" / "pipeline")
    assert widths(searched.unet) == report["widths"] and not same_weights(
        output / "search" / "pipeline", output / "pipeline"
    )
    assert {p.name for p in (output / "search" / "validation").iterdir()} == {"teacher.png", "step-2.png", "step-4.png"}
    assert {p.name for p in (output / "validation").iterdir()} == {"step-2.png", "step-4.png"}
    pipeline.set_progress_bar_config(disable=True)
    result = pipeline("a person", pose={"width": 16, "height": 16, "people": []}, height=16, width=16,
                      num_inference_steps=2, output_type="np")  # fmt: skip
    assert result.rgb.shape == (1, 16, 16, 3)


def test_the_search_resumes_exactly(pruned_run, teacher_run, distill_shards, tmp_path):
    output, report = pruned_run
    resumed = tmp_path / "resumed"
    (resumed / "search" / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        output / "search" / "checkpoints" / "checkpoint-2", resumed / "search" / "checkpoints" / "checkpoint-2"
    )
    shutil.copy(output / "cost.json", resumed / "cost.json")
    again = prune(config_for(resumed, teacher_run, distill_shards), resume="latest")
    assert again["widths"] == report["widths"]
    assert same_weights(output / "search" / "pipeline", resumed / "search" / "pipeline")
    assert same_weights(output / "pipeline", resumed / "pipeline")


def test_a_finished_search_is_kept_and_the_fine_tune_resumes_exactly(pruned_run, teacher_run, distill_shards, tmp_path):
    output, _ = pruned_run
    resumed = tmp_path / "resumed"
    shutil.copytree(output / "search", resumed / "search")
    shutil.copy(output / "cost.json", resumed / "cost.json")
    shutil.copytree(output / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    before = (resumed / "search" / "train_report.json").stat().st_mtime_ns
    again = prune(config_for(resumed, teacher_run, distill_shards), resume="latest")
    assert (resumed / "search" / "train_report.json").stat().st_mtime_ns == before  # not searched again
    first = json.loads((output / "train_report.json").read_text())["losses"]
    assert json.loads((resumed / "train_report.json").read_text())["losses"] == first[2:]
    assert again["finetune"]["steps"] == 4
    assert same_weights(output / "pipeline", resumed / "pipeline")  # the EMA weights


def test_widths_chosen_elsewhere_get_the_same_fine_tune(pruned_run, teacher_run, distill_shards, tmp_path):
    output, _ = pruned_run
    teacher = HyperHumanPipeline.from_pretrained(teacher_run / "pipeline").unet
    groups = {name: (group_size(block), widths(teacher)[name] // group_size(block))
              for name, block in prunable(teacher).items()}  # fmt: skip
    half = {name: max(1, count // 2) * group for name, (group, count) in groups.items()}
    run = tmp_path / "half"
    run.mkdir()
    shutil.copy(output / "cost.json", run / "cost.json")  # priced as the searched run was
    config = config_for(run, teacher_run, distill_shards)
    written = start_from(config, shrink_to_widths(teacher, half), {"method": "half"})
    assert written["widths"] == half and written["steps"] == 0
    report = prune(config, resume="latest")
    assert report["search"]["steps"] == 0 and report["finetune"]["steps"] == 4  # fine-tuned only
    assert report["selection"] == {"method": "half"} and report["widths"] == half
    assert widths(HyperHumanPipeline.from_pretrained(run / "pipeline").unet) == half
    assert not same_weights(run / "search" / "pipeline", run / "pipeline")
    with pytest.raises(ValueError, match="narrowed copy of the teacher"):
        start_from(config, teacher_unet(0), {"method": "another model"})


@pytest.mark.slow
def test_a_stable_diffusion_teacher_is_pruned_into_a_stable_diffusion_pipeline(
    sd_teacher_run, distill_shards, tmp_path
):
    from diffusers import StableDiffusionPipeline

    from distill.students import EditedUNet2DConditionModel

    output = tmp_path / "run"
    report = prune(config_for(output, sd_teacher_run, distill_shards, max_train_steps=2))
    assert report["target_met"] and report["predicted_cost"] <= report["target"]
    pipeline = StableDiffusionPipeline.from_pretrained(output / "pipeline")  # an ordinary SD pipeline
    assert type(pipeline.unet) is EditedUNet2DConditionModel and pipeline.unet.config.widths == report["widths"]
    assert widths(pipeline.unet) != widths(teacher_unet(0))
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a person", height=16, width=16, num_inference_steps=2, output_type="np")
    assert image.images.shape == (1, 16, 16, 3)


def test_a_latency_target_is_timed_and_the_pruned_step_measured(teacher_run, distill_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERHUMAN_CACHE", str(tmp_path / "cache"))  # a latency table of its own
    config = config_for(tmp_path / "run", teacher_run, distill_shards, search_steps=1, max_train_steps=1)
    config["target"] = {"cost": "eager", "ms": 1.0e6}  # always met: the plumbing, not the (noisy) timings
    config["validation"]["every"] = 0
    report = prune(config)
    assert report["cost_unit"] == "eager" and report["target_met"] and report["forced_groups"] == 0
    assert report["teacher_cost"] > 0 and report["measured_cost"] > 0
    assert report["prediction_error"] == pytest.approx(report["predicted_cost"] / report["measured_cost"] - 1)
    assert list((tmp_path / "cache" / "latency").glob("*.json"))  # the block timings were cached


def test_an_unmet_target_is_met_by_dropping_the_weakest_groups():
    model = teacher_unet(0).eval()
    cost = fit_cost(model, inputs_for(model), "macs")
    torch.manual_seed(0)
    masks = insert_masks(model, min_groups=2)
    untouched = {name: mask.weight.detach().clone() for name, mask in masks.items()}
    forced = meet_target(masks, cost, 0.5 * cost.full)
    assert forced > 0 and cost.expected(masks).item() <= 0.5 * cost.full
    assert all(mask.keep().sum() >= min(2, mask.groups) for mask in masks.values())
    # the dropped groups are the ones with the smallest weights
    dropped = [untouched[name][~mask.keep()] for name, mask in masks.items()]
    kept = [untouched[name][mask.keep()] for name, mask in masks.items() if mask.keep().sum() > mask.min_groups]
    assert torch.cat(dropped).max() <= torch.cat(kept).min()
    assert meet_target(masks, cost, 0.5 * cost.full) == 0


def test_bad_configs_name_the_key(teacher_run, distill_shards, tmp_path):
    good = config_for(tmp_path / "run", teacher_run, distill_shards)
    check_config(good)
    cases = [
        ({"teacher": str(tmp_path / "nothing")}, "not a run folder"),
        ({"target": {"cost": "flops", "fraction": 0.5}}, "target.cost"),
        ({"target": {"cost": "macs", "fraction": 0.5, "ms": 3.0}}, "exactly one"),
        ({"target": {"cost": "macs", "fraction": 1.5}}, "target.fraction"),
        ({"target": {"cost": "macs", "ms": 3.0}}, "target.ms"),
        ({"search": {"steps": 0}}, "search.steps"),
        ({"search": {"steps": 4, "mask_learning_rate": -1}}, "mask_learning_rate"),
        ({"search": {"steps": 4, "min_groups": 0}}, "min_groups"),
        ({"kd": {"feature_norm": "layer"}}, "feature_norm"),
        ({"search": {"steps": 4, "rate": 3}}, "rate"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_config({**good, **change})
