"""Q-Diffusion's split quantization of skip concatenations.

In a UNet's up path every ResNet takes ``cat([deep features, skip from the down path])``: two
tensors of very different ranges (Q-Diffusion, sec. 3.3: the skip's activations are several times
wider). The ResNet's 1×1 shortcut convolution reads that concatenation raw, so one activation scale
for it wastes most of the int8 levels on one half or clips the other. Splitting the convolution
along its input channels,

    conv(cat([a, b])) = conv_a(a) + conv_b(b),   conv_a / conv_b: the weight's two input slices,

gives each half its own input quantizer (PT2E observes every convolution's input on its own) at
the cost of one extra addition. The main path (GroupNorm, then the 3×3 convolution) sees the
concatenation normalised per group, so it is left alone, as Q-Diffusion leaves it.

    split = with_split_skip(unet, call)    # a copy computing what unet does, shortcuts split
"""

from __future__ import annotations

import torch
from torch import nn


class SplitInputConv(nn.Module):
    """``conv`` applied to ``cat([a, b])`` as two convolutions, one per input slice (``a``: the
    first ``split`` channels), summed: in float the same result, in int8 a scale per slice."""

    def __init__(self, conv: nn.Conv2d, split: int):
        super().__init__()
        if not 0 < split < conv.in_channels or conv.groups != 1:
            raise ValueError(f"cannot split {conv} at input channel {split}: give 0 < split < in_channels, groups=1")
        self.split = split
        self.first = _slice(conv, 0, split, bias=True)
        self.second = _slice(conv, split, conv.in_channels, bias=False)

    def extra_repr(self) -> str:
        return f"split={self.split}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.first(x[:, : self.split]) + self.second(x[:, self.split :])


def _slice(conv: nn.Conv2d, start: int, stop: int, bias: bool) -> nn.Conv2d:
    part = nn.Conv2d(
        stop - start, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        bias=bias and conv.bias is not None, padding_mode=conv.padding_mode,
    ).to(conv.weight)  # fmt: skip
    with torch.no_grad():
        part.weight.copy_(conv.weight[:, start:stop])
        if part.bias is not None:
            part.bias.copy_(conv.bias)
    return part


def up_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Every up block of a UNet or LSDM (trunk and branches): modules whose ResNets take a skip."""
    return {
        name: module
        for name, module in model.named_modules()
        if type(module).__name__.endswith("UpBlock2D") and hasattr(module, "resnets")
    }


@torch.no_grad()
def split_skip_convs(model: nn.Module, call: dict) -> int:
    """Replace the shortcut convolution of every up-path ResNet of ``model`` (in place) by a
    :class:`SplitInputConv` at its concatenation's seam; returns how many were split. ``call``:
    keyword inputs of one forward pass (a canonical call), run once to read each up block's
    incoming width (the seam of its first ResNet; the later ones' is the ResNet before)."""
    blocks = up_blocks(model)
    incoming: dict[str, int] = {}

    def probe(name):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            incoming[name] = hidden.shape[1]

        return hook

    hooks = [block.register_forward_pre_hook(probe(name), with_kwargs=True) for name, block in blocks.items()]
    try:
        model.eval()(**call)
    finally:
        for hook in hooks:
            hook.remove()
    count = 0
    for name, block in blocks.items():
        if name not in incoming:
            continue  # not on this model's forward path (a replaced trunk block)
        width = incoming[name]
        for resnet in block.resnets:
            shortcut = getattr(resnet, "conv_shortcut", None)
            if isinstance(shortcut, nn.Conv2d) and shortcut.kernel_size == (1, 1) and width < resnet.in_channels:
                resnet.conv_shortcut = SplitInputConv(shortcut, width)
                count += 1
            width = getattr(resnet, "out_channels", None) or resnet.channels  # a removed ResNet passes its width
    return count


def with_split_skip(model: nn.Module, call: dict) -> nn.Module:
    """A copy of ``model`` with its up-path shortcuts split (:func:`split_skip_convs`)."""
    import copy

    model = copy.deepcopy(model)
    split_skip_convs(model, call)
    return model
