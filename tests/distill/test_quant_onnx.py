"""The ONNX Runtime route at toy size: the exported denoiser runs in ORT as in torch (other batch
sizes in chunks of the exported one); static QDQ int8 of its weighted ops within tolerance of fp32;
a pipeline sampling with the ONNX model."""

import pytest
import torch

from distill.quant.onnx_runtime import OnnxDenoiser, export_onnx, export_vae_decoder, quantize_qdq, rebatched
from distill.quant.ptq import QuantizedDenoiser, canonical_call, with_denoiser


@pytest.fixture(scope="module")
def calls(float_pipeline, calibration):
    return [canonical_call(float_pipeline.unet, args, kwargs) for args, kwargs in calibration.calls]


@pytest.fixture(scope="module")
def onnx_models(float_pipeline, calls, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    fp32 = export_onnx(float_pipeline.unet, calls[0], folder / "unet.onnx")
    return fp32, quantize_qdq(fp32, calls, folder / "unet_int8.onnx")


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


def test_the_vae_decoder_exports_and_quantizes_on_the_trajectories_final_latents(float_pipeline, calibration, tmp_path):
    latents = calibration.decoder_inputs  # 2 batches × 3 branches, as the pipeline decodes them
    assert len(latents) == 6 and latents[0].shape[:2] == (2, float_pipeline.vae.config.latent_channels)
    vae = float_pipeline.vae
    fp32 = export_vae_decoder(vae, latents[0], tmp_path / "vae_decoder.onnx")
    int8 = quantize_qdq(fp32, [{"latents": z} for z in latents], tmp_path / "vae_decoder_int8.onnx")
    for path, tolerance in ((fp32, 1e-4), (int8, 0.1)):
        session = OnnxDenoiser(path)
        for z in latents:
            with torch.no_grad():
                reference = vae.decode(z).sample
            assert relative_error(session(latents=z).sample, reference) < tolerance


def test_calibration_calls_cut_into_the_exported_batch(calls):
    pieces = rebatched(calls, 2)
    assert len(pieces) == 2 * len(calls) and all(piece["sample"].shape[0] == 2 for piece in pieces)
    torch.testing.assert_close(torch.cat([pieces[0]["sample"], pieces[1]["sample"]]), calls[0]["sample"])
    with pytest.raises(ValueError, match="4 rows"):
        rebatched(calls, 3)
