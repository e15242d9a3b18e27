"""StructureGuidedRefinerPipeline and TwoStagePipeline at toy size: outputs, determinism, "no
condition" is the base UNet's sampling loop exactly, each condition steers, the condition forms
and conversions, save/load, and both stages from saved directories."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.utils.torch_utils import randn_tensor

from hyperhuman import modalities
from hyperhuman.lsdm.pipeline import HyperHumanPipeline, make_scheduler
from hyperhuman.lsdm.testing import dummy_components as lsdm_components
from hyperhuman.lsdm.testing import tiny_text_encoder
from hyperhuman.sgr.pipeline import (
    StructureGuidedRefinerPipeline,
    TwoStagePipeline,
    condition_units,
    prepare_depth,
    prepare_normal,
)
from hyperhuman.sgr.testing import perturb, tiny_refiner, tiny_unet
from hyperhuman.text import encode_prompts

SIZE = 32  # stage 2's toy output: latents 4×4 with an ×8 VAE
PROMPTS = ["a man running", "two people dancing"]
POSE = {
    "width": 200,
    "height": 200,
    "people": [{"keypoints": np.random.default_rng(0).uniform([20, 20, 0.5], [180, 180, 1.0], (17, 3)).tolist()}],
}


def tiny_vae_x8(seed: int = 0) -> AutoencoderKL:
    """A toy VAE with SD's ×8 downsampling, so the refiner keeps its default embedder strides."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )


def sgr_components(seed: int = 0) -> dict:
    tokenizer, text_encoder = tiny_text_encoder(seed)  # hidden size 32 = the tiny UNet's cross_attention_dim
    unet = tiny_unet("sd", seed, sample_size=SIZE // 8).eval().requires_grad_(False)
    return {
        "vae": tiny_vae_x8(seed),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "refiner": tiny_refiner(unet, seed),
        "scheduler": make_scheduler(),
    }


def _pipe(components) -> StructureGuidedRefinerPipeline:
    pipe = StructureGuidedRefinerPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def components():
    return sgr_components()


@pytest.fixture(scope="module")
def steered(components):
    """The toy pipeline with the refiner's zero-init parts moved (a new refiner is a no-op by design)."""
    refiner = tiny_refiner(components["unet"])
    perturb(refiner, seed=1, std=0.2, zero_init_only=True)
    return _pipe(dict(components, refiner=refiner))


def _maps(batch: int = 2, size: int = 8, seed: int = 0):
    """Low-resolution nearness (B, H, W) in [0, 1] and unit normals (B, H, W, 3), like stage 1's np output."""
    rng = np.random.default_rng(seed)
    depth = rng.uniform(0, 1, (batch, size, size)).astype(np.float32)
    normal = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    normal[..., 2] = np.abs(normal[..., 2])
    return depth, normal / np.linalg.norm(normal, axis=-1, keepdims=True)


def _run(pipe, **kwargs):
    options = {"num_inference_steps": 2, "generator": torch.Generator().manual_seed(0), "output_type": "latent"}
    return pipe(PROMPTS, **{**options, **kwargs}).images


def test_outputs_per_prompt_as_pil_np_and_latents(steered):
    depth, normal = _maps()
    out = steered(PROMPTS, pose=POSE, depth=depth, normal=normal, num_inference_steps=2, output_type="np")
    assert out.images.shape == (2, SIZE, SIZE, 3) and out.images.dtype == np.float32
    assert 0 <= out.images.min() and out.images.max() <= 1 and np.isfinite(out.images).all()
    assert out.pose.shape == (2, SIZE, SIZE, 3) and out.pose.dtype == np.uint8 and out.pose.any()
    pil = steered("one prompt", pose=POSE, height=48, width=64, num_inference_steps=2)
    assert len(pil.images) == 1 and pil.images[0].size == (64, 48) and pil.images[0].mode == "RGB"
    assert pil.pose[0].size == (64, 48)
    assert _run(steered).shape == (2, 4, SIZE // 8, SIZE // 8)
    assert steered("x", num_inference_steps=1, output_type="np").pose is None


def test_same_generator_same_result(steered):
    depth, normal = _maps()
    first = _run(steered, pose=POSE, depth=depth, normal=normal)
    assert torch.equal(first, _run(steered, pose=POSE, depth=depth, normal=normal))
    other = _run(steered, pose=POSE, depth=depth, normal=normal, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(first, other)


@torch.no_grad()
def _base_unet_loop(components, steps: int, guidance_scale: float, seed: int = 0) -> torch.Tensor:
    """Text-to-image with the base UNet alone: the plain diffusers sampling loop, no refiner anywhere."""
    tokenizer, text_encoder, unet, scheduler = (
        components[k] for k in ("tokenizer", "text_encoder", "unet", "scheduler")
    )
    states, mask = encode_prompts(tokenizer, text_encoder, PROMPTS)
    negative_states, negative_mask = encode_prompts(tokenizer, text_encoder, [""] * len(PROMPTS))
    states, mask = torch.cat([negative_states, states]), torch.cat([negative_mask, mask])
    scheduler.set_timesteps(steps)
    shape = (len(PROMPTS), 4, SIZE // 8, SIZE // 8)
    latents = randn_tensor(shape, generator=torch.Generator().manual_seed(seed)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        prediction = unet(
            scheduler.scale_model_input(torch.cat([latents, latents]), t), t, states, encoder_attention_mask=mask
        )
        unconditional, conditional = prediction.sample.chunk(2)
        latents = scheduler.step(unconditional + guidance_scale * (conditional - unconditional), t, latents).prev_sample
    return latents


def test_without_conditions_it_is_the_base_unet_exactly_even_with_a_trained_refiner(components):
    refiner = tiny_refiner(components["unet"])
    perturb(refiner, seed=3)  # every weight moved, as after training
    trained = _pipe(dict(components, refiner=refiner))
    expected = _base_unet_loop(components, steps=2, guidance_scale=5.0)
    assert torch.equal(_run(trained), expected)
    depth, normal = _maps()
    everything = {"pose": POSE, "depth": depth, "normal": normal}
    assert torch.equal(_run(trained, **everything, conditioning_scale=0.0), expected)
    assert not torch.equal(_run(trained, **everything), expected)


def test_each_condition_changes_the_output(steered):
    depth, normal = _maps()
    base = _run(steered)
    alone = {
        "pose": _run(steered, pose=POSE),
        "depth": _run(steered, depth=depth),
        "normal": _run(steered, normal=normal),
    }
    for name, latents in alone.items():
        assert (latents - base).abs().max() > 1e-4, name
    assert not torch.equal(alone["pose"], alone["depth"]) and not torch.equal(alone["depth"], alone["normal"])
    every = _run(steered, pose=POSE, depth=depth, normal=normal)
    assert all(not torch.equal(every, latents) for latents in alone.values())


def test_condition_units_use_the_training_conversions():
    depth, normal = _maps(size=4)
    pose = np.random.default_rng(1).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    units = condition_units(pose=pose, depth=depth, normal=normal)
    assert set(units) == {"pose", "depth", "normal"}
    assert all(u.shape == (2, 3, 4, 4) and u.dtype == torch.float32 for u in units.values())
    torch.testing.assert_close(units["pose"], modalities.image_to_unit(pose))
    torch.testing.assert_close(units["depth"][:, 0], torch.from_numpy(depth) * 2 - 1)
    assert torch.equal(units["depth"][:, 0], units["depth"][:, 2])  # nearness replicated to 3 channels
    torch.testing.assert_close(units["normal"], torch.from_numpy(normal).permute(0, 3, 1, 2))
    # the inverses the LSDM's outputs go through give the maps back
    np.testing.assert_allclose(modalities.unit_to_nearness(units["depth"]), depth, atol=1e-6)
    np.testing.assert_allclose(modalities.unit_to_normal(units["normal"]), normal, atol=1e-6)
    assert set(condition_units(depth=depth)) == {"depth"} and condition_units() == {}


def test_condition_forms_images_arrays_lists_and_resizing():
    depth, normal = _maps(batch=1, size=8)
    depth_8bit = (depth[0] * 255).round().astype(np.uint8)
    from_image = prepare_depth(PIL.Image.fromarray(depth_8bit, "L"), 2, 16, 16)
    from_floats = prepare_depth(depth_8bit.astype(np.float32) / 255, 2, 16, 16)
    assert from_image.shape == (2, 16, 16) and torch.equal(from_image, from_floats)
    assert torch.equal(prepare_depth([depth[0], depth[0]], 2, 8, 8), torch.from_numpy(np.repeat(depth, 2, axis=0)))
    rgb_depth = PIL.Image.fromarray(np.repeat(depth_8bit[..., None], 3, axis=-1))
    assert torch.equal(prepare_depth(rgb_depth, 1, 16, 16)[0], from_image[0])

    resized = prepare_normal(normal, 1, 20, 12)  # any size, any aspect: bilinear then renormalised
    assert resized.shape == (1, 20, 12, 3)
    torch.testing.assert_close(resized.norm(dim=-1), torch.ones(1, 20, 12))
    as_png = PIL.Image.fromarray(np.clip((normal[0] + 1) * 127.5, 0, 255).round().astype(np.uint8))
    torch.testing.assert_close(prepare_normal(as_png, 1, 8, 8), torch.from_numpy(normal), atol=0.02, rtol=0)

    with pytest.raises(ValueError, match="nearness in \\[0, 1\\]"):
        prepare_depth(depth * 2, 1, 8, 8)
    with pytest.raises(ValueError, match="mode 'I;16'"):
        prepare_depth(PIL.Image.new("I;16", (8, 8)), 1, 8, 8)
    with pytest.raises(ValueError, match="3 depth maps for 2 prompts"):
        prepare_depth([depth[0]] * 3, 2, 8, 8)
    with pytest.raises(ValueError, match="unit vectors"):
        prepare_normal(normal * 3, 1, 8, 8)
    with pytest.raises(ValueError, match="normal arrays must have 3 dimensions"):
        prepare_normal(normal[0, ..., 0], 1, 8, 8)


def test_pose_as_json_or_rendered_image(steered):
    from_json = steered(PROMPTS, pose=POSE, num_inference_steps=2, output_type="latent")
    rendered = PIL.Image.fromarray(from_json.pose[0])
    from_image = steered(PROMPTS, pose=[rendered, rendered], num_inference_steps=2, output_type="latent")
    np.testing.assert_array_equal(from_image.pose, from_json.pose)
    with pytest.raises(ValueError, match="one pose or one per prompt"):
        _run(steered, pose=[POSE] * 3)


def test_inputs_are_checked(steered, components):
    with pytest.raises(ValueError, match="multiples of 16"):
        _run(steered, height=40)
    with pytest.raises(ValueError, match="output_type"):
        _run(steered, output_type="pt")
    with pytest.raises(ValueError, match="latents must have shape"):
        _run(steered, latents=torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="num_inference_steps must be a positive integer"):
        _run(steered, num_inference_steps=0)
    pose_only = tiny_refiner(components["unet"], conditions=["pose"])
    with pytest.raises(ValueError, match="no embedder for \\['depth'\\]"):
        _run(_pipe(dict(components, refiner=pose_only)), depth=_maps()[0])


def test_component_sets_that_cannot_sample_are_refused(components):
    sdxl = tiny_unet("sdxl")
    with pytest.raises(ValueError, match="pooled text embeddings.*pass text_encoder_2 and tokenizer_2"):
        StructureGuidedRefinerPipeline(**dict(components, unet=sdxl, refiner=tiny_refiner(sdxl)))
    other = tiny_unet("sd", block_out_channels=(8, 16))
    with pytest.raises(ValueError, match="built for another base UNet: block_out_channels"):
        StructureGuidedRefinerPipeline(**dict(components, unet=other))
    strides = tiny_refiner(components["unet"], embedder_strides=(1, 1, 2, 2))
    with pytest.raises(ValueError, match="embedder_strides"):
        StructureGuidedRefinerPipeline(**dict(components, refiner=strides))


def test_save_and_load_the_pipeline(steered, tmp_path):
    steered.save_pretrained(tmp_path / "sgr")
    loaded = StructureGuidedRefinerPipeline.from_pretrained(tmp_path / "sgr")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.refiner).__name__ == "StructureGuidedRefiner"
    depth, normal = _maps()
    conditions = {"pose": POSE, "depth": depth, "normal": normal}
    assert torch.equal(_run(steered, **conditions), _run(loaded, **conditions))


@pytest.fixture(scope="module")
def two_stage(steered, tmp_path_factory):
    root = tmp_path_factory.mktemp("two-stage")
    lsdm = HyperHumanPipeline(**lsdm_components())
    lsdm.save_pretrained(root / "lsdm")
    steered.save_pretrained(root / "sgr")
    pipe = TwoStagePipeline.from_pretrained(root / "lsdm", root / "sgr")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _two(pipe, **kwargs):
    options = {"stage1_steps": 2, "stage2_steps": 2, "generator": torch.Generator().manual_seed(0), "output_type": "np"}
    return pipe(PROMPTS, POSE, **{**options, **kwargs})


def test_two_stage_from_saved_directories(two_stage):
    out = _two(two_stage)
    stage1 = out.stage1  # the LSDM's resolution (16 px)
    assert stage1.rgb.shape == (2, 16, 16, 3) and stage1.depth.shape == (2, 16, 16)
    assert stage1.normal.shape == (2, 16, 16, 3) and stage1.pose.shape == (2, 16, 16, 3)
    assert out.refined.shape == (2, SIZE, SIZE, 3) and np.isfinite(out.refined).all()

    # the same as chaining the stages by hand: stage 1's float depth / normal, upsampled; the pose re-rendered
    generator = torch.Generator().manual_seed(0)
    by_hand = two_stage.stage1(
        PROMPTS, POSE, num_inference_steps=2, guidance_scale=7.5, generator=generator, output_type="np"
    )
    refined = two_stage.stage2(
        PROMPTS,
        pose=POSE,
        depth=by_hand.depth,
        normal=by_hand.normal,
        num_inference_steps=2,
        generator=generator,
        output_type="np",
    )
    np.testing.assert_array_equal(by_hand.depth, stage1.depth)
    np.testing.assert_array_equal(refined.images, out.refined)
    assert refined.pose.shape == (2, SIZE, SIZE, 3)

    pil = _two(two_stage, output_type="pil", height=48, width=48)
    assert [image.size for image in pil.stage1.rgb] == [(16, 16)] * 2 and pil.stage1.depth[0].mode == "L"
    assert pil.stage1.normal[0].mode == "RGB" and [image.size for image in pil.refined] == [(48, 48)] * 2


def test_two_stage_uses_the_callers_depth_and_normal(two_stage):
    default = _two(two_stage)
    own_depth, own_normal = _maps(size=24, seed=5)
    with_depth = _two(two_stage, depth=own_depth)
    with_normal = _two(two_stage, normal=own_normal)
    for out in (with_depth, with_normal):
        np.testing.assert_array_equal(out.stage1.rgb, default.stage1.rgb)  # stage 1 is unchanged
        assert np.abs(out.refined - default.refined).max() > 1e-4
    assert not np.array_equal(with_depth.refined, with_normal.refined)
    same = _two(two_stage, depth=default.stage1.depth, normal=default.stage1.normal)
    np.testing.assert_array_equal(same.refined, default.refined)
