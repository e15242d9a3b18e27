"""SpFDE (Yuan et al., NeurIPS 2022) as an option of the shared training machinery: sparse training
(:mod:`.sparsity`), progressive layer freezing (:mod:`.freezing`) and data sieving (:mod:`.sieving`),
each on its own or together, with a count of what they saved (:mod:`.flops`).

A recipe adopts it in a few lines, all from :mod:`hyperhuman.training` (``hyperhuman/lsdm/train.py``
is the first; ``check_efficiency(train)`` belongs in its config check, ``EFFICIENCY_KEYS`` under
``train.efficiency`` in its known keys):

    efficiency = make_efficiency(train, model, seed)          # None when train.efficiency is off
    model, optimizer, lr_scheduler, ema = prepare_for_training(accelerator, model, train, efficiency=efficiency)
    state = restore(accelerator, output, resume, command)
    batches = data_stream(lambda position: Batches(data, batch_size, seed, **position), state, efficiency)
    ...  efficiency.record_losses(batch["key"], per_sample_loss)   # sieving's scores
    ...  optimizer_step(accelerator, model, optimizer, lr_scheduler, loss, max_grad_norm, efficiency)
    report["efficiency"] = efficiency.report()                     # and efficiency.apply_masks(saved copy)

Config (``train.efficiency``; every part off unless its ``use`` is true; see configs/lsdm/tiny.yaml):
``sparsity: {use, density, layers, exclude, update_every, drop_fraction, stop_at}``,
``freezing: {use, mode, schedule, check_every, threshold, max_blocks, blocks}``,
``sieving: {use, fraction, swap_every, swap_fraction, score_decay, id_key}``.
"""

from __future__ import annotations

from hyperhuman.config import ConfigError
from hyperhuman.efficiency.controller import Efficiency
from hyperhuman.efficiency.freezing import check_freezing
from hyperhuman.efficiency.sieving import check_sieving
from hyperhuman.efficiency.sparsity import check_sparsity

EFFICIENCY_KEYS = {
    "sparsity": dict.fromkeys(["use", "density", "layers", "exclude", "update_every", "drop_fraction", "stop_at"]),
    "freezing": dict.fromkeys(["use", "mode", "schedule", "check_every", "threshold", "max_blocks", "blocks"]),
    "sieving": dict.fromkeys(["use", "fraction", "swap_every", "swap_fraction", "score_decay", "id_key"]),
}
CHECKS = {"sparsity": check_sparsity, "freezing": check_freezing, "sieving": check_sieving}

__all__ = ["EFFICIENCY_KEYS", "Efficiency", "check_efficiency", "efficiency_on", "make_efficiency"]


def efficiency_on(train: dict, part: str | None = None) -> bool:
    """Whether ``train.efficiency`` turns on ``part`` (or any part)."""
    settings = train.get("efficiency") or {}
    parts = [part] if part else list(EFFICIENCY_KEYS)
    return any(bool((settings.get(name) or {}).get("use")) for name in parts)


def check_efficiency(train: dict) -> None:
    """Every part that is on, checked; a ConfigError names the key and how to fix it."""
    settings = train.get("efficiency") or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"train.efficiency={settings!r}: a section with sparsity / freezing / sieving")
    for name, check in CHECKS.items():
        part = settings.get(name) or {}
        if not isinstance(part, dict):
            raise ConfigError(f"train.efficiency.{name}={part!r}: a section, e.g. {{use: true, ...}}")
        if not isinstance(part.get("use", False), bool):
            raise ConfigError(f"train.efficiency.{name}.use={part['use']!r}: true or false")
        if part.get("use"):
            check(part, f"train.efficiency.{name}")


def make_efficiency(train: dict, model, seed: int) -> Efficiency | None:
    """The run's :class:`Efficiency` over the unwrapped ``model`` (before ``accelerator.prepare``: the
    initial masks and step-0 freezing are applied now), or ``None`` when every part is off."""
    if not efficiency_on(train):
        return None
    check_efficiency(train)
    settings = {name: train["efficiency"].get(name) or {} for name in EFFICIENCY_KEYS}
    return Efficiency(model, settings, train["batch_size"], train["max_train_steps"], seed)
