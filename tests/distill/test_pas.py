"""Pruning-as-Search masks: the binary mask and its straight-through gradient, masks in a plain UNet and
in the LSDM (a fresh one changes nothing), physical removal that computes what the masked model
computed, whole GroupNorm groups and heads, the minimum kept, and the widths record."""

import copy
import json

import pytest
import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

from distill.pas import (
    MASK_ATTRIBUTE,
    ChannelMask,
    expected_kept_channels,
    group_size,
    insert_masks,
    kept_fractions,
    masks_of,
    prunable,
    remove_masked,
    shrink_to_widths,
    widths,
    with_widths_recorded,
)
from hyperhuman.lsdm.model import LatentStructuralUNet

from .conftest import TEACHER_UNET, teacher_lsdm, teacher_unet

TEACHERS = {"unet": teacher_unet, "lsdm": teacher_lsdm}


def inputs_for(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    channels = 12 if isinstance(model, LatentStructuralUNet) else 4
    inputs = {
        "sample": torch.randn(2, channels, 8, 8, generator=generator),
        "timestep": torch.tensor([10, 700]),
        "encoder_hidden_states": torch.randn(2, 5, TEACHER_UNET["cross_attention_dim"], generator=generator),
    }
    if isinstance(model, LatentStructuralUNet):
        inputs["pose_latent"] = torch.randn(2, 4, 8, 8, generator=generator)
    return inputs


def output(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


def set_weights(mask, values):
    with torch.no_grad():
        mask.weight.copy_(torch.tensor(values, dtype=mask.weight.dtype))


def drop_some(masks):
    """Below 0.5: every third norm group of each ResNet, the first head of each attention, every
    fourth FFN channel; and all of one ResNet's groups, so it keeps only its minimum (one group)."""
    with torch.no_grad():
        for name, mask in masks.items():
            if name.endswith("ff"):
                mask.weight[::4] = 0.3
            elif name.endswith(("attn1", "attn2")):
                mask.weight[0] = 0.1
            else:
                mask.weight[1::3] = 0.2
        resnet = next(name for name in masks if ".resnets." in name)
        masks[resnet].weight.fill_(0.0)
    return resnet


# -- the mask ------------------------------------------------------------------------------------------------------


def test_the_mask_is_exactly_binary_forward_and_passes_the_gradient_straight_through():
    mask = ChannelMask(8, group=2)
    set_weights(mask, [0.9, 0.3, 3.3, -0.7])  # kept, dropped, kept (far above 1), dropped (below 0)
    expected = torch.tensor([1.0, 1, 0, 0, 1, 1, 0, 0])
    generator = torch.Generator().manual_seed(0)
    for hidden in (torch.randn(2, 8, 3, 3, generator=generator), torch.randn(2, 5, 8, generator=generator)):
        mask.weight.grad = None
        hidden.requires_grad_(True)
        shape = (1, -1, 1, 1) if hidden.ndim == 4 else (1, 1, -1)
        masked = mask(hidden)
        assert torch.equal(masked, hidden * expected.view(shape))  # exactly 0 or exactly the input
        assert set(mask.gate().tolist()) == {0.0, 1.0}

        upstream = torch.randn(masked.shape, generator=generator)
        (masked * upstream).sum().backward()
        # straight through: d/dw of a group is its channels' input times the upstream gradient
        per_channel = (hidden * upstream).transpose(0, 1 if hidden.ndim == 4 else 2).reshape(8, -1).sum(1)
        torch.testing.assert_close(mask.weight.grad, per_channel.detach().view(4, 2).sum(1))
        assert (mask.weight.grad != 0).all()  # kept and dropped groups alike
        assert torch.equal(hidden.grad, upstream * expected.view(shape))  # dropped channels pass no gradient back


def test_a_fresh_mask_starts_above_the_threshold_from_the_seeded_generator():
    torch.manual_seed(3)
    first = ChannelMask(64)
    torch.manual_seed(3)
    assert torch.equal(first.weight, ChannelMask(64).weight)
    assert ((first.weight >= 0.5) & (first.weight <= 1.0)).all()
    assert first.weight.std() > 0.05  # uniform, not a constant
    assert first.keep().all()


def test_groups_are_kept_or_dropped_whole():
    mask = ChannelMask(12, group=4)
    assert mask.weight.shape == (3,)
    set_weights(mask, [0.7, 0.2, 0.6])
    assert mask.kept_indices().tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    masked = mask(torch.ones(1, 12, 2, 2))
    assert masked[0, :, 0, 0].tolist() == [1.0] * 4 + [0.0] * 4 + [1.0] * 4


def test_the_minimum_kept_is_the_largest_weights_when_too_few_are_above_the_threshold():
    mask = ChannelMask(4, min_groups=2)
    set_weights(mask, [0.1, 0.4, 0.3, 0.2])
    assert mask.keep().tolist() == [False, True, True, False]
    set_weights(mask, [0.1, 0.9, 0.3, 0.2])  # one above: it and the next largest
    assert mask.keep().tolist() == [False, True, True, False]
    set_weights(mask, [0.6, 0.9, 0.3, 0.7])  # enough above: the minimum changes nothing
    assert mask.keep().tolist() == [True, True, False, True]
    set_weights(mask, [0.2, 0.2, 0.2, 0.2])  # ties go to the lower index
    assert mask.keep().tolist() == [True, True, False, False]
    grouped = ChannelMask(8, group=4)  # the default minimum: one whole group
    set_weights(grouped, [0.0, 0.1])
    assert grouped.kept_indices().tolist() == [4, 5, 6, 7]


def test_expected_kept_channels_counts_exactly_and_is_differentiable():
    masks = {"a": ChannelMask(6, group=3), "b": ChannelMask(4)}
    set_weights(masks["a"], [0.9, 0.1])
    set_weights(masks["b"], [0.9, 0.1, 0.2, 0.8])
    kept = expected_kept_channels(masks)
    assert {name: value.item() for name, value in kept.items()} == {"a": 3.0, "b": 2.0}
    assert kept_fractions(masks) == {"a": 0.5, "b": 0.5}
    sum(kept.values()).backward()
    assert masks["a"].weight.grad.tolist() == [3.0, 3.0]  # group channels per weight
    assert masks["b"].weight.grad.tolist() == [1.0] * 4


# -- masks in a model ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TEACHERS)
def test_a_freshly_masked_model_computes_exactly_what_the_model_computes(kind):
    model = TEACHERS[kind](0).eval()
    inputs = inputs_for(model)
    expected = output(model, inputs)
    names_before = set(model.state_dict())
    torch.manual_seed(0)
    masks = insert_masks(model)

    assert list(masks) == list(prunable(model))
    kinds = {type(model.get_submodule(name)) for name in masks}
    assert kinds == {ResnetBlock2D, Attention, FeedForward}
    if kind == "lsdm":  # every branch and the trunk have their own
        assert {name.split(".")[0] + "." + name.split(".")[1] for name in masks} >= {"branch.rgb", "branch.depth"}
        assert any(name.startswith("trunk.") for name in masks)
    assert set(kept_fractions(masks).values()) == {1.0}
    # the masks live under their blocks' paths; every other parameter keeps its name
    assert set(model.state_dict()) == names_before | {f"{name}.{MASK_ATTRIBUTE}.weight" for name in masks}
    assert masks_of(model) == masks
    assert torch.equal(output(model, inputs), expected)


@pytest.mark.parametrize("kind", TEACHERS)
def test_removal_gives_a_smaller_model_that_computes_what_the_masked_model_computed(kind):
    model = TEACHERS[kind](0).eval()
    inputs = inputs_for(model)
    unmasked = output(model, inputs)
    torch.manual_seed(0)
    masks = insert_masks(model)
    emptied = drop_some(masks)
    masked = output(model, inputs)
    assert not torch.allclose(masked, unmasked)  # the masks bite
    kept = {name: len(mask.kept_indices()) for name, mask in masks.items()}
    groups = {name: group_size(model.get_submodule(name)) for name in masks}
    count = parameter_count(model)

    assert remove_masked(model, masks) is model
    assert parameter_count(model) < count - sum(mask.weight.numel() for mask in masks.values())
    torch.testing.assert_close(output(model, inputs), masked)
    assert masks_of(model) == {} and not any(MASK_ATTRIBUTE in key for key in model.state_dict())
    assert widths(model) == kept
    assert kept[emptied] == groups[emptied]  # all its weights below 0.5: the minimum, one norm group
    for name, block in prunable(model).items():
        # the same group (head) size, fewer groups (heads): never a partial one
        assert group_size(block) == groups[name], name
        assert kept[name] % groups[name] == 0
        if isinstance(block, ResnetBlock2D):
            assert block.norm2.num_channels == block.conv1.out_channels == block.conv2.in_channels == kept[name]
            assert block.time_emb_proj.out_features == kept[name]
        if isinstance(block, Attention):
            assert block.heads * groups[name] == block.to_q.out_features == block.to_out[0].in_features
            assert block.to_k.out_features == block.to_v.out_features == kept[name]
            assert block.heads == masks[name].groups - 1  # the first head went
        if isinstance(block, FeedForward):  # GEGLU: value and gate halves both sliced
            assert block.net[0].proj.out_features == 2 * kept[name] == 2 * block.net[2].in_features
    # what a later step trains: the pruned model still takes a gradient step
    model.train()
    model(**inputs).sample.square().mean().backward()


def test_a_scale_shift_resnet_keeps_both_halves_of_its_time_embedding():
    model = teacher_unet(0, resnet_time_scale_shift="scale_shift").eval()
    inputs = inputs_for(model)
    torch.manual_seed(0)
    masks = insert_masks(model)
    drop_some(masks)
    masked = output(model, inputs)
    remove_masked(model, masks)
    torch.testing.assert_close(output(model, inputs), masked)
    resnet = model.get_submodule("down_blocks.1.resnets.1")
    assert resnet.time_emb_proj.out_features == 2 * resnet.conv1.out_channels


def test_a_copy_of_a_masked_model_has_masks_of_its_own():
    model = teacher_unet(0).eval()
    inputs = inputs_for(model)
    torch.manual_seed(0)
    masks = insert_masks(model)
    expected = output(model, inputs)
    duplicate = copy.deepcopy(model)
    drop_some(masks_of(duplicate))
    assert torch.equal(output(model, inputs), expected)  # the copy's hooks read the copy's masks
    assert not torch.allclose(output(duplicate, inputs), expected)
    with pytest.raises(ValueError, match="masks of a copy"):
        remove_masked(duplicate, masks)
    masked = output(duplicate, inputs)
    torch.testing.assert_close(output(remove_masked(duplicate, masks_of(duplicate)), inputs), masked)


def test_the_widths_record_gives_a_fresh_model_the_pruned_shapes(tmp_path):
    pruned = teacher_unet(0).eval()
    torch.manual_seed(0)
    masks = insert_masks(pruned)
    drop_some(masks)
    remove_masked(pruned, masks)
    record = json.loads(json.dumps(widths(pruned)))  # plain JSON, as a config would hold it

    fresh = shrink_to_widths(teacher_unet(1), record).eval()
    assert widths(fresh) == record
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    inputs = inputs_for(pruned)
    assert torch.equal(output(fresh, inputs), output(pruned, inputs))


@pytest.mark.parametrize("kind", TEACHERS)
def test_a_pruned_model_saves_and_loads_as_itself(kind, tmp_path):
    from diffusers import UNet2DConditionModel

    from distill.students import EditedUNet2DConditionModel

    pruned = TEACHERS[kind](0).eval()
    torch.manual_seed(0)
    masks = insert_masks(pruned)
    drop_some(masks)
    remove_masked(pruned, masks)
    inputs = inputs_for(pruned)
    expected = output(pruned, inputs)

    recorded = with_widths_recorded(pruned)
    assert recorded.config.widths == widths(pruned)
    assert isinstance(recorded, UNet2DConditionModel | LatentStructuralUNet)  # drops in where the teacher went
    recorded.save_pretrained(tmp_path / "unet")
    loaded = type(recorded).from_pretrained(tmp_path / "unet").eval()
    if kind == "unet":
        assert type(loaded) is EditedUNet2DConditionModel
    assert widths(loaded) == widths(pruned)
    assert torch.equal(output(loaded, inputs), expected)


# -- refusals ------------------------------------------------------------------------------------------------------


class MixingProcessor:
    """A stand-in for a processor that is not head-wise (IP-adapter, custom)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return hidden_states


def test_bad_values_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="10 channels in groups of 4.*multiple"):
        ChannelMask(10, group=4)
    with pytest.raises(ValueError, match="min_groups=5.*between 1 and 4"):
        ChannelMask(4, min_groups=5)
    with pytest.raises(ValueError, match="this mask has 4 channels; the tensor has 3"):
        ChannelMask(4)(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) or \(B, N, C\)"):
        ChannelMask(4)(torch.zeros(4))

    model = teacher_unet(0)
    with pytest.raises(ValueError, match="min_groups=0"):
        insert_masks(model, min_groups=0)
    insert_masks(model)
    with pytest.raises(ValueError, match="has a mask already"):
        insert_masks(model)

    mixing = teacher_unet(0)
    mixing.set_attn_processor(MixingProcessor())
    with pytest.raises(ValueError, match="processor MixingProcessor.*set_default_attn_processor"):
        insert_masks(mixing)

    fresh = teacher_unet(0)
    with pytest.raises(ValueError, match=r"width 3 for 'down_blocks.0.resnets.0'.*multiple of 2 and at most 16"):
        shrink_to_widths(fresh, {"down_blocks.0.resnets.0": 3})
    with pytest.raises(ValueError, match="'conv_in'"):
        shrink_to_widths(fresh, {"conv_in": 8})
    with pytest.raises(ValueError, match="no such module"):
        remove_masked(fresh, {"down_blocks.9.resnets.0": ChannelMask(4)})
