"""The SR network's width and depth search: STE gates, exact removal, the speed model, a short search."""

import itertools
import math
import shutil

import PIL.Image
import pytest
import torch

from distill.sr_search import (
    SkipGate,
    SRSpeedModel,
    fill_to_target,
    fit_speed_model,
    held_out_error,
    insert_masks,
    kept_architecture,
    meet_target,
    remove,
    search,
)
from hyperhuman.sr.model import SuperResolutionNet

TINY = {"scale": 2, "channels": 8, "num_blocks": 4, "inner_channels": 12}


def tiny_net(seed=0, **kwargs):
    torch.manual_seed(seed)
    return SuperResolutionNet(**TINY, **kwargs).eval()


def test_a_skip_gate_is_binary_forward_with_the_straight_through_gradient():
    torch.manual_seed(0)
    gate = SkipGate()
    assert gate.kept() and gate.gate().item() == 1.0
    gate.gate().backward()
    assert gate.weight.grad.item() == 1.0
    with torch.no_grad():
        gate.weight.fill_(0.3)
    assert not gate.kept() and gate.gate().item() == 0.0


def test_removal_computes_what_the_masked_network_computed(tmp_path):
    net = tiny_net()
    masks = insert_masks(net)
    with torch.no_grad():
        for mask, _gate in masks.values():
            mask.weight.uniform_(0.0, 1.0)  # about half the channels dropped
        masks[2][1].weight.fill_(0.1)  # block 2 skipped
    low = torch.rand(2, 3, 9, 11)
    with torch.no_grad():
        masked = net(low)
    pruned = remove(net, masks).eval()
    assert pruned.config.skipped_blocks == [2]
    assert pruned.block_widths() == kept_architecture(masks)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in tiny_net().parameters())
    with torch.no_grad():
        torch.testing.assert_close(pruned(low), masked, rtol=0, atol=1e-6)
    pruned.save_pretrained(tmp_path / "sr")
    with torch.no_grad():
        assert torch.equal(SuperResolutionNet.from_pretrained(tmp_path / "sr").eval()(low), pruned(low))


def test_the_speed_model_is_linear_in_the_masks_and_differentiable():
    speed = SRSpeedModel("eager", (1, 3, 8, 8), fixed=2.0, intercept=0.5, slope=0.1, fit_error=0.0, full=8.8)
    net = tiny_net()
    masks = insert_masks(net)
    assert speed.predict(kept_architecture(masks)) == pytest.approx(2.0 + 4 * (0.5 + 1.2))
    expected = speed.expected(masks)
    assert expected.item() == pytest.approx(speed.predict(kept_architecture(masks)))
    expected.backward()
    mask, gate = masks[0]
    assert gate.weight.grad.item() == pytest.approx(0.5 + 1.2)  # the block's whole cost
    assert torch.allclose(mask.weight.grad, torch.full((12,), 0.1))
    assert SRSpeedModel.from_json(speed.to_json()) == speed


def test_the_fitted_speed_model_predicts_networks_it_was_not_fitted_on():
    net = tiny_net()
    speed = fit_speed_model(net, (1, 3, 24, 24), "eager", warmup=1, repeats=3)
    # timings on a shared test machine: only their structure is asserted (bench/prune.py reports the error)
    assert speed.fixed > 0 and speed.full > 0 and speed.slope >= 0 and speed.fit_error >= 0
    rows = held_out_error(speed, net, count=2, repeats=3)
    assert len(rows) == 2 and all(row["measured"] > 0 and math.isfinite(row["error"]) for row in rows)


def test_a_short_search_meets_its_target_and_removes_to_a_working_network():
    teacher = tiny_net()
    net = tiny_net()
    speed = SRSpeedModel("eager", (1, 3, 8, 8), fixed=1.0, intercept=0.2, slope=0.1, fit_error=0.0, full=6.6)
    target = 0.4 * speed.full
    generator = torch.Generator().manual_seed(0)

    def pairs():
        while True:
            high = torch.rand(2, 3, 16, 16, generator=generator)
            yield torch.nn.functional.avg_pool2d(high, 2), high

    masks, log = search(net, teacher, pairs(), speed, target, steps=5, resource_weight=5.0, mask_learning_rate=0.1)
    assert len(log) == 5 and log[-1]["predicted_ms"] < log[0]["predicted_ms"]
    meet_target(masks, speed, target)
    architecture = kept_architecture(masks)
    assert speed.predict(architecture) <= target
    pruned = remove(net, masks)
    assert pruned.block_widths() == architecture
    assert pruned(torch.rand(1, 3, 6, 6)).shape == (1, 3, 12, 12)
    assert all(w >= 1 for w in itertools.chain(architecture.values()))


def test_what_an_overshooting_search_dropped_comes_back_while_the_target_holds():
    torch.manual_seed(0)
    net = tiny_net()
    speed = SRSpeedModel("eager", (1, 3, 8, 8), fixed=1.0, intercept=0.2, slope=0.1, fit_error=0.0, full=6.6)
    masks = insert_masks(net)
    with torch.no_grad():  # all gates and masks crossed together: far under the target
        for mask, gate in masks.values():
            gate.weight.fill_(0.3)
            mask.weight.uniform_(0.0, 0.4)
        masks[1][1].weight.fill_(0.45)  # the block the search was closest to keeping
    target = 0.5 * speed.full
    assert speed.predict(kept_architecture(masks)) == speed.fixed
    restored = fill_to_target(masks, speed, target)
    architecture = kept_architecture(masks)
    predicted = speed.predict(architecture)
    assert restored > 0 and 1 in architecture and predicted <= target
    assert fill_to_target(masks, speed, target) == 0


def test_hyperhuman_prune_on_the_sr_network_searches_fine_tunes_and_resumes(tmp_path):
    from distill.prune import prune
    from hyperhuman.config import load_config
    from hyperhuman.sr.train import train_sr
    from tests.hyperhuman.conftest import write_toy_shards
    from tests.sr.test_sr import sr_config

    shards = write_toy_shards(tmp_path / "shards", count=4, per_shard=2)
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(2):
        image = torch.rand(3, 20, 24, generator=torch.Generator().manual_seed(index))
        PIL.Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(photos / f"p{index}.png")
    train_sr(sr_config(tmp_path / "teacher", shards, photos, max_train_steps=2, checkpointing_steps=2))

    def config(output, steps):
        return load_config("prune/sr-tiny", [
            f"output={output}", f"teacher={tmp_path / 'teacher'}", f"data.train={shards}", "data.resolution=16",
            f"validation.photos={photos}", "validation.max_side=32", "timing.height=8", "timing.width=8",
            "timing.repeats=2", "timing.held_out_networks=1", "search.steps=3", f"train.max_train_steps={steps}",
            "train.checkpointing_steps=2", "data.shuffle_buffer=4",
            "target.fraction=0.9",  # at 8 × 8 the head and tail are much of the cost
        ])  # fmt: skip

    report = prune(config(tmp_path / "pruned", 4))
    pruned = SuperResolutionNet.from_pretrained(tmp_path / "pruned" / "sr")
    assert pruned.block_widths() == {int(k): v for k, v in report["architecture"]["pruned"].items()}
    assert report["target_met"] and report["predicted_ms"]["pruned"] <= report["target_ms"] + 1e-9
    assert {"teacher", "pruned"} <= set(report["quality"]) and report["finetune"]["steps"] == 4
    # interrupted after 2 fine-tune steps, resumed: the uninterrupted run's weights (the search is kept).
    # Both runs price widths with one speed model (timings differ between fits, and so would the search).
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "pruned" / "speed.json", tmp_path / "resumed" / "speed.json")
    prune(config(tmp_path / "resumed", 2))
    prune(config(tmp_path / "resumed", 4), resume="latest")
    again = SuperResolutionNet.from_pretrained(tmp_path / "resumed" / "sr")
    for (name, first), (_, second) in zip(pruned.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(first, second), name
