"""Fake quantizers for quantization-aware training: fixed-point, power-of-two and the mixed
per-row scheme of Auto-ViT-Acc, with straight-through gradients.

Each quantizer is a module mapping a float tensor to the nearest of its levels (still float: "fake"
quantization), so a model trains against the rounding it will meet when deployed. Gradients pass
the rounding unchanged (the straight-through estimator) and stop where a value was clipped.

- :class:`FixedPoint`: ``bits``-bit uniform levels. For weights, signed and symmetric around 0 with
  one scale per tensor or per output channel (row), taken from the weights themselves every call;
  for activations, unsigned with a zero point (affine), its range an exponential moving average of
  the batches' min/max while training and frozen in eval. At 8 bits, weights per channel and
  activations per tensor, this is exactly the int8 layout of the x86 runtime (oneDNN, PT2E's
  ``X86InductorQuantizer``), so such a model converts to it (:attr:`int8_representable`).
- :class:`PowerOfTwo`: levels ``0, ±scale·2^-k`` for ``k = 0 … 2^(bits-1) - 2`` (the sign bit and
  one code for zero leave ``2^(bits-1) - 1`` exponents): a multiplication by a level is a shift.
  Levels crowd near zero, where most weights sit, and are sparse at the range's top.
- :class:`Mixed`: within one layer, a fraction ``pot_ratio`` of the rows on power-of-two levels
  (shifts: LUTs on an FPGA) and the rest fixed-point (DSP multipliers), the ratio chosen per layer
  for the hardware (Auto-ViT-Acc). Which rows go power-of-two is chosen once from the weights it
  is built with: the rows where power-of-two loses least against fixed-point (measured squared
  error; the paper's heuristic puts low-variance rows there, which this measures directly).

    weight = FixedPoint(bits=4, per_channel=True)         # or PowerOfTwo(4), Mixed(4, pot_ratio=0.5)
    activation = FixedPoint(bits=8, signed=False)
    y = F.linear(activation(x), weight(layer.weight), layer.bias)
"""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEMES = ("fixed", "pot", "mixed")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest integer, with the gradient of the identity."""
    return x + (torch.round(x) - x).detach()


def clamp_ste(q: torch.Tensor, low: float | torch.Tensor, high: float | torch.Tensor) -> torch.Tensor:
    """``q`` clamped to ``[low, high]``; the gradient passes where ``q`` is inside, ends included
    (``torch.clamp`` stops it at the ends, which would freeze a range's own extremes)."""
    inside = (q >= low) & (q <= high)
    return torch.where(inside, q, q.detach().clamp(low, high))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as (output channels, everything else): a weight's rows."""
    return x.reshape(x.shape[0], -1)


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A value per row, shaped to broadcast against the weight ``like``."""
    return values.reshape(-1, *[1] * (like.ndim - 1))


def _check_bits(bits, low: int, scheme: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= 16:
        raise ValueError(f"{scheme}: bits={bits!r}; give an integer from {low} to 16")
    return bits


class FixedPoint(nn.Module):
    """Uniform ``bits``-bit levels; see the module docstring.

    ``signed=True`` (weights): levels ``scale·q`` for integer ``q`` in ``[-(2^(bits-1) - 1),
    2^(bits-1) - 1]``, ``scale = max|x| / (2^(bits-1) - 1)`` over the tensor or each row
    (``per_channel``). ``signed=False`` (activations): ``scale·(q - zero_point)`` for ``q`` in
    ``[0, 2^bits - 1]`` over a running ``[low, high]`` range that always holds 0."""

    def __init__(self, bits: int = 8, per_channel: bool = False, signed: bool = True, momentum: float = 0.1):
        super().__init__()
        self.bits = _check_bits(bits, 2, "fixed-point")
        self.per_channel, self.signed, self.momentum = per_channel, signed, momentum
        if not signed:
            if per_channel:
                raise ValueError("fixed-point activations take one range per tensor: per_channel=False")
            self.register_buffer("low", torch.zeros(()))
            self.register_buffer("high", torch.zeros(()))
            self.register_buffer("observed", torch.zeros((), dtype=torch.bool))

    @property
    def int8_representable(self) -> bool:
        """Runs as int8 on the x86 runtime: 8-bit symmetric weights, 8-bit affine activations."""
        return self.bits == 8

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}, signed={self.signed}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scale, zero_point = self.codes(x)
        return (codes - zero_point) * scale

    def codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q, scale, zero_point)`` with ``x ≈ (q - zero_point) · scale`` and ``q`` integer-valued
        (a float tensor, straight-through): signed codes and zero point 0 for weights (``scale`` per
        row with ``per_channel``), codes in ``[0, 2^bits - 1]`` for activations."""
        if self.signed:
            top = 2 ** (self.bits - 1) - 1
            peak = _rows(x).abs().amax(1) if self.per_channel else x.abs().amax()
            scale = (peak.detach() / top).clamp_min(torch.finfo(x.dtype).tiny)
            if self.per_channel:
                scale = _per_row(scale, x)
            # the scale comes from this tensor's peak: nothing lies past ±top but float error, and no
            # clamp, so the peak weight trains like the rest
            return round_ste(x / scale), scale, torch.zeros((), dtype=x.dtype, device=x.device)
        if self.training:
            self.observe(x)
        elif not bool(self.observed):
            raise RuntimeError("a fixed-point activation quantizer saw no data: calibrate it in train mode first")
        top = 2**self.bits - 1
        scale = ((self.high - self.low) / top).clamp_min(torch.finfo(x.dtype).tiny)
        zero_point = torch.round(-self.low / scale)
        return clamp_ste(round_ste(x / scale) + zero_point, 0, top), scale, zero_point

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Move the running range toward this batch's (the first batch sets it); 0 stays inside."""
        low, high = x.detach().amin().clamp(max=0), x.detach().amax().clamp(min=0)
        if not bool(self.observed):
            self.low.copy_(low)
            self.high.copy_(high)
            self.observed.fill_(True)
        else:
            self.low.lerp_(low, self.momentum)
            self.high.lerp_(high, self.momentum)


class PowerOfTwo(nn.Module):
    """Signed power-of-two levels ``0, ±scale·2^-k``, ``k = 0 … 2^(bits-1) - 2``, with ``scale`` the
    largest magnitude of the tensor or of each row (``per_channel``). A value rounds to the nearest
    exponent in the log domain (the geometric midpoint between two levels); below half the smallest
    level it becomes 0."""

    def __init__(self, bits: int = 4, per_channel: bool = True):
        super().__init__()
        self.bits = _check_bits(bits, 2, "power-of-two")
        self.per_channel = per_channel

    @property
    def exponents(self) -> int:
        return 2 ** (self.bits - 1) - 1

    int8_representable = False  # shifts, not int8 multiplies: reported by simulation

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        peak = _rows(x).abs().amax(1) if self.per_channel else x.abs().amax()
        scale = peak.detach().clamp_min(torch.finfo(x.dtype).tiny)
        if self.per_channel:
            scale = _per_row(scale, x)
        return power_of_two(x, scale, self.exponents)


def power_of_two(x: torch.Tensor, scale: torch.Tensor, exponents: int) -> torch.Tensor:
    """``x`` on the levels ``0, ±scale·2^-k`` (``k < exponents``), straight-through within ``±scale``."""
    magnitude = (x.detach().abs() / scale).clamp(max=1.0)
    smallest = 2.0 ** -(exponents - 1)
    exponent = torch.round(torch.log2(magnitude.clamp_min(smallest))).clamp(-(exponents - 1), 0)
    level = torch.where(magnitude < smallest / 2, torch.zeros_like(magnitude), 2.0**exponent)
    quantized = torch.sign(x.detach()) * level * scale
    inside = clamp_ste(x, -scale, scale)  # the gradient of what the levels cover; none past the range
    return inside + (quantized - inside).detach()


class Mixed(nn.Module):
    """Auto-ViT-Acc's mixed scheme for one weight: ``pot_ratio`` of its rows on power-of-two levels,
    the rest fixed-point, each row with its own scale. ``choose_rows(weight)`` picks the rows (done
    when the quantizer is built for a layer, :func:`distill.quant.layers.insert_fake_quant`); the
    choice is a buffer, so it saves and loads with the model."""

    def __init__(self, bits: int = 4, pot_ratio: float = 0.5, rows: int | None = None):
        super().__init__()
        self.bits = _check_bits(bits, 2, "mixed")
        if isinstance(pot_ratio, bool) or not isinstance(pot_ratio, int | float) or not 0 <= pot_ratio <= 1:
            raise ValueError(f"mixed: pot_ratio={pot_ratio!r}; give the fraction of rows on power-of-two, in [0, 1]")
        self.pot_ratio = float(pot_ratio)
        self.fixed = FixedPoint(bits, per_channel=True)
        self.pot = PowerOfTwo(bits, per_channel=True)
        self.register_buffer("pot_rows", torch.zeros(rows or 0, dtype=torch.bool))

    int8_representable = False

    def extra_repr(self) -> str:
        return f"bits={self.bits}, pot_ratio={self.pot_ratio}"

    @torch.no_grad()
    def choose_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """Put the ``round(pot_ratio · rows)`` rows where power-of-two's squared error exceeds
        fixed-point's the least on power-of-two; returns (and keeps) the boolean row choice."""
        rows = _rows(weight)
        loss = _rows(self.pot(weight) - weight).pow(2).sum(1) - _rows(self.fixed(weight) - weight).pow(2).sum(1)
        count = math.floor(self.pot_ratio * rows.shape[0] + 0.5)
        choice = torch.zeros(rows.shape[0], dtype=torch.bool, device=weight.device)
        choice[torch.argsort(loss, stable=True)[:count]] = True
        self.pot_rows = choice
        return choice

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.pot_rows.numel() != weight.shape[0]:
            raise RuntimeError(
                f"mixed quantizer chose rows for {self.pot_rows.numel()} output channels, the weight has "
                f"{weight.shape[0]}: call choose_rows(weight) on the layer's weight first"
            )
        pot_rows = _per_row(self.pot_rows, weight)
        return torch.where(pot_rows, self.pot(weight), self.fixed(weight))
