import json
import subprocess
import sys

import pytest

from hyperhuman.cli import build_parser, main
from hyperhuman.config import ConfigError, apply_overrides

from .conftest import REPO_ROOT


def subcommand_paths(parser, prefix=()):
    """Every command path of the CLI, e.g. ('shards', 'validate')."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from subcommand_paths(sub, prefix + (name,))


def test_every_subcommand_has_help():
    paths = list(subcommand_paths(build_parser()))
    assert ("shards", "validate") in paths and ("demo",) in paths
    for path in paths:
        with pytest.raises(SystemExit) as exit_info:
            main([*path, "--help"])
        assert exit_info.value.code == 0, path


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "hyperhuman", "--help"], capture_output=True, text=True, check=True)
    assert "shards" in result.stdout and "demo" in result.stdout


def test_overrides_parse_yaml_and_reject_unknown_keys():
    config = {"writer": {"max_samples": 10, "name": "x"}}
    assert apply_overrides(config, ["writer.max_samples=5"])["writer"]["max_samples"] == 5
    with pytest.raises(ConfigError, match="no key 'writer.max_sample'"):
        apply_overrides(config, ["writer.max_sample=5"])
    with pytest.raises(ConfigError, match="must look like"):
        apply_overrides(config, ["writer.max_samples"])


def test_exit_status_2_for_usage_1_for_configuration_and_run_time_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as usage:
        main(["shards", "validate"])  # the path is missing
    assert usage.value.code == 2
    assert main(["shards", "validate", str(tmp_path), "--set", "nope=1"]) == 1
    assert "no key 'nope'" in capsys.readouterr().err
    missing = tmp_path / "none"
    assert main(["train-lsdm", "--set", f"data.train={missing}", "--set", f"output={tmp_path / 'run'}"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("hyperhuman train-lsdm: error: ") and "no complete shards" in error
    assert "Traceback" not in error


def test_internal_errors_keep_their_traceback(monkeypatch, tmp_path):
    """A bug (here a ValueError no check meant to raise) is not turned into a one-line message."""
    import hyperhuman.cli

    def broken(args):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(hyperhuman.cli, "_shards_inspect", broken)
    with pytest.raises(ValueError, match="broadcast"):
        main(["shards", "inspect", str(tmp_path)])


def test_validate_on_an_empty_folder_fails(tmp_path, capsys):
    assert main(["shards", "validate", str(tmp_path)]) == 1
    assert "holds no shards" in capsys.readouterr().out


def test_pack_records_unreadable_images_as_failed_rows(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    source = tmp_path / "photos"
    source.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(source / "a.png")
    (source / "a.txt").write_text("a black square\n")
    (source / "b.jpg").write_bytes(b"not a jpeg")
    assert main(["shards", "pack", str(source), str(tmp_path / "out")]) == 0
    assert main(["shards", "validate", str(tmp_path / "out")]) == 0
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "out" / "000000-0000.parquet").to_pylist()
    assert [(row["status"], row["caption"]) for row in rows] == [("ok", "a black square"), ("failed", "")]
    assert "not a readable image" in rows[1]["reason"]


# The demo at reduced size: every stage, then a rerun that resumes each one instead of redoing it.
DEMO_AT_TOY_SIZE = [
    "--set", 'vae_overrides=["train.max_train_steps=4", "train.scale_samples=2", "train.eval_samples=2", '
             '"data.num_workers=0"]',
    "--set", 'lsdm_overrides=["train.max_train_steps=4", "train.checkpointing_steps=2", "validation.every=4", '
             '"validation.num_inference_steps=2", "train.batch_size=2", "model.latent_stats_batches=1", '
             '"data.num_workers=0"]',
    "--set", 'eval_overrides=["num_inference_steps=2", "batch_size=2"]',
]  # fmt: skip


@pytest.mark.slow
def test_demo_runs_every_stage_and_a_rerun_resumes(tmp_path):
    command = [str(REPO_ROOT / ".venv" / "bin" / "hyperhuman"), "demo", "--output", str(tmp_path), *DEMO_AT_TOY_SIZE]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[demo] validation OK" in result.stdout
    for path in (
        "shards/manifest.json",
        "gallery/shards/index.html",
        "vae/vae/config.json",
        "lsdm/pipeline/model_index.json",
        "eval/metrics.json",
        "eval/gallery/index.html",
    ):
        assert (tmp_path / path).is_file(), path
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["info"]["samples"] == 2 and metrics["metrics"]["pose_ap"] is not None
    assert f"generation gallery: {tmp_path / 'eval' / 'gallery' / 'index.html'}" in result.stdout

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "[demo] vae: already trained" in rerun.stdout and "[demo] lsdm: already trained" in rerun.stdout
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["info"]["generated_now"] == 0


def test_demo_fits_batches_to_a_handful_of_own_photos(capsys):
    from hyperhuman.demo import fit_batch_to_data

    config = {"train": {"batch_size": 8}, "validation": {"num_samples": 2}}
    fit_batch_to_data(config, "train.batch_size", 3)
    fit_batch_to_data(config, "validation.num_samples", 3)
    assert config == {"train": {"batch_size": 3}, "validation": {"num_samples": 2}}
    assert "train.batch_size lowered from 8 to 3: only 3 samples were kept" in capsys.readouterr().out
