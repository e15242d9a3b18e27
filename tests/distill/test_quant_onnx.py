"""The ONNX Runtime route at toy size, on the models of the ``ptq_run`` fixture (``quantize ptq``
with ``onnx: true``; exports are the slow part, so one run serves these tests and the PT2E ones):
the exported denoiser runs in ORT as in torch (other batch sizes in chunks of the exported one);
static QDQ int8 of its weighted ops within tolerance of fp32; the VAE decoder the same; pipelines
sampling with the ONNX models."""

import pytest
import torch

from distill.quant.onnx_runtime import OnnxDenoiser, rebatched
from distill.quant.ptq import QuantizedDenoiser, canonical_call, with_denoiser
from distill.quantize import load_quantized_pipeline


@pytest.fixture(scope="module")
def calls(float_pipeline, calibration):
    return [canonical_call(float_pipeline.unet, args, kwargs) for args, kwargs in calibration.calls]


@pytest.fixture(scope="module")
def onnx_models(ptq_run):
    output, _ = ptq_run
    return output / "unet.onnx", output / "unet_int8.onnx"


def relative_error(ours, reference):
    return ((ours - reference).norm() / reference.norm()).item()


def test_the_exported_denoiser_runs_in_onnx_runtime_as_in_torch(float_pipeline, calls, onnx_models):
    session = OnnxDenoiser(onnx_models[0])
    for call in calls:
        with torch.no_grad():
            reference = float_pipeline.unet(**call).sample
        assert torch.allclose(session(**call).sample, reference, atol=1e-4)
    with torch.no_grad():  # other batch sizes run in chunks of the exported one
        for rows in (slice(0, 2), slice(0, 3)):
            part = {name: torch.cat([value, value])[rows] for name, value in calls[0].items()}
            assert torch.allclose(session(**part).sample, float_pipeline.unet(**part).sample, atol=1e-4)


def test_static_qdq_int8_stays_within_tolerance_of_fp32(float_pipeline, calls, onnx_models):
    import onnx

    graph = onnx.load(str(onnx_models[1])).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "ConvInteger" not in ops
    softmax_inputs = {node.input[0] for node in graph.node if node.op_type == "Softmax"}
    producers = {output: node.op_type for node in graph.node for output in node.output}
    assert softmax_inputs and all(producers.get(name) != "DequantizeLinear" for name in softmax_inputs)
    session = OnnxDenoiser(onnx_models[1])
    for call in calls:
        with torch.no_grad():
            reference = float_pipeline.unet(**call).sample
        assert relative_error(session(**call).sample, reference) < 0.1
    with pytest.raises(ValueError, match="lacks"):
        session(sample=calls[0]["sample"])


def test_a_pipeline_samples_with_the_onnx_denoiser(float_pipeline, onnx_models):
    pipeline = with_denoiser(float_pipeline, QuantizedDenoiser(OnnxDenoiser(onnx_models[1]), float_pipeline.unet))
    pose = {"width": 16, "height": 16, "people": []}

    def sample(p):
        return p("a person", pose=pose, height=16, width=16, num_inference_steps=3, guidance_scale=3.0,
                 generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip

    assert abs(sample(pipeline).rgb - sample(float_pipeline).rgb).mean() < 0.05


def test_the_vae_decoder_exports_and_quantizes_on_the_trajectories_final_latents(float_pipeline, calibration, ptq_run):
    latents = calibration.decoder_inputs  # 2 batches × 3 branches, as the pipeline decodes them
    assert len(latents) == 6 and latents[0].shape[:2] == (2, float_pipeline.vae.config.latent_channels)
    output, report = ptq_run
    # int8: the run's mean relative error on the latents it calibrated on (its own trajectories')
    assert report["onnx"]["vae_decoder"]["relative_error"] < 0.1 and (output / "vae_decoder_int8.onnx").is_file()
    session = OnnxDenoiser(output / "vae_decoder.onnx")  # fp32: exact on any latents of the exported shape
    for z in latents:
        with torch.no_grad():
            reference = float_pipeline.vae.decode(z).sample
        assert relative_error(session(latents=z).sample, reference) < 1e-4


def test_the_run_reports_its_int8_error_and_loads_as_an_onnx_pipeline(ptq_run):
    output, report = ptq_run
    assert report["onnx"]["relative_error"] < 0.1 and report["split_skip"]
    for runtime in ("onnx", "onnx-int8"):
        pipeline = load_quantized_pipeline(output, runtime=runtime)
        pipeline.set_progress_bar_config(disable=True)
        result = pipeline("a person", pose={"width": 16, "height": 16, "people": []}, height=16, width=16,
                          num_inference_steps=2, output_type="np")  # fmt: skip
        assert result.rgb.shape == (1, 16, 16, 3)


def test_calibration_calls_cut_into_the_exported_batch(calls):
    pieces = rebatched(calls, 2)
    assert len(pieces) == 2 * len(calls) and all(piece["sample"].shape[0] == 2 for piece in pieces)
    torch.testing.assert_close(torch.cat([pieces[0]["sample"], pieces[1]["sample"]]), calls[0]["sample"])
    with pytest.raises(ValueError, match="4 rows"):
        rebatched(calls, 3)
