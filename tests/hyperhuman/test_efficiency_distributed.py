"""train-lsdm with every SpFDE option on, under real data parallelism (two CPU processes, DDP over
gloo): masks change and blocks freeze mid-run on both processes alike (DDP told to look for unused
parameters), each process sieves its own shards, and `--resume latest` reproduces the run exactly."""

import shutil

import pytest

from .conftest import write_toy_shards
from .test_distributed_training import PROCESSES, assert_same_tensors, assert_written_once, launch, lsdm_config

pytestmark = pytest.mark.slow

EVERYTHING = {
    "sparsity": {"use": True, "density": 0.5, "update_every": 1, "drop_fraction": 0.3, "stop_at": 1.0},
    "freezing": {"use": True, "mode": "schedule", "schedule": [[1, 1], [3, 2]]},
    "sieving": {"use": True, "fraction": 0.6, "swap_every": 2, "swap_fraction": 0.5},
}


def efficient_config(output, shards, vae_dir) -> dict:
    config = lsdm_config(output, shards, vae_dir)
    config["train"]["efficiency"] = EVERYTHING
    return config


def test_two_processes_agree_on_masks_and_freezing_and_resume_exactly(vae_dir, tmp_path):
    shards = write_toy_shards(tmp_path / "shards", count=8, per_shard=2)  # each process reads two shards
    run = tmp_path / "run"
    report = launch("train-lsdm", efficient_config(run, shards, vae_dir))
    assert report["steps"] == 4
    digests = report["weights_sha256_per_process"]
    assert len(digests) == PROCESSES and len(set(digests)) == 1  # same masks, same frozen blocks, same weights
    assert_written_once(run)
    saved = report["efficiency"]
    assert saved["freezing"]["frozen_at_step"] == [1, 3]
    assert saved["sparsity"]["mask_updates"] == 3  # steps 1-3: the cosine drop fraction is 0 at the last
    assert saved["sieving"]["samples_trained"] == 4 and saved["flops"]["processes"] == PROCESSES

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    shutil.copy(run / "latent_stats.json", resumed / "latent_stats.json")
    again = launch("train-lsdm", efficient_config(resumed, shards, vae_dir), resume="latest")
    assert again["losses"] == report["losses"][2:]
    assert again["weights_sha256_per_process"] == digests
    assert again["efficiency"]["flops"] == saved["flops"] and again["efficiency"]["sieving"] == saved["sieving"]
    final = "pipeline/unet/diffusion_pytorch_model.safetensors"
    assert_same_tensors(run / final, resumed / final)  # the EMA weights, masked
