"""train-sgr end to end at toy size: checkpoints, exact resume, the base stays frozen, config errors."""

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hyperhuman.lsdm.testing import TINY_UNET
from hyperhuman.sgr.model import StructureGuidedRefiner
from hyperhuman.sgr.pipeline import StructureGuidedRefinerPipeline
from hyperhuman.sgr.train import train_sgr
from hyperhuman.skeleton import RENDERER_VERSION
from shards.testing import make_sample

from .conftest import write_toy_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_toy_shards(tmp_path_factory.mktemp("sgr-shards"), count=6, per_shard=3)


def config_for(output, shards, vae_dir, **train):
    return {
        "output": str(output),
        "seed": 0,
        "data": {"train": str(shards), "resolution": 16, "shuffle_buffer": 4, "num_workers": 0},
        "model": {
            "unet": {**TINY_UNET, "cross_attention_dim": 384},
            "embedder_channels": [8, 8, 16, 16],
            "embedder_strides": [1, 1, 2, 1],  # the tiny VAE downsamples 2×
            "vae": str(vae_dir),
            "text_encoder": "minilm",
        },
        "train": {
            "batch_size": 2,
            "max_train_steps": 6,
            "checkpointing_steps": 2,
            "checkpoints_total_limit": 2,
            "learning_rate": 1e-3,
            "ema": {"use": True, "decay": 0.9},
            "log_every": 100,
            **train,
        },
        "validation": {"every": 3, "num_samples": 2, "num_inference_steps": 2},
    }


@pytest.mark.slow
def test_training_keeps_checkpoints_and_resumes_exactly(shards, vae_dir, tmp_path):
    output = tmp_path / "run"
    report = train_sgr(config_for(output, shards, vae_dir))
    assert report["steps"] == 6 and len(report["losses"]) == 6
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert list((output / "logs").rglob("events.out.tfevents.*"))
    assert {p.name for p in (output / "validation").iterdir()} == {"step-3.png", "step-6.png"}
    refiner = StructureGuidedRefiner.from_pretrained(output / "refiner")
    assert refiner.config.conditions == ["pose", "depth", "normal"]
    # only the refiner trains: the zero convs have left zero (the conditions reach the base UNet)
    assert any(p.abs().sum() > 0 for name, p in refiner.named_parameters() if name.startswith("controlnet_"))
    pipeline = StructureGuidedRefinerPipeline.from_pretrained(output / "pipeline")
    pipeline.set_progress_bar_config(disable=True)
    pose = make_sample("s0", height=16, width=16).pose
    images = pipeline("a person", pose=pose, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3)

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(output / "checkpoints" / "checkpoint-4", resumed / "checkpoints" / "checkpoint-4")
    again = train_sgr(config_for(resumed, shards, vae_dir), resume="latest")
    assert again["losses"] == report["losses"][4:]
    original = load_file(output / "checkpoints" / "checkpoint-6" / "model.safetensors")
    replayed = load_file(resumed / "checkpoints" / "checkpoint-6" / "model.safetensors")
    assert all(torch.equal(original[name], replayed[name]) for name in original)
    final = [load_file(path / "refiner" / "diffusion_pytorch_model.safetensors") for path in (output, resumed)]
    assert all(torch.equal(final[0][name], final[1][name]) for name in final[0])  # the EMA weights


def test_steps_whose_micro_batch_lost_every_condition_still_train(shards, vae_dir, tmp_path):
    """sgr/tiny drops each condition with p = 0.5 in batches of 2, so 1 micro-batch in 64 has none:
    such a step has no refiner in the graph unless the refiner keeps it there."""
    config = config_for(tmp_path / "run", shards, vae_dir, max_train_steps=2, checkpointing_steps=2)
    config["train"]["drop"] = {"pose": 1.0, "depth": 1.0, "normal": 1.0, "text": 0.5}
    config["validation"] = {}
    report = train_sgr(config)
    assert report["steps"] == 2 and report["micro_batches_without_conditions_per_process"] == [2]
    trained = StructureGuidedRefiner.from_pretrained(tmp_path / "run" / "refiner")
    assert trained.config.pose_renderer == RENDERER_VERSION  # the drawing of the poses it learns
    zero_convs = [p for name, p in trained.named_parameters() if name.startswith("controlnet_")]
    assert all(torch.count_nonzero(p) == 0 for p in zero_convs)  # zero gradients: AdamW leaves zeros at zero


def test_a_schedule_other_than_the_base_models_is_refused_naming_the_keys(shards, vae_dir, tmp_path):
    from diffusers import DDIMScheduler, UNet2DConditionModel

    base = tmp_path / "base"
    UNet2DConditionModel(**{**TINY_UNET, "cross_attention_dim": 384}).save_pretrained(base / "unet")
    DDIMScheduler(prediction_type="epsilon", beta_schedule="scaled_linear").save_pretrained(base / "scheduler")
    config = config_for(tmp_path / "run", shards, vae_dir)
    config["model"]["pretrained_unet"] = str(base / "unet")
    config["scheduler"] = {"prediction_type": "v_prediction"}
    with pytest.raises(ValueError, match=r"prediction_type: ours 'v_prediction', the base's 'epsilon'.*"
                       r"--set scheduler.prediction_type=\"epsilon\""):  # fmt: skip
        train_sgr(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["data"].update(train=None), "data.train is not set"),
        (lambda c: c["model"].update(conditions=["pose", "albedo"]), r"unknown names \['albedo'\]"),
        (lambda c: c["train"].update(drop={"segmentation": 0.5}), r"train.drop names \['segmentation'\]"),
        (lambda c: c["data"].update(resolution=18), "not divisible by 4"),
        (lambda c: c["model"].update(vae="/nonexistent/vae"), "hyperhuman train-vae"),
        (lambda c: c["model"].update(pretrained_unet="/nonexistent/unet"), "model.pretrained_unet="),
        (lambda c: c["train"].update(max_train_steps=0), "train.max_train_steps must be a positive integer"),
        (lambda c: c["model"].update(embedder_strides=[1, 2, 2, 2]), "strides"),
    ],
)
def test_bad_configs_fail_at_start_naming_the_key(change, message, shards, vae_dir, tmp_path):
    config = config_for(tmp_path / "run", shards, vae_dir)
    change(config)
    with pytest.raises(ValueError, match=message):
        train_sgr(config)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_tiny_config_checks():
    from hyperhuman.config import load_config
    from hyperhuman.sgr.train import check_config

    config = load_config("sgr/tiny")
    check_config(config, check_paths=False)
    assert config["train"]["drop"] == {"pose": 0.5, "depth": 0.5, "normal": 0.5, "text": 0.5}


@pytest.fixture(scope="module")
def sdxl_text_encoders(tmp_path_factory):
    """SDXL's layout (text_encoder + tokenizer, text_encoder_2 + tokenizer_2) with toy CLIP encoders."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .conftest import tiny_clip_tokenizer

    root = tmp_path_factory.mktemp("sdxl")
    tokenizer = tiny_clip_tokenizer()
    special = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    sizes = {"hidden_size": 16, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=77, projection_dim=32, **sizes, **special
    )
    torch.manual_seed(0)
    for suffix, model_class in (("", CLIPTextModel), ("_2", CLIPTextModelWithProjection)):
        model_class(config).save_pretrained(root / f"text_encoder{suffix}")
        tokenizer.save_pretrained(root / f"tokenizer{suffix}")
    return root


@pytest.mark.slow
def test_an_sdxl_style_base_trains_with_pooled_text_and_time_ids(shards, vae_dir, sdxl_text_encoders, tmp_path):
    from hyperhuman.sgr.testing import TINY_SDXL_UNET

    config = config_for(tmp_path / "run", shards, vae_dir, max_train_steps=2, checkpointing_steps=2)
    config["model"].update(
        unet={**TINY_SDXL_UNET, "sample_size": 4},  # cross-attention 32 = 16 + 16, pooled 32
        text_encoder=str(sdxl_text_encoders / "text_encoder"),
        text_encoder_2=str(sdxl_text_encoders / "text_encoder_2"),
    )
    report = train_sgr(config)
    assert report["steps"] == 2 and all(torch.isfinite(torch.tensor(report["losses"])))
    refiner = StructureGuidedRefiner.from_pretrained(tmp_path / "run" / "refiner")
    assert refiner.config.unet["addition_embed_type"] == "text_time"
    pipeline = StructureGuidedRefinerPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    pipeline.set_progress_bar_config(disable=True)
    pose = make_sample("s0", height=16, width=16).pose
    prompts = ["a person", "two people"]
    images = pipeline(prompts, pose=pose, height=16, width=16, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()

    config["model"].pop("text_encoder_2")
    config["model"]["text_encoder"] = "minilm"
    with pytest.raises(ValueError, match="SDXL-style .* model.text_encoder_2"):
        train_sgr({**config, "output": str(tmp_path / "other")})


def test_the_sdxl_config_builds_on_the_meta_device():
    from diffusers import UNet2DConditionModel

    from hyperhuman.config import load_config
    from hyperhuman.sgr.train import check_config

    config = load_config("sgr/sdxl-1024", ["data.train=/data/humanverse"])
    check_config(config, check_paths=False)
    assert config["scheduler"]["prediction_type"] == "epsilon" and config["train"]["learning_rate"] == 1e-5
    with torch.device("meta"):
        base = UNet2DConditionModel(**config["model"]["unet"])
        refiner = StructureGuidedRefiner.from_unet(base, embedder_strides=tuple(config["model"]["embedder_strides"]))
    base_parameters = sum(p.numel() for p in base.parameters())
    refiner_parameters = sum(p.numel() for p in refiner.parameters())
    assert 2.5e9 < base_parameters < 2.6e9  # SDXL-base's UNet: 2.57B
    assert 1.2e9 < refiner_parameters < 1.3e9  # the encoder copy (1.24B) + embedders + zero convs
