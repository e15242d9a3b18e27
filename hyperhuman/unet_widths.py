"""Per-block inner widths of a diffusers UNet (or of our LSDM): what structured pruning changes.

A *prunable block* is a ``ResnetBlock2D``, an ``Attention`` (self or cross) or a ``FeedForward``,
found by type wherever it sits (so every LSDM branch and the trunk have their own). Its *width*
is an inner width that nothing outside the block sees — conv1's output channels, the heads ×
head size, the feed-forward's hidden width — so changing it keeps every block's input and output
width, and so every skip tensor, as it is:

- ``ResnetBlock2D``: conv1's rows, the time-embedding rows (both halves under ``scale_shift``),
  norm2 (fewer groups of the same size: a width is a whole number of groups) and conv2's columns;
- ``Attention``: to_q/to_k/to_v's rows and to_out[0]'s columns, in whole heads (``heads`` and the
  inner widths follow, the head size stays);
- ``FeedForward``: the input projection's rows (the value and the gate half of GEGLU/SwiGLU) and
  the output linear's columns.

:func:`slice_block` keeps given channels of one block (Pruning-as-Search's physical removal,
:mod:`distill.pas`); :func:`widths` records every block's width as a plain JSON-able dict, and
:func:`shrink_to_widths` gives a freshly built model those shapes, so a pruned model's config can
record its widths and its state dict loads (the LSDM's ``widths`` and
:class:`distill.students.EditedUNet2DConditionModel`'s).
"""

from __future__ import annotations

import torch
from diffusers.models.activations import GEGLU, SwiGLU
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

GATED_ACTIVATIONS = (GEGLU, SwiGLU)  # proj holds the value half, then the gate half


def prunable(model: nn.Module) -> dict[str, nn.Module]:
    """Every ResnetBlock2D, Attention and FeedForward of the model, by module path, in module order."""
    kinds = (ResnetBlock2D, Attention, FeedForward)
    return {name: module for name, module in model.named_modules() if isinstance(module, kinds)}


def group_size(module: nn.Module) -> int:
    """How many channels a prunable block keeps or drops together: a norm2 group, a head, one channel."""
    if isinstance(module, ResnetBlock2D):
        return module.conv1.out_channels // module.norm2.num_groups
    if isinstance(module, Attention):
        return module.to_q.out_features // module.heads
    return 1


def width(module: nn.Module) -> int:
    """A prunable block's inner width in channels: conv1's outputs, the heads × head size, the FFN's inner width."""
    if isinstance(module, ResnetBlock2D):
        return module.conv1.out_channels
    if isinstance(module, Attention):
        return module.to_q.out_features
    return module.net[2].in_features


def widths(model: nn.Module) -> dict[str, int]:
    """Module path → inner width (channels) of every prunable block: a JSON-able record of a pruned
    model's shapes (an attention's heads are its width over its head size, which pruning keeps)."""
    return {name: width(module) for name, module in prunable(model).items()}


def shrink_to_widths(model: nn.Module, kept: dict[str, int]) -> nn.Module:
    """Give a fresh model the shapes :func:`widths` recorded of a pruned one (its first channels of
    each block, weights to be overwritten by the pruned model's state dict), in place; returns ``model``."""
    blocks = prunable(model)
    for name, count in kept.items():
        if name not in blocks:
            raise ValueError(f"widths name {name!r}, which is not a ResnetBlock2D, Attention or FeedForward here")
        block, group = blocks[name], group_size(blocks[name])
        if not 0 < count <= width(block) or count % group:
            raise ValueError(
                f"width {count} for {name!r}: it must be a positive multiple of {group} and at most {width(block)}"
            )
        if count < width(block):
            slice_block(block, torch.arange(count, device=next(block.parameters()).device))
    return model


def slice_block(block: nn.Module, channels: torch.Tensor) -> None:
    """Keep only ``channels`` (ascending indices, whole groups) of a prunable block's inner width, in place."""
    if isinstance(block, ResnetBlock2D):
        _slice_resnet(block, channels)
    elif isinstance(block, Attention):
        _slice_attention(block, channels)
    else:
        _slice_feedforward(block, channels)


def _slice_resnet(resnet: ResnetBlock2D, channels: torch.Tensor) -> None:
    full, group = resnet.conv1.out_channels, group_size(resnet)
    resnet.conv1 = _conv(resnet.conv1, rows=channels)
    if resnet.time_emb_proj is not None:
        # Under scale_shift the projection holds a scale for every channel, then a shift for every channel.
        rows = torch.cat([channels, channels + full]) if resnet.time_embedding_norm == "scale_shift" else channels
        resnet.time_emb_proj = _linear(resnet.time_emb_proj, rows=rows)
    resnet.norm2 = _group_norm(resnet.norm2, channels, groups=len(channels) // group)
    resnet.conv2 = _conv(resnet.conv2, columns=channels)


def _slice_attention(attention: Attention, channels: torch.Tensor) -> None:
    head_size = group_size(attention)
    attention.to_q = _linear(attention.to_q, rows=channels)
    if attention.to_k is not None:  # only_cross_attention with added kv projections has none (refused before)
        attention.to_k = _linear(attention.to_k, rows=channels)
        attention.to_v = _linear(attention.to_v, rows=channels)
    attention.to_out[0] = _linear(attention.to_out[0], columns=channels)
    # The processors read the head count from `heads` and the head size from the projections' width.
    attention.heads = attention.sliceable_head_dim = len(channels) // head_size
    attention.inner_dim = attention.inner_kv_dim = len(channels)


def _slice_feedforward(feedforward: FeedForward, channels: torch.Tensor) -> None:
    activation = feedforward.net[0]
    rows = channels
    if isinstance(activation, GATED_ACTIVATIONS):  # proj = [value | gate]: keep the channel in both halves
        rows = torch.cat([channels, channels + width(feedforward)])
    activation.proj = _linear(activation.proj, rows=rows)
    feedforward.net[2] = _linear(feedforward.net[2], columns=channels)


# Each builds a new layer holding the kept rows (outputs) or columns (inputs) of the old one's weights,
# on the old one's device and in its dtype; the bias follows the outputs.


def _linear(layer: nn.Linear, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> nn.Linear:
    weight = layer.weight
    weight = weight if rows is None else weight[rows]
    weight = weight if columns is None else weight[:, columns]
    bias = None if layer.bias is None else layer.bias if rows is None else layer.bias[rows]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    _copy(new, weight, bias)
    return new


def _conv(layer: nn.Conv2d, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> nn.Conv2d:
    weight = layer.weight
    weight = weight if rows is None else weight[rows]
    weight = weight if columns is None else weight[:, columns]
    bias = None if layer.bias is None else layer.bias if rows is None else layer.bias[rows]
    new = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        bias=bias is not None,
        padding_mode=layer.padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    _copy(new, weight, bias)
    return new


def _group_norm(norm: nn.GroupNorm, channels: torch.Tensor, groups: int) -> nn.GroupNorm:
    reference = norm.weight if norm.affine else None
    new = nn.GroupNorm(
        groups,
        len(channels),
        eps=norm.eps,
        affine=norm.affine,
        device=None if reference is None else reference.device,
        dtype=None if reference is None else reference.dtype,
    )
    if norm.affine:
        _copy(new, norm.weight[channels], norm.bias[channels])
    return new


def _copy(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
