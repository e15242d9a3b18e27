"""Pruning-as-Search (Li et al. 2022, "Pruning-as-Search"): binary channel masks and their physical removal.

PaS puts a depth-wise 1×1 "convolution" with binary weights — one weight per channel, binarised at
0.5 in the forward pass, trained through a straight-through estimator — behind every prunable layer.
A channel whose weight falls below 0.5 is multiplied by zero; a resource regulariser on the expected
kept channels (:func:`expected_kept_channels`) pushes weights down where the task loss allows. Once
the search has settled, :func:`remove_masked` slices the layers to the kept channels, and the smaller
model computes exactly what the masked model computed.

Prunable points, for a diffusers ``UNet2DConditionModel`` and for our ``LatentStructuralUNet``
(found by type wherever they sit, so every branch and the trunk get their own masks). Each one is
the inner width of a block: every block's input and output width, and so every skip tensor, stays
as it is.

- ``ResnetBlock2D``: conv1's output channels, in whole ``norm2`` groups. The mask multiplies what
  conv2 reads (after norm2 and the nonlinearity), not conv1's output itself: a zeroed conv1 channel
  still gets the time embedding added, and GroupNorm maps an all-zero group to its bias, so conv2
  would still see it. Zeroing conv2's input is exactly a removal: dropping a whole group leaves
  the other groups' statistics as they were. Removal slices conv1's rows, the time-embedding rows
  (both halves under ``scale_shift``), norm2 (fewer groups of the same size) and conv2's columns.
- ``Attention`` (self and cross): whole heads. The mask multiplies the heads' concatenated output as
  ``to_out[0]`` reads it; removal slices to_q/to_k/to_v's rows and to_out[0]'s columns and sets
  ``heads`` and the inner widths.
- ``FeedForward``: the inner width, as the output linear reads it; removal slices the input
  projection's rows (both the value and the gate half of GEGLU/SwiGLU) and the output linear's columns.

A mask is a child module of the block it prunes (``<block>.pas_mask``, so the optimiser and the
state dict see it under the block's path) and a forward pre-hook on the layer that reads the masked
tensor. Hooks rather than wrappers keep every parameter name of the model unchanged; the hook is
the mask's own bound method, so ``copy.deepcopy`` of a masked model hooks the copy's masks.

:func:`widths` records the width of every prunable point (module path → channels; an attention's
heads are its width over the unchanged head size), a plain JSON-able dict that a model class can
keep in its config: :func:`shrink_to_widths` gives a fresh model the shapes of a pruned one, so its
state dict loads.

    torch.manual_seed(0)
    masks = insert_masks(unet)                    # name → ChannelMask, all keeping everything
    loss = task_loss + rate * sum(expected_kept_channels(masks).values())
    ...
    remove_masked(unet, masks)                    # in place; the unet is smaller, same function
    config["widths"] = widths(unet)
"""

from __future__ import annotations

import torch
from diffusers.models.activations import GEGLU, GELU, ApproximateGELU, LinearActivation, SwiGLU
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

MASK_ATTRIBUTE = "pas_mask"  # the child name a mask takes inside the block it prunes
THRESHOLD = 0.5  # PaS binarises at 0.5 and initialises above it, so a fresh mask keeps everything
# Processors that compute each head on its own and concatenate the heads, in order, on the last axis
# of to_out[0]'s input: what makes a head mask there a head removal.
HEADWISE_PROCESSORS = (AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor, XFormersAttnProcessor)
GATED_ACTIVATIONS = (GEGLU, SwiGLU)  # proj holds the value half, then the gate half
PLAIN_ACTIVATIONS = (GELU, ApproximateGELU, LinearActivation)


class ChannelMask(nn.Module):
    """PaS's binary depth-wise 1×1 convolution: one weight per group of ``group`` channels.

    The forward value of a group is exactly 1 (kept) or 0 (dropped); the gradient reaches the weight
    as if the mask were the identity in it (straight-through estimator). A group is kept when its
    weight is above 0.5; when fewer than ``min_groups`` are, the ``min_groups`` largest weights are
    kept (ties to the lower index), so a layer never vanishes. Weights start at U(0.5, 1) from
    torch's global generator: the caller seeds it.
    """

    def __init__(self, channels: int, group: int = 1, min_groups: int = 1):
        super().__init__()
        if group < 1 or channels < 1 or channels % group:
            raise ValueError(
                f"a mask of {channels} channels in groups of {group}: the channels must be a positive multiple "
                "of the group size"
            )
        groups = channels // group
        if not 1 <= min_groups <= groups:
            raise ValueError(f"min_groups={min_groups}: a mask of {groups} groups keeps between 1 and {groups}")
        self.channels, self.group, self.min_groups = channels, group, min_groups
        self.weight = nn.Parameter(torch.empty(groups).uniform_(THRESHOLD, 1.0))

    @property
    def groups(self) -> int:
        return self.channels // self.group

    def keep(self) -> torch.Tensor:
        """Which groups are kept, as booleans (no gradient)."""
        weight = self.weight.detach()
        kept = weight > THRESHOLD
        # The top min_groups weights are always kept: when at least that many are above 0.5 they are
        # among those, so this only changes anything when too few are.
        top = torch.argsort(weight, descending=True, stable=True)[: self.min_groups]
        kept[top] = True
        return kept

    def gate(self) -> torch.Tensor:
        """Per group, exactly 1.0 or 0.0 forward, with the straight-through gradient 1 to its weight.

        PaS writes this ``w - (w - b).detach()``; ``b + (w - w.detach())`` is the same estimator,
        but exact in floating point: ``w - w`` is exactly 0, while ``w - (w - b)`` can miss 1 by an
        ulp once a kept weight strays outside [0.5, 2], and the masked model would then not be
        exactly the pruned one."""
        binary = self.keep().to(self.weight.dtype)
        return binary + (self.weight - self.weight.detach())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``(B, C, H, W)`` or ``(B, N, C)`` with its channels multiplied by the mask."""
        if hidden.ndim not in (3, 4):
            raise ValueError(f"a channel mask takes (B, C, H, W) or (B, N, C), got shape {tuple(hidden.shape)}")
        axis = 1 if hidden.ndim == 4 else 2
        if hidden.shape[axis] != self.channels:
            raise ValueError(
                f"this mask has {self.channels} channels; the tensor has {hidden.shape[axis]} on axis {axis} "
                f"(shape {tuple(hidden.shape)})"
            )
        per_channel = self.gate().repeat_interleave(self.group).to(hidden.dtype)
        shape = (1, -1, 1, 1) if axis == 1 else (1, 1, -1)
        return hidden * per_channel.view(shape)

    def kept_channels(self) -> torch.Tensor:
        """The number of kept channels as a differentiable scalar (the STE values summed, × group):
        its value is the exact count, its gradient ``group`` for every weight."""
        return self.gate().sum() * self.group

    def kept_indices(self) -> torch.Tensor:
        """The kept channels' indices, ascending; whole groups only."""
        groups = torch.nonzero(self.keep()).flatten().cpu()
        return (groups[:, None] * self.group + torch.arange(self.group)).flatten()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, group={self.group}, min_groups={self.min_groups}"

    def _mask_input(self, module: nn.Module, args: tuple) -> tuple:
        # A forward pre-hook: the layer reads the masked tensor.
        return (self(args[0]), *args[1:])


# -- the prunable points -------------------------------------------------------------------------------------------


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


def _reader(module: nn.Module) -> nn.Module:
    """The layer whose input the block's mask multiplies."""
    if isinstance(module, ResnetBlock2D):
        return module.conv2
    if isinstance(module, Attention):
        return module.to_out[0]
    return module.net[2]


def _why_not_prunable(module: nn.Module) -> str | None:
    if isinstance(module, ResnetBlock2D):
        if module.conv1.groups != 1 or module.conv2.groups != 1:
            return "its convolutions are grouped"
        return None
    if isinstance(module, Attention):
        if not isinstance(module.processor, HEADWISE_PROCESSORS):
            return (
                f"its processor {type(module.processor).__name__} may hold weights of its own or mix heads; "
                "call model.set_default_attn_processor() or set AttnProcessor2_0 first"
            )
        if module.fused_projections:
            return "its q/k/v projections are fused; call model.unfuse_qkv_projections() first"
        if module.inner_kv_dim != module.inner_dim:
            return f"it shares key/value heads (kv width {module.inner_kv_dim} ≠ {module.inner_dim})"
        extras = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "norm_q", "norm_k")
        present = [name for name in extras if getattr(module, name, None) is not None]
        if present:
            return f"it has {present}, which UNet2DConditionModel attentions do not and this pruning does not slice"
        if module.to_out is None or not isinstance(module.to_out[0], nn.Linear):
            return "it has no output projection to_out[0]"
        return None
    activation, output = module.net[0], module.net[2]
    if not isinstance(activation, GATED_ACTIVATIONS + PLAIN_ACTIVATIONS) or not isinstance(output, nn.Linear):
        layers = f"{type(activation).__name__}, {type(output).__name__}"
        return f"its layers ({layers}) are not an input projection with an activation and an output linear"
    return None


# -- inserting masks -----------------------------------------------------------------------------------------------


def insert_masks(model: nn.Module, min_groups: int = 1) -> dict[str, ChannelMask]:
    """A fresh :class:`ChannelMask` (keeping everything) in every prunable block, in place; returns
    them by the block's module path. Each mask keeps at least ``min_groups`` groups (ResNet norm
    groups, attention heads, FFN channels), or all of a block's groups where it has fewer. Masks
    take the device and dtype of the layer they feed."""
    if min_groups < 1:
        raise ValueError(f"min_groups={min_groups}: every mask must keep at least one group")
    blocks = prunable(model)
    problems = [f"{name}: {reason}" for name, block in blocks.items() if (reason := _why_not_prunable(block))]
    problems += [f"{name}: it has a mask already" for name, block in blocks.items() if hasattr(block, MASK_ATTRIBUTE)]
    if problems:
        raise ValueError(f"cannot insert PaS masks: {problems[:5]}")
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no ResnetBlock2D, Attention or FeedForward to mask")
    masks = {}
    for name, block in blocks.items():
        channels, group = width(block), group_size(block)
        mask = ChannelMask(channels, group, min(min_groups, channels // group))
        reference = _reader(block).weight
        mask.to(device=reference.device, dtype=reference.dtype)  # drawn on the CPU first: the same masks anywhere
        setattr(block, MASK_ATTRIBUTE, mask)
        _reader(block).register_forward_pre_hook(mask._mask_input)
        masks[name] = mask
    return masks


def masks_of(model: nn.Module) -> dict[str, ChannelMask]:
    """The masks inserted in ``model``, by block path (e.g. in a copy of a masked model)."""
    return {
        name: getattr(block, MASK_ATTRIBUTE)
        for name, block in prunable(model).items()
        if hasattr(block, MASK_ATTRIBUTE)
    }


# -- what the masks keep -------------------------------------------------------------------------------------------


def kept_fractions(masks: dict[str, ChannelMask]) -> dict[str, float]:
    """The fraction of its channels each mask keeps."""
    return {name: mask.keep().sum().item() / mask.groups for name, mask in masks.items()}


def expected_kept_channels(masks: dict[str, ChannelMask]) -> dict[str, torch.Tensor]:
    """Each mask's kept channels as a differentiable scalar (:meth:`ChannelMask.kept_channels`), the
    term a resource regulariser weighs (e.g. by each block's cost per channel)."""
    return {name: mask.kept_channels() for name, mask in masks.items()}


# -- physical removal ----------------------------------------------------------------------------------------------


def remove_masked(model: nn.Module, masks: dict[str, ChannelMask]) -> nn.Module:
    """Slice every masked block to the channels its mask keeps and take the mask out, in place;
    returns ``model``, which now computes what the masked model computed (with fewer parameters)."""
    for name, mask in masks.items():
        try:
            block = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"mask {name!r}: the model has no such module") from None
        if getattr(block, MASK_ATTRIBUTE, None) is not mask:
            raise ValueError(
                f"mask {name!r} is not the one inserted in this model (masks of a copy?); pass masks_of(model)"
            )
        # Slicing rebuilds the layer the mask hooks, so the hook goes with the old layer.
        _slice(block, mask.kept_indices().to(mask.weight.device))
        delattr(block, MASK_ATTRIBUTE)
    return model


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
            _slice(block, torch.arange(count, device=_reader(block).weight.device))
    return model


def _slice(block: nn.Module, channels: torch.Tensor) -> None:
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
