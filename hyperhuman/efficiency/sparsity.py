"""Sparse training at a fixed density with magnitude prune / gradient regrow (RigL, Evci et al. 2020;
the sparse-training core of SpFDE, Yuan et al. 2022).

Which layers: every ``Conv*d`` and ``Linear`` whose module name matches one of ``layers`` and none of
``exclude`` (``fnmatch`` globs, e.g. ``"*.attentions.*"``). Each selected weight keeps the fraction
``density`` of its entries (the same density in every layer), chosen by magnitude at the start: from
scratch that is a random mask, from a pretrained model the usual magnitude pruning.

Every ``update_every`` optimizer steps, until the fraction ``stop_at`` of the run, each layer drops the
``drop_fraction(step)`` of its active weights with the smallest magnitude and regrows as many where the
(dense) gradient is largest, the cosine-decayed fraction of RigL: ``α/2 · (1 + cos(π step / end))``.
Regrown weights start at zero, with their Adam moments reset, so nothing stale pushes them. The mask
is applied to the gradients before each optimizer step and to the weights after it, so pruned weights
stay exactly zero whatever the optimizer (AdamW's moments and weight decay included).
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from hyperhuman.config import ConfigError

DEFAULTS = {
    "density": 0.5,
    "layers": ["*"],
    "exclude": ["*conv_in*", "*conv_out*"],  # first and last layers stay dense, as in RigL
    "update_every": 50,
    "drop_fraction": 0.3,
    "stop_at": 0.75,
}
SPARSE_TYPES = (nn.Linear, nn.modules.conv._ConvNd)


def check_sparsity(settings: dict, where: str = "train.efficiency.sparsity") -> dict:
    """The settings with defaults filled in, or a ConfigError naming the key."""
    merged = {**DEFAULTS, **{k: v for k, v in settings.items() if v is not None and k != "use"}}
    density = merged["density"]
    if isinstance(density, bool) or not isinstance(density, int | float) or not 0 < density < 1:
        raise ConfigError(f"{where}.density={density!r}: the kept fraction of each weight, in (0, 1), e.g. 0.5")
    for key in ("layers", "exclude"):
        value = merged[key]
        if not isinstance(value, list) or not all(isinstance(glob, str) for glob in value):
            raise ConfigError(f"{where}.{key}={value!r}: a list of module-name globs, e.g. ['*.attentions.*']")
    if isinstance(merged["update_every"], bool) or not isinstance(merged["update_every"], int):
        raise ConfigError(f"{where}.update_every={merged['update_every']!r}: optimizer steps between mask updates")
    if merged["update_every"] < 1:
        raise ConfigError(f"{where}.update_every={merged['update_every']!r} must be ≥ 1 (steps between updates)")
    if not isinstance(merged["drop_fraction"], int | float) or not 0 <= merged["drop_fraction"] < 1:
        raise ConfigError(f"{where}.drop_fraction={merged['drop_fraction']!r}: in [0, 1) (0 = a fixed mask)")
    if not isinstance(merged["stop_at"], int | float) or not 0 <= merged["stop_at"] <= 1:
        raise ConfigError(f"{where}.stop_at={merged['stop_at']!r}: the fraction of the run after which masks stay")
    return merged


def select_layers(model: nn.Module, layers: list[str], exclude: list[str]) -> dict[str, nn.Module]:
    """``{module name: module}`` of the weights to sparsify, in the model's order."""
    chosen = {}
    for name, module in model.named_modules():
        if not isinstance(module, SPARSE_TYPES) or not module.weight.requires_grad:
            continue
        if any(fnmatch.fnmatchcase(name, glob) for glob in layers) and not any(
            fnmatch.fnmatchcase(name, glob) for glob in exclude
        ):
            chosen[name] = module
    return chosen


def top_k_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """A boolean mask of the ``keep`` largest ``scores`` (ties by position, deterministic)."""
    flat = scores.flatten().float()
    order = torch.argsort(flat, descending=True, stable=True)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:keep]] = True
    return mask.view_as(scores)


class SparseMasks:
    """The masks of one model's sparse layers, their prune/regrow schedule and application."""

    def __init__(self, model: nn.Module, settings: dict, max_train_steps: int):
        self.settings = check_sparsity(settings)
        self.layers = select_layers(model, self.settings["layers"], self.settings["exclude"])
        if not self.layers:
            raise ConfigError(
                f"train.efficiency.sparsity.layers={self.settings['layers']} (exclude {self.settings['exclude']}) "
                "matches no trainable Linear or Conv layer; widen the globs"
            )
        self.end_step = int(self.settings["stop_at"] * max_train_steps)
        density = self.settings["density"]
        self.masks = {
            name: top_k_mask(module.weight.detach().abs(), max(1, round(density * module.weight.numel())))
            for name, module in self.layers.items()
        }
        self.updates = 0  # prune/regrow rounds done
        self.apply_to_weights()

    # --- the schedule ------------------------------------------------------------------------------
    def drop_fraction(self, step: int) -> float:
        """RigL's cosine-decayed drop fraction at optimizer step ``step`` (0 after ``stop_at``)."""
        if step > self.end_step or self.end_step == 0:
            return 0.0
        return self.settings["drop_fraction"] / 2 * (1 + math.cos(math.pi * step / self.end_step))

    def update_due(self, step: int) -> bool:
        return step % self.settings["update_every"] == 0 and self.drop_fraction(step) > 0

    # --- masks on weights and gradients ------------------------------------------------------------
    def follow_weights(self) -> None:
        """Keep each mask on its weight's device (call after the model moved, e.g. accelerate's prepare)."""
        self.masks = {name: mask.to(self.layers[name].weight.device) for name, mask in self.masks.items()}

    @torch.no_grad()
    def apply_to_weights(self) -> None:
        for name, module in self.layers.items():
            module.weight.mul_(self.masks[name].to(module.weight.device))

    @torch.no_grad()
    def apply_to_gradients(self) -> None:
        for name, module in self.layers.items():
            if module.weight.grad is not None:
                module.weight.grad.mul_(self.masks[name].to(module.weight.grad.device))

    @torch.no_grad()
    def apply_to(self, model: nn.Module) -> None:
        """Zero the pruned weights of another copy of the model (same module names), e.g. its EMA."""
        modules = dict(model.named_modules())
        for name, mask in self.masks.items():
            modules[name].weight.mul_(mask.to(modules[name].weight.device))

    # --- prune and regrow --------------------------------------------------------------------------
    @torch.no_grad()
    def prune_and_regrow(self, step: int, optimizer=None) -> dict[str, torch.Tensor]:
        """One RigL round on the current gradients (call after backward, before the masks hit the
        gradients); layers without a gradient (frozen) keep their mask. Returns the new masks."""
        fraction = self.drop_fraction(step)
        for name, module in self.layers.items():
            weight, grad = module.weight, module.weight.grad
            if grad is None:
                continue
            mask = self.masks[name].to(weight.device)
            active = int(mask.sum())
            drop = int(fraction * active)
            if drop == 0:
                continue
            # drop the smallest active weights: inactive ones score -inf so they are never "kept"
            magnitude = torch.where(mask, weight.abs().float(), torch.full_like(weight, -math.inf, dtype=torch.float))
            kept = top_k_mask(magnitude, active - drop)
            # regrow where the gradient is largest among the weights not kept (RigL: the just-dropped too)
            growth = torch.where(kept, torch.full_like(grad, -math.inf, dtype=torch.float), grad.abs().float())
            grown = top_k_mask(growth, drop)
            new_mask = kept | grown
            weight.mul_(kept)  # regrown weights start at zero
            reset_moments(optimizer, weight, new_mask != mask)
            self.masks[name] = new_mask
        self.updates += 1
        return self.masks

    # --- what it keeps -----------------------------------------------------------------------------
    def density(self) -> float:
        kept = sum(int(mask.sum()) for mask in self.masks.values())
        return kept / max(1, sum(mask.numel() for mask in self.masks.values()))

    def layer_density(self) -> dict[str, float]:
        return {name: float(mask.float().mean()) for name, mask in self.masks.items()}

    def state_dict(self) -> dict:
        return {"masks": {name: mask.cpu().clone() for name, mask in self.masks.items()}, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if set(state["masks"]) != set(self.masks):
            raise ValueError(
                "the checkpoint's sparse layers differ from this run's (train.efficiency.sparsity.layers/exclude "
                f"changed?): {sorted(set(state['masks']) ^ set(self.masks))[:4]}"
            )
        self.masks = {name: mask.bool() for name, mask in state["masks"].items()}
        self.updates = state["updates"]
        self.follow_weights()


def reset_moments(optimizer, weight: torch.Tensor, changed: torch.Tensor) -> None:
    """Zero Adam's running moments of the entries whose mask just changed."""
    if optimizer is None or not changed.any():
        return
    state = optimizer.state.get(weight, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key].masked_fill_(changed.to(state[key].device), 0)
