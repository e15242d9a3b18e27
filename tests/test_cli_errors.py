"""How the console script ends when the user, not the code, stops it: a reader that closes the pipe
early (``| head``), Ctrl-C, malformed YAML, a path that is not what the command needs. Each is one
line on stderr and a shell-style exit status, never a traceback. Run as real processes, since the
interpreter's exit (its final flush of stdout, its signal handling) is part of what is tested."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import hyperhuman.cli
from hyperhuman.cli import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, main

CONSOLE_SCRIPT = Path(sys.executable).parent / "hyperhuman"
HYPERHUMAN = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.is_file() else [sys.executable, "-m", "hyperhuman"]

# Long keys (tar member names stay under ustar's 100 characters), so the --json report of a small
# dataset outgrows a pipe's buffer (64 KiB on Linux): the writer then blocks on a full pipe and is
# still writing when the reader closes it, whatever the timing.
KEY_PREFIX = "k" * 80
SAMPLES = 1100


@pytest.fixture(scope="module")
def long_keys_dataset(tmp_path_factory) -> Path:
    from shards import ShardWriter, write_manifest
    from shards.testing import make_sample

    root = tmp_path_factory.mktemp("long_keys")
    with ShardWriter(str(root), 0) as writer:
        for index in range(SAMPLES):
            writer.write(make_sample(f"{KEY_PREFIX}{index:04d}", height=8, width=8, seed=index, people=1))
    write_manifest(str(root))
    return root


def test_a_reader_that_closes_the_pipe_early_gets_exit_141_and_no_traceback(long_keys_dataset):
    from shards.validate import inspect

    command = [
        *HYPERHUMAN,
        "shards",
        "inspect",
        "--json",
        str(long_keys_dataset),
        "--set",
        f"inspect.max_keys={SAMPLES}",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    report_bytes = len(json.dumps(inspect(str(long_keys_dataset), max_keys=SAMPLES), indent=2))
    assert report_bytes > 96 * 1024  # 1.5 times the pipe's buffer, see KEY_PREFIX
    assert process.stdout.read(10) == b'{\n  "root"'
    process.stdout.close()  # like `head -c 10`
    _, stderr = process.communicate(timeout=60)
    text = stderr.decode()
    assert "Traceback" not in text and "Exception ignored" not in text, text
    assert process.returncode == EXIT_BROKEN_PIPE, text


# A child that runs `hyperhuman annotate` with the job replaced by a long sleep: it says when it is
# inside the command, so the signal arrives there and not during start-up.
SLOW_ANNOTATE = """
import signal, sys, time
import hyperhuman.cli

# A shell starts background jobs with SIGINT ignored, and Python keeps it so; a terminal's Ctrl-C
# reaches a foreground command with the default handler, as here.
signal.signal(signal.SIGINT, signal.default_int_handler)

def long_job(args):
    print("running", flush=True)
    time.sleep(60)

hyperhuman.cli._annotate = long_job
sys.exit(hyperhuman.cli.main(["annotate", "photos", "shards"]))
"""


def test_ctrl_c_is_one_line_saying_how_to_resume_and_exit_130():
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_ANNOTATE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline() == "running\n"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert stderr == "hyperhuman annotate: interrupted; rerun the same command to resume (completed work is kept)\n"
    assert process.returncode == EXIT_INTERRUPTED


def test_ctrl_c_in_training_points_at_resume_latest(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(hyperhuman.cli, "_train_lsdm", interrupted)
    assert main(["train-lsdm"]) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == (
        "hyperhuman train-lsdm: interrupted; rerun it with --resume latest to continue from the last checkpoint\n"
    )


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*HYPERHUMAN, *args], capture_output=True, text=True, timeout=60)


def test_malformed_yaml_in_set_is_one_line_naming_the_override(tmp_path):
    result = run("shards", "validate", str(tmp_path), "--set", "inspect={max_keys: 1")
    assert result.returncode == 1
    assert result.stderr.startswith(
        "hyperhuman shards: error: override 'inspect={max_keys: 1': the value is not valid YAML: "
    )
    assert "line 1" in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_malformed_yaml_in_a_config_file_is_one_line_naming_the_file_and_line(tmp_path):
    config = tmp_path / "shards.yaml"
    config.write_text("writer: {max_samples: 10}\npack: {partition: 0}\nvalidate: decode: true\n")
    result = run("shards", "validate", str(tmp_path), "--config", str(config))
    assert result.returncode == 1
    assert result.stderr == (
        f"hyperhuman shards: error: config file {config} is not valid YAML: mapping values are not allowed here "
        "at line 3, column 17; fix it there\n"
    )


@pytest.mark.parametrize(
    "error",
    [
        PermissionError(13, "Permission denied", "/data/shards"),
        IsADirectoryError(21, "Is a directory", "/data/shards/000000.tar"),
        NotADirectoryError(20, "Not a directory", "/data/file.txt/shards"),
        FileExistsError(17, "File exists", "/data/shards"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_a_path_that_is_not_what_the_command_needs_is_one_line(error, monkeypatch, capsys):
    def fails(args):
        raise error

    monkeypatch.setattr(hyperhuman.cli, "_shards_inspect", fails)
    assert main(["shards", "inspect", "/data/shards"]) == 1
    assert capsys.readouterr().err == f"hyperhuman shards: error: {error.strerror}: {error.filename}\n"
