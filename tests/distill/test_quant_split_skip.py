"""Q-Diffusion's split skip quantization at toy size: the split model computes what the float one
did, every up-path shortcut splits at its concatenation's seam, and PT2E then observes each half
on its own (two input scales where there was one)."""

import copy

import pytest
import torch
from torch import nn

from distill.quant.ptq import canonical_call, quantize_int8
from distill.quant.split_skip import SplitInputConv, split_skip_convs, up_blocks


def test_a_split_convolution_is_the_convolution_of_the_concatenation():
    torch.manual_seed(0)
    conv = nn.Conv2d(10, 6, 1)
    split = SplitInputConv(conv, 4)
    deep, skip = torch.randn(2, 4, 5, 5), 8 * torch.randn(2, 6, 5, 5)
    joined = torch.cat([deep, skip], dim=1)
    torch.testing.assert_close(split(joined), conv(joined), rtol=1e-5, atol=1e-5)
    assert split.first.in_channels == 4 and split.second.in_channels == 6 and split.second.bias is None
    with pytest.raises(ValueError, match="split=|input channel 10"):
        SplitInputConv(conv, 10)


def test_the_up_path_shortcuts_split_at_the_seam_and_nothing_changes(float_pipeline, calibration):
    unet = float_pipeline.unet
    call = canonical_call(unet, *calibration.example)
    model = copy.deepcopy(unet)
    count = split_skip_convs(model, call)
    splits = 0
    for block in up_blocks(model).values():
        for index, resnet in enumerate(block.resnets):
            conv = resnet.conv_shortcut
            if not isinstance(conv, SplitInputConv):
                continue
            splits += 1
            assert conv.first.in_channels + conv.second.in_channels == resnet.in_channels
            if index:  # the deep half of a later ResNet's input is the ResNet before's output
                assert conv.first.in_channels == block.resnets[index - 1].out_channels
    assert count == splits > 0
    with torch.no_grad():
        torch.testing.assert_close(model(**call).sample, unet(**call).sample, rtol=1e-4, atol=1e-5)


def test_pt2e_gives_each_half_of_a_skip_concatenation_its_own_scale(float_pipeline, calibration, int8_model):
    plain = int8_model
    split = quantize_int8(float_pipeline.unet, calibration, split_skip=True)

    def activation_quantizers(program):
        return sum(
            node.op == "call_function" and str(node.target) == "quantized_decomposed.quantize_per_tensor.default"
            for node in program.graph.nodes
        )

    call = canonical_call(float_pipeline.unet, *calibration.example)
    count = split_skip_convs(copy.deepcopy(float_pipeline.unet), call)
    assert activation_quantizers(split) >= activation_quantizers(plain) + count
    with torch.no_grad():
        reference = float_pipeline.unet(**call).sample
        ours = split(**call).sample
    assert ((ours - reference).norm() / reference.norm()).item() < 0.1


def test_a_student_with_an_up_path_resnet_removed_splits_after_it_at_the_passed_width(float_pipeline, calibration):
    from hyperhuman.unet_parts import RemovedResnet, removable_parts, remove_parts

    unet = copy.deepcopy(float_pipeline.unet)
    removable = [name for name in removable_parts(unet) if ".up_blocks." in f".{name}" and ".resnets." in name]
    assert removable, "the toy LSDM has no removable up-path ResNet to test with"
    remove_parts(unet, removable[:1])
    call = canonical_call(unet, *calibration.example)
    model = copy.deepcopy(unet)
    assert split_skip_convs(model, call) > 0
    assert isinstance(model.get_submodule(removable[0]), RemovedResnet)
    with torch.no_grad():
        torch.testing.assert_close(model(**call).sample, unet(**call).sample, rtol=1e-4, atol=1e-5)
