"""train-vae at toy size: a loadable VAE with a measured scaling factor, learning, clear errors."""

import dataclasses
import json

import numpy as np
import pytest
from diffusers import AutoencoderKL

from hyperhuman.vae import load_vae, train_vae
from shards.testing import make_sample
from shards.writer import ShardWriter


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae-shards")
    with ShardWriter(str(root), 0) as writer:
        for index in range(4):
            sample = make_sample(f"s{index}", height=24, width=32, seed=index)
            yy, xx = np.mgrid[0:24, 0:32]  # smooth colours: make_sample's random pixels are incompressible
            smooth = np.stack([xx * 8, yy * 10, (xx + yy + 20 * index) * 4], axis=2) % 256
            writer.write(dataclasses.replace(sample, image=smooth.astype(np.uint8)))
    return root


def config_for(output, shards, **train):
    return {
        "output": str(output),
        "seed": 0,
        "data": {"train": str(shards), "resolution": 16, "batch_size": 2, "random_crop": False, "flip_prob": 0.0},
        "model": {"block_out_channels": [8, 16], "norm_num_groups": 8, "sample_size": 16},
        "train": {"max_steps": 150, "learning_rate": 3e-3, "log_every": 1000, **train},
    }


def test_training_saves_a_loadable_vae_with_its_scaling_factor(shards, tmp_path):
    report = train_vae(config_for(tmp_path / "run", shards))
    vae = load_vae(str(tmp_path / "run" / "vae"))
    assert isinstance(vae, AutoencoderKL)
    assert vae.config.scaling_factor == pytest.approx(report["scaling_factor"])
    assert report["scaling_factor"] > 0
    saved = json.loads((tmp_path / "run" / "vae_report.json").read_text())
    assert set(saved["psnr_db"]) == {"rgb", "depth", "normal", "pose"}
    assert saved["psnr_on"].startswith("data.train")
    assert (tmp_path / "run" / "reconstructions.png").is_file()
    # Overfitting four samples: the loss falls by at least 3× in 150 steps (measured 5.1×).
    assert sum(report["losses"][-5:]) / 5 < sum(report["losses"][:5]) / 5 / 3


def test_missing_vae_names_the_command_that_makes_one(tmp_path):
    with pytest.raises(ValueError, match="hyperhuman train-vae"):
        load_vae(str(tmp_path / "nothing"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["data"].update(train=None), "data.train"),
        (lambda c: c["data"].update(train="/nonexistent"), "hyperhuman annotate"),
        (lambda c: c["data"].update(resolution=17), "not divisible by the VAE's downscale factor 2"),
    ],
)
def test_bad_configs_fail_at_start(change, message, shards, tmp_path):
    config = config_for(tmp_path / "run", shards)
    change(config)
    with pytest.raises(ValueError, match=message):
        train_vae(config)
    assert not (tmp_path / "run").exists()
