"""HyperHumanPipeline at toy size: outputs, determinism, save/load, poses, other schedulers."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

from hyperhuman.lsdm.pipeline import HyperHumanPipeline, make_scheduler
from hyperhuman.lsdm.testing import dummy_components

POSE = {
    "width": 200,
    "height": 100,
    "people": [{"keypoints": np.random.default_rng(0).uniform([5, 5, 0.5], [195, 95, 1.0], (17, 3)).tolist()}],
}


@pytest.fixture(scope="module")
def pipe():
    pipeline = HyperHumanPipeline(**dummy_components())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _run(pipe, **kwargs):
    options = {"pose": POSE, "num_inference_steps": 3, "generator": torch.Generator().manual_seed(0)}
    return pipe(["a man running", "two people dancing"], **{**options, **kwargs})


def test_returns_rgb_depth_normal_and_pose_per_prompt(pipe):
    out = _run(pipe, output_type="np")
    assert out.rgb.shape == (2, 16, 16, 3) and out.rgb.dtype == np.float32
    assert 0 <= out.rgb.min() and out.rgb.max() <= 1
    assert out.depth.shape == (2, 16, 16) and 0 <= out.depth.min() and out.depth.max() <= 1
    assert out.normal.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(np.linalg.norm(out.normal, axis=-1), 1.0, atol=1e-4)
    assert out.pose.shape == (2, 16, 16, 3) and out.pose.dtype == np.uint8
    pil = _run(pipe)
    assert [image.size for image in pil.rgb] == [(16, 16)] * 2
    assert pil.depth[0].mode == "L" and pil.normal[0].mode == "RGB"


def test_same_generator_same_result_and_batch_matches_single(pipe):
    first, second = _run(pipe, output_type="latent"), _run(pipe, output_type="latent")
    assert torch.equal(first.rgb, second.rgb)
    assert first.rgb.shape == (2, 12, 8, 8)
    noise = torch.randn(2, 12, 8, 8, generator=torch.Generator().manual_seed(3))
    batched = _run(pipe, output_type="latent", latents=noise).rgb
    single = pipe("two people dancing", pose=POSE, num_inference_steps=3, latents=noise[1:], output_type="latent").rgb
    torch.testing.assert_close(batched[1:], single, rtol=1e-4, atol=1e-5)


def test_pose_as_json_or_rendered_image(pipe):
    from_json = _run(pipe, output_type="np")
    rendered = PIL.Image.fromarray(from_json.pose[0])
    from_image = _run(pipe, pose=[rendered, rendered], output_type="np")
    np.testing.assert_array_equal(from_image.pose[0], from_json.pose[0])
    with pytest.raises(ValueError, match="one pose or one per prompt"):
        _run(pipe, pose=[POSE] * 3)
    with pytest.raises(ValueError, match="width, height and people"):
        _run(pipe, pose={"people": []})


def test_save_and_load_the_pipeline(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = HyperHumanPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(_run(pipe, output_type="latent").rgb, _run(loaded, output_type="latent").rgb)
    assert loaded.unet.config.branches == ["rgb", "depth", "normal"]


@pytest.mark.parametrize("scheduler_class", [EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_other_v_prediction_schedulers_work(pipe, scheduler_class):
    components = dict(pipe.components, scheduler=scheduler_class.from_config(make_scheduler().config))
    other = HyperHumanPipeline(**components)
    other.set_progress_bar_config(disable=True)
    out = _run(other, output_type="np")
    assert np.isfinite(out.rgb).all() and np.isfinite(out.normal).all()


def test_epsilon_scheduler_is_refused(pipe):
    with pytest.raises(ValueError, match="v_prediction"):
        HyperHumanPipeline(**dict(pipe.components, scheduler=make_scheduler(prediction_type="epsilon")))


def test_size_must_fit_the_vae_and_unet(pipe):
    with pytest.raises(ValueError, match="multiples of 4"):
        _run(pipe, height=18, width=16)


@pytest.mark.parametrize("steps", [0, -1, 2.5])
def test_a_step_count_that_is_not_a_positive_integer_is_refused(pipe, steps):
    with pytest.raises(ValueError, match=f"num_inference_steps must be a positive integer.*got {steps}"):
        _run(pipe, num_inference_steps=steps)


def test_the_generic_diffusers_loader_with_the_documented_call(pipe, tmp_path):
    """``DiffusionPipeline.from_pretrained`` knows only diffusers' own pipeline classes; the README's call."""
    from diffusers import DiffusionPipeline

    import hyperhuman.lsdm.pipeline

    pipe.save_pretrained(tmp_path / "lsdm")
    loaded = DiffusionPipeline.from_pretrained(
        tmp_path / "lsdm", custom_pipeline=hyperhuman.lsdm.pipeline.__file__, trust_remote_code=True
    )
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == "HyperHumanPipeline"
    np.testing.assert_array_equal(_run(loaded, output_type="np").rgb, _run(pipe, output_type="np").rgb)


def test_a_student_with_guidance_folded_in_is_called_once_per_step(pipe):
    from distill.guidance import add_guidance_input

    student = HyperHumanPipeline(**{**pipe.components, "unet": add_guidance_input(pipe.unet, dim=16)})
    student.set_progress_bar_config(disable=True)
    batches = []
    handle = student.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        folded = _run(student, guidance_scale=7.5, output_type="latent").rgb
    finally:
        handle.remove()
    assert batches == [2, 2, 2]  # 3 steps, the 2 prompts once each: no unconditional pass
    # fresh from the teacher (zero guidance projection) it is the teacher without guidance
    torch.testing.assert_close(folded, _run(pipe, guidance_scale=1.0, output_type="latent").rgb)
    torch.nn.init.normal_(student.unet.trunk.time_embedding.cond_proj.weight)
    assert not torch.equal(
        _run(student, guidance_scale=2.0, output_type="latent").rgb,
        _run(student, guidance_scale=9.0, output_type="latent").rgb,
    )


def test_a_step_distilled_model_samples_at_its_own_step_count_by_default(pipe, tmp_path):
    config = {key: value for key, value in pipe.unet.config.items() if not key.startswith("_")}
    unet = type(pipe.unet).from_config({**config, "distilled_steps": 4})
    unet.load_state_dict(pipe.unet.state_dict())
    student = HyperHumanPipeline(**{**pipe.components, "unet": unet})
    student.save_pretrained(tmp_path / "student")
    loaded = HyperHumanPipeline.from_pretrained(tmp_path / "student")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.unet.config.distilled_steps == 4
    steps = []
    loaded.unet.register_forward_pre_hook(lambda module, args: steps.append(args[1]))
    loaded("a man running", pose=POSE, guidance_scale=1.0, output_type="latent")
    assert [int(t) for t in steps] == [999, 749, 499, 249]
    steps.clear()
    loaded("a man running", pose=POSE, guidance_scale=1.0, num_inference_steps=2, output_type="latent")
    assert len(steps) == 2
