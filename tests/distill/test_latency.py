"""The latency table: blocks cover the model, timings are taken at the shapes the blocks really
see, cached per machine and runtime, and a step is predicted from them."""

import json

import pytest
import torch

from distill.latency import (
    LatencyTable,
    blocks,
    capture,
    machine,
    measure_step,
    parts,
    predict,
    rest_of_step,
    signature,
)
from hyperhuman.lsdm.model import LatentStructuralUNet
from hyperhuman.lsdm.testing import IDENTITY_NORM, tiny_unet

FAST = {"warmup": 1, "repeats": 3}


def unet_inputs(batch=2, size=8):
    torch.manual_seed(0)
    return {
        "sample": torch.randn(batch, 4, size, size),
        "timestep": torch.tensor(10),
        "encoder_hidden_states": torch.randn(batch, 5, 32),
    }


def lsdm_inputs(batch=2, size=8):
    inputs = unet_inputs(batch, size)
    inputs["sample"] = torch.randn(batch, 12, size, size)
    inputs["pose_latent"] = torch.randn(batch, 4, size, size)
    return inputs


@pytest.fixture(scope="module")
def models():
    unet = tiny_unet().eval()
    lsdm = LatentStructuralUNet.from_unet(tiny_unet(), latent_norm=dict(IDENTITY_NORM)).eval()
    return {"unet": (unet, unet_inputs()), "lsdm": (lsdm, lsdm_inputs())}


@pytest.mark.parametrize("kind", ["unet", "lsdm"])
def test_blocks_hold_every_parameter_exactly_once(models, kind):
    model, _ = models[kind]
    owned = [name for block in blocks(model) for name, _ in model.get_submodule(block).named_parameters(prefix=block)]
    assert sorted(owned) == sorted(name for name, _ in model.named_parameters())


def test_lsdm_blocks_are_its_branches_and_its_trunk_in_execution_order(models):
    names = blocks(models["lsdm"][0])
    assert names[0] == "trunk.time_embedding" and names[1] == "branch.rgb.conv_in"
    assert (
        names.index("branch.normal.down_blocks.0") < names.index("trunk.down_blocks.1") < names.index("trunk.mid_block")
    )
    assert names[-1] == "branch.normal.conv_out"
    assert parts(models["lsdm"][0], "branch.rgb.down_blocks.0") == [
        "branch.rgb.down_blocks.0.resnets.0", "branch.rgb.down_blocks.0.attentions.0",
    ]  # fmt: skip


def test_capture_records_the_shapes_each_block_really_sees(models):
    model, inputs = models["unet"]
    calls = {call.name: call for call in capture(model, inputs, blocks(model))}
    assert calls["conv_in"].args[0].shape == (2, 4, 8, 8)
    assert calls["up_blocks.1"].kwargs["hidden_states"].shape[1] == 32  # after the first up block
    assert "encoder_hidden_states" in calls["down_blocks.0"].kwargs


@pytest.mark.parametrize("kind", ["unet", "lsdm"])
def test_predict_sums_block_timings_and_caches_them(models, kind, tmp_path):
    model, inputs = models[kind]
    table = LatencyTable.load(tmp_path / "table.json")
    first = predict(model, inputs, "eager", table, **FAST)
    assert set(first.blocks) == set(blocks(model)) and all(ms > 0 for ms in first.blocks.values())
    assert 0 < first.rest_ms < first.total_ms
    assert first.total_ms == pytest.approx(sum(first.blocks.values()) + first.rest_ms)
    measured = table.measured
    again = predict(model, inputs, "eager", table, **FAST)
    assert table.measured == measured and again.blocks == first.blocks  # nothing timed twice
    table.save()
    reloaded = LatencyTable.load(tmp_path / "table.json")
    assert predict(model, inputs, "eager", reloaded, **FAST).total_ms == first.total_ms and reloaded.measured == 0
    # Another batch size is another shape: timed anew.
    predict(model, {**inputs, **{k: v[:1] for k, v in inputs.items() if k != "timestep"}}, "eager", reloaded, **FAST)
    assert reloaded.measured == measured  # as many new entries as the first step needed


def test_the_three_branches_share_timings_of_identical_blocks(models, tmp_path):
    model, inputs = models["lsdm"]
    table = LatencyTable.load(tmp_path / "table.json")
    predict(model, inputs, "eager", table, **FAST)
    # rgb, depth and normal have the same outer blocks at the same shapes: one entry each kind
    branch_blocks = [name for name in blocks(model) if name.startswith("branch.")]
    assert table.measured == len(blocks(model)) - len(branch_blocks) * 2 // 3 + 1  # + the rest of the step
    assert signature(model.get_submodule("branch.rgb.conv_out")) == signature(
        model.get_submodule("branch.depth.conv_out")
    )


@pytest.mark.parametrize("kind", ["unet", "lsdm"])
def test_the_rest_of_the_step_replays_the_blocks_and_leaves_the_model_as_it_was(models, kind):
    model, inputs = models[kind]
    with torch.inference_mode():
        before = model(**inputs).sample
    rest = rest_of_step(model, inputs, blocks(model), "eager", warmup=0, repeats=2)
    full = measure_step(model, inputs, "eager", warmup=1, repeats=3)
    assert 0 < rest < full
    assert all("forward" not in vars(model.get_submodule(name)) for name in blocks(model))
    with torch.inference_mode():
        assert torch.equal(model(**inputs).sample, before)


def test_parts_and_bf16(models, tmp_path):
    model, inputs = models["unet"]
    table = LatencyTable.load(tmp_path / "table.json")
    prediction = predict(model, inputs, "bf16", table, with_parts=True, **FAST)
    assert "down_blocks.0.attentions.0" in prediction.parts and "up_blocks.0.resnets.1" in prediction.parts
    assert all(key.startswith("bf16|") for key in table.entries)


def test_a_table_of_another_machine_is_not_used(models, tmp_path):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"format": 1, "machine": {**machine(), "cpu": "another"}, "entries": {"x": 1.0}}))
    assert LatencyTable.load(path).entries == {}


def test_measure_step_and_bad_runtime(models):
    model, inputs = models["unet"]
    assert measure_step(model, inputs, "eager", **FAST) > 0
    with pytest.raises(ValueError, match="runtime 'tensorrt' is not one of"):
        measure_step(model, inputs, "tensorrt", **FAST)
