"""The annotation job end to end on Ray Data: real photos, a faulty local HTTP server, resume."""

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest
from PIL import Image

from hyperhuman.config import load_config
from hyperhuman.demo import packaged_photos
from pipelines.job import run_job
from shards.reader import complete_shard_urls, read_shard
from shards.validate import validate
from tests.annotators.planted import offline_pose_annotator

LENIENT = {"min_side": 64, "min_person_area": 0.0}


def job_config(**overrides):
    config = load_config("annotate/offline")
    config["filters"].update(LENIENT)
    config["fetch"].update({"timeout_s": 0.5, "retries": 1, "backoff_s": 0.01, "max_bytes": 200_000})
    config.update(overrides)
    return config


def all_rows(output):
    rows = []
    for path in sorted(output.glob("*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return rows


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory, shared_humans):
    folder = tmp_path_factory.mktemp("photos")
    for path in sorted((shared_humans / "images").glob("*.jpg"))[:5]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "astronaut.png").write_bytes(_png(packaged_photos()["astronaut"]))
    (folder / "astronaut.txt").write_text("an astronaut\n")
    return folder


def _png(rgb):
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_folder_job_writes_valid_annotated_shards_and_resumes(photo_folder, tmp_path, ray_session):
    output = tmp_path / "out"
    report = run_job(str(photo_folder), str(output), job_config(partition_size=2))
    assert validate(str(output)) == []
    rows = all_rows(output)
    assert len(rows) == 6 and report["partitions_written_this_run"] == 3
    kept = [sample for url in complete_shard_urls(str(output)) for sample in read_shard(url)]
    assert len(kept) == report["samples"] >= 3
    for sample in kept:
        assert {"jpg", "txt", "json", "pose.json", "depth.png", "normal.png", "mask.png"} <= set(sample)
        assert set(sample["json"]["annotations"]) == {"pose", "mask", "depth", "normal", "caption"}
    astronaut = next(s for s in kept if s["json"]["source"].endswith("astronaut.png"))
    assert astronaut["txt"] == "an astronaut"
    assert json.loads((output / "report.json").read_text())["counts"] == report["counts"]
    assert report["annotators_this_run"]["pose"]["annotator"] == offline_pose_annotator()

    # Resume: a partition without its commit record is redone; complete ones are skipped.
    keys_before = sorted(row["key"] for row in rows)
    (output / "000001_partition.json").unlink()
    again = run_job(str(photo_folder), str(output), job_config(partition_size=2))
    assert again["partitions_written_this_run"] == 1
    assert sorted(row["key"] for row in all_rows(output)) == keys_before
    assert validate(str(output)) == []

    # A different config would mix incompatible shards: refused unless --overwrite.
    with pytest.raises(ValueError, match="different settings \\(changed: \\['partition_size'\\]\\)"):
        run_job(str(photo_folder), str(output), job_config(partition_size=3))


class FaultyServer(BaseHTTPRequestHandler):
    good = b""

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/good.jpg":
            self._send(200, self.good, "image/jpeg")
        elif self.path == "/404":
            self._send(404, b"not found", "text/plain")
        elif self.path == "/500":
            self._send(500, b"oops", "text/plain")
        elif self.path == "/html.jpg":
            self._send(200, b"<html><body>not an image</body></html>", "image/jpeg")
        elif self.path == "/big.jpg":
            self._send(200, b"\xff" * 300_000, "image/jpeg")
        elif self.path == "/truncated.jpg":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.good)))
            self.end_headers()
            self.wfile.write(self.good[: len(self.good) // 3])
            self.close_connection = True
        elif self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif self.path == "/slow":
            time.sleep(1.5)
            self._send(200, self.good, "image/jpeg")

    def _send(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def faulty_server():
    buffer = io.BytesIO()
    Image.fromarray(packaged_photos()["astronaut"]).save(buffer, format="JPEG", quality=90)
    FaultyServer.good = buffer.getvalue()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FaultyServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.slow
def test_url_list_faults_become_rows_and_good_images_are_written(faulty_server, tmp_path, ray_session):
    paths = ["good.jpg", "404", "500", "html.jpg", "big.jpg", "truncated.jpg", "loop", "slow"]
    urls = [f"{faulty_server}/{path}" for path in paths] + ["ftp://127.0.0.1/x.jpg", "file:///etc/hostname"]
    url_list = tmp_path / "urls.csv"
    url_list.write_text("url,caption,license\n" + "".join(f"{url},caption {i},cc-by\n" for i, url in enumerate(urls)))
    output = tmp_path / "out"
    report = run_job(str(url_list), str(output), job_config(partition_size=5))
    assert validate(str(output)) == []
    reasons = {row["source"].rsplit("/", 1)[-1]: (row["status"], row["reason"]) for row in all_rows(output)}
    assert reasons["good.jpg"] == ("ok", "")
    assert reasons["404"] == ("failed", "HTTP 404")
    assert reasons["500"] == ("failed", "transient: HTTP 500")
    assert reasons["html.jpg"][0] == "failed" and "not a readable image" in reasons["html.jpg"][1]
    assert reasons["big.jpg"] == ("failed", "body larger than max_bytes=200000")
    assert reasons["truncated.jpg"][1].startswith("transient: ")
    assert reasons["loop"] == ("failed", "too many redirects")
    assert reasons["slow"][1].startswith("transient: ")
    assert reasons["x.jpg"] == ("failed", "unsupported URL scheme 'ftp': only http and https are fetched")
    assert reasons["hostname"][1].startswith("unsupported URL scheme 'file'")
    assert report["counts"] == {"ok": 1, "rejected": 0, "failed": 9}
    sample = next(read_shard(complete_shard_urls(str(output))[0]))
    assert sample["txt"] == "caption 0" and sample["json"]["extra"] == {"license": "cc-by"}
    assert sample["jpg"].shape == (512, 512, 3)


def kill_session(session_id: int) -> None:
    """SIGKILL every process of a session this test started (the job and its Ray processes)."""
    import os
    import signal

    import psutil

    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session_id:
                os.kill(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue


@pytest.mark.slow
def test_job_killed_partway_resumes_to_exactly_the_uninterrupted_keys(photo_folder, tmp_path, ray_session):
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    reference = tmp_path / "reference"
    run_job(str(photo_folder), str(reference), job_config(partition_size=1))
    reference_keys = sorted(row["key"] for row in all_rows(reference))

    killed = tmp_path / "killed"
    command = [
        str(Path(sys.executable).parent / "hyperhuman"), "annotate", str(photo_folder), str(killed),
        "--set", "partition_size=1", "--set", "filters.min_side=64", "--set", "filters.min_person_area=0.0",
        # job_config's fetch settings: they are part of the job's fingerprint, so the resume below must match
        "--set", "fetch.timeout_s=0.5", "--set", "fetch.retries=1", "--set", "fetch.backoff_s=0.01",
        "--set", "fetch.max_bytes=200000",
    ]  # fmt: skip
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while len(list(killed.glob("*_partition.json"))) < 2 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert process.poll() is None, "the job finished before it could be killed"
    finally:
        kill_session(process.pid)
        process.wait()
    written = len(list(killed.glob("*_partition.json")))
    assert 2 <= written < 6
    for tar in killed.glob("*.tar"):  # anything under a final name is a complete tar
        with tarfile.open(tar) as archive:
            archive.getmembers()

    report = run_job(str(photo_folder), str(killed), job_config(partition_size=1))
    assert report["partitions_written_this_run"] == 6 - written
    assert sorted(row["key"] for row in all_rows(killed)) == reference_keys
    assert validate(str(killed)) == []


@pytest.fixture
def s3_bucket():
    """A loopback S3 server (moto in server mode) with an empty bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    credentials = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
    boto3.client("s3", endpoint_url=endpoint, **credentials).create_bucket(Bucket="humanverse")
    yield {
        "endpoint_url": endpoint,
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
    }
    server.stop()


@pytest.mark.slow
def test_job_writes_to_s3_and_shards_read_back(photo_folder, s3_bucket, tmp_path, ray_session):
    import fsspec

    from shards.reader import read_shard

    config = job_config(partition_size=3)
    config["writer"]["storage_options"] = s3_bucket
    report = run_job(str(photo_folder), "s3://humanverse/run1", config)
    fs = fsspec.filesystem("s3", **s3_bucket)
    names = sorted(path.rsplit("/", 1)[-1] for path in fs.ls("humanverse/run1"))
    assert "manifest.json" in names and "report.json" in names and "000000_partition.json" in names
    assert not [name for name in names if ".tmp-" in name]
    assert validate("s3://humanverse/run1", storage_options=s3_bucket) == []
    samples = list(read_shard("s3://humanverse/run1/000000-0000.tar", storage_options=s3_bucket))
    assert len(samples) == json.loads(fs.cat_file("humanverse/run1/000000_partition.json"))["samples"]
    assert report["counts"]["ok"] + report["counts"]["rejected"] + report["counts"]["failed"] == 6


@pytest.mark.slow
def test_job_reads_sources_from_s3(photo_folder, s3_bucket, tmp_path, ray_session):
    """A folder and our own shards on an S3-compatible store (custom endpoint) as sources."""
    import fsspec

    fs = fsspec.filesystem("s3", **s3_bucket)
    for path in sorted(photo_folder.iterdir()):
        fs.pipe_file(f"humanverse/photos/{path.name}", path.read_bytes())
    config = job_config(partition_size=3)
    config["source"]["storage_options"] = s3_bucket
    config["writer"]["storage_options"] = s3_bucket
    first = run_job("s3://humanverse/photos", "s3://humanverse/from-folder", config)
    assert first["counts"]["failed"] == 0, first
    rows = [
        row
        for path in sorted(fs.glob("humanverse/from-folder/*.parquet"))
        for row in pq.read_table(fs.open(path, "rb")).to_pylist()
    ]
    assert sorted(row["source"].rsplit("/", 1)[-1] for row in rows) == sorted(
        p.name for p in photo_folder.glob("*.*") if p.suffix != ".txt"
    )
    assert {row["caption"] for row in rows if row["source"].endswith("astronaut.png")} == {"an astronaut"}

    config["writer"]["storage_options"] = {}
    second = run_job("s3://humanverse/from-folder/000000-0000.tar", str(tmp_path / "again"), config)
    kept = sorted(row["key"] for row in rows if row["status"] == "ok" and row["key"].startswith("000000"))
    assert kept
    assert sorted(row["key"] for row in all_rows(tmp_path / "again") if row["status"] == "ok") == kept
    assert second["counts"]["failed"] == 0


class FlakyServer(BaseHTTPRequestHandler):
    """Serves the photo, or HTTP 503 while ``failing`` is set; /404 is always gone."""

    failing = True
    good = b""

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/404":
            status, body = 404, b"gone"
        else:
            status, body = (503, b"busy") if FlakyServer.failing else (200, FlakyServer.good)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.slow
def test_retry_failed_redoes_only_transient_failures(tmp_path, ray_session):
    buffer = io.BytesIO()
    Image.fromarray(packaged_photos()["astronaut"]).save(buffer, format="JPEG")
    FlakyServer.good, FlakyServer.failing = buffer.getvalue(), True
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url_list = tmp_path / "urls.jsonl"
        base = f"http://127.0.0.1:{server.server_address[1]}"
        url_list.write_text(f'{{"url": "{base}/a.jpg", "caption": "flaky"}}\n{{"url": "{base}/404", "caption": "x"}}\n')
        output = tmp_path / "out"
        first = run_job(str(url_list), str(output), job_config(partition_size=1))
        assert first["counts"] == {"ok": 0, "rejected": 0, "failed": 2}
        FlakyServer.failing = False
        assert run_job(str(url_list), str(output), job_config(partition_size=1))["partitions_written_this_run"] == 0
        retried = run_job(str(url_list), str(output), job_config(partition_size=1), retry_failed=True)
        assert retried["partitions_written_this_run"] == 1  # the 503 partition; the 404 one is final
        assert retried["counts"] == {"ok": 1, "rejected": 0, "failed": 1}
        assert validate(str(output)) == []
    finally:
        server.shutdown()


@pytest.mark.slow
def test_reannotating_our_own_shards_keeps_keys(tmp_path, ray_session):
    from shards import ShardWriter
    from shards.testing import make_sample

    source = tmp_path / "source"
    photo = packaged_photos()["astronaut"]
    with ShardWriter(str(source), 0) as writer:
        for key in ("keep_me-1", "keep_me-2"):
            sample = make_sample(key, height=512, width=512)
            sample.image, sample.caption = photo, f"caption of {key}"
            writer.write(sample)
    output = tmp_path / "out"
    run_job(str(source / "000000-0000.tar"), str(output), job_config(partition_size=5))
    samples = list(read_shard(complete_shard_urls(str(output))[0]))
    assert [s["__key__"] for s in samples] == ["keep_me-1", "keep_me-2"]
    assert samples[0]["txt"] == "caption of keep_me-1"
    assert samples[0]["json"]["annotations"]["pose"]["annotator"] == offline_pose_annotator()


@pytest.mark.slow
def test_bad_and_odd_images_through_the_whole_job(tmp_path, ray_session):
    """Every input of the decode tests, as files in a folder: the job completes, each bad one is
    a failed row with a reason, each decodable one is kept or rejected by a filter rule."""
    from tests.pipelines.test_fetch_decode import BAD, GOOD

    folder = tmp_path / "inputs"
    folder.mkdir()
    names = {}
    for index, (label, data) in enumerate([*BAD.items(), *((label, data) for label, (data, _) in GOOD.items())]):
        path = folder / f"{index:02d}.jpg"  # every file claims to be a JPEG
        path.write_bytes(data)
        names[path.name] = label
    output = tmp_path / "out"
    config = job_config(partition_size=8)
    config["filters"]["min_side"] = 1
    report = run_job(str(folder), str(output), config)
    assert validate(str(output)) == []
    rows = {row["source"].rsplit("/", 1)[-1]: row for row in all_rows(output)}
    assert len(rows) == len(BAD) + len(GOOD) == sum(report["counts"].values())
    for name, label in names.items():
        row = rows[name]
        if label in BAD:
            assert row["status"] == "failed" and row["reason"], label
        else:
            assert row["status"] in ("ok", "rejected") and (row["status"] == "ok" or row["reason"]), label
