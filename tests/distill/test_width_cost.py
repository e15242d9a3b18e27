"""The cost of per-block widths: MACs predicted exactly for any widths, the straight-through expected
cost equal to the prediction with each block's slope as its gradient, latency lines fitted to cached
timings, and the refusals."""

import pytest
import torch

from distill.latency import LatencyTable
from distill.pas import insert_masks, remove_masked
from distill.width_cost import WidthCost, count_macs, fit_cost, prediction_error
from hyperhuman.unet_widths import widths

from .conftest import teacher_lsdm, teacher_unet
from .test_pas import TEACHERS, drop_some, inputs_for


@pytest.mark.parametrize("kind", TEACHERS)
def test_macs_are_predicted_exactly_for_a_pruned_model(kind):
    model = TEACHERS[kind](0).eval()
    inputs = inputs_for(model)
    cost = fit_cost(model, inputs, "macs")
    assert cost.full == count_macs(model, inputs)
    assert all(slope > 0 for slope in cost.slopes.values())
    torch.manual_seed(0)
    masks = insert_masks(model)
    drop_some(masks)
    for mask in list(masks.values())[::3]:  # and a few more, a group or more each
        with torch.no_grad():
            mask.weight[: max(1, mask.groups // 2)] = 0.1
    remove_masked(model, masks)
    checked = prediction_error(cost, model, inputs)
    assert checked["measured"] < cost.full
    assert checked["predicted"] == pytest.approx(checked["measured"], rel=1e-9)


def test_the_expected_cost_is_the_prediction_and_its_gradient_the_slopes():
    model = teacher_unet(0).eval()
    inputs = inputs_for(model)
    cost = fit_cost(model, inputs, "macs")
    torch.manual_seed(0)
    masks = insert_masks(model)
    drop_some(masks)
    expected = cost.expected(masks)
    kept = {name: len(mask.kept_indices()) for name, mask in masks.items()}
    assert expected.item() == pytest.approx(cost.predict(kept), rel=1e-6)
    expected.backward()
    for name, mask in masks.items():
        assert torch.allclose(mask.weight.grad, torch.full_like(mask.weight, cost.slopes[name] * mask.group))


def test_a_latency_cost_fits_lines_to_cached_block_timings(tmp_path):
    model = teacher_lsdm(0).eval()
    inputs = inputs_for(model)
    table = LatencyTable.load(tmp_path / "table.json")
    cost = fit_cost(model, inputs, "eager", table, warmup=1, repeats=2)
    assert cost.unit == "eager" and cost.full > 0
    assert set(cost.slopes) == set(widths(model)) == set(cost.fit_error)
    assert all(slope >= 0 for slope in cost.slopes.values())
    # the three branches' blocks have the same shapes: each sliced block was timed once for all three
    measured = table.measured
    assert measured < 4 * len(cost.slopes)
    again = fit_cost(model, inputs, "eager", table, warmup=1, repeats=2)
    assert table.measured == measured and again.slopes == cost.slopes  # all from the table now
    assert WidthCost.from_json(cost.to_json()) == cost


def test_bad_values_are_refused_with_the_reason():
    model = teacher_unet(0).eval()
    inputs = inputs_for(model)
    with pytest.raises(ValueError, match="one of"):
        fit_cost(model, inputs, "flops")
    with pytest.raises(ValueError, match="LatencyTable"):
        fit_cost(model, inputs, "eager")
    cost = fit_cost(model, inputs, "macs")
    with pytest.raises(ValueError, match="does not know"):
        cost.predict({"conv_in": 3})
