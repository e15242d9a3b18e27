"""SpFDE as a training option (hyperhuman.efficiency): masks keep their density through prune/regrow and
pruned weights stay zero; frozen leading blocks get no gradient, no optimizer update and no backward;
the freezing criterion fires; sieving is deterministic per seed, retires the easy samples and resumes
exactly; train-lsdm with every option on resumes bit-exactly and reports what it saved."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from hyperhuman.config import ConfigError, apply_overrides, load_config
from hyperhuman.efficiency.flops import count_step
from hyperhuman.efficiency.sieving import Sieve
from hyperhuman.lsdm.model import LatentStructuralUNet
from hyperhuman.lsdm.testing import IDENTITY_NORM, TINY_UNET, tiny_unet
from hyperhuman.lsdm.train import check_config, train_lsdm
from hyperhuman.training import make_efficiency, optimizer_step, prepare_for_training

from .conftest import write_toy_shards


# --- a tiny model trained through the shared optimizer step ----------------------------------------
def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def trainer(model, efficiency_settings, steps=8, **train):
    from accelerate import Accelerator

    train = {"batch_size": 4, "max_train_steps": steps, "learning_rate": 1e-2, "weight_decay": 0.1, **train}
    train["efficiency"] = efficiency_settings
    efficiency = make_efficiency(train, model, seed=0)
    accelerator = Accelerator(cpu=True)
    groups = train.pop("param_groups", None)
    model, optimizer, scheduler, _ = prepare_for_training(accelerator, model, train, groups, efficiency=efficiency)
    generator = torch.Generator().manual_seed(1)

    def step():
        x = torch.randn(4, 6, generator=generator)
        loss = model(x).square().mean()
        optimizer_step(accelerator, model, optimizer, scheduler, loss, 1.0, efficiency)

    return efficiency, optimizer, step


SPARSE = {"use": True, "density": 0.25, "exclude": [], "update_every": 2, "drop_fraction": 0.5, "stop_at": 1.0}


def test_prune_and_regrow_keep_each_layers_density_and_pruned_weights_stay_zero():
    model = mlp()
    efficiency, optimizer, step = trainer(model, {"sparsity": SPARSE})
    masks = efficiency.sparsity.masks
    assert set(masks) == {"0", "2", "4"}
    history = []
    for _ in range(6):
        step()
        history.append({name: mask.clone() for name, mask in masks.items()})
        for name, mask in masks.items():
            weight = model.get_submodule(name).weight
            assert int(mask.sum()) == round(0.25 * mask.numel())  # the target density, exactly
            assert torch.all(weight[~mask] == 0)  # AdamW's moments and decay did not move them
    assert efficiency.sparsity.updates == 3  # steps 2, 4, 6
    assert any(not torch.equal(history[0][n], history[1][n]) for n in masks)  # the mask moved at step 2
    assert all(torch.equal(history[1][n], history[2][n]) for n in masks)  # step 3 is no update step


def test_regrown_weights_start_at_zero_with_fresh_adam_moments():
    model = mlp()
    efficiency, optimizer, step = trainer(model, {"sparsity": SPARSE})
    step()  # Adam has moments now
    sparsity, layer = efficiency.sparsity, model[2]
    before = sparsity.masks["2"].clone()
    model(torch.randn(4, 6)).square().mean().backward()
    sparsity.prune_and_regrow(2, efficiency.optimizer)
    grown = sparsity.masks["2"] & ~before
    assert grown.any()
    assert torch.all(layer.weight[grown] == 0)
    state = efficiency.optimizer.state[layer.weight]
    assert torch.all(state["exp_avg"][grown] == 0) and torch.all(state["exp_avg_sq"][grown] == 0)


def test_layer_globs_choose_the_sparse_layers():
    efficiency, _, _ = trainer(mlp(), {"sparsity": {**SPARSE, "layers": ["*"], "exclude": ["0", "4"]}})
    assert set(efficiency.sparsity.masks) == {"2"}
    with pytest.raises(ConfigError, match="matches no trainable"):
        trainer(mlp(), {"sparsity": {**SPARSE, "layers": ["nothing*"]}})


# --- freezing ----------------------------------------------------------------------------------------
def lsdm():
    return LatentStructuralUNet.from_unet(tiny_unet(0), latent_norm=dict(IDENTITY_NORM)).train()


def lsdm_inputs(batch=2):
    generator = torch.Generator().manual_seed(0)
    args = (torch.randn(batch, 12, 8, 8, generator=generator), torch.tensor([10, 500][:batch]),
            torch.randn(batch, 5, 32, generator=generator))  # fmt: skip
    return args, {"pose_latent": torch.randn(batch, 4, 8, 8, generator=generator)}


def test_frozen_leading_blocks_get_no_gradient_and_skip_their_whole_backward():
    model = lsdm()
    dense = count_step(model, *lsdm_inputs())
    settings = {"freezing": {"use": True, "mode": "schedule", "schedule": [[0, 2]]}}
    efficiency = make_efficiency({"batch_size": 2, "max_train_steps": 4, "efficiency": settings}, model, 0)
    units = efficiency.freezer.units
    assert len(units) == 5 and efficiency.freezer.frozen == 2  # embeddings + conv_in, branch down 0 | trunk …
    assert any(".time_embedding." in name for name in units[0]) and all("branch" in n for n in units[1])
    frozen = {name for unit in units[:2] for name in unit}
    args, kwargs = lsdm_inputs()
    model(*args, **kwargs).sample.square().mean().backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is None) == (name in frozen), name
    after = count_step(model, *lsdm_inputs())
    frozen_layers = {n.rsplit(".", 1)[0] for n in frozen if n.endswith(".weight")} & set(dense.backward_by_layer)
    skipped = dense.backward - after.backward
    # the frozen layers' whole backward is gone (weight and input gradients), and more: the first
    # trainable layer after them needs no input gradient either
    assert skipped > sum(dense.backward_by_layer[n] for n in frozen_layers) > 0
    assert after.forward == dense.forward


@pytest.mark.parametrize("groups", [1, 16])
def test_a_convolution_backward_costs_its_forward_per_gradient_depthwise_included(groups):
    # torch's own formula counts a depthwise conv's weight gradient `channels` times over
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=groups), nn.Conv2d(16, 8, 1))
    counted = count_step(model, (torch.rand(2, 16, 8, 8),), {})
    first = 2 * 2 * 8 * 8 * 16 * (16 // groups) * 9  # 2 · batch · pixels · out · in per group · kernel
    second = 2 * 2 * 8 * 8 * 8 * 16
    assert counted.forward == first + second
    assert counted.backward_by_layer == {"0": first, "1": 2 * second}  # the input needs no gradient
    assert counted.backward == first + 2 * second


def test_a_frozen_block_keeps_its_weights_and_optimizer_state():
    model = mlp()
    settings = {"freezing": {"use": True, "mode": "schedule", "schedule": [[2, 1]]}}
    efficiency, optimizer, step = trainer(model, settings)
    step(), step()
    weight = model[0].weight
    assert not weight.requires_grad and efficiency.freezer.frozen_at == [2]
    moments = {key: value.clone() for key, value in efficiency.optimizer.state[weight].items()}
    frozen_weight, trained_weight = weight.detach().clone(), model[2].weight.detach().clone()
    step(), step()
    assert torch.equal(weight, frozen_weight) and not torch.equal(model[2].weight, trained_weight)
    assert all(torch.equal(efficiency.optimizer.state[weight][key], value) for key, value in moments.items())


def test_the_criterion_freezes_the_leading_block_once_it_stops_changing():
    model = mlp()
    groups = [
        {"params": model[0].parameters(), "lr": 0.0},
        {"params": [*model[2].parameters(), *model[4].parameters()]},
    ]
    criterion = {"use": True, "mode": "criterion", "check_every": 2, "threshold": 1e-3, "max_blocks": 2}
    efficiency, _, step = trainer(model, {"freezing": criterion}, param_groups=groups, weight_decay=0.0)
    step()
    assert efficiency.freezer.frozen == 0  # no check between windows
    step()
    assert efficiency.freezer.frozen == 1 and efficiency.freezer.frozen_at == [2]  # lr 0: it did not move
    step(), step()
    assert efficiency.freezer.frozen == 1  # the next block still learns


# --- sieving -----------------------------------------------------------------------------------------
class Stream:
    """Batches of 3 of 20 named samples per epoch, shuffled per epoch; resumable at a position."""

    def __init__(self, epoch=0, batches_in_epoch=0):
        self.epoch, self.batches_in_epoch = epoch, batches_in_epoch

    def state(self):
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def __next__(self):
        if self.batches_in_epoch == 20 // 3:
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0
        order = torch.randperm(20, generator=torch.Generator().manual_seed(self.epoch))
        rows = order[3 * self.batches_in_epoch : 3 * self.batches_in_epoch + 3]
        self.batches_in_epoch += 1
        return {"key": [f"s{int(i)}" for i in rows], "x": rows.float()[:, None]}


SIEVING = {"fraction": 0.5, "swap_every": 2, "swap_fraction": 0.25, "score_decay": 0.5}


def sieve(seed=0, saved=None, position=None):
    return Sieve(lambda pos: Stream(**pos), position or {}, 4, SIEVING, seed, saved)


def drive(stream, batches, start=0):
    """Train-loop stand-in: a batch, its losses (= the sample number: low numbers are easy), a swap
    every other step."""
    seen = []
    for step in range(start + 1, start + batches + 1):
        batch = next(stream)
        assert len(batch["key"]) == 4 and torch.equal(
            batch["x"][:, 0], torch.tensor([float(k[1:]) for k in batch["key"]])
        )
        stream.record(batch["key"], batch["x"][:, 0])
        if stream.swap_due(step):
            stream.swap()
        seen.append(batch["key"])
    return seen


def test_sieving_is_deterministic_per_seed_and_trains_only_on_the_pool():
    first, again, other = sieve(0), sieve(0), sieve(1)
    assert drive(first, 6) == drive(again, 6)
    assert first.in_use == again.in_use and first.held_back == again.held_back
    drive(other, 6)
    assert other.in_use != first.in_use
    pool = sieve(0)
    for _ in range(3):
        batch = next(pool)
        assert set(batch["key"]) <= pool.in_use
    assert 4 <= len(pool.in_use) <= 16 and pool.counts["samples_not_seen"] > 0


def test_a_swap_retires_the_easiest_and_brings_back_the_longest_held():
    stream = sieve(0)
    for _ in range(5):
        batch = next(stream)
        stream.record(batch["key"], batch["x"][:, 0])
    scored = sorted((stream.scores[i], i) for i in stream.in_use if i in stream.scores)
    queue = list(stream.held_back)
    leaving = stream.swap()
    assert leaving == [i for _, i in scored[: len(leaving)]] and leaving  # the lowest losses
    coming = queue[: len(leaving)]
    assert set(coming) <= stream.in_use and not set(leaving) & stream.in_use
    assert stream.held_back[-len(leaving) :] == leaving
    assert not set(coming) & set(stream.scores)  # unscored: they stay until trained on


def test_sieving_resumes_exactly():
    with_waiting = 0
    for stop in range(1, 8):  # a checkpoint after each step, with and without samples waiting to be batched
        uninterrupted = sieve(0)
        drive(uninterrupted, stop)
        saved = json.loads(json.dumps(uninterrupted.state()))  # what a checkpoint holds
        with_waiting += bool(saved["sieve"]["waiting"])
        later = drive(uninterrupted, 4, start=stop)
        position = {key: value for key, value in saved.items() if key != "sieve"}
        resumed = sieve(0, saved["sieve"], position)
        assert drive(resumed, 4, start=stop) == later, stop
        assert resumed.state() == uninterrupted.state(), stop
    assert with_waiting >= 2


# --- train-lsdm with every option on ---------------------------------------------------------------
EVERYTHING = {
    "sparsity": {"use": True, "density": 0.5, "update_every": 2, "drop_fraction": 0.3, "stop_at": 1.0},
    "freezing": {"use": True, "mode": "schedule", "schedule": [[2, 1], [4, 2]]},
    "sieving": {"use": True, "fraction": 0.6, "swap_every": 2, "swap_fraction": 0.5},
}


def lsdm_config(output, shards, vae_dir):
    return {
        "output": str(output),
        "seed": 0,
        "data": {"train": str(shards), "resolution": 16, "shuffle_buffer": 4, "num_workers": 0},
        "model": {
            "unet": {**TINY_UNET, "cross_attention_dim": 384},
            "vae": str(vae_dir),
            "text_encoder": "minilm",
            "latent_stats_batches": 1,
        },
        "train": {
            "batch_size": 2,
            "max_train_steps": 6,
            "checkpointing_steps": 2,
            "checkpoints_total_limit": 3,
            "learning_rate": 1e-3,
            "ema": {"use": True, "decay": 0.9},
            "log_every": 100,
            "efficiency": EVERYTHING,
        },
    }


def test_train_lsdm_with_every_option_resumes_exactly_and_reports_its_savings(vae_dir, tmp_path):
    shards = write_toy_shards(tmp_path / "shards", count=6, per_shard=3)
    run = tmp_path / "run"
    report = train_lsdm(lsdm_config(run, shards, vae_dir))
    saved = report["efficiency"]
    flops = saved["flops"]
    assert flops["counted"] < flops["dense"] and flops["freezing_backward_skipped"] > 0
    assert flops["counted"] == flops["dense"] - flops["freezing_backward_skipped"] - flops["sparsity_saved"]
    assert flops["sparse_layers_counted"] < flops["sparse_layers_dense_equivalent"] < flops["dense"]
    assert saved["freezing"]["frozen_at_step"] == [2, 4] and saved["sparsity"]["density"] == 0.5
    assert saved["sieving"]["samples_trained"] == 12 and saved["sieving"]["samples_not_seen"] > 0

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    shutil.copy(run / "latent_stats.json", resumed / "latent_stats.json")
    again = train_lsdm(lsdm_config(resumed, shards, vae_dir), resume="latest")
    assert again["losses"] == report["losses"][2:]
    assert again["weights_sha256_per_process"] == report["weights_sha256_per_process"]
    for key in ("flops", "sparsity", "freezing", "sieving"):
        assert again["efficiency"][key] == saved[key], key
    final = "pipeline/unet/diffusion_pytorch_model.safetensors"
    original, replayed = load_file(run / final), load_file(resumed / final)  # the EMA weights, masked
    assert all(torch.equal(original[name], replayed[name]) for name in original)
    sparse = original["trunk.mid_block.resnets.0.conv1.weight"]
    assert int((sparse != 0).sum()) <= sparse.numel() // 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.efficiency.sparsity.density=1.5", "train.efficiency.sparsity.density=1.5"),
        ("train.efficiency.freezing.mode=sometimes", "train.efficiency.freezing.mode='sometimes'"),
        ("train.efficiency.freezing.schedule=[[200, 1], [100, 2]]", "train.efficiency.freezing.schedule"),
        ("train.efficiency.sieving.fraction=0", "train.efficiency.sieving.fraction=0"),
        ("train.efficiency.sieving.use=yes please", "train.efficiency.sieving.use='yes please'"),
    ],
)
def test_bad_efficiency_settings_fail_at_start_naming_the_key(override, message):
    config = load_config("lsdm/tiny")
    part = override.split(".")[2]
    config["train"]["efficiency"][part]["use"] = True
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        check_config(apply_overrides(config, [override]), check_paths=False)
