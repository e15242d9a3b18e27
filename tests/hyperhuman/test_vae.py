"""train-vae at toy size: a loadable VAE with a measured scaling factor, learning, determinism, clear errors."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from hyperhuman import modalities
from hyperhuman.vae import fixed_batches, load_vae, train_vae
from shards.testing import make_sample
from shards.writer import ShardWriter


def write_shards(root, count: int, first: int = 0):
    with ShardWriter(str(root), first) as writer:
        for index in range(first, first + count):
            sample = make_sample(f"s{index}", height=24, width=32, seed=index)
            yy, xx = np.mgrid[0:24, 0:32]  # smooth colours: make_sample's random pixels are incompressible
            smooth = np.stack([xx * 8, yy * 10, (xx + yy + 20 * index) * 4], axis=2) % 256
            writer.write(dataclasses.replace(sample, image=smooth.astype(np.uint8)))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two samples in one shard: the couple the overfitting test learns."""
    return write_shards(tmp_path_factory.mktemp("vae-shards"), 2)


def config_for(output, shards, **train):
    return {
        "output": str(output),
        "seed": 0,
        "data": {"train": str(shards), "resolution": 16, "random_crop": False, "flip_prob": 0.0},
        "model": {"block_out_channels": [8, 16], "norm_num_groups": 8, "sample_size": 16},
        "train": {"batch_size": 2, "max_train_steps": 3, "learning_rate": 3e-3, "log_every": 1000, **train},
    }


def test_training_saves_a_loadable_vae_with_the_measured_scaling_factor(shards, tmp_path):
    config = config_for(tmp_path / "run", shards)
    report = train_vae(config)
    vae = load_vae(tmp_path / "run" / "vae")
    assert isinstance(vae, AutoencoderKL)
    assert list(vae.config.block_out_channels) == [8, 16] and vae.config.latent_channels == 4
    assert (tmp_path / "run" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    # scaling_factor is 1 / std of the RGB latents (posterior mode) of the training data
    with torch.no_grad():
        batch = next(fixed_batches(config["data"], [str(next(shards.glob("*.tar")))], 0, 64, batch_size=2))
        latents = vae.encode(modalities.batch_to_units(batch)["rgb"]).latent_dist.mode()
    assert vae.config.scaling_factor == pytest.approx(report["scaling_factor"])
    assert report["scaling_factor"] == pytest.approx(1 / float(latents.std()), rel=1e-4)
    assert load_vae(tmp_path / "run").config.scaling_factor == vae.config.scaling_factor  # the run folder works too
    saved = json.loads((tmp_path / "run" / "vae_report.json").read_text())
    assert saved["steps"] == 3 and len(saved["losses"]) == 3
    assert set(saved["psnr_db"]) == {"rgb", "depth", "normal", "pose"}
    assert saved["psnr_on"] == "data.train (no held-out set given)" and saved["psnr_samples"] == 2
    assert saved["parameters"] == sum(p.numel() for p in vae.parameters())
    assert saved["downscale_factor"] == 2 and saved["wall_s"] >= saved["train_s"] > 0
    for key in ("final_loss", "scaling_factor", "scale_samples"):
        assert saved[key] == pytest.approx(report[key])
    preview = (tmp_path / "run" / "reconstructions.png").stat()
    assert preview.st_size > 0


def test_same_seed_same_weights_and_a_held_out_set_is_reported(shards, tmp_path):
    held_out = write_shards(tmp_path / "held-out", 2, first=10)
    reports = []
    for name in ("a", "b"):
        config = config_for(tmp_path / name, shards)
        config["data"].update(random_crop=True, flip_prob=0.5, min_crop_scale=0.5, eval=str(held_out))
        reports.append(train_vae(config))
    assert reports[0]["losses"] == reports[1]["losses"]
    assert reports[0]["psnr_on"] == "data.eval" and reports[0]["psnr_db"] == reports[1]["psnr_db"]
    weights = [load_vae(tmp_path / name / "vae").state_dict() for name in ("a", "b")]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_loss_falls_when_overfitting_two_samples(shards, tmp_path):
    report = train_vae(config_for(tmp_path / "run", shards, max_train_steps=120))
    # the mean of the last 5 steps is at least 3x below the first 5 (measured 5.4x)
    first, last = np.mean(report["losses"][:5]), np.mean(report["losses"][-5:])
    assert last < first / 3
    assert report["psnr_db"]["rgb"] > 18


def test_missing_vae_names_the_path_and_the_command_that_makes_one(tmp_path):
    with pytest.raises(ValueError, match=r"nothing.*hyperhuman train-vae"):
        load_vae(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="hyperhuman train-vae"):
        load_vae(tmp_path / "empty")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c, t: c["data"].update(train=None), r"data\.train is not set.*hyperhuman annotate"),
        (lambda c, t: c["data"].update(train="/nonexistent"), r"data\.train='/nonexistent'.*hyperhuman annotate"),
        (lambda c, t: c["data"].update(train=str(t)), r"data\.train=.*no complete shards.*make demo"),  # empty folder
        (lambda c, t: c["data"].update(train=[str(t / "000000.tar")]), r"data\.train=.*missing.*hyperhuman annotate"),
        (lambda c, t: c["data"].update(eval="/nonexistent"), r"data\.eval="),
        (lambda c, t: c["data"].update(resolution=17), "not divisible by the VAE's downscale factor 2"),
        (lambda c, t: c["model"].update(block_out_channels=[8] * 6), r"data\.resolution=16 .* factor 32 "),
        (lambda c, t: c["data"].update(resolution=0), "data.resolution must be a positive integer"),
        (lambda c, t: c["model"].update(norm_num_groups=6), "norm_num_groups=6 must divide"),
        (
            lambda c, t: c["train"].update(lr=1e-3),
            r"unknown train keys \['lr'\] \(train.lr is now train.learning_rate\)",
        ),
        (lambda c, t: c["data"].update(batch_size=2), r"data.batch_size is now train.batch_size"),
        (lambda c, t: c["train"].update(max_train_steps=0), "train.max_train_steps must be a positive integer"),
        (lambda c, t: c.pop("output"), "lacks 'output'"),
    ],
)
def test_bad_configs_fail_at_start(change, message, shards, tmp_path):
    (tmp_path / "empty").mkdir()
    config = config_for(tmp_path / "run", shards)
    change(config, tmp_path / "empty")
    with pytest.raises(ValueError, match=message):
        train_vae(config)
    assert not (tmp_path / "run").exists()


def test_fewer_samples_than_a_batch_is_a_clear_error(shards, tmp_path):
    config = config_for(tmp_path / "run", shards)
    config["train"]["batch_size"] = 3
    with pytest.raises(ValueError, match=r"fewer than train\.batch_size=3 samples"):
        train_vae(config)
