"""Removing ResNets and attentions from the blocks of a diffusers UNet (or of our LSDM).

A *part* is one ResNet or one attention (transformer) inside a down, mid or up block, named by
its module path: ``down_blocks.0.attentions.1``, ``mid_block.resnets.1``, and in the LSDM
``branch.depth.up_blocks.3.resnets.2`` or ``trunk.down_blocks.1.attentions.0``. Removing a part
replaces it with a pass-through that has no weights, so the block keeps its loop structure and
every skip tensor it hands to the up path; what the network computes is what it would compute
had the part never been there:

- an attention is removable anywhere (its input and output widths agree);
- a down- or mid-block ResNet is removable when it keeps the width (not the first ResNet of a
  stage that changes width);
- an up-block ResNet reads ``cat(hidden, skip)``; from the second on, ``hidden`` already has the
  block's width, so removing one passes ``hidden`` through and leaves its skip unread.

This is what SnapFusion's architecture evolving removes and what its robust training skips at
random (:func:`skipping`), and the LSDM and :class:`distill.students.EditedUNet2DConditionModel`
record removed parts in their configs (``removed_parts``) so students save and load as themselves.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator

from torch import nn

PART = re.compile(
    r"^(?P<block>(?:.+\.)?(?:down_blocks\.\d+|up_blocks\.\d+|mid_block))\.(?P<kind>resnets|attentions)\.(?P<index>\d+)$"
)


class RemovedAttention(nn.Module):
    """An attention taken out: the hidden states pass through (as the blocks unpack ``[0]``)."""

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,)


class RemovedResnet(nn.Module):
    """A ResNet taken out: the first ``channels`` of its input pass through (an up block's ResNet
    reads ``cat(hidden, skip)``; the skip is dropped)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, input_tensor, temb=None, *args, **kwargs):
        return input_tensor[:, : self.channels]

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def is_removed(module: nn.Module) -> bool:
    return isinstance(module, RemovedAttention | RemovedResnet)


def parts(model: nn.Module) -> list[str]:
    """Every ResNet and attention inside the model's blocks (removed ones included), in module order."""
    return [name for name, _ in model.named_modules() if PART.match(name)]


def removed_parts(model: nn.Module) -> list[str]:
    return [name for name in parts(model) if is_removed(model.get_submodule(name))]


def removable_parts(model: nn.Module) -> list[str]:
    """The parts still present that can be removed without changing any tensor's width."""
    return [name for name in parts(model) if _why_not_removable(model, name) is None]


def remove_parts(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Replace the named parts by pass-throughs, in place (their weights are gone); returns ``model``."""
    for name in names:
        _replace(model, name, _passthrough(model, name))
    return model


@contextlib.contextmanager
def skipping(model: nn.Module, names: Iterable[str]) -> Iterator[nn.Module]:
    """The named parts bypassed for the duration (robust training's random skips); the original
    modules, weights and all, are back afterwards."""
    originals = {}
    try:
        for name in names:
            replacement = _passthrough(model, name)
            originals[name] = model.get_submodule(name)
            _replace(model, name, replacement)
        yield model
    finally:
        for name, module in originals.items():
            _replace(model, name, module)


def _passthrough(model: nn.Module, name: str) -> nn.Module:
    reason = _why_not_removable(model, name)
    if reason is not None:
        raise ValueError(f"cannot remove {name!r}: {reason}")
    if PART.match(name)["kind"] == "attentions":
        return RemovedAttention()
    return RemovedResnet(model.get_submodule(name).out_channels)


def _why_not_removable(model: nn.Module, name: str) -> str | None:
    match = PART.match(name)
    if match is None:
        return "not a ResNet or attention inside a down, mid or up block (e.g. 'down_blocks.0.attentions.1')"
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return f"the model has no such module; its parts are {parts(model)}"
    if is_removed(module):
        return "it is removed already"
    if match["kind"] == "attentions":
        return None
    if ".up_blocks." in f".{match['block']}":
        if int(match["index"]) == 0:
            return "the first ResNet of an up block changes the width of the hidden states"
        return None
    if module.in_channels != module.out_channels:
        return f"it changes the width ({module.in_channels} → {module.out_channels} channels)"
    return None


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, index = name.rpartition(".")
    model.get_submodule(parent)[int(index)] = module
