"""`hyperhuman quantize qat` at toy size: W4A8 fake-quant KD fine-tuning with exact resume, the
saved run rebuilding the same fake-quantized model, PIM-QAT, and config errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from distill.measure import HeldOut, v_loss
from distill.quant.layers import fake_quant_layers
from distill.quant.qat import check_config, load_qat_model, quantize_qat
from hyperhuman.config import ConfigError


def config_for(output, model, shards, weight=None, pim=None, steps=4):
    return {
        "output": str(output),
        "seed": 0,
        "model": str(model),
        "scheme": {
            "weight": weight or {"scheme": "fixed", "bits": 4, "per_channel": True},
            "activation": {"scheme": "fixed", "bits": 8},
            "keep_float": ["*conv_in", "*conv_out"],
        },
        "pim": pim,
        "calibration_batches": 2,
        "data": {"train": str(shards), "resolution": 16, "shuffle_buffer": 4, "num_workers": 0},
        "train": {
            "batch_size": 2,
            "max_train_steps": steps,
            "checkpointing_steps": 2,
            "learning_rate": 1e-3,
            "log_every": 100,
        },  # fmt: skip
        "validation": {"heldout": str(shards), "heldout_num": 4},
    }


@pytest.fixture(scope="module")
def qat_run(teacher_run, distill_shards, tmp_path_factory):
    output = tmp_path_factory.mktemp("qat") / "run"
    return output, quantize_qat(config_for(output, teacher_run, distill_shards))


def weights(folder):
    return load_file(folder / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


def test_w4a8_qat_trains_and_saves_what_rebuilds_the_model(qat_run, teacher_run, distill_shards):
    output, report = qat_run
    assert report["steps"] == 4 and len(report["losses"]) == 4
    assert json.loads((output / "qat_report.json").read_text())["losses"] == report["losses"]
    assert not report["int8_representable"] and report["quantized_layers"] > 10  # 4-bit weights
    heldout = report["heldout"]
    assert set(heldout) == {"fp32", "before", "after"} and heldout["before"] != heldout["fp32"]
    teacher = load_file(teacher_run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    trained = weights(output)
    assert trained.keys() == teacher.keys()  # the float master weights, under the model's own names
    assert any(not torch.equal(trained[name], teacher[name]) for name in teacher)
    pipeline = load_qat_model(output)
    layers = fake_quant_layers(pipeline.unet)
    assert len(layers) == report["quantized_layers"]
    assert all(layer.input_quantizer.observed for layer in layers.values())
    rebuilt = v_loss(pipeline, HeldOut.from_shards(distill_shards, pipeline, num=4))["v_loss"]
    assert rebuilt == pytest.approx(heldout["after"], rel=1e-6)


def test_qat_resumes_exactly(qat_run, teacher_run, distill_shards, tmp_path):
    output, report = qat_run
    resumed = tmp_path / "resumed"
    shutil.copytree(output / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    again = quantize_qat(config_for(resumed, teacher_run, distill_shards), resume="latest")
    assert again["losses"] == report["losses"][2:]
    first, second = weights(output), weights(resumed)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_pim_qat_runs_the_crossbars_in_training(teacher_run, distill_shards, tmp_path):
    pim = {"tile": 32, "adc_bits": 5, "scheme": "bit_serial", "train_adc_bits": 4, "noise": 0.5}
    pim["adc_range"] = "calibrated"
    report = quantize_qat(config_for(tmp_path / "pim", teacher_run, distill_shards, pim=pim, steps=2))
    assert report["steps"] == 2 and all(loss == loss for loss in report["losses"])  # finite
    pipeline = load_qat_model(tmp_path / "pim")
    chips = [layer.pim for layer in fake_quant_layers(pipeline.unet).values() if layer.pim is not None]
    assert chips and all(chip.gain.item() > 0 for chip in chips)
    full_scale = 32 * 7  # tile × the 4-bit weights' largest code
    assert all(0 < chip.adc_tops.item() <= full_scale for chip in chips)  # ranges learned in training, saved


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"scheme": {"weight": {"scheme": "fp4"}}}, "scheme='fp4'"),
        ({"pim": {"tiles": 8}}, "unknown keys"),
        ({"pim": {"tile": 8}, "scheme": {"weight": {"scheme": "fixed"}, "activation": None}}, "fixed-point"),
        ({"calibration_batches": 0}, "calibration_batches"),
        ({"kd": {"task_weight": -1}}, "kd.task_weight"),
    ],
)
def test_bad_configs_fail_at_start(teacher_run, distill_shards, tmp_path, override, message):
    config = {**config_for(tmp_path, teacher_run, distill_shards), **override}
    with pytest.raises(ConfigError, match=message):
        check_config(config, check_paths=False)
