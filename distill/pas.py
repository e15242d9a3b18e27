"""Pruning-as-Search (Li et al. 2022, "Pruning-as-Search"): binary channel masks and their physical removal.

PaS puts a depth-wise 1×1 "convolution" with binary weights — one weight per channel, binarised at
0.5 in the forward pass, trained through a straight-through estimator — behind every prunable layer.
A channel whose weight falls below 0.5 is multiplied by zero; a resource regulariser on the expected
kept channels (:func:`expected_kept_channels`) pushes weights down where the task loss allows. Once
the search has settled, :func:`remove_masked` slices the layers to the kept channels, and the smaller
model computes exactly what the masked model computed.

Prunable points, for a diffusers ``UNet2DConditionModel`` and for our ``LatentStructuralUNet``:
the inner width of every ResNet (in whole ``norm2`` groups), attention (whole heads) and
feed-forward (:mod:`hyperhuman.unet_widths` says which layers each width spans and how removal
slices them). Every block's input and output width, and so every skip tensor, stays as it is.
Where each mask sits:

- ``ResnetBlock2D``: it multiplies what conv2 reads (after norm2 and the nonlinearity), not
  conv1's output itself: a zeroed conv1 channel still gets the time embedding added, and
  GroupNorm maps an all-zero group to its bias, so conv2 would still see it. Zeroing conv2's input
  is exactly a removal: dropping a whole group leaves the other groups' statistics as they were.
- ``Attention`` (self and cross): it multiplies the heads' concatenated output as ``to_out[0]``
  reads it.
- ``FeedForward``: it multiplies the inner width as the output linear reads it.

A mask is a child module of the block it prunes (``<block>.pas_mask``, so the optimiser and the
state dict see it under the block's path) and a forward pre-hook on the layer that reads the masked
tensor. Hooks rather than wrappers keep every parameter name of the model unchanged; the hook is
the mask's own bound method, so ``copy.deepcopy`` of a masked model hooks the copy's masks.

After removal, :func:`widths` records the width of every prunable point, which the pruned model's
config keeps (the LSDM's ``widths``, :class:`distill.students.EditedUNet2DConditionModel`'s).

    torch.manual_seed(0)
    masks = insert_masks(unet)                    # name → ChannelMask, all keeping everything
    loss = task_loss + rate * sum(expected_kept_channels(masks).values())
    ...
    remove_masked(unet, masks)                    # in place; the unet is smaller, same function
    config["widths"] = widths(unet)
"""

from __future__ import annotations

import torch
from diffusers.models.activations import GELU, ApproximateGELU, LinearActivation
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from hyperhuman.unet_widths import (
    GATED_ACTIVATIONS,
    group_size,
    prunable,
    shrink_to_widths,
    slice_block,
    width,
    widths,
)

__all__ = [  # the width helpers are re-exported: a pruning caller needs them next to the masks
    "ChannelMask",
    "expected_kept_channels",
    "group_size",
    "insert_masks",
    "kept_fractions",
    "masks_of",
    "prunable",
    "remove_masked",
    "shrink_to_widths",
    "width",
    "widths",
    "with_widths_recorded",
]

MASK_ATTRIBUTE = "pas_mask"  # the child name a mask takes inside the block it prunes
THRESHOLD = 0.5  # PaS binarises at 0.5 and initialises above it, so a fresh mask keeps everything
# Processors that compute each head on its own and concatenate the heads, in order, on the last axis
# of to_out[0]'s input: what makes a head mask there a head removal.
HEADWISE_PROCESSORS = (AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor, XFormersAttnProcessor)
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
        slice_block(block, mask.kept_indices().to(mask.weight.device))
        delattr(block, MASK_ATTRIBUTE)
    return model


def with_widths_recorded(model: nn.Module) -> nn.Module:
    """A model whose config records its current widths (:func:`widths`), so ``save_pretrained`` /
    ``from_pretrained`` give back the pruned shapes: the LSDM itself (its config has ``widths``);
    for a plain UNet an :class:`distill.students.EditedUNet2DConditionModel` holding its weights."""
    from distill.students import EditedUNet2DConditionModel, unet_config

    recorded = widths(model)
    if "widths" in model.config:  # the LSDM, or an edited UNet already
        model.register_to_config(widths=recorded)
        return model
    edited = EditedUNet2DConditionModel(**unet_config(model), widths=recorded)
    reference = next(model.parameters())
    edited.to(device=reference.device, dtype=reference.dtype)
    edited.load_state_dict(model.state_dict(), strict=True)
    return edited.train(model.training)
