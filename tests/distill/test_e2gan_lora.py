"""New E2GAN concepts cheaply, at toy size: LoRA adapter files (save, load, swap, merge) over one base
generator; the layer-importance ranking finds a planted group; the rank search keeps the smallest
rank within tolerance; k-means picks one pair per planted cluster, deterministically; `hyperhuman
distill gan-concept` end to end with checkpoints and exact resume."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from distill.e2gan.generator import E2GANGenerator
from distill.e2gan.importance import Probe, pick_crucial, pick_rank, rank_groups, search_ranks
from distill.e2gan.lora import (
    adapter_parameters,
    add_adapter,
    base_digest,
    layer_groups,
    load_concept,
    loaded_concepts,
    merge_concept,
    read_adapter,
    save_adapter,
    use_concept,
)
from distill.e2gan.subset import pair_features, select_representatives, torch_kmeans
from hyperhuman.config import ConfigError, load_config
from tests.distill.test_e2gan import TINY, inputs, pairs, text_encoder_path, tiny_generator  # noqa: F401 (fixtures)

TARGETS = {"sketch": ["res_blocks.1.conv1", "transformer.attn2.to_k", "transformer.attn2.to_v"],
           "cartoon": ["down_blocks.0.conv", "res_blocks.2.conv2", "conv_out"]}  # fmt: skip


@pytest.fixture
def base_run(tmp_path):
    """A base run folder: a toy generator (its weights random: the adapters are what is tested)."""
    tiny_generator().save_pretrained(tmp_path / "base" / "generator", safe_serialization=True)
    return tmp_path / "base"


def trained_concept(base, concept, seed):
    """``base`` (deep-copied) with a LoRA adapter ``concept`` whose weights are random, as if trained."""
    import copy

    model = add_adapter(copy.deepcopy(base), concept, TARGETS[concept], rank=2, alpha=2.0)
    generator = torch.Generator().manual_seed(seed)
    for parameter in adapter_parameters(model, concept):
        parameter.data = torch.randn(parameter.shape, generator=generator) * 0.2
    return model.eval()


def describe(base, run):
    return {"base": {"run": str(run), "generator_sha256": base_digest(base)}, "rank": 2, "alpha": 2.0}


# --- adapters --------------------------------------------------------------------------------------
def test_layer_groups_cover_every_conv_and_linear_once():
    model = tiny_generator()
    groups = layer_groups(model)
    assert list(groups) == ["down", "res_blocks.0", "res_blocks.1", "res_blocks.2", "transformer.resample",
                            "transformer.attn1", "transformer.attn2", "transformer.ff", "up"]  # fmt: skip
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert sorted(sum(groups.values(), [])) == sorted(layers)
    assert groups["transformer.attn2"] == [f"transformer.attn2.{n}" for n in ("to_q", "to_k", "to_v", "to_out")]


def test_adapters_save_load_and_swap_as_in_memory_and_concepts_differ(base_run, tmp_path):
    base = tiny_generator()
    image, text, mask = inputs()
    expected = {}
    for seed, concept in enumerate(TARGETS):
        model = trained_concept(base, concept, seed)
        assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)  # base frozen
        with torch.no_grad():
            expected[concept] = model(image, text, mask)
        path = save_adapter(model, concept, tmp_path / "adapters" / f"{concept}.safetensors",
                            {**describe(base, base_run), "target_modules": TARGETS[concept]})  # fmt: skip
        state, description = read_adapter(path)
        assert description["concept"] == concept and description["target_modules"] == TARGETS[concept]
        assert json.loads(path.with_suffix(".json").read_text()) == description
        assert all(".lora_" in key and concept not in key for key in state)  # peft's names, no adapter name
        weights = base_run / "generator" / "diffusion_pytorch_model.safetensors"
        assert path.stat().st_size < 0.1 * weights.stat().st_size
    with torch.no_grad():
        base_out = base(image, text, mask)
        assert (expected["sketch"] - expected["cartoon"]).abs().max() > 1e-3
        assert (expected["sketch"] - base_out).abs().max() > 1e-3

    generator = load_concept(base_run, tmp_path / "adapters" / "sketch.safetensors")
    generator = load_concept(base_run, tmp_path / "adapters" / "cartoon.safetensors", generator=generator)
    assert sorted(loaded_concepts(generator)) == ["cartoon", "sketch"] and not generator.training
    with torch.no_grad():
        assert torch.equal(generator(image, text, mask), expected["cartoon"])  # the last loaded is active
        for concept in ("sketch", "cartoon", "sketch"):  # swapping back and forth
            assert torch.equal(use_concept(generator, concept)(image, text, mask), expected[concept])
        assert torch.equal(use_concept(generator, None)(image, text, mask), base_out)
    with pytest.raises(KeyError, match="concept 'paint' is not loaded"):
        use_concept(generator, "paint")
    with pytest.raises(ConfigError, match="concept 'sketch' is loaded already"):
        load_concept(base_run, tmp_path / "adapters" / "sketch.safetensors", generator=generator)


def test_a_merged_adapter_edits_as_the_unmerged_one(base_run):
    base = tiny_generator()
    model = trained_concept(base, "cartoon", 1)
    merged = merge_concept(model, "cartoon")
    assert type(merged) is type(base) and not any("lora_" in key for key in merged.state_dict())
    image, text, mask = inputs()
    with torch.no_grad():
        assert torch.allclose(merged(image, text, mask), model(image, text, mask), atol=1e-5)
        assert not torch.allclose(merged(image, text, mask), base(image, text, mask), atol=1e-3)
    assert base_digest(model) == base_digest(base)  # merging a copy leaves the adapter model alone


def test_an_adapter_refuses_another_base(base_run, tmp_path):
    path = save_adapter(trained_concept(tiny_generator(), "sketch", 0), "sketch", tmp_path / "sketch.safetensors",
                        {**describe(tiny_generator(), base_run), "target_modules": TARGETS["sketch"]})  # fmt: skip
    other = tmp_path / "other"
    tiny_generator(seed=1).save_pretrained(other / "generator")
    with pytest.raises(ConfigError, match="was trained on the base generator of .* load it on the base it names"):
        load_concept(other, path)
    with pytest.raises(FileNotFoundError, match="no adapter file"):
        load_concept(base_run, tmp_path / "none.safetensors")


# --- the searches ----------------------------------------------------------------------------------
class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.middle, self.last = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.last(torch.tanh(self.middle(torch.tanh(self.first(x)))))


def planted_probe(steps=60):
    """A toy whose target differs from the base in ``middle`` alone (a rank-1 change)."""
    torch.manual_seed(0)
    base = Toy()
    target = Toy()
    target.load_state_dict(base.state_dict())
    with torch.no_grad():
        target.middle.weight += 2.0 * torch.outer(torch.randn(8), torch.randn(8)) / 8
    generator = torch.Generator().manual_seed(1)
    train_x, heldout_x = torch.randn(64, 8, generator=generator), torch.randn(64, 8, generator=generator)
    with torch.no_grad():
        train_y, heldout_y = target(train_x), target(heldout_x)
    batches = [(train_x[i : i + 16], train_y[i : i + 16]) for i in range(0, 64, 16)]

    def loss(model, batch):
        return nn.functional.mse_loss(model(batch[0]), batch[1])

    def heldout_mse(model):
        return nn.functional.mse_loss(model(heldout_x), heldout_y).item()

    return Probe(base, loss, batches, heldout_mse, steps=steps, learning_rate=3e-2, seed=0)


def test_the_importance_ranking_puts_the_planted_group_first():
    probe = planted_probe()
    before = [p.clone() for p in probe.base.parameters()]
    ranking = rank_groups(probe, {"first": ["first"], "middle": ["middle"], "last": ["last"]}, rank=2, log=lambda m: 0)
    assert [row["group"] for row in ranking["groups"]][0] == "middle"
    middle = ranking["groups"][0]
    assert middle["gain_db"] > 3 and middle["params"] == 2 * (8 + 8)
    assert all(torch.equal(a, b) for a, b in zip(before, probe.base.parameters(), strict=True))  # probes copy
    again = rank_groups(planted_probe(), {"first": ["first"], "middle": ["middle"], "last": ["last"]}, 2, lambda m: 0)
    assert again == ranking  # a pure function of the settings


def test_crucial_groups_are_the_ranking_prefix_within_budget_and_gain():
    rows = [{"group": "a", "params": 100, "gain_db": 2.0}, {"group": "b", "params": 300, "gain_db": 3.0},
            {"group": "c", "params": 50, "gain_db": 0.1}, {"group": "d", "params": 10, "gain_db": -0.5}]  # fmt: skip
    assert pick_crucial(rows, budget_params=450) == ["a", "b", "c"]  # d loses: never crucial
    assert pick_crucial(rows, budget_params=420) == ["a", "b"]  # c would pass the budget
    assert pick_crucial(rows, budget_params=420, min_gain_db=2.5) == ["a"]
    assert pick_crucial(rows, budget_params=50) == ["a"]  # nothing fits: the first group alone


def test_the_rank_search_keeps_the_smallest_rank_within_tolerance():
    rows = [{"rank": 1, "psnr_db": 20.0}, {"rank": 2, "psnr_db": 24.95}, {"rank": 4, "psnr_db": 25.0},
            {"rank": 8, "psnr_db": 25.02}, {"rank": 16, "psnr_db": 24.9}]  # fmt: skip
    assert pick_rank(rows, 0.1) == 2
    assert pick_rank(rows, 0.0) == 8
    assert pick_rank(rows, 10.0) == 1
    searched = search_ranks(planted_probe(steps=30), ["middle"], [4, 1, 2], 0.5, log=lambda m: 0)
    assert [row["rank"] for row in searched["ranks"]] == [1, 2, 4] and searched["chosen"] in (1, 2, 4)
    assert searched["chosen"] == pick_rank(searched["ranks"], 0.5)


# --- minimal data ----------------------------------------------------------------------------------
def planted_clusters():
    """15 points in 3 tight, far-apart clusters (sizes 4, 5, 6), shuffled."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 5.0], [0.0, 10.0, -5.0]], dtype=torch.float64)
    cluster = torch.tensor([0] * 4 + [1] * 5 + [2] * 6)[torch.randperm(15, generator=generator)]
    points = centres[cluster] + 0.3 * torch.randn(15, 3, generator=generator, dtype=torch.float64)
    return points, cluster


@pytest.mark.parametrize("use_sklearn", [True, False])
def test_cluster_selection_is_deterministic_and_takes_one_pair_per_cluster(use_sklearn):
    points, cluster = planted_clusters()
    chosen = select_representatives(points, 3, seed=0, use_sklearn=use_sklearn)
    assert chosen == select_representatives(points.clone(), 3, seed=0, use_sklearn=use_sklearn)
    indices = [entry["index"] for entry in chosen]
    assert indices == sorted(indices) and sorted(cluster[indices].tolist()) == [0, 1, 2]
    assert sorted(entry["cluster_size"] for entry in chosen) == [4, 5, 6]
    for index in indices:  # the member nearest its cluster's mean
        members = points[cluster == cluster[index]]
        assert torch.equal(points[index], members[(members - members.mean(0)).norm(dim=1).argmin()])
    assert [e["index"] for e in select_representatives(points, 20, seed=0)] == list(range(15))


def test_torch_kmeans_leaves_no_cluster_empty():
    points = torch.zeros(6, 2, dtype=torch.float64)  # every point the same: k-means++ has no distance to go by
    labels, centres = torch_kmeans(points, 3, seed=0)
    assert sorted(set(labels.tolist())) == [0, 1, 2] and centres.shape == (3, 2)


def test_pair_features_from_the_encoder_and_from_colour_statistics():
    image, _, _ = inputs(batch=3)
    edits = [{"input": image[i], "target": image[i].flip(-1)} for i in range(3)]
    encoder = pair_features(edits, "encoder", tiny_generator(), batch_size=2)
    assert encoder.shape == (3, 2 * 2 * 16) and encoder.dtype == torch.float64  # mean and std of 16 channels, twice
    assert pair_features(edits, "colour").shape == (3, 16)
    with pytest.raises(ConfigError, match="subset.features must be one of"):
        pair_features(edits, "clip")


# --- the command -----------------------------------------------------------------------------------
def concept_overrides(output, base, pairs):  # noqa: F811 (the fixture's value)
    return [f"output={output}", f"base={base}", "concept=cartoon", f"data.train={pairs / 'train'}",
            "data.resolution=16", "data.shuffle_buffer=4", "subset.size=3", "search.steps=3", "search.batch_size=2",
            "importance.groups=[res_blocks.1, transformer.attn2, up]", "importance.budget=0.05",
            "rank_search.ranks=[1, 2, 4]", "discriminator.base_channels=8", "train.batch_size=2",
            "train.max_train_steps=6", "train.checkpointing_steps=2", "train.learning_rate=5.0e-3",
            "train.ema={use: true, decay: 0.9}", "train.log_every=100", "validation.every=3",
            f"validation.heldout={pairs / 'heldout'}", "validation.num_per_concept=1"]  # fmt: skip


def test_gan_concept_searches_trains_an_adapter_and_resumes_exactly(pairs, text_encoder_path, tmp_path, capsys):  # noqa: F811
    from distill.e2gan.concept import train_concept
    from distill.e2gan.data import read_pairs
    from distill.e2gan.train import PromptStates, heldout_psnr
    from hyperhuman.cli import main
    from hyperhuman.text import load_text_encoder

    base = tmp_path / "base"
    torch.manual_seed(0)  # a toy base generator, untrained, that records the toy text encoder
    E2GANGenerator(**TINY, text_dim=32, text_encoder=text_encoder_path).save_pretrained(base / "generator")
    output = tmp_path / "run"
    arguments = ["distill", "gan-concept"] + [f"--set={o}" for o in concept_overrides(output, base, pairs)]
    assert main(arguments) == 0
    assert "[distill gan-concept] 6 steps" in capsys.readouterr().out
    report = json.loads((output / "train_report.json").read_text())
    assert report["steps"] == 6 and len(report["losses"]) == 6
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert {p.name for p in (output / "validation").iterdir()} == {"step-3.png", "step-6.png"}

    subset = json.loads((output / "search" / "subset.json").read_text())
    assert subset["pairs"] == 5 and subset["size"] == 3 and len({e["key"] for e in subset["chosen"]}) == 3
    importance = json.loads((output / "search" / "importance.json").read_text())
    assert [row["group"] for row in importance["groups"]] != [] and len(importance["groups"]) == 3
    assert importance["crucial"] == report["crucial"] and importance["crucial"][0] == importance["groups"][0]["group"]
    assert importance["scored_on"] == str(pairs / "train")  # the probes never see the report's held-out pairs
    ranks = json.loads((output / "search" / "ranks.json").read_text())
    assert [row["rank"] for row in ranks["ranks"]] == [1, 2, 4] and ranks["chosen"] == report["rank"]

    adapter = output / "adapters" / "cartoon.safetensors"
    _, description = read_adapter(adapter)
    assert description["concept"] == "cartoon" and description["prompt"] == "turn the person into a cartoon"
    assert description["data"]["subset"] == [e["key"] for e in subset["chosen"]] and description["steps"] == 6
    assert description["rank"] == report["rank"] and description["target_modules"] == report["target_modules"]
    assert report["params"]["adapter"] < report["params"]["base"]
    assert report["output"]["bytes"] == adapter.stat().st_size
    assert set(report["psnr_db"]) == {"cartoon", "all"} and "base_psnr_db" in report
    generator = load_concept(base, adapter)
    heldout = read_pairs(str(pairs / "heldout"), 16, 1, ["cartoon"])
    text = PromptStates(*load_text_encoder(text_encoder_path), "cpu")
    assert heldout_psnr(generator, heldout, text)["psnr_db"] == report["psnr_db"]  # the file edits as trained

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(output / "checkpoints" / "checkpoint-4", resumed / "checkpoints" / "checkpoint-4")
    shutil.copytree(output / "search", resumed / "search")
    config = load_config("distill/gan-concept-tiny", concept_overrides(resumed, base, pairs))
    again = train_concept(config, resume="latest")
    printed = capsys.readouterr().out
    assert "resuming: the subset, crucial groups and rank of" in printed and "[importance]" not in printed
    assert again["losses"] == report["losses"][4:]
    assert all(again["terms"][name] == values[4:] for name, values in report["terms"].items())
    final, replayed = load_file(adapter), load_file(resumed / "adapters" / "cartoon.safetensors")
    assert final.keys() == replayed.keys() and all(torch.equal(final[k], replayed[k]) for k in final)
    assert again["psnr_db"] == report["psnr_db"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("concept=a/b", r"concept='a/b': the concept's name"),
        ("subset.features=clip", "subset.features must be one of"),
        ("subset.size=0", "subset.size must be an integer ≥ 1"),
        ("importance.budget=2", r"importance.budget=2 is a fraction"),
        ("importance.crucial=[res_blocks.7]", r"importance.crucial=\['res_blocks.7'\] must be a list of layer groups"),
        ("rank_search.ranks=[0, 2]", "rank_search.ranks must be a list of positive integers"),
        ("search.learning_rate=0", "search.learning_rate must be a number > 0"),
        ("data.resolution=18", "data.resolution=18 must be a positive multiple of 4"),
        ("base=/nonexistent", "base='/nonexistent' holds no E2GAN generator"),
    ],
)
def test_bad_configs_fail_at_start_naming_the_key(change, message, pairs, base_run, tmp_path):  # noqa: F811
    from distill.e2gan.concept import check_config

    config = load_config("distill/gan-concept-tiny", [*concept_overrides(tmp_path / "run", base_run, pairs), change])
    with pytest.raises(ConfigError, match=message):
        check_config(config)
    assert not (tmp_path / "run").exists()
