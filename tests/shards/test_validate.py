"""validate catches each planted fault, and names its shard and key."""

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hyperhuman.cli import main
from shards import ShardWriter, write_manifest
from shards.codecs import encode_mask
from shards.validate import validate


@pytest.fixture
def dataset(tmp_path, sample_factory) -> Path:
    with ShardWriter(str(tmp_path), 0) as writer:
        for index in range(3):
            writer.write(sample_factory(f"k{index}", seed=index))
        writer.reject("k-bad", "no person found")
    write_manifest(str(tmp_path))
    assert validate(str(tmp_path)) == []
    return tmp_path


def rewrite_tar(path: Path, edit) -> None:
    """Rewrite a tar's members through ``edit(list of (name, bytes)) -> list``."""
    with tarfile.open(path) as archive:
        members = [(m.name, archive.extractfile(m).read()) for m in archive.getmembers()]
    with tarfile.open(path, "w") as archive:
        for name, data in edit(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def messages(root: Path) -> list[str]:
    return [str(problem) for problem in validate(str(root))]


def test_truncated_tar(dataset):
    tar = dataset / "000000-0000.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    assert any(m.startswith("000000-0000: tar is unreadable or truncated") for m in messages(dataset))


def test_missing_member(dataset):
    rewrite_tar(dataset / "000000-0000.tar", lambda ms: [(n, d) for n, d in ms if n != "k1.json"])
    assert "000000-0000 key=k1: missing required member k1.json" in messages(dataset)


def test_non_contiguous_key(dataset):
    def move_caption_to_the_end(members):
        caption = [(n, d) for n, d in members if n == "k0.txt"]
        return [(n, d) for n, d in members if n != "k0.txt"] + caption

    rewrite_tar(dataset / "000000-0000.tar", move_caption_to_the_end)
    assert "000000-0000 key=k0: members of this key are not contiguous" in messages(dataset)


def test_mismatched_modality_size(dataset):
    import numpy as np

    small_mask = encode_mask(np.zeros((10, 10), bool))
    rewrite_tar(dataset / "000000-0000.tar", lambda ms: [(n, small_mask if n == "k2.mask.png" else d) for n, d in ms])
    assert "000000-0000 key=k2: mask.png is 10x10 but the image is 64x48" in messages(dataset)


def test_keypoints_outside_image(dataset):
    def move_keypoint(members):
        out = []
        for name, data in members:
            if name == "k0.pose.json":
                pose = json.loads(data)
                pose["people"][0]["keypoints"][3] = [500.0, 10.0, 0.9]
                data = json.dumps(pose).encode()
            out.append((name, data))
        return out

    rewrite_tar(dataset / "000000-0000.tar", move_keypoint)
    assert any("key=k0: person 0 keypoints[3] at (500.0, 10.0) lies outside" in m for m in messages(dataset))


def test_stats_and_parquet_disagree(dataset):
    stats_path = dataset / "000000-0000_stats.json"
    stats = json.loads(stats_path.read_text())
    stats["counts"]["rejected"] = 0
    stats_path.write_text(json.dumps(stats))
    found = messages(dataset)
    assert any("stats counts" in m and "disagree with the parquet" in m for m in found)
    # The manifest was built from the old stats, so it disagrees too.
    assert any(m.startswith("manifest.json") and "counts" in m for m in found)


def test_parquet_missing_an_ok_row(dataset):
    table = pq.read_table(dataset / "000000-0000.parquet")
    pq.write_table(table.slice(1), dataset / "000000-0000.parquet")
    found = messages(dataset)
    assert "000000-0000 key=k0: sample is in the tar but not an 'ok' row of the parquet" in found


def test_path_traversal_member(dataset):
    rewrite_tar(dataset / "000000-0000.tar", lambda ms: ms + [("../../evil.txt", b"x")])
    assert any("'../../evil.txt' escapes its directory" in m for m in messages(dataset))


def test_incomplete_shard_and_missing_manifest(dataset):
    (dataset / "000001-0000.tar").write_bytes((dataset / "000000-0000.tar").read_bytes())
    (dataset / "manifest.json").unlink()
    found = messages(dataset)
    assert any("000001-0000: incomplete" in m for m in found)
    assert any(m.startswith("manifest.json") and "missing" in m for m in found)


def test_cli_exit_status_and_inspect(dataset, capsys):
    assert main(["shards", "validate", str(dataset)]) == 0
    assert main(["shards", "inspect", str(dataset), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert report["samples"] == 3 and report["rows"] == {"ok": 3, "rejected": 1, "failed": 0}
    assert report["annotators"]["depth: test-depth 0 (none)"] == 3
    assert report["example_keys"] == ["k0", "k1", "k2"]
    rewrite_tar(dataset / "000000-0000.tar", lambda ms: [(n, d) for n, d in ms if n != "k1.jpg"])
    assert main(["shards", "validate", str(dataset)]) == 1
    assert "000000-0000 key=k1: missing required member k1.jpg" in capsys.readouterr().out
