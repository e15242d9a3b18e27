"""Fixtures of the distillation tests: toy shards and a toy teacher run folder (``pipeline/`` as
``train-lsdm`` writes it) whose UNet has two layers per block and three stages, so every BK-SDM
student (base, small, tiny) and every SnapFusion edit has something to remove."""

import pytest
import torch

from hyperhuman.lsdm.testing import IDENTITY_NORM, tiny_text_encoder, tiny_vae

# SD's layout at toy size: attention in the high-resolution stages, none in the innermost.
TEACHER_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (16, 32, 32),
    "norm_num_groups": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
}


def teacher_unet(seed: int = 0, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TEACHER_UNET, **overrides})


def teacher_lsdm(seed: int = 0):
    from hyperhuman.lsdm.model import LatentStructuralUNet

    return LatentStructuralUNet.from_unet(teacher_unet(seed), latent_norm=dict(IDENTITY_NORM))


@pytest.fixture(scope="session")
def distill_shards(tmp_path_factory):
    """Six toy samples (24×32, one or two people) in two complete shards with a manifest."""
    from shards.writer import write_manifest
    from tests.hyperhuman.conftest import write_toy_shards

    root = write_toy_shards(tmp_path_factory.mktemp("distill-shards"), count=6, per_shard=3)
    write_manifest(str(root))
    return root


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory):
    """A run folder holding ``pipeline/``: the toy teacher LSDM with a toy VAE and text encoder."""
    from hyperhuman.lsdm.pipeline import HyperHumanPipeline, make_scheduler

    tokenizer, text_encoder = tiny_text_encoder(0)
    components = {"vae": tiny_vae(0), "text_encoder": text_encoder, "tokenizer": tokenizer}
    pipeline = HyperHumanPipeline(**components, unet=teacher_lsdm(0), scheduler=make_scheduler())
    run = tmp_path_factory.mktemp("teacher-run")
    pipeline.save_pretrained(run / "pipeline")
    return run


@pytest.fixture(scope="session")
def sd_teacher_run(tmp_path_factory):
    """A diffusers StableDiffusionPipeline folder at toy size: a plain UNet2DConditionModel teacher."""
    from diffusers import StableDiffusionPipeline

    from hyperhuman.lsdm.pipeline import make_scheduler

    tokenizer, text_encoder = tiny_text_encoder(0)
    tokenizer.model_max_length = 16  # the prompts' token count in SD's encode_prompt
    pipeline = StableDiffusionPipeline(
        vae=tiny_vae(0), text_encoder=text_encoder, tokenizer=tokenizer, unet=teacher_unet(0),
        scheduler=make_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("sd-teacher") / "pipeline"
    pipeline.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def float_pipeline(teacher_run):
    """The toy teacher as a pipeline (progress bars off): the float model the quantization tests quantize."""
    from hyperhuman.lsdm.pipeline import HyperHumanPipeline

    pipeline = HyperHumanPipeline.from_pretrained(teacher_run / "pipeline")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="session")
def ptq_run(teacher_run, distill_shards, tmp_path_factory):
    """One ``quantize ptq`` run of the toy teacher with everything on (split skip scales, the ONNX
    route, evaluation on the eager and bf16 runtimes): ``(output folder, report)``. Its exports are
    the slow part, so the PT2E and the ONNX tests share it. Its batches are the ``calibration``
    fixture's (2 samples), so the ONNX models take that fixture's calls at their exported shape."""
    from distill.quantize import quantize_ptq

    output = tmp_path_factory.mktemp("ptq-run") / "ptq"
    config = {
        "output": str(output),
        "model": str(teacher_run),
        "split_skip": True,
        "onnx": True,
        "calibration": {"shards": str(distill_shards), "num_samples": 2, "steps": 4, "timesteps": 2, "batch_size": 2},
        "evaluation": {
            "heldout": str(distill_shards),
            "heldout_num": 4,
            "psnr_num": 2,
            "psnr_steps": 3,
            "runtimes": ["eager", "bf16"],
        },  # fmt: skip
    }
    return output, quantize_ptq(config)


@pytest.fixture(scope="session")
def calibration(float_pipeline, distill_shards):
    """Trajectory calibration of the toy teacher: 2 batches of 2 samples × 3 of 6 steps."""
    from distill.quant.calibration import trajectory_calibration

    return trajectory_calibration(
        float_pipeline, str(distill_shards), num_samples=4, steps=6, timesteps=3, batch_size=2
    )


@pytest.fixture(scope="session")
def int8_model(float_pipeline, calibration):
    """The toy teacher's PT2E int8 model (converted, uncompiled), calibrated on ``calibration``."""
    from distill.quant.ptq import quantize_int8

    return quantize_int8(float_pipeline.unet, calibration)
