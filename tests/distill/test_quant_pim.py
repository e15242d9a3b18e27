"""PIM quantization against a direct computation of tiled, bit-serial partial sums through an ADC;
its layers against the fake-quantized ones they replace; PIM-QAT's rescaling, noise and
BatchNorm calibration."""

import pytest
import torch
from torch import nn

from distill.quant.layers import insert_fake_quant
from distill.quant.pim import (
    SCHEMES,
    PIMConfig,
    adc,
    calibrate_adc,
    calibrate_batchnorm,
    disable_pim,
    enable_pim,
    fit_adc_range,
    pim_matmul,
)


def adc_of(value: float, top: float, bits: int, signed: bool) -> float:
    """A b-bit ADC by hand: signed, two's-complement codes with ``2^(b-1) - 1`` steps up to ``top``;
    unsigned, ``2^b - 1`` steps up to ``top``; a step of at least one unit."""
    if signed:
        step = max(1.0, top / max(1, 2 ** (bits - 1) - 1))
        return min(max(round(value / step), -(2 ** (bits - 1))), 2 ** (bits - 1) - 1) * step
    step = max(1.0, top / (2**bits - 1))
    return min(max(round(value / step), 0), 2**bits - 1) * step


def direct(inputs, weights, input_bits, weight_bits, tile, adc_bits, scheme, adc_top=None):
    """One partial sum at a time: each tile of rows, each input bit, each crossbar, each column;
    the ADC spans the full scale, or ``adc_top`` on every array."""
    top = 2 ** (weight_bits - 1) - 1
    full_top = adc_top or tile * top
    rows, columns = inputs.shape[1], weights.shape[0]
    result = torch.zeros(inputs.shape[0], columns, dtype=torch.float64)
    for m in range(inputs.shape[0]):
        for o in range(columns):
            total = 0.0
            for start in range(0, rows, tile):
                ks = range(start, min(start + tile, rows))
                for i in range(input_bits):
                    bit = [(int(inputs[m, k]) >> i) & 1 for k in ks]
                    w = [int(weights[o, k]) for k in ks]
                    if scheme == "bit_serial":
                        partial = sum(b * v for b, v in zip(bit, w, strict=True))
                        total += 2**i * adc_of(partial, full_top, adc_bits, True)
                    elif scheme == "differential":
                        plus = sum(b * max(v, 0) for b, v in zip(bit, w, strict=True))
                        minus = sum(b * max(-v, 0) for b, v in zip(bit, w, strict=True))
                        total += 2**i * (
                            adc_of(plus, full_top, adc_bits, False) - adc_of(minus, full_top, adc_bits, False)
                        )
                    else:
                        for j in range(weight_bits - 1):
                            plus = sum(b * ((max(v, 0) >> j) & 1) for b, v in zip(bit, w, strict=True))
                            minus = sum(b * ((max(-v, 0) >> j) & 1) for b, v in zip(bit, w, strict=True))
                            total += 2 ** (i + j) * (
                                adc_of(plus, adc_top or tile, adc_bits, False)
                                - adc_of(minus, adc_top or tile, adc_bits, False)
                            )
            result[m, o] = total
    return result


def codes(seed, m=3, k=21, o=4, input_bits=4, weight_bits=4):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, 2**input_bits, (m, k), generator=generator).double()
    top = 2 ** (weight_bits - 1) - 1
    weights = torch.randint(-top, top + 1, (o, k), generator=generator).double()
    return inputs, weights


@pytest.mark.parametrize("scheme", SCHEMES)
def test_pim_matmul_is_the_sum_of_digitised_tile_partial_sums(scheme):
    inputs, weights = codes(0)  # 21 rows: tiles of 8, 8 and 5
    for adc_bits in (2, 3, 5):
        config = PIMConfig(tile=8, adc_bits=adc_bits, scheme=scheme)
        ours = pim_matmul(inputs, weights, 4, 4, config)
        assert torch.allclose(ours, direct(inputs, weights, 4, 4, 8, adc_bits, scheme), rtol=0, atol=1e-9), adc_bits


@pytest.mark.parametrize("scheme", SCHEMES)
def test_an_adc_range_given_per_array_replaces_the_full_scale(scheme):
    inputs, weights = codes(3)
    config = PIMConfig(tile=8, adc_bits=3, scheme=scheme)
    seen = []

    def adc_top(array, partial, full_scale, signed):
        seen.append((array, full_scale, signed))
        return 5.0

    ours = pim_matmul(inputs, weights, 4, 4, config, adc_top=adc_top)
    assert torch.allclose(ours, direct(inputs, weights, 4, 4, 8, 3, scheme, adc_top=5.0), rtol=0, atol=1e-9)
    arrays = {"bit_serial": [(0, 56, True)], "differential": [(0, 56, False), (1, 56, False)]}
    assert seen == arrays.get(scheme, [(index, 8, False) for index in range(6)])


def test_the_adc_reads_zero_as_zero_and_clips_beyond_its_range():
    values = torch.tensor([0.0, 0.4, -0.4, 3.0, -3.0, 100.0, -100.0])
    assert adc(values, 21.0, 3, signed=True).tolist() == [0, 0, 0, 0, 0, 21, -28]  # step 7, codes -4..3
    assert adc(values, 14.0, 3, signed=False).tolist() == [0, 0, 0, 4, 0, 14, 0]  # step 2, codes 0..7


def test_a_fitted_adc_range_clips_the_rare_large_partial_sums():
    torch.manual_seed(0)
    partial = torch.distributions.Laplace(0.0, 20.0).sample((50_000,)).round()  # most sums small
    partial[:2] = 600.0  # two rare large ones
    top = fit_adc_range(partial, 4, signed=True, full_scale=16256)
    assert 20 < top < 300
    error = (adc(partial, top, 4, signed=True) - partial).pow(2).mean()
    assert error < (adc(partial, partial.abs().max().item(), 4, signed=True) - partial).pow(2).mean() / 4
    assert fit_adc_range(torch.zeros(10), 4, signed=False, full_scale=128) == 1.0  # nothing to span


@pytest.mark.parametrize("scheme", SCHEMES)
def test_an_adc_with_enough_bits_is_exact_and_a_coarse_one_is_not(scheme):
    inputs, weights = codes(1, k=40)
    exact = inputs @ weights.T
    assert torch.equal(pim_matmul(inputs, weights, 4, 4, PIMConfig(tile=16, adc_bits=12, scheme=scheme)), exact)
    coarse = pim_matmul(inputs, weights, 4, 4, PIMConfig(tile=16, adc_bits=3, scheme=scheme))
    assert not torch.equal(coarse, exact)


def test_thermal_noise_is_seeded_and_in_adc_steps():
    inputs, weights = codes(2, m=64, k=32, o=8)
    config = PIMConfig(tile=32, adc_bits=12, noise=0.4)  # step 1: noise below half a step mostly vanishes
    first = pim_matmul(inputs, weights, 4, 4, config, generator=torch.Generator().manual_seed(0))
    again = pim_matmul(inputs, weights, 4, 4, config, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, again)
    exact = inputs @ weights.T
    loud = pim_matmul(inputs, weights, 4, 4, PIMConfig(tile=32, adc_bits=12, noise=3.0), generator=torch.Generator())
    assert (first - exact).abs().mean() < (loud - exact).abs().mean()


def quantized_conv(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(5, 6, 3, stride=2, padding=1), nn.SiLU(), nn.Linear(4, 3))
    insert_fake_quant(model, {"scheme": "fixed", "bits": 4}, {"scheme": "fixed", "bits": 6})
    x = torch.randn(2, 5, 8, 8)
    model(x)  # the input ranges
    return model.eval(), x


def test_pim_layers_with_an_exact_adc_compute_what_the_fake_quantized_layers_do():
    model, x = quantized_conv()
    reference = model(x)
    enabled = enable_pim(model, PIMConfig(tile=16, adc_bits=16, rescale=False))
    assert set(enabled) == {"0", "2"}
    assert torch.allclose(model(x), reference, atol=1e-5)  # padding, stride, zero point, bias
    enable_pim(model, PIMConfig(tile=16, adc_bits=3, rescale=False))
    assert not torch.allclose(model(x), reference, atol=1e-2)
    disable_pim(model)
    assert torch.equal(model(x), reference)


def test_pim_training_is_straight_through_and_rescaled_to_the_digital_output():
    model, x = quantized_conv()
    digital = model[0](x)
    layer = model[0]
    layer.train()
    enable_pim(model, PIMConfig(tile=8, adc_bits=3, train_adc_bits=2))
    x.requires_grad_(True)
    out = layer(x)
    gain = layer.pim.gain.item()
    assert gain != 1.0 and layer.pim.observed
    assert out.pow(2).mean().sqrt().item() == pytest.approx(digital.pow(2).mean().sqrt().item(), rel=0.25)
    (gradient,) = torch.autograd.grad(out.sum(), x)
    disable_pim(model)
    (expected,) = torch.autograd.grad(layer(x).sum(), x)
    assert torch.allclose(gradient, expected, atol=1e-5)  # the exact product's gradient (gain on the chip's values)
    layer.eval()
    enable_pim(model, PIMConfig(tile=8, adc_bits=3, train_adc_bits=2))
    with pytest.raises(ValueError, match="scheme"):
        PIMConfig(scheme="analog")
    with pytest.raises(ValueError, match="adc_bits"):
        PIMConfig(adc_bits=0)
    with pytest.raises(ValueError, match="unknown keys"):
        PIMConfig.from_config({"tiles": 8})


def test_calibrated_adc_ranges_fit_the_layers_and_read_closer_to_the_digital_product():
    model, x = quantized_conv()
    digital = model(x)
    enable_pim(model, PIMConfig(tile=32, adc_bits=4, adc_range="calibrated", rescale=False))
    uncalibrated = model(x)  # no range seen yet: the full scale
    enable_pim(model, PIMConfig(tile=32, adc_bits=4, rescale=False))
    assert torch.equal(model(x), uncalibrated)
    enable_pim(model, PIMConfig(tile=32, adc_bits=4, adc_range="calibrated", rescale=True))
    assert calibrate_adc(model, [x[:1], x[1:]], lambda m, b: m(b)) == 2
    assert not model.training and not model[0].pim.calibrating
    full_scale = 32 * 7  # tile × the 4-bit weights' largest code
    tops = [layer.pim.adc_tops.item() for layer in (model[0], model[2])]
    assert all(0 < top < full_scale for top in tops), tops
    assert all(layer.pim.observed for layer in (model[0], model[2]))
    calibrated = model(x)
    assert (calibrated - digital).pow(2).mean() < (uncalibrated - digital).pow(2).mean() / 4
    assert [layer.pim.adc_tops.item() for layer in (model[0], model[2])] == tops  # frozen in evaluation
    with pytest.raises(ValueError, match="adc_range"):
        PIMConfig(adc_range="auto")


def test_batchnorm_statistics_are_calibrated_with_pim_on():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    insert_fake_quant(model, {"scheme": "fixed", "bits": 4}, {"scheme": "fixed", "bits": 4})
    batches = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    model.train()
    model(batches[0])
    model.eval()
    enable_pim(model, PIMConfig(tile=8, adc_bits=2, rescale=False))
    assert calibrate_batchnorm(model, batches, lambda m, b: m(b)) == 1
    with torch.no_grad():
        features = torch.cat([model[0](b) for b in batches]).transpose(0, 1).flatten(1)
    assert torch.allclose(model[1].running_mean, features.mean(1), atol=1e-5)
    assert not model.training
    assert calibrate_batchnorm(nn.Sequential(nn.GroupNorm(1, 3)), batches, lambda m, b: m(b)) == 0
