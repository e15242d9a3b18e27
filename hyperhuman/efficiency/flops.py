"""Training FLOPs counted, not timed: what each option saves is a count, machine-independent.

The count of one micro-step is ``torch.utils.flop_counter`` over one forward and one backward of the
trained model on the **meta device** (``torch.func.functional_call`` with meta copies of its
parameters and of the micro-batch's inputs as the recipe gave them): shapes only, no arithmetic, no
memory, no random numbers, the real model untouched. The backward is that of the model's
``requires_grad`` flags at the time, so what freezing skips is measured by autograd itself (frozen
leading blocks build no graph: neither their weight gradients nor their input gradients are
computed). FLOPs are attributed to modules, so the sparse layers' share can be scaled by their
density: a masked layer run by dense kernels on this CPU does its dense FLOPs, but a sparse kernel
(the point of sparse training on an accelerator that has them) does ``density`` of them, in the
forward and both halves of the backward. Attention is counted by its math decomposition (``bmm``);
the fused CPU kernel has no formula, so a real-device count would miss it. A convolution's backward
is counted by :func:`conv_backward_flops`: torch's own formula ignores ``groups`` in the weight
gradient and counts a depthwise conv's as ``channels`` times its real cost (a 15× overcount of the
EfficientFormerV2 student's whole backward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

LAYER_TYPES = (nn.Linear, nn.modules.conv._ConvNd)


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:  # fmt: skip
    """``aten.convolution_backward``: each of the input and the weight gradient costs what the forward
    did (every multiply of the forward is one multiply of each), grouped convolutions included (the
    weight shape already holds ``in_channels / groups``)."""
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


FORMULAS = {torch.ops.aten.convolution_backward: conv_backward_flops}


@dataclass
class StepFlops:
    """One micro-step's FLOPs: totals, the forward per module (by its ``named_modules`` name) and the
    backward per Linear / Conv layer.

    A layer's backward is its forward once for the input gradient (if its input needs one) and once
    for the weight gradient (if its weight trains): the flop counter's own backward attribution to
    modules is unreliable (its module tracker leaves modules "active" during the backward), its
    backward *total* is exact."""

    forward: int
    backward: int
    forward_by_module: dict[str, int]
    backward_by_layer: dict[str, int]


def to_meta(value):
    """Tensors (in nested lists, tuples and dicts) as meta tensors of the same shape and dtype."""
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta")
    if isinstance(value, dict):
        return {key: to_meta(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_meta(v) for v in value)
    return value


def output_tensors(output) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output (a tensor, tuple, dict or diffusers output)."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    values = output.values() if isinstance(output, dict) else output if isinstance(output, list | tuple) else []
    return [tensor for value in values for tensor in output_tensors(value)]


def _by_module(counter: FlopCounterMode, root: str) -> dict[str, int]:
    """Flops per module name, the root's class-name prefix taken off (``""`` for the whole model)."""
    found = {}
    for name, ops in counter.get_flop_counts().items():
        if name == "Global":
            continue
        found[name[len(root) + 1 :] if name.startswith(root + ".") else ("" if name == root else name)] = sum(
            ops.values()
        )
    return found


def count_step(model: nn.Module, args: tuple, kwargs: dict, trainable: dict[str, bool] | None = None) -> StepFlops:
    """Forward and backward FLOPs of ``model(*args, **kwargs)`` with ``trainable`` (parameter name →
    requires_grad; default: the model's flags now), counted on the meta device (``args``/``kwargs``
    may be real or meta tensors)."""
    flags = trainable or {name: p.requires_grad for name, p in model.named_parameters()}
    params = {name: torch.empty_like(p, device="meta").requires_grad_(flags[name])
              for name, p in model.named_parameters()}  # fmt: skip
    buffers = {name: torch.empty_like(b, device="meta") for name, b in model.named_buffers()}
    gradients_needed = {}  # layer → how many of (input, weight) gradients its backward computes

    def note_gradients(name):
        def hook(module, inputs, output):
            needs_input = bool(inputs) and isinstance(inputs[0], torch.Tensor) and inputs[0].requires_grad
            gradients_needed[name] = int(needs_input) + int(module.weight.requires_grad)

        return hook

    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LAYER_TYPES)]
    handles = [module.register_forward_hook(note_gradients(name)) for name, module in layers]
    root = type(model).__name__
    try:
        with FlopCounterMode(display=False, custom_mapping=FORMULAS) as counter:
            output = torch.func.functional_call(model, {**params, **buffers}, to_meta(args), to_meta(kwargs))
            forward_total, forward = counter.get_total_flops(), _by_module(counter, root)
            outputs = [t for t in output_tensors(output) if t.requires_grad]
            if outputs:  # a stand-in loss: its own few elementwise ops have no FLOP formula
                sum(t.float().square().mean() for t in outputs).backward()
            total = counter.get_total_flops()
    finally:
        for handle in handles:
            handle.remove()
    backward = {name: forward.get(name, 0) * gradients_needed.get(name, 0) for name, _ in layers}
    return StepFlops(forward_total, total - forward_total, forward, backward)


class InputRecorder:
    """Keeps meta copies of the first training-mode call's inputs of a module (a forward pre-hook),
    so a recipe needs no code of its own for the FLOP count."""

    def __init__(self, model: nn.Module):
        self.inputs: tuple[tuple, dict] | None = None
        self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        if module.training and self.inputs is None and torch.is_grad_enabled():
            self.inputs = (to_meta(args), to_meta(kwargs))
            self._handle.remove()
