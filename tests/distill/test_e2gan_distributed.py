"""`distill gan` under real data parallelism: two CPU processes, DDP over gloo, each reading its own
pair shards. Both end with the same generator, checkpoints are written once, and `--resume latest`
reproduces the run (the discriminator is called unwrapped in the generator's step: DDP must not wait
for its gradients there)."""

import shutil

import pytest

from tests.hyperhuman.test_distributed_training import PROCESSES, assert_same_tensors, assert_written_once, launch

from .test_e2gan import gan_config, text_encoder_path  # noqa: F401 (a fixture)
from .test_edit_pairs import pairs_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def many_pair_shards(distill_shards, tmp_path_factory):
    """One pair per shard (10 training shards): each process reads five."""
    from distill.e2gan.pairs import edit_pairs

    output = tmp_path_factory.mktemp("ddp-pairs")
    config = pairs_config(output, distill_shards)
    config["writer"]["max_samples"] = 1
    edit_pairs(config)
    return output


def ddp_config(output, pairs, text_encoder):
    config = gan_config(output, pairs, text_encoder, max_train_steps=4, batch_size=1, log_every=1)
    config["validation"]["every"] = 0
    return config


def test_two_processes_agree_write_once_and_resume_exactly(many_pair_shards, text_encoder_path, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    report = launch("distill gan", ddp_config(run, many_pair_shards, text_encoder_path))
    assert report["steps"] == 4
    digests = report["weights_sha256_per_process"]
    assert len(digests) == PROCESSES and len(set(digests)) == 1
    assert_written_once(run)

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    again = launch("distill gan", ddp_config(resumed, many_pair_shards, text_encoder_path), resume="latest")
    assert again["losses"] == report["losses"][2:]
    assert again["weights_sha256_per_process"] == digests
    final = "generator/diffusion_pytorch_model.safetensors"
    assert_same_tensors(run / final, resumed / final)  # the EMA weights
