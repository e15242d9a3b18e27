import gzip
import json

import pandas as pd
import pytest

from pipelines.sources import list_inputs, partition_inputs

RECORDS = [
    {"url": "http://127.0.0.1/a.jpg", "caption": "first", "license": "cc-by"},
    {"url": "http://127.0.0.1/b.jpg", "caption": None, "license": "cc0"},
]


@pytest.mark.parametrize("name", ["urls.parquet", "urls.csv", "urls.tsv", "urls.jsonl", "urls.csv.gz", "urls.jsonl.gz"])
def test_url_lists_in_every_format(tmp_path, name):
    path = tmp_path / name
    frame = pd.DataFrame(RECORDS)
    if name.endswith(".parquet"):
        frame.to_parquet(path)
    elif ".jsonl" in name:
        text = "".join(json.dumps(record) + "\n" for record in RECORDS)
        path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    else:
        frame.to_csv(
            path, sep="\t" if ".tsv" in name else ",", index=False, compression="gzip" if name.endswith(".gz") else None
        )
    rows = list_inputs(str(path), {"url_column": "url", "caption_column": "caption"})
    assert [(row["kind"], row["source"], row["caption"]) for row in rows] == [
        ("url", "http://127.0.0.1/a.jpg", "first"),
        ("url", "http://127.0.0.1/b.jpg", ""),
    ]
    assert json.loads(rows[0]["extra"]) == {"license": "cc-by"}


def test_missing_url_column_names_the_setting(tmp_path):
    path = tmp_path / "urls.csv"
    pd.DataFrame(RECORDS).to_csv(path, index=False)
    with pytest.raises(ValueError, match="no column 'link'.*set source.url_column"):
        list_inputs(str(path), {"url_column": "link"})


def test_partitions_are_deterministic():
    rows = [{"key": None, "source": str(i)} for i in range(5)]
    partitions = partition_inputs(rows, 2)
    assert [[row["key"] for row in p["rows"]] for p in partitions] == [
        ["00000000000", "00000000001"],
        ["00000100000", "00000100001"],
        ["00000200000"],
    ]
    assert partition_inputs(rows, 2) == partitions
    with pytest.raises(ValueError, match="partition_size"):
        partition_inputs(rows, 0)
