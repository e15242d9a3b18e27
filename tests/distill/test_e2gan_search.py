"""The E2GAN generator's width search at toy size: masks are exact removals, the cost of chained
widths (MACs exactly, latency through the latency table), a search that meets its target on a toy
table, `hyperhuman distill gan-search` end to end with exact resume, config errors naming the key."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from distill.e2gan.generator import E2GANGenerator, load_generator
from distill.e2gan.search import (
    cost_units,
    fill_to_target,
    fit_generator_cost,
    generator_widths,
    insert_masks,
    kept_widths,
    masks_of,
    remove,
    search,
    width_points,
)
from distill.e2gan.search_train import check_config, search_gan
from distill.latency import LatencyTable
from distill.prune import meet_target
from distill.width_cost import count_macs
from hyperhuman.config import ConfigError

from .test_e2gan import pairs, text_encoder_path  # noqa: F401 (fixtures: toy pair shards, toy text encoder)

# two down-samplings: the encoder's and the decoder's widths chain (a layer reads one, writes the next)
CHAINED = {"base_channels": 8, "num_downsamples": 2, "attention_heads": 2, "mlp_ratio": 2}


def chained_generator(seed=0, text_encoder="test"):
    torch.manual_seed(seed)
    return E2GANGenerator(**CHAINED, text_dim=32, text_encoder=text_encoder).eval()


def frame(batch=1, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(batch, 3, size, size, generator=generator) * 2 - 1,
        "encoder_hidden_states": torch.randn(batch, 5, 32, generator=generator),
        "encoder_attention_mask": torch.ones(batch, 5, dtype=torch.long),
    }


def drop_at_random(masks, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for mask in masks.values():
            mask.weight.uniform_(0.0, 1.0)  # about half of every width dropped


def test_the_searchable_widths_are_the_generators_and_each_unit_depends_on_its_own():
    model = chained_generator()
    points = width_points(model)
    assert list(points) == [
        "conv_in",
        "down_blocks.0",
        "res_blocks.0",
        "res_blocks.1",
        "res_blocks.2",
        "transformer.attn1",
        "transformer.attn2",
        "transformer.ff",
        "up_blocks.0",
        "up_blocks.1",
    ]
    assert points["transformer.attn1"].group == 16 and points["up_blocks.1"].reader == "conv_out"
    units = cost_units(points)
    assert units["down_blocks.0"] == ("conv_in", "down_blocks.0") and units["up_blocks.1"] == (
        "up_blocks.0",
        "up_blocks.1",
    )
    assert units["norm_in"] == ("conv_in",) and units["conv_out"] == ("up_blocks.1",)
    assert "transformer.conv_down" not in units  # the trunk's width never changes: a fixed cost


def test_fresh_masks_change_nothing_and_removal_computes_what_the_masked_generator_computed(tmp_path):
    model = chained_generator()
    inputs = frame(batch=2)
    with torch.no_grad():
        unmasked = model(**inputs)
    torch.manual_seed(0)
    masks = insert_masks(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs), unmasked)  # every gate exactly 1
    drop_at_random(masks)
    with torch.no_grad():
        masked = model(**inputs)
    pruned = remove(model, masks)
    assert generator_widths(pruned) == kept_widths(masks) == pruned.config.widths
    assert all(width % 16 == 0 for name, width in pruned.config.widths.items() if ".attn" in name)  # whole heads
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in chained_generator().parameters())
    with torch.no_grad():
        torch.testing.assert_close(pruned(**inputs), masked, rtol=0, atol=1e-5)
    pruned.save_pretrained(tmp_path / "generator")
    with torch.no_grad():
        assert torch.equal(load_generator(str(tmp_path))(**inputs), pruned(**inputs))
    assert set(masks_of(model)) == set(masks)
    with pytest.raises(ValueError, match="already has a mask"):
        insert_masks(model)


def test_macs_of_chained_widths_are_predicted_exactly():
    model = chained_generator()
    inputs = frame()
    cost = fit_generator_cost(model, inputs, "macs")
    assert cost.full == count_macs(model, inputs)
    assert set(cost.couplings) == {"conv_in|down_blocks.0", "up_blocks.0|up_blocks.1"}
    assert all(value > 0 for value in cost.couplings.values())
    torch.manual_seed(0)
    masks = insert_masks(model)
    drop_at_random(masks)
    expected = cost.expected(masks)
    pruned = remove(model, masks)
    counted = count_macs(pruned, inputs)
    assert cost.predict(generator_widths(pruned)) == pytest.approx(counted, rel=1e-9)
    assert expected.item() == pytest.approx(counted, rel=1e-6)
    expected.backward()  # the gradient reaches every mask: its slope plus its couplings
    assert all(mask.weight.grad is not None and mask.weight.grad.abs().sum() > 0 for mask in masks.values())


class ToyTable(LatencyTable):
    """A latency table whose 'timings' are a unit's MACs / 1e6: deterministic, as fast as counting."""

    def lookup(self, call, runtime, warmup=3, repeats=10):
        from distill.e2gan.search import _call_macs

        self.measured += 1
        return _call_macs(call) / 1e6


def test_the_search_meets_its_latency_target_on_a_toy_table(monkeypatch):
    import distill.latency

    monkeypatch.setattr(distill.latency, "measure_step", lambda model, inputs, *a, **k: count_macs(model, inputs) / 1e6)
    teacher = chained_generator()
    cost = fit_generator_cost(teacher, frame(), "eager", ToyTable())
    assert cost.unit == "eager" and cost.full == pytest.approx(count_macs(teacher, frame()) / 1e6)
    target = 0.4 * cost.full

    def batches():
        generator = torch.Generator().manual_seed(0)
        while True:
            image = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
            yield {"input": image, "target": image.flip(-1), "prompt": ["a", "b"]}

    states = frame(batch=2)

    def text(prompts):
        return states["encoder_hidden_states"][: len(prompts)], states["encoder_attention_mask"][: len(prompts)]

    student = chained_generator()
    masks, log = search(
        student, teacher, batches(), text, cost, target, steps=4, mask_learning_rate=0.2, log=lambda _: None
    )
    assert len(log) == 4 and log[-1]["predicted"] < log[0]["predicted"]  # the hinge pulls the widths down
    meet_target(masks, cost, target)
    fill_to_target(masks, cost, target)
    widths = kept_widths(masks)
    assert cost.predict(widths) <= target
    for name, mask in masks.items():  # filled: no dropped group fits in what is left of the budget
        if (~mask.keep()).any():
            assert cost.predict({**widths, name: widths[name] + mask.group}) > target
    pruned = remove(student, masks)
    assert count_macs(pruned, frame()) / 1e6 == pytest.approx(cost.predict(widths), rel=1e-6)  # the toy table's truth


def test_a_latency_cost_times_units_through_the_table_once(tmp_path):
    model = chained_generator()
    table = LatencyTable.load(tmp_path / "table.json")
    cost = fit_generator_cost(model, frame(), "eager", table, warmup=0, repeats=1)
    assert cost.full > 0 and all(value >= 0 for value in [*cost.slopes.values(), *cost.couplings.values()])
    assert set(cost.fit_error) == set(cost_units(width_points(model)))
    measured = table.measured
    assert measured < 16 * len(cost.fit_error)  # a unit at a width it was timed at is not timed again
    again = fit_generator_cost(model, frame(), "eager", table, warmup=0, repeats=1)
    assert table.measured == measured and again.slopes == cost.slopes


# --- the recipe ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_folder(text_encoder_path, tmp_path_factory):  # noqa: F811
    """An unpruned generator saved as `distill gan` saves it (with concepts.json)."""
    folder = tmp_path_factory.mktemp("gan-run") / "generator"
    chained_generator(text_encoder=text_encoder_path).save_pretrained(folder, safe_serialization=True)
    concepts = {"sketch": "turn the photo into a pencil sketch", "cartoon": "turn the person into a cartoon"}
    (folder / "concepts.json").write_text(json.dumps(concepts))
    return folder.parent


def search_config(output, teacher, pairs, **train):  # noqa: F811
    return {
        "output": str(output),
        "seed": 0,
        "teacher": str(teacher),
        "target": {"cost": "macs", "fraction": 0.5},
        "timing": {"resolution": 16, "repeats": 2},
        "search": {"steps": 3, "mask_learning_rate": 0.2, "resource_weight": 5.0, "min_channels": 1},
        "kd": {"output_weight": 1.0},
        "loss": {"l1_weight": 10.0, "l2_weight": 0.0},
        "data": {
            "train": str(pairs / "train"),
            "resolution": 16,
            "random_crop": True,
            "shuffle_buffer": 4,
            "num_workers": 0,
        },  # fmt: skip
        "train": {
            "batch_size": 2,
            "max_train_steps": 4,
            "checkpointing_steps": 2,
            "checkpoints_total_limit": 2,
            "learning_rate": 1e-3,
            "ema": {"use": True, "decay": 0.9},
            "log_every": 100,
            **train,
        },  # fmt: skip
        "validation": {"heldout": str(pairs / "heldout"), "num_per_concept": 1},
    }


def test_gan_search_meets_the_target_fine_tunes_and_resumes_exactly(teacher_folder, pairs, tmp_path):  # noqa: F811
    output = tmp_path / "run"
    report = search_gan(search_config(output, teacher_folder, pairs))
    assert report["search"]["target_met"] and report["search"]["steps"] == 3
    assert report["macs"]["searched"] <= 0.5 * report["macs"]["full"] and report["macs_ratio"] >= 2
    assert report["predicted_cost"]["searched"] == pytest.approx(report["macs"]["searched"], rel=1e-9)
    assert report["finetune"]["steps"] == 4 and len(report["finetune"]["losses"]) == 4
    assert set(report["psnr_db"]["searched"]) == {"sketch", "cartoon", "all"} and "searched_vs_full_psnr_db" in report
    assert report["measured_ms"]["searched"] > 0 and report["psnr_on"] == "validation.heldout"
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    searched = load_generator(str(output))
    assert searched.config.widths == report["search"]["widths"] == report["widths"]["searched"]
    assert json.loads((output / "generator" / "concepts.json").read_text())["sketch"].startswith("turn the photo")
    assert json.loads((output / "gan_search_report.json").read_text())["macs"] == report["macs"]

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(output / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    shutil.copytree(output / "search", resumed / "search")  # a finished search is kept
    shutil.copy(output / "cost.json", resumed / "cost.json")
    again = search_gan(search_config(resumed, teacher_folder, pairs), resume="latest")
    assert again["finetune"]["losses"] == report["finetune"]["losses"][2:]
    final = load_file(output / "generator" / "diffusion_pytorch_model.safetensors")
    replayed = load_file(resumed / "generator" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(value, replayed[name]) for name, value in final.items())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.pop("teacher"), r"lacks 'teacher'"),
        (lambda c: c["target"].update(cost="flops"), "target.cost must be one of"),
        (lambda c: c["target"].update(ms=3.0), "exactly one of target.fraction"),
        (lambda c: c["target"].update(fraction=1.5), r"target.fraction must be in \(0, 1\)"),
        (lambda c: c.update(target={"cost": "macs", "ms": 3.0}), "target.ms=3.0: a positive latency"),
        (lambda c: c["search"].update(steps=0), "search.steps must be an integer ≥ 1"),
        (lambda c: c["search"].update(mask_learning_rate=0), "search.mask_learning_rate must be a number > 0"),
        (lambda c: c["timing"].update(resolution=12), r"timing.resolution=12 must be a positive multiple of 8"),
        (lambda c: c["kd"].update(weight=1), "unknown config key 'kd.weight'"),
        (lambda c: c.update(teacher="/nonexistent"), "teacher='/nonexistent' is not"),
        (lambda c: c["data"].update(resolution=12), "data.resolution=12 must be a positive multiple of 8"),
    ],
)
def test_bad_configs_fail_at_start_naming_the_key(change, message, teacher_folder, pairs, tmp_path):  # noqa: F811
    config = search_config(tmp_path / "run", teacher_folder, pairs)
    change(config)
    with pytest.raises(ConfigError, match=message):
        check_config(config)
    assert not (tmp_path / "run").exists()


def test_a_generator_config_refuses_unknown_or_too_wide_widths():
    with pytest.raises(ConfigError, match="generator.widths.res_blocks.9: no such width"):
        E2GANGenerator(**CHAINED, text_dim=32, widths={"res_blocks.9": 4})
    with pytest.raises(ConfigError, match=r"generator.widths.transformer.attn1=8 must be a positive multiple of 16"):
        E2GANGenerator(**CHAINED, text_dim=32, widths={"transformer.attn1": 8})
