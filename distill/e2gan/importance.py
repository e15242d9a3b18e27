"""Where a new concept needs LoRA, and how much: the layer-importance and rank searches.

E2GAN fine-tunes only the *crucial* layers of the base GAN for a new concept (about 1% of the
weights). Which layers are crucial is measured, not guessed: for each group of layers
(:func:`distill.e2gan.lora.layer_groups`: the down-sampling path, each ResNet block, the parts of the
transformer block, the up-sampling path) a short LoRA fine-tune of that group alone, from the base
model, on the concept's pairs; each is scored by its held-out PSNR gain over the base model per
trainable parameter (LoRA on the group alone at one probe rank: what the final training will add
there). The crucial groups are the longest prefix of that ranking whose LoRA parameters fit the
budget (a fraction of the generator's weights) among groups that gain more than ``min_gain_db``;
at least the first.

The rank search then fine-tunes LoRA on the crucial layers at each candidate rank, just as briefly,
and keeps the smallest rank whose held-out PSNR is within ``tolerance_db`` of the best.

Every probe is a pure function of its settings: a deep copy of the base model, LoRA drawn from a
seeded generator, the same fixed batches in the same order, Adam at a fixed rate, the held-out
measure after. The probes train on the reconstruction loss alone (L1/L2): a discriminator learns
nothing useful in a few dozen steps, and the PSNR they are scored by is a reconstruction measure.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from distill.e2gan.lora import adapter_parameters, add_adapter
from distill.e2gan.train import PromptStates, edit, psnr

PROBE = "probe"  # the probes' adapter name


class Probe:
    """Short LoRA fine-tunes of ``base`` scored on held-out data.

    ``loss(model, batch)``: the training loss of one of ``batches`` (cycled for ``steps`` Adam steps
    at ``learning_rate``); ``heldout_mse(model)``: the held-out mean squared error, images in
    [-1, 1] (reported as PSNR). ``alpha_ratio``: LoRA's ``alpha = alpha_ratio · rank`` (1: scale 1 at
    every rank, so ranks compare at the same learning rate)."""

    def __init__(self, base: nn.Module, loss: Callable, batches: list, heldout_mse: Callable[[nn.Module], float],
                 steps: int, learning_rate: float, alpha_ratio: float = 1.0, seed: int = 0):  # fmt: skip
        self.base, self.loss, self.batches, self.heldout_mse = base, loss, batches, heldout_mse
        self.steps, self.learning_rate, self.alpha_ratio, self.seed = steps, learning_rate, alpha_ratio, seed

    @torch.no_grad()
    def baseline(self) -> dict:
        """The base model's held-out measure."""
        mse = self.heldout_mse(self.base.eval())
        return {"mse": mse, "psnr_db": psnr(mse)}

    def run(self, targets: list[str], rank: int) -> dict:
        """LoRA of ``rank`` on ``targets`` alone, trained briefly: ``{mse, psnr_db, params}``."""
        model = copy.deepcopy(self.base)
        with torch.random.fork_rng(devices=[]):  # LoRA's start from the probe's seed, the caller's RNG untouched
            torch.manual_seed(self.seed)
            add_adapter(model, PROBE, targets, rank, self.alpha_ratio * rank)
        parameters = adapter_parameters(model, PROBE)
        optimizer = torch.optim.Adam(parameters, lr=self.learning_rate)
        model.train()
        for step in range(self.steps):
            loss = self.loss(model, self.batches[step % len(self.batches)])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            mse = self.heldout_mse(model.eval())
        return {"mse": mse, "psnr_db": psnr(mse), "params": sum(p.numel() for p in parameters)}


# --- layer importance ------------------------------------------------------------------------------
def rank_groups(probe: Probe, groups: dict[str, list[str]], rank: int, log=print) -> dict:
    """Every group probed alone; ``{"baseline": ..., "groups": [rows best first]}``, each row
    ``{group, modules, params, psnr_db, gain_db, gain_db_per_kparam}`` (ties keep ``groups``' order)."""
    baseline = probe.baseline()
    rows = []
    for name, modules in groups.items():
        result = probe.run(modules, rank)
        gain = result["psnr_db"] - baseline["psnr_db"]
        rows.append({"group": name, "modules": modules, "params": result["params"], "psnr_db": result["psnr_db"],
                     "gain_db": gain, "gain_db_per_kparam": 1000.0 * gain / result["params"]})  # fmt: skip
        log(f"[importance] {name}: {gain:+.3f} dB with {result['params']} LoRA parameters")
    rows.sort(key=lambda row: -row["gain_db_per_kparam"])
    return {"baseline": baseline, "rank": rank, "groups": rows}


def pick_crucial(rows: list[dict], budget_params: int, min_gain_db: float = 0.0) -> list[str]:
    """The longest prefix of the ranking (best first) of groups that gain more than ``min_gain_db``
    whose parameters sum to at most ``budget_params``; the first group alone when none fits."""
    chosen, spent = [], 0
    for row in rows:
        if row["gain_db"] <= min_gain_db or spent + row["params"] > budget_params:
            break
        chosen.append(row["group"])
        spent += row["params"]
    return chosen or [rows[0]["group"]]


# --- rank ------------------------------------------------------------------------------------------
def search_ranks(probe: Probe, targets: list[str], ranks: list[int], tolerance_db: float, log=print) -> dict:
    """LoRA on ``targets`` at each rank; ``{"ranks": [rows by rank], "chosen": rank}``."""
    rows = []
    for rank in sorted(set(ranks)):
        rows.append({"rank": rank, **probe.run(targets, rank)})
        log(f"[rank search] rank {rank}: {rows[-1]['psnr_db']:.3f} dB with {rows[-1]['params']} LoRA parameters")
    return {"ranks": rows, "tolerance_db": tolerance_db, "chosen": pick_rank(rows, tolerance_db)}


def pick_rank(rows: list[dict], tolerance_db: float) -> int:
    """The smallest rank whose held-out PSNR is within ``tolerance_db`` of the best rank's."""
    best = max(row["psnr_db"] for row in rows)
    return min(row["rank"] for row in rows if row["psnr_db"] >= best - tolerance_db)


# --- the E2GAN generator's probe ------------------------------------------------------------------
def generator_probe(config: dict, base, text: PromptStates, pairs: list[dict], heldout: list[dict]):
    """A :class:`Probe` of the base generator trained on ``pairs`` (fixed batches of
    ``search.batch_size``) and scored on ``heldout``; its loss is the reconstruction part of the
    config's ``loss`` (``l1_weight · L1 + l2_weight · MSE``)."""
    search, loss = config.get("search") or {}, config.get("loss") or {}
    l1_weight, l2_weight = float(loss.get("l1_weight", 10.0)), float(loss.get("l2_weight", 0.0))
    device = next(base.parameters()).device
    batches = []
    for start in range(0, len(pairs), search.get("batch_size", 4)):
        chunk = pairs[start : start + search.get("batch_size", 4)]
        states, mask = text([pair["prompt"] for pair in chunk])
        batches.append({"input": torch.stack([p["input"] for p in chunk]).to(device), "states": states, "mask": mask,
                        "target": torch.stack([p["target"] for p in chunk]).to(device)})  # fmt: skip

    def reconstruction(model, batch):
        fake = model(batch["input"], batch["states"], batch["mask"]).float()
        return l1_weight * F.l1_loss(fake, batch["target"]) + l2_weight * F.mse_loss(fake, batch["target"])

    targets = torch.stack([pair["target"] for pair in heldout]).double()

    def heldout_mse(model) -> float:
        return F.mse_loss(edit(model, heldout, text).double(), targets).item()

    return Probe(base, reconstruction, batches, heldout_mse, search.get("steps", 40),
                 float(search.get("learning_rate", 1e-3)), float((config.get("lora") or {}).get("alpha_ratio", 1.0)),
                 config.get("seed", 0))  # fmt: skip
