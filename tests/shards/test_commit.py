"""A rewrite of a committed partition killed (SIGKILL, a real process) at each of the writer's
fault-injection points leaves either the old complete partition or the new one, never a mix."""

import os
import subprocess
import sys
import textwrap

import pytest
from fsspec.implementations.local import LocalFileSystem

from shards import ShardWriter, write_manifest
from shards.commit import FAULT_ENV, FAULT_POINTS, read_record, remove_leftovers
from shards.reader import complete_shard_urls, read_shard
from shards.testing import make_sample
from shards.validate import validate

from ..conftest import REPO_ROOT

KEYS = [f"k{index}" for index in range(5)]
REWRITE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    from shards import ShardWriter
    from shards.testing import make_sample
    with ShardWriter({output!r}, 5, max_samples=2, job="second") as writer:
        for index, key in enumerate({keys!r}):
            writer.write(make_sample(key, seed=100 + index))
    """
)


def write_first(output):
    with ShardWriter(str(output), 5, max_samples=2, job="first") as writer:
        for index, key in enumerate(KEYS):
            writer.write(make_sample(key, seed=index))


def committed(output):
    """(the record's job, keys of the committed parts, which run wrote the committed samples)."""
    record = read_record(LocalFileSystem(), str(output), 5)
    samples = [sample for url in complete_shard_urls(str(output)) for sample in read_shard(url, decode=False)]
    images = [sample["jpg"] for sample in samples]
    runs = {run: [_image(key, seed + index) for index, key in enumerate(KEYS)] for run, seed in RUNS.items()}
    wrote = next((run for run, expected in runs.items() if images == expected), "a mix of runs")
    return record["job"], [sample["__key__"] for sample in samples], wrote


RUNS = {"first": 0, "second": 100}  # the seeds each run draws its samples from


def _image(key, seed):
    from shards.sample import encode_sample

    return encode_sample(make_sample(key, seed=seed))["jpg"]


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_rewrite_killed_at_each_point_leaves_one_complete_generation(tmp_path, point):
    output = tmp_path / "out"
    write_first(output)
    script = REWRITE.format(repo=str(REPO_ROOT), output=str(output), keys=KEYS)
    killed = subprocess.run([sys.executable, "-c", script], env={**os.environ, FAULT_ENV: point}, timeout=120)
    assert killed.returncode == -9  # SIGKILL, at the point

    job, keys, samples_from = committed(output)
    assert keys == KEYS  # every key exactly once
    assert (job, samples_from) == (("second", "second") if point == "record_swapped" else ("first", "first"))
    write_manifest(str(output))
    problems = validate(str(output))
    assert problems and all("interrupted" in problem.message for problem in problems)  # leftovers only

    # The next job (holding the output's lock) removes the leftovers; the output is valid.
    assert remove_leftovers(LocalFileSystem(), str(output))
    write_manifest(str(output))
    assert validate(str(output)) == []
    # And a rewrite after the crash completes as usual.
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert committed(output) == ("second", KEYS, "second")
    write_manifest(str(output))
    assert validate(str(output)) == []


def test_fault_point_can_target_one_partition(tmp_path):
    output = tmp_path / "out"
    write_first(output)
    script = REWRITE.format(repo=str(REPO_ROOT), output=str(output), keys=KEYS)
    subprocess.run([sys.executable, "-c", script], env={**os.environ, FAULT_ENV: "parts_written:4"}, check=True)
    assert committed(output) == ("second", KEYS, "second")  # partition 5 is not the target
