"""train-lsdm and train-sgr under real data parallelism: two CPU processes, DDP over gloo.

Both processes must end with the same weights, the checkpoints must be written once, and
`--resume latest` under two processes must reproduce the uninterrupted two-process run exactly.
SGR runs with drop probabilities high enough that whole micro-batches lose every condition."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hyperhuman.lsdm.testing import TINY_UNET

from .conftest import write_toy_shards

pytestmark = pytest.mark.slow

PROCESSES = 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Four shards of two samples: each process reads two of them (``split_by_node``)."""
    return write_toy_shards(tmp_path_factory.mktemp("ddp-shards"), count=8, per_shard=2)


def base_config(output, shards, vae_dir) -> dict:
    return {
        "output": str(output),
        "seed": 0,
        "data": {"train": str(shards), "resolution": 16, "shuffle_buffer": 2, "num_workers": 0},
        "model": {"unet": {**TINY_UNET, "cross_attention_dim": 384}, "vae": str(vae_dir), "text_encoder": "minilm"},
        "train": {
            "batch_size": 1,  # per process
            "max_train_steps": 4,
            "checkpointing_steps": 2,
            "checkpoints_total_limit": 2,
            "learning_rate": 1e-3,
            "ema": {"use": True, "decay": 0.9},
            "log_every": 1,
        },
    }


def lsdm_config(output, shards, vae_dir) -> dict:
    config = base_config(output, shards, vae_dir)
    config["model"]["latent_stats_batches"] = 1
    return config


def sgr_config(output, shards, vae_dir) -> dict:
    config = base_config(output, shards, vae_dir)
    config["model"].update(embedder_channels=[8, 8, 16, 16], embedder_strides=[1, 1, 2, 1])  # tiny VAE: 2×
    # p(all three dropped) = 0.51 per one-sample micro-batch: about every other step of a process has none
    config["train"]["drop"] = {"pose": 0.8, "depth": 0.8, "normal": 0.8, "text": 0.5}
    return config


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(command: str, config: dict, resume: str | None = None) -> dict:
    """Run ``hyperhuman COMMAND`` (e.g. ``train-lsdm`` or ``distill unet``) in two CPU processes; the
    run's train_report.

    ``accelerate launch --cpu --num_processes 2`` starts ONE process unless it is given an MPI
    hostfile (accelerate's simple launcher; huggingface/accelerate#2741). Two processes on one
    machine without MPI: the torchrun launcher (``--multi_gpu``) with ``ACCELERATE_USE_CPU=true``,
    which makes accelerate pick MULTI_CPU with the gloo backend."""
    output = Path(config["output"])
    output.mkdir(parents=True, exist_ok=True)
    config_file = output.parent / f"{output.name}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate is a dependency; run make setup"
    argv = [
        accelerate, "launch", "--multi_gpu", "--num_processes", str(PROCESSES), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(free_port()),
        "-m", "hyperhuman", *command.split(), "--config", str(config_file), *(["--resume", resume] if resume else []),
    ]  # fmt: skip
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(output.parent / "hf-home"),  # no user accelerate config can change the launch
    }
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads((output / "train_report.json").read_text())


def assert_written_once(output: Path) -> None:
    checkpoints = sorted(p.name for p in (output / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    for name in checkpoints:
        files = sorted(p.name for p in (output / "checkpoints" / name).iterdir())
        assert files.count("model.safetensors") == 1 and "random_states_1.pkl" not in files, files  # main only
        state = json.loads((output / "checkpoints" / name / "trainer_state.json").read_text())
        assert len(state["data_per_process"]) == PROCESSES  # each process resumes at its own position


def assert_same_tensors(first: Path, second: Path) -> None:
    a, b = load_file(first), load_file(second)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a), first


@pytest.mark.parametrize(
    ("command", "make_config", "final_weights"),
    [
        ("train-lsdm", lsdm_config, "pipeline/unet/diffusion_pytorch_model.safetensors"),
        ("train-sgr", sgr_config, "refiner/diffusion_pytorch_model.safetensors"),
    ],
    ids=["lsdm", "sgr"],
)
def test_two_processes_agree_write_once_and_resume_exactly(command, make_config, final_weights, shards, vae_dir,
                                                          tmp_path):  # fmt: skip
    run = tmp_path / "run"
    report = launch(command, make_config(run, shards, vae_dir))
    assert report["steps"] == 4
    digests = report["weights_sha256_per_process"]
    assert len(digests) == PROCESSES and len(set(digests)) == 1  # the replicas never drifted apart
    assert_written_once(run)
    if command == "train-sgr":  # the step that crashed DDP before: some micro-batches had no condition
        unconditioned = report["micro_batches_without_conditions_per_process"]
        assert len(unconditioned) == PROCESSES and sum(unconditioned) > 0, unconditioned
        assert sum(unconditioned) < PROCESSES * 4, "every micro-batch lost its conditions: pick another seed"

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    if (run / "latent_stats.json").is_file():
        shutil.copy(run / "latent_stats.json", resumed / "latent_stats.json")
    again = launch(command, make_config(resumed, shards, vae_dir), resume="latest")
    assert again["losses"] == report["losses"][2:]
    assert again["weights_sha256_per_process"] == digests
    assert_same_tensors(run / "checkpoints" / "checkpoint-4" / "model.safetensors",
                        resumed / "checkpoints" / "checkpoint-4" / "model.safetensors")  # fmt: skip
    assert_same_tensors(run / final_weights, resumed / final_weights)  # the EMA weights
