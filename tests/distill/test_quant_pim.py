"""PIM quantization against a direct computation of tiled, bit-serial partial sums through an ADC;
its layers against the fake-quantized ones they replace; PIM-QAT's rescaling, noise and
BatchNorm calibration."""

import math

import pytest
import torch
from torch import nn

from distill.quant.layers import insert_fake_quant
from distill.quant.pim import SCHEMES, PIMConfig, calibrate_batchnorm, disable_pim, enable_pim, pim_matmul


def adc_of(value: float, low: float, high: float, bits: int) -> float:
    step = max(1.0, (high - low) / (2**bits - 1))
    return low + min(max(round((value - low) / step), 0), math.ceil((high - low) / step)) * step


def direct(inputs, weights, input_bits, weight_bits, tile, adc_bits, scheme):
    """One partial sum at a time: each tile of rows, each input bit, each crossbar, each column."""
    top = 2 ** (weight_bits - 1) - 1
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
                        total += 2**i * adc_of(partial, -tile * top, tile * top, adc_bits)
                    elif scheme == "differential":
                        plus = sum(b * max(v, 0) for b, v in zip(bit, w, strict=True))
                        minus = sum(b * max(-v, 0) for b, v in zip(bit, w, strict=True))
                        total += 2**i * (adc_of(plus, 0, tile * top, adc_bits) - adc_of(minus, 0, tile * top, adc_bits))
                    else:
                        for j in range(weight_bits - 1):
                            plus = sum(b * ((max(v, 0) >> j) & 1) for b, v in zip(bit, w, strict=True))
                            minus = sum(b * ((max(-v, 0) >> j) & 1) for b, v in zip(bit, w, strict=True))
                            total += 2 ** (i + j) * (adc_of(plus, 0, tile, adc_bits) - adc_of(minus, 0, tile, adc_bits))
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
