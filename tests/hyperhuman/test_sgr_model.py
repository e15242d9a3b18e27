"""The Structure-Guided Refiner at toy size (SD- and SDXL-style base UNets): "no condition" is the
base UNet exactly, each condition steers it, per-sample dropping, gradients, the encoder copy,
save/load, and the errors that name what to fix."""

import pytest
import torch

from hyperhuman.sgr import (
    CONDITIONS,
    PAPER_DROP_PROBABILITIES,
    ConditionEmbedder,
    StructureGuidedRefiner,
    drop_conditions,
    refiner_forward,
)
from hyperhuman.sgr.testing import (
    TINY_SD_UNET,
    dummy_components,
    dummy_inputs,
    is_zero_init,
    perturb,
    tiny_refiner,
    tiny_unet,
)

KINDS = ["sd", "sdxl"]


@pytest.fixture(params=KINDS)
def components(request):
    return dummy_components(request.param)


def _base(unet, inputs):
    return unet(**{key: value for key, value in inputs.items() if key != "conditions"}).sample


def _only(inputs, *names):
    return {**inputs, "conditions": {name: inputs["conditions"][name] for name in names}}


@torch.no_grad()
def test_with_every_condition_dropped_the_refiner_is_the_base_unet_exactly_even_after_training(components):
    unet, refiner = components["unet"], components["refiner"]
    inputs = dummy_inputs(unet, batch=3)
    expected = _base(unet, inputs)
    perturb(refiner, seed=3)  # every weight moved, as after training: zero-init alone would not do
    all_masked = {name: torch.zeros(3, dtype=torch.bool) for name in CONDITIONS}
    dropped = [
        _only(inputs),
        {**inputs, "conditions": dict.fromkeys(CONDITIONS)},
        {**inputs, "condition_masks": all_masked},
    ]
    for case in dropped:
        down, mid = refiner(**case)
        assert all(torch.count_nonzero(residual) == 0 for residual in (*down, mid))
        assert torch.equal(refiner_forward(unet, refiner, **case), expected)
    assert not torch.equal(refiner_forward(unet, refiner, **inputs), expected)  # with them it steers


@torch.no_grad()
def test_a_fresh_refiner_changes_nothing_and_zero_residuals_have_the_computed_shapes(components):
    unet, refiner = components["unet"], components["refiner"]
    inputs = dummy_inputs(unet)
    assert torch.equal(refiner_forward(unet, refiner, **inputs), _base(unet, inputs))
    present, absent = refiner(**inputs), refiner(**_only(inputs))
    assert [r.shape for r in (*present[0], present[1])] == [r.shape for r in (*absent[0], absent[1])]
    assert len(present[0]) == len(refiner.controlnet_down_blocks) == 4  # conv_in, 2 resnets, 1 downsampler


@torch.no_grad()
def test_each_condition_alone_changes_the_output(components):
    unet, refiner = components["unet"], components["refiner"]
    perturb(refiner, seed=1, zero_init_only=True)  # a new refiner is a no-op by design
    inputs = dummy_inputs(unet)
    base = _base(unet, inputs)
    outputs = {name: refiner_forward(unet, refiner, **_only(inputs, name)) for name in CONDITIONS}
    for name, out in outputs.items():
        assert (out - base).abs().max() > 1e-3, name
    assert not torch.equal(outputs["pose"], outputs["depth"]) and not torch.equal(outputs["depth"], outputs["normal"])
    assert torch.equal(refiner_forward(unet, refiner, **inputs, conditioning_scale=0.0), base)


@torch.no_grad()
def test_per_sample_dropping_only_affects_the_dropped_samples(components):
    unet, refiner = components["unet"], components["refiner"]
    perturb(refiner, seed=2)
    inputs = dummy_inputs(unet, batch=3)
    masks = {  # sample 0: no pose; sample 1: everything; sample 2: nothing
        "pose": torch.tensor([False, True, False]),
        "depth": torch.tensor([True, True, False]),
        "normal": torch.tensor([True, True, False]),
    }
    mixed = refiner_forward(unet, refiner, **inputs, condition_masks=masks)
    full = refiner_forward(unet, refiner, **inputs)
    without_pose = refiner_forward(unet, refiner, **_only(inputs, "depth", "normal"))
    base = _base(unet, inputs)
    assert torch.equal(mixed[0], without_pose[0])  # a mask of 1 or 0 is exact: same arithmetic per sample
    assert torch.equal(mixed[1], full[1])
    assert torch.equal(mixed[2], base[2])
    assert not torch.allclose(mixed[0], full[0], atol=1e-4)


def test_gradients_reach_every_trainable_part_and_none_of_the_frozen_base(components):
    unet, refiner = components["unet"], components["refiner"]
    perturb(refiner, seed=4, zero_init_only=True)  # zero convs pass no gradient upstream until they move
    inputs = dummy_inputs(unet, batch=3, conditions=("pose", "depth"))  # normal absent from the batch
    masks = {"pose": torch.tensor([True, False, True]), "depth": torch.tensor([False, True, True])}
    out = refiner_forward(unet, refiner, **inputs, condition_masks=masks)
    out.square().mean().backward()
    for name, parameter in refiner.named_parameters():
        if name.startswith("embedders.normal."):
            assert parameter.grad is None, name
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(parameter.grad is None for parameter in unet.parameters())
    names = {name.split(".")[1] for name, _ in refiner.named_parameters() if name.startswith("control.")}
    assert {"conv_in", "time_embedding", "down_blocks", "mid_block"} <= names
    if unet.config.addition_embed_type == "text_time":
        assert "add_embedding" in names


@pytest.mark.parametrize("kind", KINDS)
def test_from_unet_copies_the_encoder_exactly_and_zero_inits_the_rest(kind):
    unet = tiny_unet(kind, seed=5)
    refiner = tiny_refiner(unet)
    source, state = unet.state_dict(), refiner.state_dict()
    encoder = {key for key in source if not key.startswith(("up_blocks.", "conv_norm_out.", "conv_out."))}
    assert {key[len("control.") :] for key in state if key.startswith("control.")} == encoder
    for key in encoder:
        assert torch.equal(state[f"control.{key}"], source[key]), key
    if kind == "sdxl":
        assert "add_embedding.linear_1.weight" in encoder
    zero_init = [key for key in state if is_zero_init(key)]
    assert len(zero_init) == 2 * (4 + 1 + len(CONDITIONS))
    assert all(torch.count_nonzero(state[key]) == 0 for key in zero_init)


@torch.no_grad()
def test_save_and_load_give_identical_outputs(components, tmp_path):
    unet, refiner = components["unet"], components["refiner"]
    perturb(refiner, seed=6)
    refiner.save_pretrained(tmp_path / "refiner")
    loaded = StructureGuidedRefiner.from_pretrained(tmp_path / "refiner").eval()
    inputs = dummy_inputs(unet)
    masks = {"depth": torch.tensor([True, False])}
    assert torch.equal(
        refiner_forward(unet, refiner, **inputs, condition_masks=masks),
        refiner_forward(unet, loaded, **inputs, condition_masks=masks),
    )
    assert loaded.config.conditions == list(CONDITIONS) and loaded.config.embedder_strides == [1, 2, 2, 2]


def test_embedder_strides_set_the_downsampling_and_the_projection_starts_at_zero():
    condition = torch.rand(1, 3, 64, 64)
    default, paper = ConditionEmbedder(3, 16, strides=(1, 2, 2, 2)), ConditionEmbedder(3, 16, strides=(2, 2, 2, 2))
    assert default(condition).shape == (1, 16, 8, 8) and default.downscale == 8
    assert paper(condition).shape == (1, 16, 4, 4) and paper.downscale == 16
    assert torch.count_nonzero(default(condition)) == 0
    assert [layer.out_channels for layer in default.layers if isinstance(layer, torch.nn.Conv2d)] == [16, 32, 96, 256]


def test_conditions_at_the_wrong_size_name_the_strides_and_sizes():
    unet = tiny_unet("sd")
    refiner = tiny_refiner(unet, embedder_strides=(2, 2, 2, 2))  # the paper's ×16 on an ×8 latent
    inputs = dummy_inputs(unet)  # 16-px latent, 128-px conditions
    with pytest.raises(ValueError, match=r"embedder_strides \(2, 2, 2, 2\) downsample ×16.*256×256"):
        refiner(**inputs)
    with pytest.raises(ValueError, match=r"16×16.*\(1, 2, 2, 2\).*128×128"):
        tiny_refiner(unet)(**{**inputs, "conditions": {"pose": torch.zeros(2, 3, 120, 120)}})


def test_unknown_conditions_and_bad_masks_are_refused():
    unet = tiny_unet("sd")
    refiner = tiny_refiner(unet, conditions=["pose", "depth"])
    inputs = dummy_inputs(unet)
    with pytest.raises(ValueError, match=r"unknown condition 'normal'.*\['pose', 'depth'\]"):
        refiner(**inputs)
    with pytest.raises(ValueError, match="condition_masks\\['pose'\\] must be a bool tensor of shape \\(2,\\)"):
        refiner(**_only(inputs, "pose"), condition_masks={"pose": torch.ones(2)})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"conditions": ["pose", "pose"]}, "distinct"),
        ({"conditions": ["pose", "text"]}, "'text'"),
        ({"embedder_strides": [2, 2, 2]}, "same length"),
        ({"unet": {**TINY_SD_UNET, "addition_embed_type": "image_hint"}}, "image_hint"),
    ],
)
def test_bad_refiner_configs_are_refused_with_the_key_to_fix(change, message):
    with pytest.raises(ValueError, match=message):
        StructureGuidedRefiner(**{"unet": TINY_SD_UNET, **change})


def test_a_batch_that_lost_every_condition_still_back_propagates_through_every_parameter(components):
    """Robust conditioning drops all three conditions of a whole micro-batch now and then (sgr/tiny:
    1 step in 64). The step must still have a graph (the base is frozen: without the refiner in it
    ``backward`` raises) holding every trainable parameter (DDP refuses unused ones), while the
    prediction stays the base UNet's exactly."""
    unet, refiner = components["unet"], components["refiner"]
    unet.requires_grad_(False)
    perturb(refiner, seed=5)
    inputs = dummy_inputs(unet, batch=2)
    with torch.no_grad():
        expected = _base(unet, inputs)
    for masks in (
        {name: torch.zeros(2, dtype=torch.bool) for name in CONDITIONS},  # every condition, every sample
        {"pose": torch.tensor([True, False]), "depth": torch.zeros(2, dtype=torch.bool)},  # one whole embedder off
    ):
        refiner.zero_grad(set_to_none=True)
        out = refiner_forward(unet, refiner, **inputs, condition_masks=masks)
        out.square().mean().backward()
        assert all(parameter.grad is not None for parameter in refiner.parameters())
        assert all(parameter.grad is None for parameter in unet.parameters())
        if not any(mask.any() for mask in masks.values()):
            assert torch.equal(out.detach(), expected)
            assert all(torch.count_nonzero(parameter.grad) == 0 for parameter in refiner.parameters())
        else:
            assert all(torch.count_nonzero(p.grad) == 0 for p in refiner.embedders["depth"].parameters())


def test_drop_conditions_draws_per_sample_masks_reproducibly():
    batch = 64
    conditions = {name: torch.rand(batch, 3, 8, 8) for name in CONDITIONS}
    states, empty = torch.randn(batch, 5, 32), torch.randn(1, 5, 32)

    def draw(seed, probabilities=PAPER_DROP_PROBABILITIES):
        generator = torch.Generator().manual_seed(seed)
        return drop_conditions(conditions, states, probabilities, generator, empty_text_states=empty)

    first, again = draw(0), draw(0)
    for name in CONDITIONS:
        mask = first.condition_masks[name]
        assert torch.equal(mask, again.condition_masks[name]) and 0 < int(mask.sum()) < batch
        assert first.conditions[name] is conditions[name]  # the images are not copied: the masks carry the drop
    kept = first.text_kept
    assert torch.equal(first.text_states[kept], states[kept])
    assert torch.equal(first.text_states[~kept], empty.expand(int((~kept).sum()), -1, -1))

    everything = draw(1, dict.fromkeys([*CONDITIONS, "text"], 1.0))
    assert all(everything.conditions[name] is conditions[name] for name in CONDITIONS)  # kept for the graph
    assert not any(mask.any() for mask in everything.condition_masks.values())
    nothing = drop_conditions(conditions, states, {}, torch.Generator().manual_seed(2))
    assert all(mask.all() for mask in nothing.condition_masks.values()) and nothing.text_states is states


def test_drop_conditions_refuses_unknown_names_and_a_missing_empty_prompt():
    conditions, states = {"pose": torch.rand(2, 3, 8, 8)}, torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match=r"unknown names \['depth'\]"):
        drop_conditions(conditions, states, {"depth": 0.5})
    with pytest.raises(ValueError, match="empty_text_states"):
        drop_conditions(conditions, states, {"text": 0.5})
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        drop_conditions(conditions, states, {"pose": 1.5})


@torch.no_grad()
def test_dropped_batches_feed_the_refiner(components):
    unet, refiner = components["unet"], components["refiner"]
    perturb(refiner, seed=7)
    inputs = dummy_inputs(unet, batch=4)
    empty = torch.zeros(1, 5, unet.config.cross_attention_dim)
    generator = torch.Generator().manual_seed(0)
    drop = drop_conditions(
        inputs["conditions"],
        inputs["encoder_hidden_states"],
        PAPER_DROP_PROBABILITIES,
        generator,
        empty_text_states=empty,
    )
    case = {**inputs, "conditions": drop.conditions, "encoder_hidden_states": drop.text_states}
    out = refiner_forward(unet, refiner, **case, condition_masks=drop.condition_masks)
    base = _base(unet, case)
    none = ~torch.stack(list(drop.condition_masks.values())).any(dim=0)
    assert none.tolist() == [True, False, True, False]  # this seed's draw: two samples lose every condition
    assert torch.equal(out[none], base[none])
    assert not torch.allclose(out[~none], base[~none], atol=1e-4)
