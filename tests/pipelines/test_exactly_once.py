"""Exactly-once under every rewrite, on the real job (Ray Data, real processes): a writer killed
mid-rewrite, a second job on a locked output, a changed listing, --overwrite with another
partition_size. Packaged photos only: these run in a fresh clone without ../shared."""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from hyperhuman.config import ConfigError, load_config
from hyperhuman.demo import packaged_photos
from pipelines.job import run_job
from pipelines.lock import LOCK_NAME, OutputLock, OutputLocked
from shards.commit import FAULT_ENV, FAULT_LOG_ENV, FAULT_ONCE_ENV, read_records
from shards.reader import complete_shard_urls, read_shard
from shards.validate import validate


def photo_folder(folder, count):
    folder.mkdir()
    buffer = io.BytesIO()
    Image.fromarray(packaged_photos()["astronaut"]).resize((224, 224)).save(buffer, format="JPEG")
    for index in range(count):
        (folder / f"{index:02d}.jpg").write_bytes(buffer.getvalue())
        (folder / f"{index:02d}.txt").write_text(f"photo {index}")
    return folder


def job_config(partition_size):
    config = load_config("annotate/offline")
    config["filters"].update({"min_side": 64, "min_person_area": 0.0})
    config["partition_size"] = partition_size
    return config


def committed_rows(output):
    """Every parquet row of the committed parts; asserts each source appears once."""
    fs, root = LocalFileSystem(), str(output)
    rows = []
    for record in read_records(fs, root).values():
        for part in record["parts"]:
            rows += pq.read_table(output / f"{part['shard']}.parquet").to_pylist()
    sources = [row["source"] for row in rows]
    assert len(sources) == len(set(sources)), "a source was written twice"
    return rows


def kept_captions(output):
    return sorted(sample["txt"] for url in complete_shard_urls(str(output)) for sample in read_shard(url))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return photo_folder(tmp_path_factory.mktemp("exactly-once") / "photos", 4)


@pytest.fixture
def written(photos, tmp_path, ray_session):
    """A complete output of the four photos in two partitions."""
    output = tmp_path / "out"
    run_job(str(photos), str(output), job_config(partition_size=2))
    assert validate(str(output)) == []
    return output


@pytest.mark.slow
def test_rewrite_killed_once_after_the_record_swap_is_retried_within_the_job(photos, written, tmp_path, monkeypatch):
    """The write task of partition 1 is SIGKILLed after its new record is in place but before the
    old parts are removed; Ray retries the task, and the job ends with one generation, valid."""
    monkeypatch.setenv(FAULT_ENV, "record_swapped:1")
    monkeypatch.setenv(FAULT_ONCE_ENV, str(tmp_path / "fired"))
    run_job(str(photos), str(written), job_config(partition_size=2), overwrite=True)
    assert (tmp_path / "fired").exists(), "the fault never fired"
    assert validate(str(written)) == []
    assert len(committed_rows(written)) == 4 and kept_captions(written) == [f"photo {i}" for i in range(4)]
    records = read_records(LocalFileSystem(), str(written))
    assert sorted(records) == [0, 1] and records[1]["generation"] >= 1


@pytest.mark.slow
@pytest.mark.parametrize("point", ["parts_written", "record_staged"])
def test_job_killed_mid_rewrite_keeps_the_old_partition_and_the_next_run_completes(photos, written, tmp_path, point):
    """A real ``hyperhuman annotate --overwrite`` process whose writer of partition 0 dies at
    ``point`` (every attempt: Ray retries it without end) is SIGKILLed with all its Ray processes
    once the fault has fired: partition 0 stays the old complete one (leftovers aside), the lock
    is stale, and the next run takes it over and leaves a valid output with every input once."""
    from tests.pipelines.test_job import kill_session

    before = kept_captions(written)
    fired = tmp_path / "fired.log"
    command = [
        str(Path(sys.executable).parent / "hyperhuman"), "annotate", str(photos), str(written), "--overwrite",
        "--set", "partition_size=2", "--set", "filters.min_side=64", "--set", "filters.min_person_area=0.0",
    ]  # fmt: skip
    env = {**os.environ, FAULT_ENV: f"{point}:0", FAULT_LOG_ENV: str(fired)}
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not fired.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        assert fired.exists(), f"the fault never fired (exit {process.poll()})"
    finally:
        kill_session(process.pid)
        process.wait()
    assert kept_captions(written) == before and len(committed_rows(written)) == 4
    assert read_records(LocalFileSystem(), str(written))[0]["generation"] == 0  # the old one
    # What validate finds: the leftovers, and a manifest the killed job did not get to rebuild.
    problems = validate(str(written))
    assert all("interrupted" in p.message or p.shard == "manifest.json" for p in problems), problems
    assert (written / LOCK_NAME).exists()  # the killed job's lease, stale now

    run_job(str(photos), str(written), job_config(partition_size=2))
    assert validate(str(written)) == [] and kept_captions(written) == before
    assert len(committed_rows(written)) == 4 and not (written / LOCK_NAME).exists()


def test_a_second_job_on_a_locked_output_is_refused(photos, tmp_path, ray_session):
    output = tmp_path / "out"
    with OutputLock(str(output)):
        with pytest.raises(OutputLocked, match="being written by another job .*pid"):
            run_job(str(photos), str(output), job_config(partition_size=2))
    assert not list(output.glob("*.tar")) and not (output / "job.json").exists()


def test_a_stale_lock_is_taken_over_with_a_message(photos, tmp_path, ray_session, capsys):
    output = tmp_path / "out"
    output.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease = {"host": __import__("socket").gethostname(), "pid": int(gone.stdout), "started": 0, "refreshed": 0}
    (output / LOCK_NAME).write_text(json.dumps({**lease, "token": "old"}))
    run_job(str(photos), str(output), job_config(partition_size=4))
    assert "taking over the stale lock" in capsys.readouterr().err
    assert validate(str(output)) == [] and not (output / LOCK_NAME).exists()


def test_a_changed_listing_is_refused_until_overwrite(photos, tmp_path, ray_session):
    folder = photo_folder(tmp_path / "more", 2)
    output = tmp_path / "out"
    run_job(str(folder), str(output), job_config(partition_size=1))
    (folder / "02.jpg").write_bytes((photos / "00.jpg").read_bytes())
    with pytest.raises(ConfigError, match=r"source listing changed .*3 inputs now, 2 then.*--overwrite"):
        run_job(str(folder), str(output), job_config(partition_size=1))
    run_job(str(folder), str(output), job_config(partition_size=1), overwrite=True)
    assert len(committed_rows(output)) == 3 and validate(str(output)) == []


@pytest.mark.parametrize("first, second", [(1, 4), (4, 1)])
def test_overwrite_with_another_partition_size_leaves_no_duplicates(photos, tmp_path, ray_session, first, second):
    output = tmp_path / "out"
    run_job(str(photos), str(output), job_config(partition_size=first))
    run_job(str(photos), str(output), job_config(partition_size=second), overwrite=True)
    assert len(committed_rows(output)) == 4 and validate(str(output)) == []
    assert sorted(read_records(LocalFileSystem(), str(output))) == list(range(4 // second))
    assert kept_captions(output) == [f"photo {i}" for i in range(4)]


def test_plan_only_writes_the_plan_and_fetches_nothing(tmp_path, ray_session, capsys):
    from hyperhuman.cli import main

    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\n" + "".join(f"http://127.0.0.1:9/{i}.jpg,photo {i}\n" for i in range(25)))
    output = tmp_path / "out"
    assert main(["annotate", str(urls), str(output), "--plan-only", "--set", "partition_size=10"]) == 0
    plan = json.loads((output / "plan.json").read_text())
    assert (plan["inputs"], plan["partitions"], plan["kind"]) == (25, 3, "url_list")
    assert [d["segments"][0]["count"] for d in plan["descriptors"]] == [10, 10, 5]
    assert sorted(path.name for path in output.iterdir()) == ["plan.json"]  # no job.json, no lock, no shards
    assert "planned 25 inputs in 3 partitions" in capsys.readouterr().out


def test_every_tar_sample_ends_as_exactly_one_row(tmp_path, ray_session):
    import tarfile

    photo = (photo_folder(tmp_path / "photo", 1) / "00.jpg").read_bytes()
    members = {
        "good.jpg": photo, "good.txt": b"kept as is",
        "img.v2.jpg": photo,  # a dot in the key: re-keyed, not dropped
        "a/x.jpg": photo, "b/x.jpg": photo,  # one basename in two folders: two samples
        "with space.jpg": photo,
        "orphan.txt": b"a caption without an image",
    }  # fmt: skip
    tars = tmp_path / "tars"
    tars.mkdir()
    with tarfile.open(tars / "000.tar", "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    output = tmp_path / "out"
    run_job(str(tars), str(output), job_config(partition_size=100))
    assert validate(str(output)) == []
    rows = {row["source"].rsplit("#", 1)[1]: row for row in committed_rows(output)}
    assert sorted(rows) == ["a/x", "b/x", "good", "img.v2", "orphan", "with space"]
    assert rows["good"]["key"] == "good" and rows["img.v2"]["key"] == "t000000s0000001"
    assert rows["orphan"]["status"] == "failed" and rows["orphan"]["rule"] == "no_image"
