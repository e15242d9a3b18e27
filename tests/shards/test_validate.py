"""validate catches each planted fault, and names its shard and key."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hyperhuman.cli import main
from shards import ShardWriter, write_manifest
from shards.codecs import encode_mask
from shards.validate import ORPHAN_MESSAGE, validate

RECORD = "000000_partition.json"


def write_partition(root: Path, partition: int, keys: list[str], sample_factory, rejected=(), **options) -> None:
    with ShardWriter(str(root), partition, **options) as writer:
        for index, key in enumerate(keys):
            writer.write(sample_factory(key, seed=index))
        for key in rejected:
            writer.reject(key, "no person found", rule="min_people")


@pytest.fixture
def dataset(tmp_path, sample_factory) -> Path:
    write_partition(tmp_path, 0, ["k0", "k1", "k2"], sample_factory, rejected=["k-bad"])
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


def replace_member(name: str, edit):
    """An ``edit`` for :func:`rewrite_tar` that rewrites the data of one member."""
    return lambda members: [(n, edit(d) if n == name else d) for n, d in members]


def edit_record(root: Path, edit, name: str = RECORD) -> None:
    path = root / name
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


def edit_parquet(path: Path, edit) -> None:
    pq.write_table(edit(pq.read_table(path)), path)


def messages(root: Path, **options) -> list[str]:
    return [str(problem) for problem in validate(str(root), **options)]


# -- tar contents ------------------------------------------------------------------------------


def test_truncated_tar(dataset):
    tar = dataset / "000000-0000.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    found = messages(dataset)
    assert any(m.startswith("000000-0000: tar is unreadable or truncated") for m in found)
    assert any(m.startswith("000000-0000: tar size in bytes 5000 ≠ ") and m.endswith(RECORD) for m in found)


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
    rewrite_tar(dataset / "000000-0000.tar", replace_member("k2.mask.png", lambda _: small_mask))
    assert "000000-0000 key=k2: mask.png is 10x10 but the image is 64x48" in messages(dataset)


def test_keypoints_outside_image(dataset):
    def move_keypoint(data):
        pose = json.loads(data)
        pose["people"][0]["keypoints"][3] = [500.0, 10.0, 0.9]
        return json.dumps(pose).encode()

    rewrite_tar(dataset / "000000-0000.tar", replace_member("k0.pose.json", move_keypoint))
    assert any("key=k0: person 0 keypoints[3] at (500.0, 10.0) lies outside" in m for m in messages(dataset))


def test_path_traversal_member(dataset):
    rewrite_tar(dataset / "000000-0000.tar", lambda ms: ms + [("../../evil.txt", b"x")])
    assert any("'../../evil.txt' escapes its directory" in m for m in messages(dataset))


@pytest.mark.parametrize("decode", [True, False])
def test_non_finite_numbers_in_json_members(dataset, decode):
    def add_nan_score(data):
        meta = json.loads(data)
        meta["scores"] = {"blur": float("nan")}
        return json.dumps(meta).encode()  # Python's json writes NaN unless allow_nan=False

    def add_infinite_score(data):
        pose = json.loads(data)
        pose["people"][0]["score"] = float("inf")
        return json.dumps(pose).encode()

    tar = dataset / "000000-0000.tar"
    rewrite_tar(tar, replace_member("k1.json", add_nan_score))
    rewrite_tar(tar, replace_member("k2.pose.json", add_infinite_score))
    found = messages(dataset, decode=decode)
    assert any(m.startswith("000000-0000 key=k1: k1.json is not strict JSON: NaN is not valid JSON") for m in found)
    assert any(m.startswith("000000-0000 key=k2: k2.pose.json is not strict JSON: Infinity") for m in found)
    assert not any("does not decode" in m for m in found)  # reported once, as not strict JSON


def test_any_json_member_is_parsed_strictly(dataset):
    rewrite_tar(dataset / "000000-0000.tar", lambda ms: ms[:7] + [("k0.extra.json", b"[-Infinity]")] + ms[7:])
    found = messages(dataset)
    assert any(m.startswith("000000-0000 key=k0: k0.extra.json is not strict JSON: -Infinity") for m in found)
    assert "000000-0000 key=k0: unexpected member k0.extra.json" in found


# -- parts against their commit record ---------------------------------------------------------


def test_tampered_tar_byte_fails_its_sha256(dataset):
    tar = dataset / "000000-0000.tar"
    data = tar.read_bytes()
    at = data.index(b"a photo k1")
    tar.write_bytes(data[:at] + b"A" + data[at + 1 :])  # same size, still a readable tar
    found = messages(dataset)
    assert len(found) == 1 and found[0].startswith("000000-0000: tar sha256 ") and found[0].endswith(RECORD), found


def test_grown_tar_and_parquet_fail_their_sizes(dataset):
    with open(dataset / "000000-0000.tar", "ab") as handle:
        handle.write(bytes(10240))  # more end-of-archive blocks: the tar still reads
    edit_parquet(dataset / "000000-0000.parquet", lambda table: table.replace_schema_metadata({"x": "y"}))
    found = messages(dataset)
    assert any(m.startswith("000000-0000: tar size in bytes ") for m in found)
    assert any(m.startswith("000000-0000: tar sha256 ") for m in found)
    assert any(m.startswith("000000-0000: parquet size in bytes ") for m in found)
    assert any(m.startswith("000000-0000: parquet sha256 ") for m in found)


@pytest.mark.parametrize("extension", ["tar", "parquet"])
def test_deleted_part_file(dataset, extension):
    (dataset / f"000000-0000.{extension}").unlink()
    assert f"000000-0000: {extension} is missing; {RECORD} names it" in messages(dataset)


def test_record_counts_disagree_with_the_parquet(dataset):
    def no_rejected(record):
        record["parts"][0]["counts"]["rejected"] = 0

    edit_record(dataset, no_rejected)
    found = messages(dataset)
    assert (
        "000000-0000: status counts in the parquet {'ok': 3, 'rejected': 1, 'failed': 0} "
        f"≠ {{'failed': 0, 'ok': 3, 'rejected': 0}} in {RECORD}"
    ) in found
    assert any(m.startswith(f"{RECORD}: record counts ") and "summed over its parts" in m for m in found)
    # The manifest was built from the old record, so it disagrees too.
    assert any(m.startswith("manifest.json: 000000-0000 counts") for m in found)


def test_record_samples_and_rows_disagree(dataset):
    def miscount(record):
        record["parts"][0]["samples"] = 4
        record["parts"][0]["rows"] = 5
        record["samples"] = 4
        record["rows"] = 5

    edit_record(dataset, miscount)
    found = messages(dataset)
    assert f"000000-0000: samples in the tar 3 ≠ 4 in {RECORD}" in found
    assert f"000000-0000: rows in the parquet 4 ≠ 5 in {RECORD}" in found
    edit_record(dataset, lambda record: record.update(samples=9))
    assert f"{RECORD}: record samples 9 ≠ 4 summed over its parts" in messages(dataset)


def test_record_partition_differs_from_its_file_name(dataset):
    edit_record(dataset, lambda record: record.update(partition=7))
    assert f"{RECORD}: record partition 7 differs from the file name's 0" in messages(dataset)


def test_record_with_a_gap_in_part_numbers(tmp_path, sample_factory):
    write_partition(tmp_path, 0, ["k0", "k1", "k2"], sample_factory, max_samples=1)
    write_manifest(str(tmp_path))
    assert validate(str(tmp_path)) == []

    def drop_the_middle_part(record):
        del record["parts"][1]

    edit_record(tmp_path, drop_the_middle_part)
    found = messages(tmp_path)
    assert f"{RECORD}: parts are numbered [0, 2]; a partition's parts are 0..1 in order (missing [1])" in found
    assert f"000000-0001.tar: {ORPHAN_MESSAGE}" in found


def test_part_named_for_another_generation(dataset):
    edit_record(dataset, lambda record: record.update(generation=1))
    assert (
        f"{RECORD}: part '000000-0000' is not named after partition 0, part 0 and generation 1 "
        "(expected '000000-0000-g1')"
    ) in messages(dataset)


def test_record_naming_a_file_outside_the_output(dataset):
    edit_record(dataset, lambda record: record["parts"][0].update(shard="../000000-0000"))
    found = messages(dataset)
    expected = f"{RECORD}: part '../000000-0000' is not named after partition 0, part 0 and generation 0"
    assert any(m.startswith(expected) for m in found)
    assert f"000000-0000.tar: {ORPHAN_MESSAGE}" in found
    assert not any("is missing" in m for m in found)  # its files are not looked for


@pytest.mark.parametrize("text", ["{", '{"parts": [], "samples": NaN}', "[]", '{"parts": []}'])
def test_unreadable_record(dataset, text):
    (dataset / RECORD).write_text(text)
    found = messages(dataset)
    assert any(m.startswith(f"{RECORD}: commit record ") for m in found)
    assert any("holds no shards" in m for m in found)
    assert f"000000-0000.tar: {ORPHAN_MESSAGE}" in found  # no trusted record names it


def test_record_with_mistyped_fields(dataset):
    edit_record(dataset, lambda record: record["parts"][0].update(tar_bytes="1024"))
    assert any(
        m.startswith(f"{RECORD}: commit record parts[0] has fields of the wrong type: tar_bytes")
        for m in messages(dataset)
    )


# -- leftovers and duplicates ------------------------------------------------------------------


def test_orphan_and_temporary_files(dataset):
    for extension in ("tar", "parquet"):
        shutil.copy(dataset / f"000000-0000.{extension}", dataset / f"000000-0000-g1.{extension}")
    shutil.copy(dataset / "000000-0000.tar", dataset / "000001-0000.tar")  # a partition without a record
    (dataset / "000000-0001.tar.tmp-0123abcd").write_bytes(b"half")
    found = messages(dataset)
    assert sorted(found) == sorted(
        [
            f"000000-0000-g1.tar: {ORPHAN_MESSAGE}",
            f"000000-0000-g1.parquet: {ORPHAN_MESSAGE}",
            f"000001-0000.tar: {ORPHAN_MESSAGE}",
            "000000-0001.tar.tmp-0123abcd: temporary file left by an interrupted writer; rerun that partition",
        ]
    )
    assert ORPHAN_MESSAGE.endswith("the next `hyperhuman annotate` run on this output removes")


def test_duplicate_keys_across_partitions(dataset, sample_factory):
    write_partition(dataset, 1, ["k1", "n0"], sample_factory)  # k1 again, in a tar
    write_partition(dataset, 2, ["n1"], sample_factory, rejected=["k-bad"])  # k-bad again, in a parquet row
    write_manifest(str(dataset))
    assert sorted(messages(dataset)) == [
        "000001-0000 key=k1: duplicate key: 000000-0000 holds it too",
        "000002-0000 key=k-bad: duplicate key: 000000-0000 holds it too",
    ]


def test_duplicate_keys_across_parts_of_one_partition(tmp_path, sample_factory):
    write_partition(tmp_path, 0, ["k0", "k1"], sample_factory, max_samples=1)
    write_manifest(str(tmp_path))
    rewrite_tar(
        tmp_path / "000000-0001.tar", lambda ms: [(n.replace("k1", "k0"), d.replace(b'"k1"', b'"k0"')) for n, d in ms]
    )
    edit_parquet(
        tmp_path / "000000-0001.parquet",
        lambda table: table.set_column(0, "key", pa.array(["k0"] * table.num_rows, pa.string())),
    )
    assert "000000-0001 key=k0: duplicate key: 000000-0000 holds it too" in messages(tmp_path)


# -- parquet rows ------------------------------------------------------------------------------


def test_parquet_missing_an_ok_row(dataset):
    edit_parquet(dataset / "000000-0000.parquet", lambda table: table.slice(1))
    found = messages(dataset)
    assert "000000-0000 key=k0: sample is in the tar but not an 'ok' row of the parquet" in found


def test_parquet_rows_without_reason_or_rule(dataset):
    def blank(column: str):
        def edit(table):
            index = table.schema.get_field_index(column)
            return table.set_column(index, column, pa.array([""] * table.num_rows, pa.string()))

        return edit

    edit_parquet(dataset / "000000-0000.parquet", blank("rule"))
    assert "000000-0000 key=k-bad: rejected row has no rule (the filter that rejected it)" in messages(dataset)
    edit_parquet(dataset / "000000-0000.parquet", blank("reason"))
    assert "000000-0000 key=k-bad: rejected row has no reason" in messages(dataset)


def test_parquet_rule_column(dataset):
    parquet = dataset / "000000-0000.parquet"
    table = pq.read_table(parquet)
    pq.write_table(table.drop_columns(["rule"]), parquet)
    found = messages(dataset)
    assert (
        "000000-0000: parquet has no 'rule' column: written before the rule column; rewrite with --overwrite" in found
    )
    index = table.schema.get_field_index("rule")
    pq.write_table(table.set_column(index, "rule", pa.array(range(table.num_rows), pa.int64())), parquet)
    assert "000000-0000: parquet 'rule' column is int64, not a string column" in messages(dataset)


# -- the manifest ------------------------------------------------------------------------------


def test_missing_manifest(dataset):
    (dataset / "manifest.json").unlink()
    assert messages(dataset) == ["manifest.json: missing; rebuild it with shards.writer.write_manifest"]


def test_stale_manifest(dataset, sample_factory):
    write_partition(dataset, 1, ["n0"], sample_factory)
    write_partition(dataset, 0, ["k0", "k1"], sample_factory)  # a rewrite: generation 1
    found = messages(dataset)
    assert "manifest.json: does not list complete shard 000000-0000-g1" in found
    assert "manifest.json: does not list complete shard 000001-0000" in found
    assert "manifest.json: lists 000000-0000, which no commit record names" in found
    assert "manifest.json: total partitions 1 ≠ 2 in the commit records" in found
    assert "manifest.json: total rows 4 ≠ 3 in the commit records" in found
    write_manifest(str(dataset))
    assert validate(str(dataset)) == []


def test_manifest_entry_disagrees_with_its_record(dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["shards"][0]["samples"] = 2
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    assert messages(dataset) == ["manifest.json: 000000-0000 samples 2 ≠ 3 in its commit record"]


# -- command line ------------------------------------------------------------------------------


def test_cli_exit_status_and_inspect(dataset, capsys):
    assert main(["shards", "validate", str(dataset)]) == 0
    shutil.copy(dataset / "000000-0000.tar", dataset / "000000-0000-g1.tar")
    (dataset / "000000-0000.parquet.tmp-0123abcd").write_bytes(b"")
    capsys.readouterr()
    assert main(["shards", "inspect", str(dataset), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 3 and report["rows"] == {"ok": 3, "rejected": 1, "failed": 0}
    assert (report["complete_partitions"], report["complete_shards"]) == (1, 1)
    assert (report["orphan_part_files"], report["temporary_files"]) == (1, 1)
    assert report["tar_bytes"] == (dataset / "000000-0000.tar").stat().st_size
    assert report["members"]["jpg"] == 3 and report["members"]["pose.json"] == 3
    assert report["annotators"]["depth: test-depth 0 (none)"] == 3
    assert report["example_keys"] == ["k0", "k1", "k2"]
    (dataset / "000000-0000-g1.tar").unlink()
    (dataset / "000000-0000.parquet.tmp-0123abcd").unlink()
    rewrite_tar(dataset / "000000-0000.tar", lambda ms: [(n, d) for n, d in ms if n != "k1.jpg"])
    assert main(["shards", "validate", str(dataset)]) == 1
    assert "000000-0000 key=k1: missing required member k1.jpg" in capsys.readouterr().out


def test_empty_folder_holds_no_shards(tmp_path):
    assert any("holds no shards" in m for m in messages(tmp_path))
