"""Architecture evolving: the greedy search on toy tables with known answers (order of removal, stop
at the budget, add-back, memoised losses, unreachable budgets), then on the toy teacher LSDM, and
the evolve.json a student is built from."""

import json
import math

import pytest

from distill.evolve import EPSILON_MS, evolve, read_student, search, write
from distill.latency import LatencyTable, predict
from distill.measure import HeldOut, load_pipeline, step_inputs, v_loss
from distill.students import make_student
from hyperhuman.lsdm.pipeline import HyperHumanPipeline
from hyperhuman.unet_parts import removable_parts, removed_parts

# Six parts: "e" is timer noise (0 ms) that costs quality. Removal scores Δloss/ms: d 0, b 0.05,
# a 0.1, f 0.3, c 0.4, e 0.5/ε. To save 20 of 100 ms the cheapest set is {a, f, d} (loss 3.4).
PARTS_MS = {"a": 10.0, "b": 5.0, "c": 20.0, "d": 2.0, "e": 0.0, "f": 8.0}
COSTS = {"a": 1.0, "b": 0.25, "c": 8.0, "d": 0.0, "e": 0.5, "f": 2.4}
FULL_MS = 100.0


class CountingLoss:
    """An additive loss that counts how often each set of removed parts is evaluated."""

    def __init__(self, costs=COSTS):
        self.costs, self.calls = costs, {}

    def __call__(self, removed):
        self.calls[removed] = self.calls.get(removed, 0) + 1
        return 1.0 + sum(self.costs[part] for part in removed)


def run(budget_ms, add_back=True, loss=None, candidates=None):
    loss = loss or CountingLoss()
    return search(PARTS_MS, FULL_MS, budget_ms, loss, candidates or sorted(PARTS_MS), add_back=add_back)


def test_greedy_removes_the_lowest_loss_per_ms_first_and_stops_as_soon_as_under_budget():
    evolution = run(80.0, add_back=False)
    assert [action["part"] for action in evolution.actions] == ["d", "b", "a", "f"]
    assert [action["action"] for action in evolution.actions] == ["remove"] * 4
    assert [action["score"] for action in evolution.actions] == pytest.approx([0.0, 0.05, 0.1, 0.3])
    latencies = [action["latency_ms"] for action in evolution.actions]
    assert latencies == pytest.approx([98.0, 93.0, 83.0, 75.0])
    assert latencies[-2] > 80.0 >= latencies[-1]  # one removal more than needed would be one too many
    for action in evolution.actions:
        assert action["delta_ms"] == -PARTS_MS[action["part"]]
    assert evolution.removed == ["d", "b", "a", "f"] and evolution.budget_met
    assert evolution.latency_ms == pytest.approx(FULL_MS - sum(PARTS_MS[part] for part in evolution.removed))
    assert evolution.base_loss == 1.0 and evolution.loss == pytest.approx(1.0 + 3.65)
    assert json.loads(json.dumps(evolution.to_json()))["removed"] == evolution.removed


def test_adding_back_what_became_unnecessary_reaches_the_optimum_and_every_set_is_evaluated_once():
    loss = CountingLoss()
    evolution = run(80.0, loss=loss)
    assert [(action["action"], action["part"]) for action in evolution.actions][-1] == ("add", "b")
    added = evolution.actions[-1]
    assert added["delta_ms"] == 5.0 and added["delta_loss"] == pytest.approx(-0.25)
    assert added["latency_ms"] == pytest.approx(80.0) and added["score"] < 0
    assert evolution.removed == ["d", "a", "f"] and evolution.loss == pytest.approx(1.0 + 3.4)
    assert evolution.budget_met and evolution.latency_ms == pytest.approx(80.0)
    # base, then 6, 5, 4 and 3 candidates, then b or d back (both fit the 5 ms slack); then nothing fits
    assert evolution.evaluations == 1 + 6 + 5 + 4 + 3 + 2 == len(loss.calls)
    assert set(loss.calls.values()) == {1}


def test_add_back_undoes_an_early_removal_a_later_one_made_unnecessary():
    """x and y are cheap on their own; z makes up for neither (the loss is not additive): x goes first,
    z then meets the budget, and x comes back because z alone is better than x and z."""
    parts_ms = {"x": 6.0, "y": 6.0, "z": 12.0}
    losses = {(): 0.0, ("x",): 0.1, ("y",): 0.2, ("z",): 0.5, ("x", "y"): 2.0, ("x", "z"): 0.9}

    def loss_with(removed):
        return losses[tuple(sorted(removed))]

    evolution = search(parts_ms, 100.0, 88.0, loss_with, ["x", "y", "z"])
    assert [(action["action"], action["part"]) for action in evolution.actions] == [
        ("remove", "x"), ("remove", "z"), ("add", "x"),
    ]  # fmt: skip
    assert [action["latency_ms"] for action in evolution.actions] == [94.0, 82.0, 88.0]
    assert evolution.removed == ["z"] and evolution.loss == 0.5 and evolution.budget_met
    without = search(parts_ms, 100.0, 88.0, loss_with, ["x", "y", "z"], add_back=False)
    assert without.removed == ["x", "z"] and without.loss == 0.9


def test_the_search_is_deterministic_and_ties_go_to_the_first_name():
    assert run(80.0).to_json() == run(80.0).to_json()
    assert run(80.0, candidates=sorted(PARTS_MS, reverse=True)).removed == run(80.0).removed
    twins = search({"q": 3.0, "p": 3.0}, 10.0, 8.0, lambda removed: len(removed), ["q", "p"])
    assert twins.removed == ["p"]


def test_an_unreachable_budget_removes_every_candidate_and_says_so():
    evolution = run(10.0)
    assert not evolution.budget_met
    assert sorted(evolution.removed) == sorted(PARTS_MS) and evolution.removed[-1] == "e"  # noise costs, so last
    assert evolution.actions[-1]["score"] == pytest.approx(0.5 / EPSILON_MS)
    assert evolution.latency_ms == pytest.approx(FULL_MS - sum(PARTS_MS.values()))
    assert math.isfinite(evolution.loss)


def test_a_budget_already_met_changes_nothing():
    evolution = run(FULL_MS)
    assert evolution.actions == [] and evolution.removed == [] and evolution.budget_met
    assert evolution.evaluations == 1 and evolution.latency_ms == FULL_MS


def test_bad_search_inputs_are_refused_by_name():
    with pytest.raises(ValueError, match=r"\['g'\] have no timing"):
        run(80.0, candidates=["a", "g"])
    with pytest.raises(ValueError, match=r"\['a'\] are listed more than once"):
        run(80.0, candidates=["a", "b", "a"])
    with pytest.raises(ValueError, match="budget_ms=0"):
        run(0)
    with pytest.raises(ValueError, match=r"loss_with\(\['a'\]\) returned nan"):
        run(80.0, loss=lambda removed: float("nan") if removed else 0.0)


# --- on the toy teacher LSDM ---------------------------------------------------------------------
FAST = {"warmup": 1, "repeats": 2}
CANDIDATES = [
    "branch.rgb.down_blocks.0.attentions.0",
    "branch.rgb.down_blocks.0.resnets.1",
    "trunk.down_blocks.1.attentions.1",
    "trunk.mid_block.attentions.0",
    "trunk.up_blocks.1.resnets.2",
    "branch.depth.up_blocks.2.attentions.2",
]


@pytest.fixture(scope="module")
def evolved(teacher_run, distill_shards, tmp_path_factory):
    pipeline = load_pipeline(teacher_run)
    heldout = HeldOut.from_shards(distill_shards, pipeline, num=2, resolution=16)
    table = LatencyTable.load(tmp_path_factory.mktemp("latency") / "table.json")
    timed = predict(pipeline.unet, step_inputs(pipeline, heldout), "eager", table, with_parts=True, **FAST)
    # a budget that needs a third of what the candidates can save: a few iterations, each a v-loss pass
    budget = 1 - 0.35 * sum(timed.parts[part] for part in CANDIDATES) / timed.total_ms
    measured = table.measured
    evolution = evolve(pipeline, heldout, table, budget=budget, candidates=CANDIDATES, **FAST)
    assert table.measured == measured  # every timing came from the table
    return pipeline, heldout, table, timed, evolution


def test_evolve_meets_the_budget_with_removable_parts_timed_by_the_table(evolved):
    pipeline, _, table, timed, evolution = evolved
    assert evolution.budget_met and evolution.actions
    assert evolution.full_ms == timed.total_ms and evolution.latency_ms <= evolution.budget_ms
    assert set(evolution.removed) <= set(CANDIDATES) <= set(removable_parts(pipeline.unet))
    assert evolution.latency_ms == pytest.approx(timed.total_ms - sum(timed.parts[part] for part in evolution.removed))
    assert evolution.parts_ms == {part: timed.parts[part] for part in CANDIDATES}
    assert LatencyTable.load(table.path).entries == table.entries  # saved for the next search
    assert removed_parts(pipeline.unet) == []  # the robust model is left whole


def test_the_evolved_student_builds_and_has_the_loss_the_search_reported(evolved):
    pipeline, heldout, _, _, evolution = evolved
    student = make_student(pipeline.unet, evolution.student).eval()
    assert student.config.removed_parts == evolution.removed
    edited = HyperHumanPipeline(**{**pipeline.components, "unet": student})
    assert v_loss(edited, heldout)["v_loss"] == pytest.approx(evolution.loss, rel=1e-6)


def test_evolve_refuses_a_bad_budget_or_candidate_before_timing_anything(evolved):
    pipeline, heldout, table, _, _ = evolved
    with pytest.raises(ValueError, match=r"budget=1\.5.*0 < budget ≤ 1"):
        evolve(pipeline, heldout, table, budget=1.5)
    with pytest.raises(ValueError, match=r"up_blocks\.1\.resnets\.0'\] are not removable"):
        evolve(pipeline, heldout, table, candidates=["trunk.up_blocks.1.resnets.0"])


# --- evolve.json ---------------------------------------------------------------------------------
def test_write_and_read_student_round_trip_and_bad_paths_are_named(tmp_path):
    evolution = run(80.0)
    path = write(evolution, tmp_path / "run")
    assert path == tmp_path / "run" / "evolve.json" and not list(path.parent.glob("*.tmp"))
    data = json.loads(path.read_text())
    assert data["student"] == {"remove": ["d", "a", "f"]} and data["actions"] == evolution.to_json()["actions"]
    assert read_student(path) == read_student(path.parent) == {"remove": ["d", "a", "f"]}
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere'}.*evolve.json"):
        read_student(tmp_path / "nowhere")
    (tmp_path / "other.json").write_text(json.dumps({"student": "bk-base"}))
    with pytest.raises(ValueError, match=r"other\.json.*no student spec"):
        read_student(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match=r"broken\.json.*not an evolve\.json"):
        read_student(tmp_path / "broken.json")
