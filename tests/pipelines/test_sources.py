"""Planning from metadata and reading partitions in their tasks: URL lists, folders."""

import gzip
import json
import math
import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hyperhuman.config import ConfigError
from pipelines import url_lists
from pipelines.sources import plan_source, read_partition, to_json

RECORDS = [
    {"url": "http://127.0.0.1/a.jpg", "caption": "first", "license": "cc-by"},
    {"url": "http://127.0.0.1/b.jpg", "caption": None, "license": "cc0"},
]
OPTIONS = {"url_column": "url", "caption_column": "caption"}


def rows_of(plan, options=OPTIONS):
    return [row for descriptor in plan.descriptors() for row in read_partition(descriptor, options)]


def write_list(path, records):
    name = path.name
    frame = pd.DataFrame(records)
    if name.endswith(".parquet"):
        frame.to_parquet(path)
    elif ".jsonl" in name:
        text = "".join(json.dumps(record) + "\n" for record in records)
        path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    else:
        compression = "gzip" if name.endswith(".gz") else None
        frame.to_csv(path, sep="\t" if ".tsv" in name else ",", index=False, compression=compression)


@pytest.mark.parametrize("name", ["urls.parquet", "urls.csv", "urls.tsv", "urls.jsonl", "urls.csv.gz", "urls.jsonl.gz"])
def test_url_lists_in_every_format(tmp_path, name):
    write_list(tmp_path / name, RECORDS)
    plan = plan_source(str(tmp_path / name), OPTIONS, 100)
    assert (plan.kind, plan.inputs, plan.partitions) == ("url_list", 2, 1)
    rows = rows_of(plan)
    assert [(row["kind"], row["source"], row["caption"], row["problem"]) for row in rows] == [
        ("url", "http://127.0.0.1/a.jpg", "first", None),
        ("url", "http://127.0.0.1/b.jpg", "", None),
    ]
    assert json.loads(rows[0]["extra"]) == {"license": "cc-by"}
    assert [row["key"] for row in rows] == ["00000000000", "00000000001"]


@pytest.mark.parametrize("name", ["urls.parquet", "urls.csv", "urls.jsonl"])
def test_partitions_span_files_chunks_and_row_groups_in_order(tmp_path, monkeypatch, name):
    """Rows are cut into partitions across files, row groups and counting chunks exactly as if
    the lists were concatenated — the keys are those of the old whole-list approach."""
    monkeypatch.setattr(url_lists, "CHUNK_BYTES", 64)  # many chunks for a few rows
    records = [{"url": f"http://127.0.0.1/{i}.jpg", "caption": f"caption {i}"} for i in range(23)]
    folder = tmp_path / "lists"
    folder.mkdir()
    suffix = name.split(".", 1)[1]
    for index, chunk in enumerate((records[:9], records[9:])):
        path = folder / f"part{index}.{suffix}"
        if suffix == "parquet":
            pq.write_table(pa.Table.from_pylist(chunk), path, row_group_size=4)
        else:
            write_list(path, chunk)
    plan = plan_source(str(folder), OPTIONS, 5)
    assert (plan.inputs, plan.partitions) == (23, 5)
    rows = rows_of(plan)
    assert [row["source"] for row in rows] == [record["url"] for record in records]
    assert [row["caption"] for row in rows] == [record["caption"] for record in records]
    assert rows[7]["key"] == "00000100002"
    if suffix != "parquet":
        assert len(plan.files[0]["chunks"]) > 1  # counted in several chunks


@pytest.mark.parametrize("name", ["urls.csv", "urls.jsonl"])
def test_a_row_starting_exactly_at_a_chunk_boundary_is_counted_once(tmp_path, monkeypatch, name):
    """Lines (and the csv header) of one length, chunks of one or three lines: every chunk
    boundary is the first byte of a row."""
    if name.endswith(".csv"):
        lines = [f"http://127.0.0.1/{i:04d}.jpg,c,\n" for i in range(40)]
        header = "url,caption," + "p" * (len(lines[0]) - len("url,caption,") - 1) + "\n"
    else:
        lines, header = [json.dumps({"url": f"http://127.0.0.1/{i:04d}.jpg"}) + "\n" for i in range(40)], ""
    (tmp_path / name).write_text(header + "".join(lines))
    for chunk in (len(lines[0]), len(lines[0]) * 3):
        monkeypatch.setattr(url_lists, "CHUNK_BYTES", chunk)
        plan = plan_source(str(tmp_path / name), OPTIONS, 7)
        assert plan.inputs == 40
        assert [row["source"] for row in rows_of(plan)] == [f"http://127.0.0.1/{i:04d}.jpg" for i in range(40)]


def test_plan_reads_only_metadata(tmp_path, monkeypatch):
    write_list(tmp_path / "urls.parquet", RECORDS * 50)

    def no_table_reads(*args, **kwargs):
        raise AssertionError("planning read the table")

    monkeypatch.setattr(pq, "read_table", no_table_reads)
    monkeypatch.setattr(pd, "read_parquet", no_table_reads)
    plan = plan_source(str(tmp_path / "urls.parquet"), OPTIONS, 30)
    assert (plan.inputs, plan.partitions) == (100, 4)
    assert "rows" not in json.dumps(plan.summary()["descriptors"][0]).replace('"rows"', "")  # no inputs inside


def test_missing_url_column_names_the_setting(tmp_path):
    write_list(tmp_path / "urls.csv", RECORDS)
    with pytest.raises(ConfigError, match="no column 'link'.*set source.url_column"):
        plan_source(str(tmp_path / "urls.csv"), {"url_column": "link"}, 10)


def test_bad_list_files_are_one_line_errors_naming_the_file(tmp_path):
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    quoted = tmp_path / "quoted.csv"
    quoted.write_text('url,caption\nhttp://127.0.0.1/a.jpg,"two\nlines"\n')
    for path, message in (
        (tmp_path / "empty.csv", "is empty: no header row"),
        (tmp_path / "broken.parquet", "is not a readable parquet file"),
        (quoted, "line breaks inside quoted fields.*convert it to parquet"),
        (tmp_path / "absent.parquet", "does not exist"),
    ):
        with pytest.raises(ConfigError, match=message) as error:
            plan_source(str(path), OPTIONS, 10)
        assert path.name in str(error.value) and "\n" not in str(error.value)


def test_bad_rows_are_rows_with_a_reason(tmp_path):
    path = tmp_path / "urls.jsonl"
    path.write_text('{"url": "http://127.0.0.1/a.jpg"}\n{not json\n[1, 2]\n\n{"url": 5, "caption": ["x"]}\n')
    rows = rows_of(plan_source(str(path), OPTIONS, 10))
    assert len(rows) == 4  # the blank line is not a row
    assert rows[0]["problem"] is None
    assert rows[1]["problem"][0] == "source_read" and "not JSON" in rows[1]["problem"][1]
    assert "JSON list, not an object" in rows[2]["problem"][1]
    assert rows[3]["problem"] == ("caption", "caption is list, not text") and rows[3]["source"] == "5"


def test_long_captions_are_rejected_rows(tmp_path):
    write_list(tmp_path / "urls.parquet", [{"url": "http://127.0.0.1/a.jpg", "caption": "x" * 5000}, RECORDS[0]])
    plan = plan_source(str(tmp_path / "urls.parquet"), OPTIONS, 10)
    rows = rows_of(plan, {**OPTIONS, "max_caption_bytes": 4096})
    assert rows[0]["problem"] == ("caption", "caption is 5000 bytes, more than source.max_caption_bytes=4096")
    assert rows[0]["caption"] == "x" * 5000 and rows[1]["problem"] is None


def test_extra_columns_are_strict_json(tmp_path):
    table = pa.table(
        {
            "url": ["http://127.0.0.1/a.jpg"],
            "score": [math.nan],
            "tags": [["a", "b"]],
            "blob": [b"\x00\x01"],
            "when": pa.array([pd.Timestamp("2024-05-01T12:00:00")], pa.timestamp("us")),
            "inf": [math.inf],
        }
    )
    pq.write_table(table, tmp_path / "urls.parquet")
    [row] = rows_of(plan_source(str(tmp_path / "urls.parquet"), OPTIONS, 10))
    extra = json.loads(row["extra"], parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))
    assert extra == {
        "score": None, "tags": ["a", "b"], "blob": {"$base64": "AAE="}, "when": "2024-05-01T12:00:00", "inf": None,
    }  # fmt: skip
    assert to_json({"n": math.nan}) == '{"n": null}'


def test_listing_fingerprint_follows_the_listing(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (folder / name).write_bytes(b"jpeg")
    first = plan_source(str(folder), {}, 10)
    assert plan_source(str(folder), {}, 10).fingerprint == first.fingerprint
    (folder / "c.jpg").write_bytes(b"jpeg")
    assert plan_source(str(folder), {}, 10).fingerprint != first.fingerprint
    write_list(tmp_path / "urls.csv", RECORDS)
    before = plan_source(str(tmp_path / "urls.csv"), OPTIONS, 10).fingerprint
    write_list(tmp_path / "urls.csv", [RECORDS[1], RECORDS[0]])  # same size, rewritten
    assert plan_source(str(tmp_path / "urls.csv"), OPTIONS, 10).fingerprint != before


def test_folder_captions_links_and_unreadable_parts(tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(b"jpeg")
    (folder / "a.txt").write_text(" a caption \n")
    (folder / "b.jpg").write_bytes(b"jpeg")
    (folder / "b.txt").write_bytes(b"\xff\xfe not utf-8")
    (folder / "sub" / "c.jpg").write_bytes(b"jpeg")
    (folder / "sub" / "c.txt").mkdir()  # a caption "file" that cannot be read
    (folder / "sub" / "loop").symlink_to(folder)  # a link back up: listed once, not forever
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "d.jpg").write_bytes(b"jpeg")
    (folder / "linked").symlink_to(outside)  # a symlinked folder is followed
    plan = plan_source(str(folder), {}, 10)
    rows = {os.path.relpath(row["source"].removeprefix("file://"), folder): row for row in rows_of(plan, {})}
    assert sorted(rows) == ["a.jpg", "b.jpg", "linked/d.jpg", "sub/c.jpg"]
    assert rows["a.jpg"]["caption"] == "a caption" and rows["a.jpg"]["problem"] is None
    assert rows["b.jpg"]["problem"] == ("caption", f"caption file file://{folder}/b.txt is not UTF-8 text")
    assert rows["sub/c.jpg"]["problem"][0] == "caption_read"
    assert "symlink loop" in capsys.readouterr().err


def test_partition_size_is_checked():
    with pytest.raises(ConfigError, match="partition_size must be an integer ≥ 1, got 2.5"):
        plan_source("unused", {}, 2.5)
