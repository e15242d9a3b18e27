"""Processing-in-memory (PIM) quantization, for evaluation and for PIM-QAT (Jin et al. 2022).

On a PIM chip a layer's integer matrix product runs in analog crossbars: the weights sit in memory
cells, the input drives the rows, and each column sums the products of ``tile`` rows at once. An
ADC of few bits then digitises every such partial sum: that is the *PIM quantization*, an extra
rounding after every tile that conventional quantization never sees. How a product splits into
partial sums is the *decomposition scheme* (:data:`SCHEMES`):

- ``bit_serial``: the inputs enter one bit per cycle, the weights are multi-level signed cells;
  a partial sum is ``Σ_rows bit_i(x)·w``, in ``[-tile·w_max, tile·w_max]``.
- ``differential``: bit-serial inputs, and the weights split into a positive and a negative
  crossbar (``w = w⁺ - w⁻``), each column digitised on its own, in ``[0, tile·w_max]``.
- ``sliced``: bit-serial inputs, and each weight's magnitude sliced into one-bit cells on the
  differential pair; a partial sum counts ones, in ``[0, tile]``.

The results are shifted by their bit positions and added digitally. The ADC (:func:`adc`) has
``2^adc_bits`` uniform levels, zero among them (a signed partial sum reads two's-complement codes,
an unsigned one codes from 0), never finer than one unit (the sums are integers), so an ADC with
enough bits is exact. Its range (``adc_range``) is either the partial sum's ``full`` theoretical
range, or ``calibrated``: per layer and crossbar array, the clipping range that loses least (mean
squared error) on the partial sums the layer meets, found on calibration data
(:func:`calibrate_adc`) or, in PIM-QAT, kept as a running average while training, frozen in
evaluation. Partial sums concentrate far below their theoretical bound (a tile of 128 rows rarely
has many large products of one sign), so a full-range ADC of few bits reads almost all of them as
0; real chips set the ADC's reference to the range they see. ``noise`` adds Gaussian thermal noise
to the analog sum before the ADC, its standard deviation in ADC steps (LSBs).

PIM-QAT's training aids are here as well:

- the PIM product enters training straight-through: its values the chip's, its gradient that of
  the exact (digital) product, so the backward pass keeps the scale the layer was trained at;
- a forward *rescaling* gain per layer keeps the chip's output at the magnitude of the digital
  product, which the next layer was trained on: the ratio of the two (zero-point-free) products'
  RMS, a running average in training, frozen in evaluation. (PIM-QAT derives its forward and
  backward factors from the training dynamics; this is the measured version of the same aim.);
- *adjusted precision training*: train at ``train_adc_bits`` (and ``train_noise``) other than the
  chip's, so what is learned holds on a noisy chip;
- *BatchNorm calibration* (:func:`calibrate_batchnorm`): re-estimate BatchNorm statistics with PIM
  on, for models that have BatchNorm (the UNets' GroupNorm has no statistics to calibrate).

A conventionally trained model deployed on a chip gets the same calibration (:func:`calibrate_adc`:
the ADC ranges and rescaling gains from a few batches, nothing trained), so the two are compared on
the same hardware.

PIM runs on the fake-quantized layers of :mod:`distill.quant.layers` whose weight and input
quantizers are fixed-point (the crossbars hold integers): :func:`enable_pim` sets it on them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distill.quant.schemes import FixedPoint

SCHEMES = ("bit_serial", "differential", "sliced")
ADC_RANGES = ("full", "calibrated")


@dataclass(frozen=True)
class PIMConfig:
    tile: int = 128  # crossbar rows summed in one analog partial sum
    adc_bits: int = 6
    scheme: str = "bit_serial"
    noise: float = 0.0  # thermal noise at the ADC input, standard deviation in LSBs
    train_adc_bits: int | None = None  # adjusted precision training: None trains at adc_bits
    train_noise: float | None = None  # None trains with `noise`
    rescale: bool = True  # PIM-QAT's output rescaling
    momentum: float = 0.1  # of the running averages (rescaling gain, calibrated ADC range)
    adc_range: str = "full"  # or "calibrated": per layer and array, fitted to the partial sums

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"pim.scheme={self.scheme!r}; choose one of {SCHEMES}")
        if self.adc_range not in ADC_RANGES:
            raise ValueError(f"pim.adc_range={self.adc_range!r}; choose one of {ADC_RANGES}")
        for key in ("tile", "adc_bits", "train_adc_bits"):
            value = getattr(self, key)
            if value is None and key == "train_adc_bits":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"pim.{key}={value!r}; give a positive integer")
        for key in ("noise", "train_noise"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int | float) or value < 0):
                raise ValueError(f"pim.{key}={value!r}; give a standard deviation ≥ 0 in ADC steps")

    @classmethod
    def from_config(cls, config: dict) -> PIMConfig:
        known = set(asdict(cls()))
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"pim: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**config)


def adc(partial: torch.Tensor, top, bits: int, signed: bool, noise: float = 0.0, generator=None):
    """An ADC of ``bits`` bits reading ``[-top, top]`` (``signed``: two's-complement codes) or
    ``[0, top]``: uniform steps with a level at zero, never finer than one unit; values beyond the
    range clip to the end codes. ``top``: a float, or a tensor of ranges broadcast against
    ``partial`` (:func:`fit_adc_range` reads its values at every candidate range at once)."""
    low, high = adc_codes(bits, signed)
    step = top / max(1, high)
    step = step.clamp_min(1.0) if isinstance(step, torch.Tensor) else max(1.0, step)
    # in place on the one fresh copy: the partial sums are the largest tensors of a PIM forward
    codes = partial / step
    if noise:
        codes.add_(torch.randn(partial.shape, generator=generator).to(partial), alpha=noise)
    return codes.round_().clamp_(low, high).mul_(step)


def adc_codes(bits: int, signed: bool) -> tuple[int, int]:
    """The lowest and highest code of an ADC of ``bits`` bits (two's complement when ``signed``)."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def fit_adc_range(partial: torch.Tensor, bits: int, signed: bool, full_scale: float, samples: int = 1 << 14) -> float:
    """The ADC range (``top``) within ``full_scale`` that digitises ``partial`` with the least mean
    squared error: a search over clipping points from the largest |value| down, in quarter-octave
    steps, on an evenly strided subset of at most ``samples`` values (the first of equal errors)."""
    values = partial.detach().flatten()
    values = values[:: max(1, values.numel() // samples)].double()
    largest = float(values.abs().max()) if values.numel() else 0.0
    exact_below = adc_codes(bits, signed)[1]  # tops up to the highest code step by one unit
    tops = [min(full_scale, max(largest, 1.0))]
    while tops[-1] > exact_below:  # below this the step stays at one unit: only more clipping
        tops.append(max(tops[-1] * 2**-0.25, exact_below))
    # every candidate at once (one pass per op over candidates × values, not a Python loop per
    # candidate: this runs for every crossbar array of every layer in each PIM-QAT step)
    errors = (adc(values, values.new_tensor(tops)[:, None], bits, signed) - values).pow_(2).mean(1)
    return tops[int(errors.argmin())]


def crossbar_arrays(weights: torch.Tensor, weight_bits: int, scheme: str) -> list[tuple[torch.Tensor, float, bool]]:
    """The crossbars a scheme programs for signed integer ``weights``: ``(cells, factor, signed)``,
    each array's digitised sums multiplied by ``factor`` and added."""
    if scheme == "bit_serial":
        return [(weights, 1.0, True)]
    positive, negative = weights.clamp(min=0), (-weights).clamp(min=0)
    if scheme == "differential":
        return [(positive, 1.0, False), (negative, -1.0, False)]
    arrays = []
    for bit in range(weight_bits - 1):  # the magnitude's bits; the sign is the differential pair
        for half, sign in ((positive, 1.0), (negative, -1.0)):
            arrays.append((torch.bitwise_and(half.long() >> bit, 1).to(weights.dtype), sign * 2**bit, False))
    return arrays


@torch.no_grad()
def pim_matmul(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    input_bits: int,
    weight_bits: int,
    config: PIMConfig,
    adc_bits: int | None = None,
    noise: float | None = None,
    generator: torch.Generator | None = None,
    adc_top: Callable[[int, torch.Tensor, float, bool], float] | None = None,
) -> torch.Tensor:
    """What a PIM chip computes for ``inputs @ weights.T``: ``inputs`` (M, K) unsigned integer codes
    below ``2^input_bits``, ``weights`` (O, K) signed integer codes within ``±(2^(weight_bits-1) - 1)``;
    K in tiles of ``config.tile`` rows, inputs bit-serial, every partial sum through the ADC.
    ``adc_top(array, partial sums, full scale, signed)`` gives each crossbar array's ADC range
    (:class:`PIM`'s calibrated ranges); without it the ADC spans the full scale."""
    adc_bits = config.adc_bits if adc_bits is None else adc_bits
    noise = config.noise if noise is None else noise
    rows, tile = inputs.shape[1], config.tile
    tiles = math.ceil(rows / tile)
    pad = tiles * tile - rows
    inputs = F.pad(inputs, (0, pad)).view(inputs.shape[0], tiles, tile)
    weights = F.pad(weights, (0, pad)).view(weights.shape[0], tiles, tile)
    as_integers = inputs.round().to(torch.uint8 if input_bits <= 8 else torch.long)  # 8× less to shift than long
    input_planes = torch.stack([torch.bitwise_and(as_integers >> bit, 1) for bit in range(input_bits)]).to(inputs)
    bit_values = 2.0 ** torch.arange(input_bits, dtype=inputs.dtype, device=inputs.device)
    result = inputs.new_zeros(inputs.shape[0], weights.shape[0])
    full_scale = tile * (1 if config.scheme == "sliced" else 2 ** (weight_bits - 1) - 1)
    for index, (cells, factor, signed) in enumerate(crossbar_arrays(weights, weight_bits, config.scheme)):
        partial = torch.einsum("bmtn,otn->bmto", input_planes, cells)  # (input bit, M, tile, O)
        top = full_scale if adc_top is None else adc_top(index, partial, full_scale, signed)
        digital = adc(partial, top, adc_bits, signed, noise, generator)
        result += factor * torch.einsum("b,bmto->mo", bit_values, digital)
    return result


def crossbar_count(weight_bits: int, scheme: str) -> int:
    """How many crossbar arrays :func:`crossbar_arrays` programs."""
    return {"bit_serial": 1, "differential": 2}.get(scheme, 2 * (weight_bits - 1))


class PIM(nn.Module):
    """PIM quantization of one fake-quantized layer (:func:`enable_pim` attaches it)."""

    def __init__(self, config: PIMConfig, arrays: int = 1):
        super().__init__()
        self.config = config
        self.register_buffer("gain", torch.ones(()))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))
        # the calibrated ADC range of each crossbar array (0: not yet seen); used with adc_range="calibrated"
        self.register_buffer("adc_tops", torch.zeros(arrays, dtype=torch.float64))
        self.generator: torch.Generator | None = None
        self.calibrating = False  # calibrate_adc: observe ranges and gain in evaluation too

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in asdict(self.config).items())

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        config = self.config
        adc_bits = (config.train_adc_bits or config.adc_bits) if self.training else config.adc_bits
        noise = config.noise if not self.training or config.train_noise is None else config.train_noise
        codes, input_scale, zero_point = layer.input_quantizer.codes(x)
        weights, weight_scale, _ = layer.weight_quantizer.codes(layer.weight)
        rows, shape = _as_rows(layer, codes, zero_point)
        flat = weights.reshape(weights.shape[0], -1)
        exact = rows @ flat.T
        observing = self.training or self.calibrating
        adc_top = None
        if config.adc_range == "calibrated":
            adc_top = functools.partial(self._adc_top, observing=observing)
        chip = pim_matmul(
            rows.detach(), flat.detach(), layer.input_quantizer.bits, layer.weight_quantizer.bits, config,
            adc_bits, noise, self.generator, adc_top,
        )  # fmt: skip
        offset = zero_point * flat.sum(1)  # the input's zero point, taken out digitally
        exact, chip = exact - offset, chip - offset.detach()
        if config.rescale:
            if observing:
                self._observe_gain(exact.detach(), chip)
            chip = chip * self.gain
        product = exact + (chip - exact).detach()  # the chip's values, the exact product's gradient
        output = product * input_scale * weight_scale.reshape(1, -1)
        if layer.bias is not None:
            output = output + layer.bias
        return _from_rows(output, shape)

    @torch.no_grad()
    def _adc_top(self, array: int, partial: torch.Tensor, full_scale: float, signed: bool, observing: bool) -> float:
        """The array's calibrated ADC range: fitted at the chip's resolution to ``partial`` while
        observing (the first time as is, then a running average), the stored one otherwise; the
        full scale until first seen."""
        stored = float(self.adc_tops[array])
        if observing:
            fitted = fit_adc_range(partial, self.config.adc_bits, signed, full_scale)
            stored = fitted if stored <= 0 else stored + self.config.momentum * (fitted - stored)
            self.adc_tops[array] = stored
        return stored if stored > 0 else full_scale

    @torch.no_grad()
    def _observe_gain(self, exact: torch.Tensor, chip: torch.Tensor) -> None:
        gain = exact.pow(2).mean().sqrt() / chip.pow(2).mean().sqrt().clamp_min(1e-12)
        if not bool(self.observed):
            self.gain.copy_(gain)
            self.observed.fill_(True)
        else:
            self.gain.lerp_(gain, self.config.momentum)


def _as_rows(layer: nn.Module, codes: torch.Tensor, zero_point: torch.Tensor):
    """A layer's input codes as the crossbar's input rows (M, K) and what reshapes the output back;
    a convolution's padding reads the code of 0 (the zero point), as the real input pads with 0."""
    if isinstance(layer, nn.Linear):
        return codes.reshape(-1, codes.shape[-1]), ("linear", codes.shape[:-1])
    if layer.padding_mode != "zeros":
        raise ValueError(f"PIM convolutions pad with zeros; {layer} pads with {layer.padding_mode!r}")
    batch, _, height, width = codes.shape
    if isinstance(layer.padding, str):
        raise ValueError(f"PIM convolutions take numeric padding; {layer} has padding={layer.padding!r}")
    columns = F.unfold(codes - zero_point, layer.kernel_size, layer.dilation, layer.padding, layer.stride) + zero_point
    out = [
        (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
        for size, pad, dilation, kernel, stride in zip(
            (height, width), layer.padding, layer.dilation, layer.kernel_size, layer.stride, strict=True
        )
    ]
    rows = columns.transpose(1, 2).reshape(-1, columns.shape[1])
    return rows, ("conv", (batch, *out))


def _from_rows(output: torch.Tensor, shape) -> torch.Tensor:
    kind, size = shape
    if kind == "linear":
        return output.reshape(*size, output.shape[-1])
    batch, height, width = size
    return output.reshape(batch, height * width, -1).transpose(1, 2).reshape(batch, -1, height, width)


def enable_pim(model: nn.Module, config: PIMConfig, generator: torch.Generator | None = None) -> dict[str, PIM]:
    """PIM on every fake-quantized layer whose weight and input quantizers are fixed-point; returns
    them by name. Layers on other schemes (power-of-two, mixed, float inputs) stay digital."""
    from distill.quant.layers import fake_quant_layers

    enabled = {}
    for name, layer in fake_quant_layers(model).items():
        weight, inputs = layer.weight_quantizer, layer.input_quantizer
        if not (isinstance(weight, FixedPoint) and isinstance(inputs, FixedPoint) and not inputs.signed):
            continue
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
            continue
        arrays = crossbar_count(weight.bits, config.scheme)
        layer.pim = PIM(config, arrays).to(layer.weight.device).train(layer.training)
        layer.pim.generator = generator
        enabled[name] = layer.pim
    if not enabled:
        raise ValueError(
            "no layer runs on PIM: it needs fixed-point weights and fixed-point inputs (activation quantizer)"
        )
    return enabled


def disable_pim(model: nn.Module) -> None:
    from distill.quant.layers import fake_quant_layers

    for layer in fake_quant_layers(model).values():
        layer.pim = None


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches: Iterable, forward: Callable[[nn.Module, object], object]) -> int:
    """PIM-QAT's BatchNorm calibration: the running statistics of every BatchNorm re-estimated on
    ``batches`` (a cumulative average) with the model as it now runs (PIM on); returns how many
    BatchNorm layers there were (0 for GroupNorm models: nothing to calibrate). The model's other
    state (quantizer ranges, PIM gains) stays frozen."""
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    was_training = model.training
    model.eval()
    saved = {}
    for norm in norms:
        saved[norm] = norm.momentum
        norm.reset_running_stats()
        norm.momentum = None  # cumulative: every batch counts alike
        norm.train()
    for batch in batches:
        forward(model, batch)
    for norm, momentum in saved.items():
        norm.momentum = momentum
    model.train(was_training)
    return len(norms)


@torch.no_grad()
def calibrate_adc(model: nn.Module, batches: Iterable, forward: Callable[[nn.Module, object], object]) -> int:
    """A chip set up for a model as it is: every PIM layer's calibrated ADC ranges (with
    ``adc_range="calibrated"``) and rescaling gain (with ``rescale``) estimated afresh on
    ``batches`` (a running average from the first), the model in evaluation otherwise (activation
    ranges, BatchNorm statistics and weights untouched); returns how many PIM layers it set."""
    modules = [module for module in model.modules() if isinstance(module, PIM)]
    was_training = model.training
    model.eval()
    for module in modules:
        module.adc_tops.zero_()
        module.observed.fill_(False)
        module.gain.fill_(1.0)
        module.calibrating = True
    try:
        for batch in batches:
            forward(model, batch)
    finally:
        for module in modules:
            module.calibrating = False
        model.train(was_training)
    return len(modules)
