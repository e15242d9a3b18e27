"""Fake-quantized convolutions and linears, put into a model in place of its own.

:func:`insert_fake_quant` swaps every ``nn.Conv2d`` / ``nn.Linear`` of a model (but those named in
``keep_float``) for a :class:`QuantConv2d` / :class:`QuantLinear` that shares its weight and bias
(so parameter names, and checkpoints, stay as they were) and quantizes its weight and its input on
every call with the schemes of :mod:`distill.quant.schemes`. :func:`remove_fake_quant` swaps them
back to plain layers holding the trained weights.

A scheme is a small mapping, as configs write it::

    weight:     {scheme: fixed, bits: 4, per_channel: true}   # or {scheme: pot, bits: 4}
                {scheme: mixed, bits: 4, pot_ratio: 0.5, pot_ratio_per_layer: {"attn": 0.25}}
    activation: {scheme: fixed, bits: 8}                      # or null: inputs stay float
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn.functional as F
from torch import nn

from distill.quant.schemes import SCHEMES, FixedPoint, Mixed, PowerOfTwo

WEIGHT_KEYS = {"scheme", "bits", "per_channel", "pot_ratio", "pot_ratio_per_layer"}
ACTIVATION_KEYS = {"scheme", "bits"}


class _FakeQuant:
    """What the two layers share: the quantizers, and the description of what they make."""

    weight_quantizer: nn.Module
    input_quantizer: nn.Module | None

    def run_on_pim(self, x: torch.Tensor) -> torch.Tensor | None:
        """The layer's output as a PIM chip computes it (:mod:`distill.quant.pim`), or None when
        PIM is off (``enable_pim`` sets ``self.pim``)."""
        pim = getattr(self, "pim", None)
        return None if pim is None else pim(self, x)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    @property
    def int8_representable(self) -> bool:
        weight = getattr(self.weight_quantizer, "int8_representable", False)
        return weight and (self.input_quantizer is None or self.input_quantizer.int8_representable)


class QuantConv2d(_FakeQuant, nn.Conv2d):
    @classmethod
    def wrap(cls, layer: nn.Conv2d, weight_quantizer: nn.Module, input_quantizer: nn.Module | None):
        quant = cls(*_conv_args(layer), device="meta")
        return _adopt(quant, layer, weight_quantizer, input_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        on_pim = self.run_on_pim(x)
        if on_pim is not None:
            return on_pim
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)

    def unwrap(self) -> nn.Conv2d:
        return _adopt(nn.Conv2d(*_conv_args(self), device="meta"), self)


class QuantLinear(_FakeQuant, nn.Linear):
    @classmethod
    def wrap(cls, layer: nn.Linear, weight_quantizer: nn.Module, input_quantizer: nn.Module | None):
        quant = cls(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
        return _adopt(quant, layer, weight_quantizer, input_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        on_pim = self.run_on_pim(x)
        if on_pim is not None:
            return on_pim
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)

    def unwrap(self) -> nn.Linear:
        return _adopt(nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta"), self)


def _conv_args(layer: nn.Conv2d) -> tuple:
    return (
        layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
        layer.groups, layer.bias is not None, layer.padding_mode,
    )  # fmt: skip


def _adopt(new: nn.Module, old: nn.Module, weight_quantizer=None, input_quantizer=None) -> nn.Module:
    """``new`` (built on the meta device) holding ``old``'s very Parameter objects, so an optimiser
    or EMA that holds them goes on training the same tensors; and the quantizers, if given."""
    new.weight, new.bias = old.weight, old.bias
    if weight_quantizer is not None:
        new.weight_quantizer, new.input_quantizer = weight_quantizer, input_quantizer
    return new.train(old.training)


QUANT_LAYERS = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def check_scheme(spec: dict | None, role: str) -> None:
    """A weight or activation scheme as a config gives it; the error names the key to fix."""
    if spec is None and role == "activation":
        return
    if not isinstance(spec, dict):
        raise ValueError(f"{role} scheme must be a mapping like {{scheme: fixed, bits: 8}}, got {spec!r}")
    allowed = WEIGHT_KEYS if role == "weight" else ACTIVATION_KEYS
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(f"{role} scheme: unknown keys {sorted(unknown)}; known: {sorted(allowed)}")
    scheme = spec.get("scheme")
    choices = SCHEMES if role == "weight" else ("fixed", "pot")
    if scheme not in choices:
        raise ValueError(f"{role} scheme: scheme={scheme!r}; choose one of {choices}")
    for pattern, ratio in (spec.get("pot_ratio_per_layer") or {}).items():
        if not isinstance(ratio, int | float) or not 0 <= ratio <= 1:
            raise ValueError(f"{role} scheme: pot_ratio_per_layer[{pattern!r}]={ratio!r}; give a fraction in [0, 1]")
    # building one checks what only the quantizers know (bits, the mixed ratio)
    if role == "weight":
        make_weight_quantizer(spec, "check")
    else:
        make_input_quantizer(spec)


def make_weight_quantizer(spec: dict, name: str) -> nn.Module:
    """The weight quantizer ``spec`` asks for, for the layer at ``name`` (its per-layer ratio)."""
    bits, scheme = spec.get("bits", 8), spec["scheme"]
    if scheme == "fixed":
        return FixedPoint(bits, per_channel=spec.get("per_channel", True))
    if scheme == "pot":
        return PowerOfTwo(bits, per_channel=spec.get("per_channel", True))
    ratio = spec.get("pot_ratio", 0.5)
    for pattern, layer_ratio in (spec.get("pot_ratio_per_layer") or {}).items():
        if fnmatch.fnmatchcase(name, f"*{pattern}*"):
            ratio = layer_ratio
    return Mixed(bits, pot_ratio=ratio)


def make_input_quantizer(spec: dict | None) -> nn.Module | None:
    if spec is None:
        return None
    if spec["scheme"] == "pot":
        return PowerOfTwo(spec.get("bits", 8), per_channel=False)
    return FixedPoint(spec.get("bits", 8), signed=False)


def insert_fake_quant(
    model: nn.Module, weight: dict, activation: dict | None, keep_float: tuple[str, ...] = ()
) -> dict[str, nn.Module]:
    """Swap the model's convolutions and linears for fake-quantized ones, in place; layers whose
    name matches a ``keep_float`` glob (``conv_in``, ``*time_embedding*``) stay float. Returns the
    swapped layers by name. Grouped convolutions are left alone (none of ours are)."""
    check_scheme(weight, "weight")
    check_scheme(activation, "activation")
    swapped = {}
    for name, layer in list(model.named_modules()):
        kind = QUANT_LAYERS.get(type(layer))
        if kind is None or getattr(layer, "groups", 1) != 1:
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in keep_float):
            continue
        weight_quantizer = make_weight_quantizer(weight, name)
        if isinstance(weight_quantizer, Mixed):
            weight_quantizer.choose_rows(layer.weight)
        quant = kind.wrap(layer, weight_quantizer, make_input_quantizer(activation)).to(layer.weight.device)
        _replace(model, name, quant)
        swapped[name] = quant
    if not swapped:
        raise ValueError(f"no Conv2d or Linear left to quantize (keep_float={list(keep_float)})")
    return swapped


def remove_fake_quant(model: nn.Module) -> nn.Module:
    """Plain layers back in place of the fake-quantized ones (same weights), in place."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, _FakeQuant):
            _replace(model, name, layer.unwrap())
    return model


def fake_quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: layer for name, layer in model.named_modules() if isinstance(layer, _FakeQuant)}


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer)
