"""int8 PT2E post-training quantization at toy size: calibration from the model's own sampling
trajectories, conversion matching fp32 within tolerance, the saved program reloading with a
dynamic batch, and a pipeline sampling with it. (Compiling the int8 kernels is the benchmark's.)"""

import pytest
import torch

from distill.measure import HeldOut, v_loss
from distill.quant.calibration import trajectory_calibration
from distill.quant.ptq import (
    QuantizedDenoiser,
    canonical_call,
    load_program,
    with_denoiser,
)


def relative_error(ours, reference):
    return ((ours - reference).norm() / reference.norm()).item()


def test_calibration_spreads_over_the_trajectory_or_sits_at_one_step(float_pipeline, calibration, distill_shards):
    assert calibration.steps == [0, 2, 5, 0, 2, 5]  # 2 batches × 3 recorded steps, first and last included
    args, kwargs = calibration.example
    assert args[0].shape[0] == 4 and kwargs["pose_latent"].shape[0] == 4  # 2 samples, unconditional halves too
    timesteps = {float(args[1]) for args, _ in calibration.calls}
    assert len(timesteps) == 3
    shards = str(distill_shards)
    single = trajectory_calibration(float_pipeline, shards, num_samples=2, steps=6, timesteps=2, mode="single")
    assert single.steps == [3] and single.calls[0][0][0].shape[0] == 8  # 4 trajectories cut at step 3
    assert len(calibration.decoder_inputs) == 6 and not single.decoder_inputs  # finished trajectories only
    with pytest.raises(ValueError, match="mode"):
        trajectory_calibration(float_pipeline, shards, mode="uniform")
    with pytest.raises(ValueError, match="timesteps=8"):
        trajectory_calibration(float_pipeline, shards, steps=4, timesteps=8)


def test_the_int8_model_matches_fp32_within_tolerance(float_pipeline, calibration, int8_model):
    quantized_ops = {str(node.target) for node in int8_model.graph.nodes if "quantize" in str(node.target)}
    assert "quantized_decomposed.dequantize_per_channel.default" in quantized_ops  # int8 weights
    assert "quantized_decomposed.quantize_per_tensor.default" in quantized_ops  # u8 activations
    for args, kwargs in calibration.calls:
        with torch.no_grad():
            reference = float_pipeline.unet(*args, **kwargs).sample
            ours = int8_model(**canonical_call(float_pipeline.unet, args, kwargs)).sample
        assert relative_error(ours, reference) < 0.1


def test_the_saved_program_reloads_with_a_dynamic_batch(float_pipeline, distill_shards, ptq_run, tmp_path):
    """The program ``quantize ptq`` saved (``ptq_run``: exporting it again is the slow part) gives
    back the int8 error the run measured on it in memory, and runs at other batch sizes."""
    from distill.quantize import calibration_error

    output, report = ptq_run
    program = load_program(output / "unet_int8.pt2")
    run_calibration = trajectory_calibration(  # the run's own calibration, sampled again (seeded)
        float_pipeline, str(distill_shards), num_samples=2, steps=4, timesteps=2, batch_size=2
    )
    error = calibration_error(float_pipeline.unet, program, run_calibration)
    assert error == pytest.approx(report["calibration"]["relative_error"], rel=1e-6)
    call = canonical_call(float_pipeline.unet, *run_calibration.example)
    assert call["timestep"].shape == (4,)  # the sampler's one timestep, one per sample
    halved = {name: value[:2] for name, value in call.items()}
    with torch.no_grad():
        torch.testing.assert_close(program(**halved).sample, program(**call).sample[:2], rtol=1e-4, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="quantize ptq"):
        load_program(tmp_path / "missing.pt2")


def test_a_pipeline_samples_and_scores_with_the_int8_denoiser(float_pipeline, int8_model, distill_shards):
    pipeline = with_denoiser(float_pipeline, QuantizedDenoiser(int8_model, float_pipeline.unet))
    assert float_pipeline.unet is not pipeline.unet  # the float pipeline is untouched
    pose = {"width": 16, "height": 16, "people": []}

    def sample(p):
        return p(["a person", "a dancer"], pose=[pose, pose], height=16, width=16, num_inference_steps=3,
                 guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip

    ours, reference = sample(pipeline), sample(float_pipeline)
    assert ours.rgb.shape == reference.rgb.shape == (2, 16, 16, 3)
    assert abs(ours.rgb - reference.rgb).mean() < 0.05
    heldout = HeldOut.from_shards(distill_shards, float_pipeline, num=4)  # one timestep per sample, batch 4
    assert v_loss(pipeline, heldout)["v_loss"] == pytest.approx(v_loss(float_pipeline, heldout)["v_loss"], rel=0.05)
