"""Width and depth search for the SR network (compiler-aware NAS for real-time SR, its public code
wuyushuwys/compiler-aware-nas-sr): PaS channel masks inside every residual block plus a skip gate
per block, trained under a hinge on the latency a fitted speed model predicts.

- **Masks** (:class:`distill.pas.ChannelMask`): one per block, on the inner width as ``conv2``
  reads it (after the ReLU). A zeroed channel there contributes nothing to ``conv2``: removing it
  from ``conv1``'s outputs and ``conv2``'s inputs is exact.
- **Skip gates** (:class:`SkipGate`): one binary weight per block with the same STE, multiplying
  ``conv2``'s output: a closed gate makes the block ``x + 0 = x``, exactly the block removed.
- **Speed model** (:class:`SRSpeedModel`): the network's latency on a runtime as a fixed part
  plus, per kept block, a line in its width, fitted by least squares to whole networks timed on
  that runtime (the unpruned one, one without blocks, random pruned ones). Its error is reported
  on whole networks it was not fitted on (:func:`held_out_error`).
- **Search** (:func:`search`): L1 to the photo + L1 to the unpruned network's output + γ ·
  max(predicted / target − 1, 0), masks and gates at their own learning rate; when the steps run
  out above the target, the smallest kept mask weights are dropped until the prediction meets it
  (:func:`meet_target`), and when under it, the largest dropped ones come back while it stays met
  (:func:`fill_to_target`).
- **Removal** (:func:`remove`): a :class:`hyperhuman.sr.model.SuperResolutionNet` with the kept
  widths and the skipped blocks in its config, computing exactly what the masked network computed.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distill.latency import measure_step
from distill.pas import THRESHOLD, ChannelMask
from hyperhuman.sr.model import SuperResolutionNet

MASK_ATTRIBUTE, GATE_ATTRIBUTE = "pas_mask", "skip_gate"


class SkipGate(nn.Module):
    """One binary weight (U(0.5, 1) at the start; the caller seeds torch): 1 keeps the block, 0 skips it."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1).uniform_(THRESHOLD, 1.0))

    def kept(self) -> bool:
        return bool(self.weight.detach() > THRESHOLD)

    def gate(self) -> torch.Tensor:
        """Exactly 1.0 or 0.0 forward, gradient 1 to the weight (the masks' exact form of the STE)."""
        return float(self.kept()) + (self.weight - self.weight.detach())

    def _gate_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * self.gate().to(output.dtype)


def insert_masks(net: SuperResolutionNet, min_channels: int = 1) -> dict[int, tuple[ChannelMask, SkipGate]]:
    """A channel mask and a skip gate in every block (in place): index → (mask, gate)."""
    found = {}
    for index, block in net.blocks.items():
        if hasattr(block, MASK_ATTRIBUTE):
            raise ValueError(f"block {index} already has a mask: insert masks once, into an unmasked network")
        mask = ChannelMask(block.inner, group=1, min_groups=min(min_channels, block.inner))
        gate = SkipGate()
        setattr(block, MASK_ATTRIBUTE, mask)
        setattr(block, GATE_ATTRIBUTE, gate)
        block.conv2.register_forward_pre_hook(mask._mask_input)
        block.conv2.register_forward_hook(gate._gate_output)
        found[int(index)] = (mask, gate)
    return found


def masks_of(net: SuperResolutionNet) -> dict[int, tuple[ChannelMask, SkipGate]]:
    """The masks :func:`insert_masks` put in (e.g. of a deep copy)."""
    return {int(i): (getattr(b, MASK_ATTRIBUTE), getattr(b, GATE_ATTRIBUTE)) for i, b in net.blocks.items()}


def kept_architecture(masks: dict) -> dict[int, int]:
    """Index → kept width, for the blocks whose gate is open."""
    return {index: int(mask.keep().sum()) for index, (mask, gate) in masks.items() if gate.kept()}


# -- the speed model -------------------------------------------------------------------------------------------


@dataclass
class SRSpeedModel:
    """ms = fixed + Σ_kept blocks (intercept + slope · width), on ``runtime`` at ``input_shape``."""

    runtime: str
    input_shape: tuple[int, int, int, int]
    fixed: float
    intercept: float
    slope: float
    fit_error: float  # the largest relative miss of the networks it was fitted to
    full: float  # the unpruned network, measured

    def predict(self, architecture: dict[int, int]) -> float:
        return self.fixed + sum(self.intercept + self.slope * width for width in architecture.values())

    def expected(self, masks: dict) -> torch.Tensor:
        """The prediction as a differentiable function of the masks and gates (STE values)."""
        terms = [gate.gate() * (self.intercept + self.slope * mask.kept_channels()) for mask, gate in masks.values()]
        return self.fixed + torch.stack(terms).sum() if terms else torch.tensor(self.fixed)

    def to_json(self) -> dict:
        return {**asdict(self), "input_shape": list(self.input_shape)}

    @classmethod
    def from_json(cls, data: dict) -> SRSpeedModel:
        return cls(**{**data, "input_shape": tuple(data["input_shape"])})


def fit_speed_model(
    net: SuperResolutionNet,
    input_shape: tuple,
    runtime: str = "eager",
    warmup: int = 2,
    repeats: int = 5,
    networks: int = 6,
    seed: int = 1,
) -> SRSpeedModel:
    """Time whole networks and fit ``ms = fixed + Σ_kept (intercept + slope · width)`` to them by
    least squares: the unpruned network, the network without blocks, and ``networks`` random pruned
    ones (random widths, some blocks skipped). Whole networks, as compiler-aware NAS fits its speed
    model, because a compiler fuses across parts: the parts timed alone summed to 1.4× a compiled
    network's step, and the bare network timed alone to 3× its share (the per-call overhead of each
    compiled part). ``seed`` draws the fitted networks; :func:`held_out_error` draws others."""
    low = torch.rand(input_shape)
    rng = random.Random(seed)
    blocks, inner = net.config.num_blocks, net.config.inner_channels
    designs = [(list(range(blocks)), [inner] * blocks), ([], [inner] * blocks)]
    for _ in range(networks):
        widths = [rng.randint(1, inner) for _ in range(blocks)]
        designs.append(([i for i in range(blocks) if rng.random() > 0.25], widths))
    rows, times = [], []
    for kept, widths in designs:
        skipped = [i for i in range(blocks) if i not in kept]
        candidate = net if len(kept) == blocks and widths == [inner] * blocks else SuperResolutionNet(
            **{**net.config, "widths": widths, "skipped_blocks": skipped}
        )  # fmt: skip
        times.append(measure_step(candidate, {"low_resolution": low}, runtime, warmup, repeats))
        rows.append([1.0, float(len(kept)), float(sum(widths[i] for i in kept))])
    x, y = torch.tensor(rows, dtype=torch.float64), torch.tensor(times, dtype=torch.float64)
    fixed, intercept, slope = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.flatten().tolist()
    slope = max(slope, 0.0)  # a narrower block is never slower
    model = SRSpeedModel(runtime, tuple(input_shape), fixed, intercept, slope, 0.0, times[0])
    predicted = (x @ torch.tensor([fixed, intercept, slope], dtype=torch.float64)).tolist()
    model.fit_error = max(abs(p / t - 1) for p, t in zip(predicted, times, strict=True))
    return model


def held_out_error(model: SRSpeedModel, net: SuperResolutionNet, count: int = 4, seed: int = 0, repeats: int = 5):
    # seed 0 here, 1 in fit_speed_model: the held-out networks are others than the fitted ones
    """Predicted vs measured for ``count`` random pruned versions of ``net`` the model was not fitted
    on (random widths, about a quarter of the blocks skipped): ``[{architecture, predicted, measured, error}]``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        widths = [rng.randint(1, net.config.inner_channels) for _ in range(net.config.num_blocks)]
        skipped = [i for i in range(net.config.num_blocks) if rng.random() < 0.25]
        pruned = SuperResolutionNet(**{**net.config, "widths": widths, "skipped_blocks": skipped})
        predicted = model.predict(pruned.block_widths())
        measured = measure_step(pruned, {"low_resolution": torch.rand(model.input_shape)}, model.runtime, 2, repeats)
        rows.append({"architecture": pruned.block_widths(), "predicted": predicted, "measured": measured,
                     "error": predicted / measured - 1})  # fmt: skip
    return rows


# -- search, forced drops, removal ------------------------------------------------------------------------------


def search(
    net: SuperResolutionNet,
    teacher: SuperResolutionNet,
    batches,
    speed: SRSpeedModel,
    target_ms: float,
    steps: int,
    *,
    learning_rate: float = 1e-4,
    mask_learning_rate: float = 0.05,
    resource_weight: float = 5.0,
    output_weight: float = 1.0,
    min_channels: int = 1,
    seed: int = 0,
) -> tuple[dict, list[dict]]:
    """Insert masks into ``net`` (in place) and train them: ``(masks, per-step log)``. ``batches``
    yields ``(low, high)`` pairs in [0, 1]."""
    torch.manual_seed(seed)
    masks = insert_masks(net, min_channels)
    mask_params = [p for mask, gate in masks.values() for p in (mask.weight, gate.weight)]
    mask_ids = {id(p) for p in mask_params}
    weights = [p for p in net.parameters() if id(p) not in mask_ids]
    optimizer = torch.optim.AdamW(
        [{"params": weights, "lr": learning_rate}, {"params": mask_params, "lr": mask_learning_rate, "weight_decay": 0}]
    )
    teacher = teacher.eval().requires_grad_(False)
    log = []
    net.train()
    for _ in range(steps):
        low, high = next(batches)
        output = net(low)
        with torch.no_grad():
            reference = teacher(low)
        predicted = speed.expected(masks)
        task, distill = F.l1_loss(output, high), F.l1_loss(output, reference)
        resource = torch.relu(predicted / target_ms - 1)
        loss = task + output_weight * distill + resource_weight * resource
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log.append({"loss": loss.item(), "task": task.item(), "predicted_ms": predicted.item()})
    return masks, log


def meet_target(masks: dict, speed: SRSpeedModel, target_ms: float) -> int:
    """Drop the smallest kept mask weights (whole blocks when their last channel would go) until the
    prediction meets ``target_ms``; returns how many channels were dropped."""
    dropped = 0
    with torch.no_grad():
        while speed.predict(kept_architecture(masks)) > target_ms:
            candidates = [
                (float(mask.weight[c]), index, c)
                for index, (mask, gate) in masks.items()
                if gate.kept()
                for c in torch.nonzero(mask.keep()).flatten().tolist()
            ]
            if not candidates:
                break
            _, index, channel = min(candidates)
            mask, gate = masks[index]
            if int(mask.keep().sum()) <= mask.min_groups:
                gate.weight.fill_(0.0)  # the block's last channels: skip the block instead
            else:
                mask.weight[channel] = 0.0
            dropped += 1
    return dropped


def fill_to_target(masks: dict, speed: SRSpeedModel, target_ms: float) -> int:
    """Take back what the search dropped, most wanted first (the largest weight below the
    threshold: a channel of a kept block, or a skipped block's gate), while the prediction stays
    within ``target_ms``; returns how many were taken back. The hinge stops pulling at the target,
    but masks and gates that crossed it together leave the network well under it: the latency
    budget is there to be spent on quality."""
    restored = 0
    with torch.no_grad():
        while True:
            architecture = kept_architecture(masks)
            slack = target_ms - speed.predict(architecture)
            candidates = []
            for index, (mask, gate) in masks.items():
                if not gate.kept():
                    width = len(mask.kept_indices())
                    if speed.intercept + speed.slope * width <= slack:
                        candidates.append((float(gate.weight), index, None))
                elif speed.slope <= slack:
                    dropped = torch.nonzero(~mask.keep()).flatten().tolist()
                    candidates += [(float(mask.weight[c]), index, c) for c in dropped]
            if not candidates:
                return restored
            _, index, channel = max(candidates)
            mask, gate = masks[index]
            if channel is None:
                gate.weight.fill_(THRESHOLD + 1e-3)
            else:
                mask.weight[channel] = THRESHOLD + 1e-3
            restored += 1


def remove(net: SuperResolutionNet, masks: dict) -> SuperResolutionNet:
    """The masked network as a smaller :class:`SuperResolutionNet` (a new model; ``net`` unchanged)."""
    config = dict(net.config)
    widths = list(config.get("widths") or [config["inner_channels"]] * config["num_blocks"])
    skipped = set(config.get("skipped_blocks") or ())
    kept_channels = {}
    for index, (mask, gate) in masks.items():
        if gate.kept():
            kept_channels[index] = mask.kept_indices()
            widths[index] = len(kept_channels[index])
        else:
            skipped.add(index)
    pruned = SuperResolutionNet(**{**config, "widths": widths, "skipped_blocks": sorted(skipped)})
    state = {}
    source = {name: tensor for name, tensor in net.state_dict().items() if MASK_ATTRIBUTE not in name
              and GATE_ATTRIBUTE not in name}  # fmt: skip
    for name, tensor in source.items():
        parts = name.split(".")
        if parts[0] != "blocks":
            state[name] = tensor
            continue
        index = int(parts[1])
        if index not in kept_channels:
            continue
        keep = kept_channels[index]
        if parts[2] == "conv1":
            tensor = tensor[keep]
        elif parts[2] == "conv2" and parts[3] == "weight":
            tensor = tensor[:, keep]
        state[name] = tensor.clone()
    pruned.load_state_dict(state)
    return pruned
