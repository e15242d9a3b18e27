"""The QAT quantizers: their levels, straight-through gradients, the mixed scheme's per-row split,
and the fake-quantized layers that carry them (same parameters, removable, saved and loaded)."""

import itertools

import pytest
import torch
from torch import nn

from distill.quant.layers import fake_quant_layers, insert_fake_quant, remove_fake_quant
from distill.quant.schemes import FixedPoint, Mixed, PowerOfTwo


def test_fixed_point_weights_take_at_most_2_to_the_bits_minus_1_symmetric_levels_per_row():
    torch.manual_seed(0)
    weight = torch.randn(6, 3, 3, 3)
    quantized = FixedPoint(bits=4, per_channel=True)(weight)
    for row, original in zip(quantized, weight, strict=True):
        scale = original.abs().max() / 7
        codes = row / scale
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 7 + 1e-4
        assert (row - original).abs().max() <= scale / 2 + 1e-6  # nearest level
    per_tensor = FixedPoint(bits=4, per_channel=False)(weight) / (weight.abs().max() / 7)
    assert len(per_tensor.round().unique()) <= 15


def test_fixed_point_activations_track_a_range_and_freeze_it_in_eval():
    quantizer = FixedPoint(bits=8, signed=False, momentum=0.5)
    quantizer(torch.tensor([-1.0, 3.0]))
    assert (quantizer.low.item(), quantizer.high.item()) == (-1.0, 3.0)
    quantizer(torch.tensor([0.5, 5.0]))  # low: toward min(0.5, 0) = 0, high toward 5
    assert (quantizer.low.item(), quantizer.high.item()) == (-0.5, 4.0)
    quantizer.eval()
    x = torch.linspace(-2, 6, 101)
    y = quantizer(x)
    assert y.min() == pytest.approx(-0.5, abs=0.02) and y.max() == pytest.approx(4.0, abs=0.02)  # clipped
    assert y[x.abs() < 1e-6].abs().max() == 0  # 0 is a level exactly (padding, ReLU zeros)
    assert len(y.unique()) <= 256
    with pytest.raises(RuntimeError, match="calibrate"):
        FixedPoint(signed=False).eval()(x)


def test_power_of_two_levels_are_zero_and_signed_powers_of_two_of_the_row_peak():
    torch.manual_seed(0)
    weight = torch.randn(4, 32)
    quantized = PowerOfTwo(bits=3, per_channel=True)(weight)  # exponents 0, -1, -2
    for row, original in zip(quantized, weight, strict=True):
        peak = original.abs().max()
        allowed = {0.0, 1.0, 0.5, 0.25}
        assert {round(v, 5) for v in (row.abs() / peak).tolist()} <= allowed
        assert torch.equal(torch.sign(row[row != 0]), torch.sign(original[row != 0]))
    # log-domain rounding: 0.36 is above the geometric midpoint of 0.25 and 0.5 (0.354), 0.1 under half of 0.25
    values = torch.tensor([[1.0, 0.36, 0.34, 0.1, -0.7]])
    assert PowerOfTwo(bits=3)(values).tolist() == [[1.0, 0.5, 0.25, 0.0, -0.5]]


@pytest.mark.parametrize("quantizer", [FixedPoint(4, per_channel=True), PowerOfTwo(4), FixedPoint(4, signed=False)])
def test_gradients_pass_straight_through_the_rounding(quantizer):
    x = torch.linspace(-1, 1, 17, requires_grad=True)
    quantizer(x.view(1, -1)).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # every value inside the range: identity gradient


def test_clipped_activations_get_no_gradient():
    quantizer = FixedPoint(8, signed=False)
    quantizer(torch.tensor([0.0, 1.0]))
    quantizer.eval()
    x = torch.tensor([0.5, 2.0], requires_grad=True)
    quantizer(x).sum().backward()
    assert x.grad.tolist() == [1.0, 0.0]


def test_the_mixed_scheme_puts_the_chosen_ratio_of_rows_where_power_of_two_loses_least():
    torch.manual_seed(0)
    # rows of different shapes: heavy-tailed (power-of-two's), uniform (fixed-point's), Gaussian
    heavy = torch.randn(3, 64) * torch.where(torch.rand(3, 64) < 0.05, 8.0, 0.3)
    weight = torch.cat([heavy, torch.rand(3, 64) * 2 - 1, torch.randn(2, 64)])
    mixed = Mixed(bits=4, pot_ratio=0.5)
    chosen = mixed.choose_rows(weight)
    quantized = mixed(weight)
    pot, fixed = PowerOfTwo(4)(weight), FixedPoint(4, per_channel=True)(weight)
    assert int(chosen.sum()) == 4
    assert torch.equal(quantized[chosen], pot[chosen]) and torch.equal(quantized[~chosen], fixed[~chosen])

    def error(rows):
        mask = torch.zeros(8, dtype=torch.bool)
        mask[list(rows)] = True
        return ((torch.where(mask[:, None], pot, fixed) - weight) ** 2).sum().item()

    best = min(itertools.combinations(range(8), 4), key=error)  # every split at this ratio
    assert error(torch.nonzero(chosen).flatten().tolist()) == pytest.approx(error(best))
    assert Mixed(4, pot_ratio=0.25).choose_rows(weight).sum() == 2
    assert Mixed(4, pot_ratio=0.0).choose_rows(weight).sum() == 0
    with pytest.raises(RuntimeError, match="choose_rows"):
        Mixed(4)(weight)
    with pytest.raises(ValueError, match="pot_ratio"):
        Mixed(4, pot_ratio=1.5)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 1, bias=False))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(self.conv_in(x)).mean((2, 3)))


def test_fake_quant_layers_share_the_parameters_and_come_out_again():
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(2, 3, 8, 8)
    reference = model(x)
    names = {name for name, _ in model.named_parameters()}
    before = {name: p for name, p in model.named_parameters()}
    swapped = insert_fake_quant(model, {"scheme": "fixed", "bits": 8}, {"scheme": "fixed", "bits": 8}, ("conv_in",))
    assert set(swapped) == {"body.0", "body.2", "head"} and set(fake_quant_layers(model)) == set(swapped)
    assert {name for name, _ in model.named_parameters()} == names  # checkpoints keep their keys
    assert all(p is before[name] for name, p in model.named_parameters())  # optimisers keep their tensors
    assert all(layer.int8_representable for layer in swapped.values())
    quantized = model(x)  # train mode: the input ranges observed from this batch
    assert not torch.equal(quantized, reference)
    assert torch.allclose(quantized, reference, atol=0.05)
    quantized.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    state = model.state_dict()
    assert "body.0.input_quantizer.high" in state
    remove_fake_quant(model)
    assert not fake_quant_layers(model) and type(model.body[0]) is nn.Conv2d
    assert torch.equal(model(x), reference)


def test_mixed_layers_choose_their_rows_on_insertion_and_take_per_layer_ratios():
    torch.manual_seed(0)
    model = Tiny()
    weight = {"scheme": "mixed", "bits": 4, "pot_ratio": 0.5, "pot_ratio_per_layer": {"head": 1.0}}
    swapped = insert_fake_quant(model, weight, None)
    assert int(swapped["body.0"].weight_quantizer.pot_rows.sum()) == 4
    assert swapped["head"].weight_quantizer.pot_rows.all()
    assert not swapped["head"].int8_representable
    copy = Tiny()
    insert_fake_quant(copy, weight, None)
    copy.load_state_dict(model.state_dict())  # the row choice is saved
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(copy(x), model(x))


@pytest.mark.parametrize(
    ("weight", "activation", "message"),
    [
        ({"scheme": "float"}, None, "scheme='float'"),
        ({"scheme": "fixed", "bits": 1}, None, "bits=1"),
        ({"scheme": "fixed", "bitz": 4}, None, "unknown keys"),
        ({"scheme": "fixed"}, {"scheme": "mixed"}, "activation scheme"),
        ({"scheme": "mixed", "pot_ratio_per_layer": {"head": 2}}, None, "pot_ratio_per_layer"),
    ],
)
def test_bad_schemes_are_named(weight, activation, message):
    with pytest.raises(ValueError, match=message):
        insert_fake_quant(Tiny(), weight, activation)
