"""The SpFDE options of one training run, driven from the shared training loop
(:mod:`hyperhuman.training`): sparse masks, progressive freezing and data sieving together, the FLOP
ledger of what they saved, and their state in the run's checkpoints.

Order within an optimizer step (:func:`hyperhuman.training.optimizer_step` calls the two hooks):
backward → :meth:`Efficiency.before_optimizer_step` (on a mask-update step, prune and regrow on the
dense gradient; then mask the gradients; count the micro-step's FLOPs) → clip → optimizer step →
:meth:`Efficiency.after_optimizer_step` (mask the weights; decide the freezing of the next step;
swap the sieve's pool when due).

Processes. Masks are decided on every process from identical weights and all-reduced gradients, then
process 0's masks and sparse weights are broadcast, so no tie broken differently on some device can
split the replicas; the number of frozen units is process 0's, broadcast. Each process sieves its own
shards (its sieve state travels with its data position).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from hyperhuman.efficiency.flops import InputRecorder, StepFlops, count_step
from hyperhuman.efficiency.freezing import Freezer
from hyperhuman.efficiency.sieving import Sieve, check_sieving
from hyperhuman.efficiency.sparsity import SparseMasks

LEDGER = (
    "dense",  # the dense model, nothing frozen, the same micro-steps
    "counted",  # what this run computed
    "freezing_backward_skipped",
    "sparsity_saved",
    "sparse_layers_dense_equivalent",  # the sparse layers' FLOPs had they been dense
    "sparse_layers_counted",
)
PROBE_ERRORS = (RuntimeError, NotImplementedError, TypeError, ValueError)


def _on(settings: dict, name: str) -> bool:
    return bool((settings.get(name) or {}).get("use"))


class Efficiency:
    """See the module docstring. ``model`` is the unwrapped model, before ``accelerator.prepare``."""

    def __init__(self, model: nn.Module, settings: dict, batch_size: int, max_train_steps: int, seed: int):
        self.model, self.batch_size, self.seed = model, batch_size, seed
        self.started = time.perf_counter()
        self.base_trainable = {name: p.requires_grad for name, p in model.named_parameters()}
        self.sparsity = SparseMasks(model, settings["sparsity"], max_train_steps) if _on(settings, "sparsity") else None
        self.freezer = Freezer(model, settings["freezing"]) if _on(settings, "freezing") else None
        self.sieving = check_sieving(settings["sieving"]) if _on(settings, "sieving") else None
        self.sieve: Sieve | None = None
        self.accelerator, self.optimizer = None, None
        self.steps, self.micro_steps = 0, 0
        self.flops = dict.fromkeys(LEDGER, 0)
        self.overhead_s = 0.0  # time in these hooks (mask updates, swaps, counting), of this process's run
        self.counting_s = 0.0  # of which the FLOP probes (one per freezing state)
        self._recorder = InputRecorder(model)
        self._probes: dict = {}  # frozen units (or "dense") → StepFlops
        self._probe_error: str | None = None
        self._densities = self.sparsity.layer_density() if self.sparsity else {}
        if self.freezer is not None:  # units a schedule freezes from step 0
            self.freezer.freeze(self.freezer.target(0), 0)

    def options(self) -> list[str]:
        return [name for name, on in (("sparsity", self.sparsity), ("freezing", self.freezer),
                                      ("sieving", self.sieving)) if on is not None]  # fmt: skip

    def attach(self, accelerator, optimizer) -> None:
        """The prepared optimizer (Adam moments of regrown weights are reset) and the accelerator."""
        self.accelerator, self.optimizer = accelerator, getattr(optimizer, "optimizer", optimizer)
        if self.sparsity is not None:
            self.sparsity.follow_weights()

    # --- the data stream ---------------------------------------------------------------------------
    def data_stream(self, make_stream, state: dict):
        """The recipe's stream at the restored position, sieved when sieving is on."""
        if self.sieving is None:
            return make_stream(state["data"])
        self.sieve = Sieve(make_stream, state["data"], self.batch_size, self.sieving, self.seed, state.get("sieve"))
        return self.sieve

    def record_losses(self, ids, losses) -> None:
        """Each sample's loss of the micro-batch just trained (the sieve's scores); a no-op without sieving."""
        if self.sieve is not None:
            self.sieve.record(ids, losses)

    # --- the optimizer step ------------------------------------------------------------------------
    def before_optimizer_step(self, accelerator) -> None:
        began = time.perf_counter()
        self.micro_steps += 1
        regrown = False
        if self.sparsity is not None and accelerator.sync_gradients:
            step = self.steps + 1
            if self.sparsity.update_due(step):
                self.sparsity.prune_and_regrow(step, self.optimizer)
                self._agree_on_masks(accelerator)
                self._densities, regrown = self.sparsity.layer_density(), True
            self.sparsity.apply_to_gradients()
        self._count_micro_step(dense_weight_gradients=regrown)
        self.overhead_s += time.perf_counter() - began

    def after_optimizer_step(self, accelerator) -> None:
        if not accelerator.sync_gradients:
            return
        began = time.perf_counter()
        if self.sparsity is not None:
            self.sparsity.apply_to_weights()
        self.steps += 1
        if self.freezer is not None:
            self.freezer.freeze(self._from_main(accelerator, self.freezer.target(self.steps)), self.steps)
        if self.sieve is not None and self.sieve.swap_due(self.steps):
            self.sieve.swap()
        self.overhead_s += time.perf_counter() - began

    def apply_masks(self, model: nn.Module) -> None:
        """Zero the pruned weights of a copy of the model (e.g. the EMA weights a recipe saves)."""
        if self.sparsity is not None:
            self.sparsity.apply_to(model)

    # --- processes agree ---------------------------------------------------------------------------
    def _agree_on_masks(self, accelerator) -> None:
        if accelerator.num_processes == 1:
            return
        from accelerate.utils import broadcast

        names = list(self.sparsity.masks)
        masks = broadcast([self.sparsity.masks[n].to(accelerator.device, torch.uint8) for n in names])
        self.sparsity.masks = {n: mask.bool() for n, mask in zip(names, masks, strict=True)}
        self.sparsity.follow_weights()
        weights = broadcast([self.sparsity.layers[n].weight.data for n in names])
        for name, weight in zip(names, weights, strict=True):
            self.sparsity.layers[name].weight.data.copy_(weight)

    @staticmethod
    def _from_main(accelerator, value: int) -> int:
        if accelerator.num_processes == 1:
            return value
        from accelerate.utils import broadcast

        return int(broadcast(torch.tensor([value], device=accelerator.device))[0])

    # --- the FLOP ledger ---------------------------------------------------------------------------
    def _probe(self, key) -> StepFlops | None:
        if key not in self._probes and self._recorder.inputs is not None and self._probe_error is None:
            args, kwargs = self._recorder.inputs
            trainable = self.base_trainable if key == "dense" else None
            began = time.perf_counter()
            try:
                self._probes[key] = count_step(self.model, args, kwargs, trainable)
            except PROBE_ERRORS as error:  # the FLOP count is a report: a model it cannot trace still trains
                self._probe_error = f"{type(error).__name__}: {error}"
                print(f"[efficiency] WARNING: FLOPs not counted, the meta-device probe failed: {self._probe_error}")
            self.counting_s += time.perf_counter() - began
        return self._probes.get(key)

    def _count_micro_step(self, dense_weight_gradients: bool) -> None:
        dense = self._probe("dense")
        now = self._probe(self.freezer.frozen if self.freezer is not None and self.freezer.frozen else "dense")
        if dense is None or now is None:
            return
        saved = sparse = 0.0
        for name, density in self._densities.items():
            forward, backward = now.forward_by_module.get(name, 0), now.backward_by_layer.get(name, 0)
            sparse += forward + backward
            # a regrow step needs the dense weight gradient: only the forward and input gradient are sparse
            saved += (1 - density) * (forward + (backward / 2 if dense_weight_gradients else backward))
        ledger = self.flops
        ledger["dense"] += dense.forward + dense.backward
        ledger["freezing_backward_skipped"] += dense.backward - now.backward
        ledger["sparsity_saved"] += round(saved)
        ledger["sparse_layers_dense_equivalent"] += round(sparse)
        ledger["sparse_layers_counted"] += round(sparse - saved)
        ledger["counted"] += now.forward + now.backward - round(saved)

    # --- checkpoint and report ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "micro_steps": self.micro_steps,
            "flops": dict(self.flops),
            "sparsity": self.sparsity.state_dict() if self.sparsity is not None else None,
            "freezing": self.freezer.state_dict() if self.freezer is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        for name in ("sparsity", "freezing"):
            if (state.get(name) is None) != (getattr(self, "freezer" if name == "freezing" else name) is None):
                raise ValueError(
                    f"the checkpoint was written with train.efficiency.{name} "
                    f"{'on' if state.get(name) is not None else 'off'}; resume it with the same setting"
                )
        self.steps, self.micro_steps, self.flops = state["steps"], state["micro_steps"], dict(state["flops"])
        if self.sparsity is not None:
            self.sparsity.load_state_dict(state["sparsity"])
            self._densities = self.sparsity.layer_density()
        if self.freezer is not None:
            self.freezer.load_state_dict(state["freezing"])

    def report(self, processes: int = 1) -> dict:
        """What the options saved (FLOPs per process; ``processes`` of them ran alike) and took."""
        ledger = dict(self.flops)
        dense_step = self._probes.get("dense")
        flops = {
            **ledger,
            "saved_fraction": round(1 - ledger["counted"] / ledger["dense"], 4) if ledger["dense"] else None,
            "per_process": True,
            "processes": processes,
            "dense_micro_step": dense_step.forward + dense_step.backward if dense_step else None,
            "counting": "torch.utils.flop_counter on the meta device, one micro-batch, sparse layers × density",
        }
        if self._probe_error:
            flops["not_counted"] = self._probe_error
        report = {
            "options": self.options(),
            "steps": self.steps,
            "micro_steps": self.micro_steps,
            "wall_s": round(time.perf_counter() - self.started, 2),
            "overhead_s": round(self.overhead_s, 2),
            "counting_s": round(self.counting_s, 2),
            "flops": flops,
        }
        if self.sparsity is not None:
            report["sparsity"] = {
                "density": round(self.sparsity.density(), 4),
                "target_density": self.sparsity.settings["density"],
                "layers": len(self.sparsity.masks),
                "mask_updates": self.sparsity.updates,
            }
        if self.freezer is not None:
            labels = self.freezer.labels()
            report["freezing"] = {
                "frozen_units": labels[: self.freezer.frozen],
                "frozen_at_step": self.freezer.frozen_at,
                "units": len(labels),
            }
        if self.sieve is not None:
            per_sample = dense_step.forward + dense_step.backward if dense_step else 0
            report["sieving"] = {
                **self.sieve.report(),
                "dense_flops_not_spent": self.sieve.counts["samples_not_seen"] * per_sample // self.batch_size,
            }
        return report
