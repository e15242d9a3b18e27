"""SnapFusion's architecture evolving: which ResNets and attentions of a robust-trained UNet to take
out so one step meets a latency budget at the least loss of quality.

Architecture evolving (Li et al. 2023, "SnapFusion", sec. 3.2) starts from a UNet trained
*robustly*: during training each ResNet and cross-attention block is skipped at random (done by the
KD recipe), so the network still works with any of them missing. The search then weighs every
*action* (remove one part, or add one back) by what it does to quality against what it does to
latency, and applies actions greedily:

- while the predicted latency is over the budget, remove the part with the lowest
  ``Δloss / Δms`` (loss increase per millisecond saved; ties broken by part name, so the search is
  deterministic);
- once under the budget, add back the removed part with the largest loss decrease per
  millisecond whose cost fits the slack, as long as one lowers the loss: a part removed early
  because it was cheap per millisecond may turn out unnecessary once later removals met the budget.

Latency is predicted, never measured per candidate: the whole step's time minus the parts taken
out, each read from the per-block latency table (:mod:`distill.latency`) at its real input shapes.
A pass-through costs next to nothing, so a removed part saves its measured time; interactions
(caches, memory traffic) are not modelled, which is why the latency table's prediction error is
reported next to every result. Parts timed at 0 ms or less (timer noise at toy sizes) are scored as
saving :data:`EPSILON_MS`, so the division holds: such a part is removed first if that lowers the
loss, last if it costs any.

Quality is the held-out v-loss of :mod:`distill.measure` (the one quality measure of every stage)
with the removed parts bypassed (:func:`hyperhuman.unet_parts.skipping`) in the one robust model.
What differs from SnapFusion: they score actions by CLIP score and FID on a validation set and keep
training the robust model between actions; we score every action on the same robust model with
no training in between (a one-shot search, cheap and deterministic; re-train the student with KD
afterwards). Their latency table is measured on an iPhone; ours on the machine and runtime at hand.
Their lesson holds here too: the cost is in the high-resolution stages.

Cost: each iteration evaluates every remaining candidate once, so ``evaluations`` ≈ iterations ×
candidates (plus one per removed part when adding back), each one held-out v-loss pass. Losses are
memoised per set of removed parts, so a set is never evaluated twice.

    pipeline = load_pipeline("runs/robust")
    heldout = HeldOut.from_shards("data/shards", pipeline, num=16)
    evolution = evolve(pipeline, heldout, LatencyTable.load(), budget=0.4)
    path = write(evolution, "runs/evolved")            # evolve.json
    student = make_student(pipeline.unet, read_student(path))
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distill.latency import LatencyTable, predict
from distill.measure import HeldOut, step_inputs, v_loss
from hyperhuman.lsdm.pipeline import HyperHumanPipeline
from hyperhuman.unet_parts import removable_parts, skipping

EPSILON_MS = 1e-6  # the saving a part timed at ≤ 0 ms is scored with (timer noise, not a free part)
FILENAME = "evolve.json"


@dataclass
class Evolution:
    """What a search did and where it ended. ``actions``: one dict per applied action with ``step``,
    ``action`` (``"remove"`` or ``"add"``), ``part``, ``delta_loss``, ``delta_ms`` (negative for a
    removal), ``score`` (``delta_loss`` per ms of the part's cost), ``latency_ms`` and ``loss`` after
    it. ``removed``: the parts out at the end, in removal order. ``evaluations``: loss evaluations
    made (memoised sets are not counted twice)."""

    actions: list[dict]
    removed: list[str]
    full_ms: float
    budget_ms: float
    latency_ms: float
    loss: float
    base_loss: float
    budget_met: bool
    evaluations: int
    candidates: list[str] = field(default_factory=list)
    parts_ms: dict[str, float] = field(default_factory=dict)  # the candidates' timings the search used

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def student(self) -> dict:
        """The spec :func:`distill.students.make_student` takes."""
        return {"remove": list(self.removed)}


# --- the search, free of any model ---------------------------------------------------------------
def search(
    parts_ms: dict[str, float],
    full_ms: float,
    budget_ms: float,
    loss_with: Callable[[frozenset[str]], float],
    candidates: list[str],
    *,
    add_back: bool = True,
) -> Evolution:
    """Greedy architecture evolving (see the module docstring). ``parts_ms``: each part's time;
    ``full_ms``: the whole step with every part in; ``loss_with(removed)``: the quality loss with
    those parts out (lower is better); ``candidates``: the parts the search may remove. A budget that
    removing every candidate cannot meet ends the search with ``budget_met=False``."""
    _check_search(parts_ms, full_ms, budget_ms, candidates)
    losses: dict[frozenset[str], float] = {}

    def loss_of(removed: frozenset[str]) -> float:
        if removed not in losses:
            loss = float(loss_with(removed))
            if not math.isfinite(loss):
                raise ValueError(f"loss_with({sorted(removed)}) returned {loss}; the search needs finite losses")
            losses[removed] = loss
        return losses[removed]

    removed: list[str] = []
    latency, loss = float(full_ms), loss_of(frozenset())
    base_loss, actions = loss, []

    def apply(action: str, part: str, new_loss: float, delta_ms: float, score: float) -> None:
        nonlocal latency, loss
        latency += delta_ms
        actions.append(
            {
                "step": len(actions),
                "action": action,
                "part": part,
                "delta_loss": new_loss - loss,
                "delta_ms": delta_ms,
                "score": score,
                "latency_ms": latency,
                "loss": new_loss,
            }
        )
        loss = new_loss

    while latency > budget_ms:
        remaining = [part for part in candidates if part not in removed]
        if not remaining:
            break
        scored = []
        for part in remaining:
            new_loss = loss_of(frozenset([*removed, part]))
            scored.append(((new_loss - loss) / _saving(parts_ms[part]), part, new_loss))
        score, part, new_loss = min(scored)  # lowest loss increase per ms saved, then the first name
        removed.append(part)
        apply("remove", part, new_loss, -parts_ms[part], score)

    while add_back and latency <= budget_ms:
        scored = []
        for part in removed:
            if latency + parts_ms[part] <= budget_ms:
                new_loss = loss_of(frozenset(removed) - {part})
                scored.append(((new_loss - loss) / _saving(parts_ms[part]), part, new_loss))
        if not scored or min(scored)[0] >= 0:
            break
        score, part, new_loss = min(scored)  # the most loss decrease per ms spent
        removed.remove(part)
        apply("add", part, new_loss, parts_ms[part], score)

    return Evolution(
        actions=actions,
        removed=removed,
        full_ms=float(full_ms),
        budget_ms=float(budget_ms),
        latency_ms=latency,
        loss=loss,
        base_loss=base_loss,
        budget_met=latency <= budget_ms,
        evaluations=len(losses),
        candidates=list(candidates),
        parts_ms={part: float(parts_ms[part]) for part in candidates},
    )


def _saving(ms: float) -> float:
    return ms if ms > 0 else EPSILON_MS


def _check_search(parts_ms: dict, full_ms: float, budget_ms: float, candidates: list[str]) -> None:
    if not full_ms > 0:
        raise ValueError(f"full_ms={full_ms!r}: the whole step's latency must be positive")
    if not budget_ms > 0:
        raise ValueError(f"budget_ms={budget_ms!r}: the latency budget must be positive")
    unknown = [part for part in candidates if part not in parts_ms]
    if unknown:
        raise ValueError(f"candidates {unknown} have no timing in parts_ms (it times {sorted(parts_ms)[:5]}...)")
    repeated = sorted({part for part in candidates if candidates.count(part) > 1})
    if repeated:
        raise ValueError(f"candidates {repeated} are listed more than once; list each part once")


# --- on a pipeline -------------------------------------------------------------------------------
def evolve(
    pipeline: HyperHumanPipeline,
    heldout: HeldOut,
    table: LatencyTable,
    *,
    runtime: str = "eager",
    budget: float = 0.4,
    candidates: list[str] | None = None,
    batch_size: int = 8,
    warmup: int = 3,
    repeats: int = 10,
) -> Evolution:
    """Architecture evolving of ``pipeline.unet`` (the robust-trained model) to ``budget`` × its
    predicted step latency on ``runtime``: parts timed by ``table`` (missing timings are measured
    with ``warmup``/``repeats`` and the table saved), quality = held-out v-loss on ``heldout`` with
    the removed parts bypassed. ``candidates``: the parts the search may remove (default: every
    removable part). The UNet is left as it was."""
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget <= 1:
        raise ValueError(f"budget={budget!r} is a fraction of the full step's latency: 0 < budget ≤ 1, e.g. 0.4")
    unet = pipeline.unet
    removable = removable_parts(unet)
    candidates = removable if candidates is None else list(candidates)
    not_removable = [part for part in candidates if part not in removable]
    if not_removable:
        raise ValueError(
            f"candidates {not_removable} are not removable parts of this UNet; "
            f"pick from removable_parts(pipeline.unet), e.g. {removable[:3]}"
        )

    inputs = step_inputs(pipeline, heldout)
    prediction = predict(unet, inputs, runtime, table, with_parts=True, warmup=warmup, repeats=repeats)
    table.save()  # timings are reused by the next search, PaS and the reports

    def loss_with(removed: frozenset[str]) -> float:
        with skipping(unet, sorted(removed)):
            return v_loss(pipeline, heldout, batch_size)["v_loss"]

    full_ms = prediction.total_ms
    return search(prediction.parts, full_ms, budget * full_ms, loss_with, candidates)


# --- the result on disk --------------------------------------------------------------------------
def write(evolution: Evolution, output_dir: str | Path) -> Path:
    """``OUTPUT/evolve.json``: the evolution and the ``"student"`` spec ``make_student`` takes, written
    to a temporary name and renamed (a reader never sees half a file)."""
    path = Path(output_dir) / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**evolution.to_json(), "student": evolution.student}, indent=1))
    os.replace(tmp, path)
    return path


def read_student(path: str | Path) -> dict:
    """The ``{"remove": [part, ...]}`` spec in an ``evolve.json`` (or in a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist; point it at an evolve.json or its folder")
    try:
        spec = json.loads(path.read_text()).get("student")
    except (json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"{str(path)!r} is not an evolve.json (a JSON object with a 'student'): {error}") from None
    is_spec = isinstance(spec, dict) and set(spec) == {"remove"} and isinstance(spec["remove"], list)
    if not is_spec or not all(isinstance(part, str) for part in spec["remove"]):
        raise ValueError(f"{str(path)!r} holds no student spec {{'remove': [part names]}} (found {spec!r})")
    return {"remove": list(spec["remove"])}
