"""`hyperhuman quantize ptq` end to end at toy size: calibrate, quantize, save, evaluate, and the
saved run loading as a pipeline that samples with the int8 program; config errors."""

import json

import pytest

from distill.quantize import check_ptq_config, load_quantized_pipeline
from hyperhuman.config import ConfigError


@pytest.mark.slow
def test_quantize_ptq_writes_a_program_a_pipeline_and_a_report(ptq_run):
    output, report = ptq_run  # split skip scales and the ONNX route on (test_quant_onnx.py tests the latter)
    assert (output / "unet_int8.pt2").is_file() and (output / "pipeline" / "model_index.json").is_file()
    assert json.loads((output / "quantize_report.json").read_text()) == report
    assert report["calibration"]["calls"] == 2 and report["calibration"]["steps"] == [0, 3]
    assert report["calibration"]["relative_error"] < 0.1 and report["split_skip"]
    assert report["ops"]["quantized_decomposed.dequantize_per_channel.default"] > 0
    evaluation = report["evaluation"]
    assert evaluation["int8_v_loss"] == pytest.approx(evaluation["fp32_v_loss"], rel=0.05)
    assert set(evaluation["psnr_vs_fp32"]) == {"rgb", "depth", "normal"}
    assert set(evaluation["step_ms"]) == {"eager", "bf16"} and evaluation["compile_s"] == {}

    pipeline = load_quantized_pipeline(output, runtime="eager")
    pipeline.set_progress_bar_config(disable=True)
    result = pipeline("a person", pose={"width": 16, "height": 16, "people": []}, height=16, width=16,
                      num_inference_steps=2, output_type="np")  # fmt: skip
    assert result.rgb.shape == (1, 16, 16, 3)


def test_the_command_line_names_a_bad_config_key(tmp_path, capsys):
    from hyperhuman.cli import main

    code = main(["quantize", "ptq", "--set", "calibration.mode=uniform", "--set", f"output={tmp_path}"])
    assert code != 0 and "calibration.mode='uniform'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"calibration": None}, "lacks 'calibration'"),
        ({"calibration": {"shards": None}}, "calibration.shards"),
        ({"calibration": {"shards": "s", "steps": 0}}, "calibration.steps=0"),
        ({"evaluation": {"heldout": "s", "runtimes": ["int4"]}}, "evaluation.runtimes"),
        ({"evaluation": {"runtimes": ["eager"]}}, "set evaluation.heldout"),
        ({"evaluation": {"heldout": "s", "int8_runtime": "onnx"}}, "int8_runtime"),
        ({"quantise": 1}, "quantise"),
        ({"onnx": "yes"}, "onnx='yes'"),
        ({"split_skip": 1}, "split_skip=1"),
    ],
)
def test_bad_configs_fail_at_start(override, message):
    config = {"output": "out", "model": "m", "calibration": {"shards": "s"}, **override}
    with pytest.raises(ConfigError, match=message):
        check_ptq_config(config, check_paths=False)
