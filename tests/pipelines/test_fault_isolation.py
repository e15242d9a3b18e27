"""One bad image never costs a partition, and a dying annotate actor never costs the job: the
annotation job on Ray Data with an annotator registered by the test that fails on chosen images."""

import io
import os
import signal
import threading
import time

import pyarrow.parquet as pq
import pytest
from PIL import Image

from annotators.registry import REGISTRY
from hyperhuman.config import load_config
from hyperhuman.demo import packaged_photos
from pipelines.job import run_job
from pipelines.output import partitions_with_transient_failures
from shards.reader import complete_shard_urls, read_shard
from shards.validate import validate
from tests.pipelines.faulty_annotators import TARGET


@pytest.fixture
def faulty_caption(monkeypatch):
    monkeypatch.setitem(REGISTRY, "faulty-caption", TARGET)


def photo_folder(folder, captions):
    """One astronaut photo per caption, named in caption order (the job lists files sorted)."""
    folder.mkdir()
    buffer = io.BytesIO()
    Image.fromarray(packaged_photos()["astronaut"]).resize((256, 256)).save(buffer, format="JPEG")
    for index, caption in enumerate(captions):
        (folder / f"{index:02d}.jpg").write_bytes(buffer.getvalue())
        (folder / f"{index:02d}.txt").write_text(caption)
    return folder


def job_config(partition_size, **annotate):
    config = load_config("annotate/offline")
    config["filters"].update({"min_side": 64, "min_person_area": 0.0})
    config["annotators"]["caption"] = {"name": "faulty-caption", "options": {"pid_file": annotate.pop("pid_file", "")}}
    config["ray"]["annotate"].update(annotate)
    config["partition_size"] = partition_size
    return config


def rows_by_caption(output):
    rows = [row for path in sorted(output.glob("*.parquet")) for row in pq.read_table(path).to_pylist()]
    assert len({row["key"] for row in rows}) == len(rows)  # nothing duplicated
    return rows


def test_an_annotator_raising_on_one_image_fails_only_that_image(faulty_caption, tmp_path, ray_session):
    folder = photo_folder(tmp_path / "photos", ["fine", "raise", "fine too"])
    output = tmp_path / "out"
    report = run_job(str(folder), str(output), job_config(partition_size=3))
    assert validate(str(output)) == []
    rows = {row["caption"]: row for row in rows_by_caption(output)}
    assert rows["raise"]["status"] == "failed"
    assert rows["raise"]["reason"] == "annotator 'faulty-caption' raised ValueError: this image cannot be captioned"
    assert rows["fine"]["status"] == rows["fine too"]["status"] == "ok"
    assert report["counts"] == {"ok": 2, "rejected": 0, "failed": 1}
    kept = [sample["txt"] for url in complete_shard_urls(str(output)) for sample in read_shard(url)]
    assert kept == ["fine", "fine too"]
    assert partitions_with_transient_failures(str(output), {}) == set()  # a bad image is final


def test_an_actor_killed_mid_partition_is_restarted_and_nothing_is_lost(faulty_caption, tmp_path, ray_session):
    """The annotate actor blocks on one image of partition 0 (partition 1 queued behind it on the
    same actor); the test SIGKILLs exactly that process; Ray restarts it and redoes both."""
    folder = photo_folder(tmp_path / "photos", ["a", "block", "c", "d"])
    pid_file = tmp_path / "blocked.pid"
    killed = []

    def kill_the_blocked_actor():
        deadline = time.monotonic() + 150
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_file.exists():
            pid = int(pid_file.read_text())
            assert pid != os.getpid()
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_the_blocked_actor, daemon=True)
    killer.start()
    output = tmp_path / "out"
    report = run_job(str(folder), str(output), job_config(partition_size=2, pid_file=str(pid_file)))
    killer.join()
    assert killed, "the annotator never blocked"
    assert validate(str(output)) == []
    rows = rows_by_caption(output)
    assert sorted(row["caption"] for row in rows) == ["a", "block", "c", "d"]
    assert {row["status"] for row in rows} == {"ok"}
    kept = sorted(sample["txt"] for url in complete_shard_urls(str(output)) for sample in read_shard(url))
    assert kept == ["a", "block", "c", "d"]
    assert report["partitions_written_this_run"] == 2


def test_a_partition_failing_every_attempt_is_recorded_failed_after_max_retries(faulty_caption, tmp_path, ray_session):
    """Partition 0 kills its actor on every attempt, partition 1 runs out of memory on every
    attempt: after 1 + max_retries attempts their rows are failed with the reason (transient, so
    --retry-failed redoes them) and the rest of the job is written."""
    folder = photo_folder(tmp_path / "photos", ["die", "a", "memory", "b", "c", "d"])
    output = tmp_path / "out"
    report = run_job(str(folder), str(output), job_config(partition_size=2, max_retries=1))
    assert validate(str(output)) == []
    rows = {row["caption"]: row for row in rows_by_caption(output)}
    assert len(rows) == 6
    tried = "transient: annotating the partition failed 2 times (ray.annotate.max_retries=1); last: "
    for caption in ("die", "a"):
        assert rows[caption]["status"] == "failed"
        assert rows[caption]["reason"] == tried + "the annotate actor died (process killed or out of memory)"
    for caption in ("memory", "b"):
        assert rows[caption]["status"] == "failed"
        assert rows[caption]["reason"] == (
            tried + "resource error: annotator 'faulty-caption' raised MemoryError: cannot allocate 64 GiB"
        )
    assert rows["c"]["status"] == rows["d"]["status"] == "ok"
    assert report["counts"] == {"ok": 2, "rejected": 0, "failed": 4}
    assert partitions_with_transient_failures(str(output), {}) == {0, 1}


@pytest.mark.parametrize("value", ["-1", "1.5", "'2'", "true"])  # as --set writes them
def test_a_bad_retry_bound_is_refused_at_start(value):
    from hyperhuman.config import ConfigError
    from pipelines.job import check_job_config

    config = load_config("annotate/offline", [f"ray.annotate.max_retries={value}"])
    with pytest.raises(ConfigError, match="ray.annotate.max_retries must be an integer ≥ 0"):
        check_job_config(config)
