"""Progressive layer freezing from the input side (SpFDE, Yuan et al. 2022).

The model is cut into *units* in input order (a unit: a list of parameter-name globs). Freezing the
first ``k`` units sets ``requires_grad=False`` on their parameters: autograd then builds no graph for
them (their inputs need no gradient either), so their whole backward is skipped, not only their
weight gradients, and the optimizer leaves them and their state untouched (their gradient stays
``None``). Freezing only ever grows from the input side; a frozen unit is never thawed.

When: ``mode: schedule`` freezes the first ``k`` units at step ``s`` for each ``[s, k]`` of
``schedule``; ``mode: criterion`` checks every ``check_every`` steps whether the next unit's relative
weight change over that window, ``‖W_now − W_then‖ / ‖W_then‖``, fell below ``threshold``, and
freezes it if so, up to ``max_blocks`` units.

Units (``blocks: auto``): for a diffusers ``UNet2DConditionModel`` or a ``LatentStructuralUNet``,
the time embedding with the input convs first (every block reads the time embedding, so no block's
backward could be skipped while it trains), then each down block, the mid block and the inner up
blocks, in the order the forward runs them; the outermost up block and the output head are never
frozen. A model with a ``freezing_units()`` method names its own (e.g. the pose student: its
backbone's stem and stages). Any other model: its top-level children in definition order (a
``Sequential`` or ``ModuleList`` child counts per item), all but the last. ``blocks: [[glob, ...],
...]`` names them.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from hyperhuman.config import ConfigError

MODES = ("schedule", "criterion")
DEFAULTS = {"mode": "schedule", "schedule": [], "check_every": 50, "threshold": 0.01, "max_blocks": None}
EMBEDDINGS = ("time_embedding", "class_embedding", "add_embedding", "encoder_hid_proj", "add_time_proj")


def check_freezing(settings: dict, where: str = "train.efficiency.freezing") -> dict:
    merged = {**DEFAULTS, "blocks": "auto", **{k: v for k, v in settings.items() if v is not None and k != "use"}}
    if merged["mode"] not in MODES:
        raise ConfigError(f"{where}.mode={merged['mode']!r}: one of {list(MODES)}")
    schedule = merged["schedule"]
    pairs_ok = isinstance(schedule, list) and all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(n, int) and n >= 0 for n in pair)
        for pair in schedule
    )
    if not pairs_ok or [s for s, _ in schedule] != sorted(s for s, _ in schedule):
        raise ConfigError(
            f"{where}.schedule={schedule!r}: a list of [step, blocks] pairs in step order, e.g. [[100, 1], [200, 2]] "
            "(freeze the first `blocks` units at `step`)"
        )
    if merged["mode"] == "schedule" and not schedule:
        raise ConfigError(f"{where}.schedule is empty with mode=schedule; give [[step, blocks], ...] or mode=criterion")
    if not isinstance(merged["check_every"], int) or merged["check_every"] < 1:
        raise ConfigError(f"{where}.check_every={merged['check_every']!r}: optimizer steps per window, ≥ 1")
    if not isinstance(merged["threshold"], int | float) or merged["threshold"] <= 0:
        raise ConfigError(f"{where}.threshold={merged['threshold']!r}: a relative weight change > 0, e.g. 0.01")
    limit = merged["max_blocks"]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"{where}.max_blocks={limit!r}: the most units the criterion freezes (≥ 0), or null for all")
    blocks = merged["blocks"]
    if blocks != "auto" and not (
        isinstance(blocks, list) and blocks and all(isinstance(u, list) and u and all(isinstance(g, str) for g in u)
                                                    for u in blocks)
    ):  # fmt: skip
        raise ConfigError(f"{where}.blocks={blocks!r}: 'auto' or a list of units, each a list of parameter globs")
    return merged


# --- units in input order ---------------------------------------------------------------------------
def unet_units(model: nn.Module) -> list[list[str]] | None:
    """The input-side units of a diffusers UNet or an LSDM (see the module docstring); else None."""
    if hasattr(model, "trunk") and hasattr(model, "branch"):  # LatentStructuralUNet
        trunk, replicated = model.trunk, model.config.replicated_blocks
        first = [f"trunk.{name}.*" for name in EMBEDDINGS] + ["branch.*.conv_in.*"]
        units = [first] + [[f"branch.*.down_blocks.{i}.*"] for i in range(replicated)]
        units[-1].append("merge_weights")  # where the branches meet the trunk
        units += [[f"trunk.down_blocks.{i}.*"] for i in range(replicated, len(trunk.down_blocks))]
        units += [["trunk.mid_block.*"]] if trunk.mid_block is not None else []
        return units + [[f"trunk.up_blocks.{i}.*"] for i in range(len(trunk.up_blocks) - replicated)]
    if hasattr(model, "down_blocks") and hasattr(model, "conv_in"):  # UNet2DConditionModel
        units = [[f"{name}.*" for name in EMBEDDINGS] + ["conv_in.*"]]
        units += [[f"down_blocks.{i}.*"] for i in range(len(model.down_blocks))]
        units += [["mid_block.*"]] if getattr(model, "mid_block", None) is not None else []
        return units + [[f"up_blocks.{i}.*"] for i in range(len(model.up_blocks) - 1)]
    return None


def child_units(model: nn.Module) -> list[list[str]]:
    """Top-level children in definition order, sequences per item, all but the last (the head)."""
    units = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential | nn.ModuleList):
            units += [[f"{name}.{item}.*"] for item, _ in child.named_children()]
        else:
            units.append([f"{name}.*"])
    return units[:-1]


def resolve_units(model: nn.Module, blocks) -> list[list[str]]:
    """Each unit's trainable parameter names; globs matching nothing trainable are dropped (e.g. an
    embedding the model does not have), units left empty are refused."""
    if blocks != "auto":
        globs = blocks
    elif hasattr(model, "freezing_units"):
        globs = model.freezing_units()
    else:
        globs = unet_units(model) or child_units(model)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    units, taken = [], set()
    for unit in globs:
        names = [n for n in trainable if n not in taken and any(fnmatch.fnmatchcase(n, g) for g in unit)]
        if not names:
            if blocks == "auto":
                continue
            raise ConfigError(f"train.efficiency.freezing.blocks unit {unit} matches no trainable parameter")
        taken.update(names)
        units.append(names)
    return units


def relative_change(now: list[torch.Tensor], then: list[torch.Tensor]) -> float:
    moved = sum(float((a.float() - b.to(a.device).float()).square().sum()) for a, b in zip(now, then, strict=True))
    size = sum(float(b.float().square().sum()) for b in then)
    return (moved / max(size, 1e-30)) ** 0.5


class Freezer:
    """How many leading units are frozen, when the next one freezes, and applying it to the model."""

    def __init__(self, model: nn.Module, settings: dict):
        self.settings = check_freezing(settings)
        self.parameters = dict(model.named_parameters())
        self.units = resolve_units(model, self.settings["blocks"])
        limit = self.settings["max_blocks"]
        self.max_blocks = len(self.units) if limit is None else min(limit, len(self.units))
        most = max((k for _, k in self.settings["schedule"]), default=0)
        if self.settings["mode"] == "schedule" and most > len(self.units):
            raise ConfigError(
                f"train.efficiency.freezing.schedule freezes {most} units but the model has {len(self.units)} "
                "that may freeze; lower the counts or give blocks"
            )
        self.frozen = 0
        self.frozen_at: list[int] = []  # the step each unit froze at
        self.snapshot = self._candidate_weights()  # the criterion's window start

    def labels(self) -> list[str]:
        """Each unit named by its first and last parameter's module."""
        return [unit[0].rsplit(".", 1)[0] + (" … " + unit[-1].rsplit(".", 1)[0] if len(unit) > 1 else "")
                for unit in self.units]  # fmt: skip

    def _candidate_weights(self) -> list[torch.Tensor] | None:
        if self.settings["mode"] != "criterion" or self.frozen >= self.max_blocks:
            return None
        return [self.parameters[name].detach().clone() for name in self.units[self.frozen]]

    def target(self, step: int) -> int:
        """The number of frozen units from step ``step`` on (the criterion measures the weights now)."""
        if self.settings["mode"] == "schedule":
            return max([self.frozen] + [k for s, k in self.settings["schedule"] if s <= step])
        if self.snapshot is None or step == 0 or step % self.settings["check_every"]:
            return self.frozen
        now = [self.parameters[name].detach() for name in self.units[self.frozen]]
        return self.frozen + 1 if relative_change(now, self.snapshot) < self.settings["threshold"] else self.frozen

    def freeze(self, count: int, step: int) -> None:
        """Freeze the first ``count`` units; a new window starts for the criterion's next candidate."""
        while self.frozen < count:
            for name in self.units[self.frozen]:
                self.parameters[name].requires_grad_(False)
                self.parameters[name].grad = None
            self.frozen += 1
            self.frozen_at.append(step)
        if self.settings["mode"] == "criterion" and step % self.settings["check_every"] == 0:
            self.snapshot = self._candidate_weights()

    def state_dict(self) -> dict:
        return {"frozen": self.frozen, "frozen_at": list(self.frozen_at), "snapshot": self.snapshot}

    def load_state_dict(self, state: dict) -> None:
        for name in (n for unit in self.units[: state["frozen"]] for n in unit):
            self.parameters[name].requires_grad_(False)
        self.frozen, self.frozen_at = state["frozen"], list(state["frozen_at"])
        self.snapshot = state["snapshot"]
