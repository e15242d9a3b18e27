"""Latency-driven width search of the E2GAN generator (the portrait-stylization seed: a search over
the generator's per-layer widths under a latency target cut its compute 10×).

The generator's searchable widths are those of :func:`distill.e2gan.generator.full_widths`: tensors
one layer writes and only the next one reads (the encoder's and decoder's stage outputs, each ResNet
block's inner width, the transformer's heads and MLP). The pruning stage's machinery does the rest:

- **masks**: one :class:`distill.pas.ChannelMask` per width (whole heads for the attentions), a
  forward pre-hook on the layer that reads the width, as the PaS masks of a UNet. The norms are
  per channel (InstanceNorm), so a zeroed channel is exactly a removed one.
- **cost**: a :class:`distill.width_cost.WidthCost` (MACs, or ms on a runtime of
  :mod:`distill.latency`), fitted here because a conv net's widths chain: a down- or up-sampling
  reads one searched width and writes the next, so its cost is bilinear in the two (the cost's
  ``couplings``). Each layer that a width touches (a *unit*: ``down_blocks.0``, ``res_blocks.1``,
  ``transformer.attn2``, ...) is timed through the :class:`distill.latency.LatencyTable` at its real
  inputs in generators built at a grid of widths, and a line (or a bilinear surface) is fitted to
  those timings; ``full`` is the whole generator measured, only the change is predicted.
- **search** (:func:`search`): the pair loss (L1/L2 to the teacher editor's edit) + L1 to the
  unpruned generator's output + ``resource_weight · max(cost / target − 1, 0)``, the masks at their
  own learning rate; :func:`distill.prune.meet_target` drops the weakest groups if the steps ran out
  above the target, :func:`fill_to_target` gives back the strongest dropped ones while it stays met.
- **removal** (:func:`remove`): a new :class:`E2GANGenerator` with the kept widths in its config
  (``widths``), computing exactly what the masked generator computed; it saves and loads as any other.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distill.pas import MASK_ATTRIBUTE, THRESHOLD, ChannelMask

UNIT_PARENTS = ("down_blocks", "up_blocks", "res_blocks", "transformer")  # a unit is one of their children


@dataclass(frozen=True)
class WidthPoint:
    """One searchable width: the layers that write it (``rows``: their output channels), the
    per-channel norms on it, the layer that reads it (its input channels; the mask sits there) and
    how many channels go together (a head for attention, else one)."""

    name: str
    group: int
    rows: tuple[str, ...]
    norms: tuple[str, ...]
    reader: str


def width_points(generator: nn.Module) -> dict[str, WidthPoint]:
    """The generator's searchable widths, by the names of ``full_widths`` (in that order)."""
    from distill.e2gan.generator import full_widths

    config = generator.config
    downs, head = config.num_downsamples, config.base_channels * 2**config.num_downsamples // config.attention_heads
    points = {}
    if downs:
        points["conv_in"] = WidthPoint("conv_in", 1, ("conv_in",), ("norm_in",), "down_blocks.0.conv")
    for i in range(downs - 1):
        name = f"down_blocks.{i}"
        points[name] = WidthPoint(name, 1, (f"{name}.conv",), (f"{name}.norm",), f"down_blocks.{i + 1}.conv")
    for k in range(config.num_res_blocks):
        name = f"res_blocks.{k}"
        points[name] = WidthPoint(name, 1, (f"{name}.conv1",), (f"{name}.norm1",), f"{name}.conv2")
    for attention in ("transformer.attn1", "transformer.attn2"):
        rows = tuple(f"{attention}.{layer}" for layer in ("to_q", "to_k", "to_v"))
        points[attention] = WidthPoint(attention, head, rows, (), f"{attention}.to_out")
    points["transformer.ff"] = WidthPoint("transformer.ff", 1, ("transformer.ff.fc1",), (), "transformer.ff.fc2")
    for j in range(downs):
        name = f"up_blocks.{j}"
        reader = f"up_blocks.{j + 1}.conv" if j + 1 < downs else "conv_out"
        points[name] = WidthPoint(name, 1, (f"{name}.conv",), (f"{name}.norm",), reader)
    order = list(full_widths(dict(config)))
    if sorted(points) != sorted(order):  # the two descriptions of the generator must name the same widths
        raise RuntimeError(f"width points {sorted(points)} ≠ the generator's widths {sorted(order)}")
    return {name: points[name] for name in order}


def generator_widths(generator: nn.Module) -> dict[str, int]:
    """Each searchable width as the generator's layers have it now."""

    def out_channels(layer):
        return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features

    return {name: out_channels(generator.get_submodule(p.rows[0])) for name, p in width_points(generator).items()}


def at_widths(generator: nn.Module, widths: dict[str, int]) -> nn.Module:
    """A fresh generator of ``generator``'s config at ``widths`` (its own weights, freshly drawn)."""
    # the public keys only: diffusers' `_use_default_values` would reset `widths` to its default
    config = {key: value for key, value in generator.config.items() if not key.startswith("_")}
    return type(generator)(**{**config, "widths": widths})


def _placed_like(model: nn.Module, reference: nn.Module) -> nn.Module:
    """``model`` on ``reference``'s device and in its dtype (the dtype given only when it differs:
    diffusers warns at every ``to(dtype=...)``)."""
    parameter = next(reference.parameters())
    model = model.to(parameter.device)
    return model if parameter.dtype == torch.float32 else model.to(parameter.dtype)


# --- masks and removal -----------------------------------------------------------------------------
def insert_masks(generator: nn.Module, min_channels: int = 1) -> dict[str, ChannelMask]:
    """A fresh :class:`ChannelMask` (keeping everything; drawn from torch's global generator, which
    the caller seeds) on every searchable width, in place: ``{width name: mask}``. Each keeps at
    least ``min_channels`` channels (whole groups: at least one head)."""
    widths = generator_widths(generator)
    masks = {}
    for name, point in width_points(generator).items():
        reader = generator.get_submodule(point.reader)
        if hasattr(reader, MASK_ATTRIBUTE):
            raise ValueError(f"{point.reader} already has a mask: insert masks once, into an unmasked generator")
        groups = widths[name] // point.group
        mask = ChannelMask(widths[name], point.group, min(groups, max(1, -(-min_channels // point.group))))
        mask.to(device=reader.weight.device, dtype=reader.weight.dtype)
        setattr(reader, MASK_ATTRIBUTE, mask)  # the reader's child: in the state dict and the optimiser
        reader.register_forward_pre_hook(mask._mask_input)  # the mask's own method: a deep copy hooks its own
        masks[name] = mask
    return masks


def masks_of(generator: nn.Module) -> dict[str, ChannelMask]:
    """The masks :func:`insert_masks` put in (e.g. of a deep copy)."""
    found = {}
    for name, point in width_points(generator).items():
        mask = getattr(generator.get_submodule(point.reader), MASK_ATTRIBUTE, None)
        if mask is not None:
            found[name] = mask
    return found


def remove(generator: nn.Module, masks: dict[str, ChannelMask]) -> nn.Module:
    """The masked generator as a smaller one of the same class (a new model, in eval mode; the
    masked one is unchanged): the kept channels' weights, its ``widths`` in the config."""
    points = width_points(generator)
    kept = {name: mask.kept_indices() for name, mask in masks.items()}
    widths = {**generator_widths(generator), **{name: len(index) for name, index in kept.items()}}
    state = {key: value for key, value in generator.state_dict().items() if MASK_ATTRIBUTE not in key}
    for name, index in kept.items():
        point = points[name]
        for layer in (*point.rows, *point.norms):
            for key in (f"{layer}.weight", f"{layer}.bias"):
                if key in state:
                    state[key] = state[key][index.to(state[key].device)]
        key = f"{point.reader}.weight"
        state[key] = state[key][:, index.to(state[key].device)]
    pruned = at_widths(generator, widths)
    pruned.load_state_dict({key: value.clone() for key, value in state.items()})
    return _placed_like(pruned, generator).eval()


# --- the cost of widths ----------------------------------------------------------------------------
def cost_units(points: dict[str, WidthPoint]) -> dict[str, tuple[str, ...]]:
    """Each module whose cost depends on searchable widths (``conv_in``, ``norm_in``,
    ``down_blocks.I``, ``res_blocks.K``, ``transformer.attn1``, ..., ``conv_out``) → those widths
    (one, or two for a layer that reads one and writes the next)."""
    units: dict[str, list[str]] = {}
    for name, point in points.items():
        for layer in (*point.rows, *point.norms, point.reader):
            parts = layer.split(".")
            unit = ".".join(parts[:2]) if parts[0] in UNIT_PARENTS else parts[0]
            if name not in units.setdefault(unit, []):
                units[unit].append(name)
    return {unit: tuple(names) for unit, names in units.items()}


def _sides(points, units) -> dict[str, int]:
    """0 or 1 per width, the two widths of every two-width unit on different sides (the widths
    form chains, so this always exists): a grid over the two sides' fractions varies both widths
    of every such unit independently."""
    side: dict[str, int] = {}
    for start in points:
        if start in side:
            continue
        side[start], todo = 0, [start]
        while todo:
            name = todo.pop()
            for pair in units.values():
                if len(pair) == 2 and name in pair:
                    other = pair[1] if pair[0] == name else pair[0]
                    if other not in side:
                        side[other] = 1 - side[name]
                        todo.append(other)
    return side


def _narrowed(full: int, group: int, fraction: float) -> int:
    return max(group, round(fraction * full / group) * group)


def _call_macs(call) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        call.module(*call.args, **call.kwargs)
    return counter.get_total_flops() // 2


def fit_generator_cost(generator: nn.Module, inputs: dict, unit: str, table=None, *, warmup=3, repeats=10):
    """The :class:`distill.width_cost.WidthCost` of ``generator``'s widths at ``inputs`` (keyword
    inputs of one call: a frame). ``unit``: ``macs`` (counted: the fit is exact) or a runtime of
    :data:`distill.latency.RUNTIMES`, each unit timed through ``table``. Units are measured in
    generators built at every pair of :data:`distill.width_cost.LATENCY_WIDTHS` fractions for the
    two sides of the chains (identical units at identical shapes are timed once: the table's key);
    each unit's cost is fitted by least squares as ``c + Σ slope · Δwidth (+ coupling · Δa · Δb)``."""
    from distill.latency import capture, measure_step
    from distill.width_cost import COST_UNITS, LATENCY_WIDTHS, WidthCost, count_macs

    if unit not in COST_UNITS:
        raise ValueError(f"cost unit {unit!r}: one of {COST_UNITS} (MACs, or milliseconds on a runtime)")
    if unit != "macs" and table is None:
        raise ValueError(f"a latency cost ({unit}) times units through a LatencyTable: pass table=LatencyTable.load()")
    generator = generator.eval()
    points, full = width_points(generator), generator_widths(generator)
    units = cost_units(points)
    side = _sides(points, units)
    fractions = (1.0, 0.5) if unit == "macs" else LATENCY_WIDTHS  # MACs are exactly bilinear: two suffice
    samples: dict[str, list[tuple[dict, float]]] = {name: [] for name in units}
    for pair in itertools.product(fractions, repeat=2):
        widths = {name: _narrowed(full[name], p.group, pair[side[name]]) for name, p in points.items()}
        candidate = generator
        if widths != full:  # the weights' values do not matter to MACs or time: a fresh one at those widths
            candidate = _placed_like(at_widths(generator, widths), generator).eval()
        for call in capture(candidate, inputs, list(units)):
            value = _call_macs(call) if unit == "macs" else table.lookup(call, unit, warmup, repeats)
            samples[call.name].append((widths, float(value)))
    slopes, couplings, errors = dict.fromkeys(points, 0.0), {}, {}
    for name, rows in samples.items():
        fitted = _fit_unit(units[name], full, rows, clamp=unit != "macs")
        for width, slope in zip(units[name], fitted["slopes"], strict=True):
            slopes[width] += slope
        if fitted["coupling"] is not None:
            key = "|".join(units[name])
            couplings[key] = couplings.get(key, 0.0) + fitted["coupling"]
        errors[name] = fitted["error"]
    total = float(count_macs(generator, inputs)) if unit == "macs" else measure_step(generator, inputs, unit,
                                                                                        warmup, repeats)  # fmt: skip
    return WidthCost(unit, total, full, slopes, errors, couplings)


def _fit_unit(widths: tuple[str, ...], full: dict, rows: list, clamp: bool) -> dict:
    """Least squares of one unit's costs on ``[1, Δa(, Δb, Δa·Δb)]``; with ``clamp`` (timings) no
    negative slope or coupling (a narrower layer is never slower: noise can tilt a fit below zero)."""

    def features(assignment):
        changes = [float(assignment[w] - full[w]) for w in widths]
        return [1.0, *changes, *([changes[0] * changes[1]] if len(changes) == 2 else [])]

    x = torch.tensor([features(assignment) for assignment, _ in rows], dtype=torch.float64)
    y = torch.tensor([value for _, value in rows], dtype=torch.float64)
    solution = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.flatten()
    if clamp:
        solution[1:] = solution[1:].clamp(min=0.0)
    misses = (x @ solution - y).abs() / y.clamp(min=1e-12)
    coefficients = solution.tolist()
    return {"slopes": coefficients[1 : 1 + len(widths)], "coupling": coefficients[3] if len(widths) == 2 else None,
            "error": float(misses.max())}  # fmt: skip


def prediction_error(cost, pruned: nn.Module, inputs: dict, *, warmup=3, repeats=10) -> dict:
    """Predicted vs measured (or counted) cost of a searched generator of the one ``cost`` was fitted on."""
    from distill.latency import measure_step
    from distill.width_cost import count_macs

    predicted = cost.predict(generator_widths(pruned))
    if cost.unit == "macs":
        measured = float(count_macs(pruned.eval(), inputs))
    else:
        measured = measure_step(pruned.eval(), inputs, cost.unit, warmup, repeats)
    return {"predicted": predicted, "measured": measured, "error": predicted / measured - 1}


# --- the search ------------------------------------------------------------------------------------
def search(student: nn.Module, teacher: nn.Module, batches, text, cost, target: float, steps: int, *,
           learning_rate: float = 1e-4, mask_learning_rate: float = 0.05, resource_weight: float = 5.0,
           output_weight: float = 1.0, l1_weight: float = 10.0, l2_weight: float = 0.0, min_channels: int = 1,
           seed: int = 0, log=print) -> tuple[dict, list[dict]]:  # fmt: skip
    """Insert masks into ``student`` (a copy of ``teacher``, trained in place) and train masks and
    weights for ``steps`` batches of pairs (``batches``: ``{input, target, prompt}``, ``text``:
    prompts → states, mask): ``(masks, per-step log)``."""
    torch.manual_seed(seed)
    masks = insert_masks(student, min_channels)
    mask_weights = [mask.weight for mask in masks.values()]
    mask_ids = {id(weight) for weight in mask_weights}
    weights = [p for p in student.parameters() if id(p) not in mask_ids]
    optimizer = torch.optim.Adam([{"params": weights, "lr": learning_rate},
                                  {"params": mask_weights, "lr": mask_learning_rate}])  # fmt: skip
    teacher = teacher.eval().requires_grad_(False)
    device = next(student.parameters()).device
    history = []
    student.train()
    for step in range(steps):
        batch = next(batches)
        inputs, targets = batch["input"].to(device), batch["target"].to(device)
        states, attention_mask = text(batch["prompt"])
        output = student(inputs, states, attention_mask)
        with torch.no_grad():
            reference = teacher(inputs, states, attention_mask)
        pair = l1_weight * F.l1_loss(output, targets) + l2_weight * F.mse_loss(output, targets)
        distilled = F.l1_loss(output, reference)
        predicted = cost.expected(masks)
        resource = torch.relu(predicted / target - 1)
        loss = pair + output_weight * distilled + resource_weight * resource
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"loss": loss.item(), "pair": pair.item(), "distill": distilled.item(),
                        "predicted": predicted.item()})  # fmt: skip
        if (step + 1) % 25 == 0 or step == 0:
            log(f"[distill gan-search] search step {step + 1}/{steps} loss {loss.item():.4f} "
                f"(pair {pair.item():.4f}, distill {distilled.item():.4f}); predicted {cost.unit} "
                f"{predicted.item() / cost.full:.1%} of the full generator's "
                f"(target {target / cost.full:.1%})")  # fmt: skip
    student.eval()
    return masks, history


def kept_widths(masks: dict[str, ChannelMask]) -> dict[str, int]:
    return {name: len(mask.kept_indices()) for name, mask in masks.items()}


def fill_to_target(masks: dict[str, ChannelMask], cost, target: float) -> int:
    """Give back dropped groups, the largest mask weight first, while the predicted cost stays
    within ``target``; returns how many. The hinge stops pulling at the target, but masks that
    crossed the threshold together can leave the generator well under it: the budget is there to
    be spent on quality (the WidthCost counterpart of :func:`distill.sr_search.fill_to_target`)."""
    restored = 0
    with torch.no_grad():
        while True:
            kept, best = kept_widths(masks), None
            for name, mask in masks.items():
                dropped = torch.nonzero(~mask.keep()).flatten()
                if not len(dropped) or cost.predict({**kept, name: kept[name] + mask.group}) > target:
                    continue
                index = int(dropped[mask.weight.detach()[dropped].argmax()])
                if best is None or float(mask.weight[index]) > best[0]:
                    best = (float(mask.weight[index]), name, index)
            if best is None:
                return restored
            masks[best[1]].weight[best[2]] = THRESHOLD + 1e-3
            restored += 1
