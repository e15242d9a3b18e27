"""`distill unet` under real data parallelism: two CPU processes, DDP over gloo, robust training
(parts bypassed at random, a different set in each process, so some parameters get no gradient in
some steps). Both processes end with the same weights, and `--resume latest` reproduces the run."""

import shutil

import pytest

from tests.hyperhuman.conftest import write_toy_shards
from tests.hyperhuman.test_distributed_training import PROCESSES, assert_same_tensors, assert_written_once, launch

from .test_kd import config_for

pytestmark = pytest.mark.slow


def robust_config(output, teacher_run, shards):
    config = config_for(output, teacher_run, shards, student="teacher", max_train_steps=4, batch_size=1)
    config["kd"]["skip_prob"] = 0.3
    config["validation"] = {}
    config["train"]["log_every"] = 1
    return config


def test_two_processes_agree_write_once_and_resume_exactly(teacher_run, tmp_path):
    shards = write_toy_shards(tmp_path / "shards", count=8, per_shard=2)  # each process reads two shards
    run = tmp_path / "run"
    report = launch("distill unet", robust_config(run, teacher_run, shards))
    assert report["steps"] == 4 and sum(report["skipped"]) > 0
    digests = report["weights_sha256_per_process"]
    assert len(digests) == PROCESSES and len(set(digests)) == 1
    assert_written_once(run)

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    again = launch("distill unet", robust_config(resumed, teacher_run, shards), resume="latest")
    assert again["losses"] == report["losses"][2:]
    assert again["weights_sha256_per_process"] == digests
    final = "pipeline/unet/diffusion_pytorch_model.safetensors"
    assert_same_tensors(run / final, resumed / final)  # the EMA weights
