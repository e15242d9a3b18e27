"""What a pruned model costs, as a function of its per-block widths: MACs, or milliseconds on a runtime.

Pruning-as-Search trains its masks against a resource target, so it needs the cost of every width
assignment it passes through, differentiably, without timing each one. Every prunable block's
width (:mod:`hyperhuman.unet_widths`) touches only that block's layers, and the blocks are
disjoint, so a model's cost is

    cost(widths) = cost(full model) + Σ_block [c_block(width_block) − c_block(full width_block)]

with ``c_block`` the cost of the block alone, at the inputs it sees in a real step (captured with
:func:`distill.latency.capture`). Each ``c_block`` is a straight line in the width, fitted to the
block sliced to a few widths (whole groups, the first channels: which channels are kept does not
change the cost):

- ``macs``: counted by ``torch.utils.flop_counter`` (convolutions, linears and the attention
  matmuls; elementwise work is not counted). Exactly linear: two widths are enough, and the
  prediction is exact.
- a runtime of :data:`distill.latency.RUNTIMES` (``eager``, ``compiled``, ``bf16``): each sliced
  block timed through the :class:`distill.latency.LatencyTable` (cached per machine and runtime,
  so blocks of equal shape — the LSDM's branches — are timed once), a least-squares line through
  :data:`LATENCY_WIDTHS` widths. ``cost(full model)`` is the whole step measured, not the sum of
  blocks timed alone (which misses what runs between blocks and how warm the caches are); only the
  change is predicted. :attr:`WidthCost.fit_error` reports how far the lines miss their own
  timings; :func:`prediction_error` compares a prediction with a pruned model's measured step.

:meth:`WidthCost.expected` is the same sum over the masks' straight-through kept counts
(:meth:`distill.pas.ChannelMask.kept_channels`): its value is the cost of the masks' current
widths exactly as :meth:`WidthCost.predict` gives it, its gradient each block's cost per channel.

    cost = fit_cost(unet, step_inputs, "macs")            # or "eager" with table=LatencyTable.load()
    target = 0.5 * cost.full
    loss = task + gamma * torch.relu(cost.expected(masks) / target - 1)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from distill.latency import RUNTIMES, Call, LatencyTable, capture, measure_step
from hyperhuman.unet_widths import group_size, prunable, shrink_to_widths, width

COST_UNITS = ("macs", *RUNTIMES)
# The fractions of a block's groups a latency line is fitted through (each rounded to whole groups,
# at least one): the ends and two points between, where the searched widths fall.
LATENCY_WIDTHS = (1.0, 0.75, 0.5, 0.25)


@dataclass
class WidthCost:
    """A model's cost (``unit``: MACs or ms on a runtime) as ``full`` plus, per prunable block, a
    slope (cost per channel) times the channels the block lost."""

    unit: str
    full: float  # the unpruned model's step: counted MACs, or measured ms
    full_widths: dict[str, int]
    slopes: dict[str, float]  # block path → cost per channel of its width
    fit_error: dict[str, float] = field(default_factory=dict)  # block path → max |line − timing| / timing
    # "a|b" → cost per channel of a per channel of b, for a layer that reads width a and writes width b
    # (a plain conv net's chained widths, :mod:`distill.e2gan.search`); a UNet's widths are each inside
    # one block, so it has none
    couplings: dict[str, float] = field(default_factory=dict)

    def predict(self, widths: dict[str, int]) -> float:
        """The cost with the given widths (blocks not named keep their full width)."""
        unknown = sorted(set(widths) - set(self.slopes))
        if unknown:
            raise ValueError(f"widths for blocks this cost model does not know: {unknown[:5]}")
        lost = {name: widths[name] - self.full_widths[name] for name in widths}
        return self.full + sum(self.slopes[name] * channels for name, channels in lost.items()) + self._coupled(lost)

    def expected(self, masks: dict) -> torch.Tensor:
        """The cost at the masks' current widths as a differentiable scalar (straight-through: the
        value is :meth:`predict` of the kept counts, the gradient each block's slope, plus its
        couplings times the other width's change)."""
        unknown = sorted(set(masks) - set(self.slopes))
        if unknown:
            raise ValueError(f"masks on blocks this cost model does not know: {unknown[:5]}")
        lost = {name: mask.kept_channels() - self.full_widths[name] for name, mask in masks.items()}
        return self.full + sum(self.slopes[name] * channels for name, channels in lost.items()) + self._coupled(lost)

    def _coupled(self, lost: dict):
        """Σ coupling · (change of a) · (change of b) over the couplings (a width not given: no change)."""
        total = 0.0
        for pair, coupling in self.couplings.items():
            first, second = pair.split("|")
            if first in lost and second in lost:
                total = total + coupling * lost[first] * lost[second]
        return total

    def to_json(self) -> dict:
        return {
            "unit": self.unit,
            "full": self.full,
            "full_widths": self.full_widths,
            "slopes": self.slopes,
            "fit_error": self.fit_error,
            "couplings": self.couplings,
        }

    @classmethod
    def from_json(cls, data: dict) -> WidthCost:
        return cls(data["unit"], data["full"], data["full_widths"], data["slopes"], data.get("fit_error", {}),
                   data.get("couplings", {}))  # fmt: skip


def fit_cost(
    model: nn.Module,
    inputs: dict,
    unit: str,
    table: LatencyTable | None = None,
    *,
    warmup: int = 3,
    repeats: int = 10,
) -> WidthCost:
    """The :class:`WidthCost` of ``model`` (unpruned or already pruned: its current widths are the
    full ones) at one step's ``inputs``. Latency units time on the machine now, through ``table``."""
    if unit not in COST_UNITS:
        raise ValueError(f"cost unit {unit!r}: one of {COST_UNITS} (MACs, or milliseconds on a runtime)")
    if unit != "macs" and table is None:
        raise ValueError(f"a latency cost ({unit}) times blocks through a LatencyTable: pass table=LatencyTable.load()")
    model = model.eval()
    blocks = prunable(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no ResnetBlock2D, Attention or FeedForward to narrow")
    calls = capture(model, inputs, list(blocks))
    slopes, errors = {}, {}
    for call in calls:
        if unit == "macs":
            slopes[call.name] = _mac_slope(call)
        else:
            slopes[call.name], errors[call.name] = _latency_line(call, unit, table, warmup, repeats)
    if unit == "macs":
        full = float(count_macs(model, inputs))
    else:
        full = measure_step(model, inputs, unit, warmup, repeats)
    return WidthCost(unit, full, {name: width(block) for name, block in blocks.items()}, slopes, errors)


def count_macs(model: nn.Module, inputs: dict) -> int:
    """Multiply-accumulates of one ``model(**inputs)`` (FLOPs / 2, as torch's flop counter counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(**inputs)
    return counter.get_total_flops() // 2


def prediction_error(cost: WidthCost, pruned: nn.Module, inputs: dict, *, warmup=3, repeats=10) -> dict:
    """Predicted vs measured (or counted) cost of a pruned model of the one ``cost`` was fitted on."""
    from hyperhuman.unet_widths import widths

    predicted = cost.predict(widths(pruned))
    if cost.unit == "macs":
        measured = float(count_macs(pruned.eval(), inputs))
    else:
        measured = measure_step(pruned.eval(), inputs, cost.unit, warmup, repeats)
    return {"predicted": predicted, "measured": measured, "error": predicted / measured - 1}


# -- one block's line --------------------------------------------------------------------------------------------


def _sliced(call: Call, channels: int) -> Call:
    """The call with its block narrowed to its first ``channels`` (a copy; the model is untouched)."""
    block = copy.deepcopy(call.module)
    shrink_to_widths(block, {"": channels})
    return Call(call.name, block, call.args, call.kwargs)


def _block_macs(call: Call) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        call.module(*call.args, **call.kwargs)
    return counter.get_total_flops() // 2


def _mac_slope(call: Call) -> float:
    """MACs per channel: the block's MACs are linear in its width (every layer it slices is), so
    the full width and one group fewer give the exact slope."""
    full, group = width(call.module), group_size(call.module)
    if full == group:  # one group only: the line through the block at one group and at none
        return _block_macs(call) / full
    return (_block_macs(call) - _block_macs(_sliced(call, full - group))) / group


def _latency_line(call: Call, runtime: str, table: LatencyTable, warmup: int, repeats: int) -> tuple[float, float]:
    """The least-squares slope (ms per channel) through the block timed at :data:`LATENCY_WIDTHS`,
    and the line's largest relative miss of those timings."""
    full, group = width(call.module), group_size(call.module)
    counts = sorted({max(group, round(fraction * full / group) * group) for fraction in LATENCY_WIDTHS})
    calls = [call if count == full else _sliced(call, count) for count in counts]
    times = [table.lookup(sliced, runtime, warmup, repeats) for sliced in calls]
    if len(counts) == 1:
        return times[0] / full, 0.0
    x, y = torch.tensor(counts, dtype=torch.float64), torch.tensor(times, dtype=torch.float64)
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / (x - x.mean()).square().sum())
    intercept = float(y.mean()) - slope * float(x.mean())
    # A block this small that narrowing it does not speed it up: timing noise can tilt the line
    # below zero, which would reward widening; it costs nothing per channel instead.
    slope = max(slope, 0.0)
    misses = [abs(intercept + slope * c - t) / t for c, t in zip(counts, times, strict=True)]
    return slope, max(misses)
