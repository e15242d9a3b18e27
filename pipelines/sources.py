"""Where the annotation job's images come from, split into deterministic partitions.

Three kinds of source, all through fsspec (local paths, ``s3://``, ``memory://``):
- a folder of images (recursive; ``NAME.txt`` beside an image is its caption);
- a URL list: parquet, csv, tsv or jsonl (optionally ``.gz``) with a url column, an optional
  caption column and extra columns carried into the sample metadata;
- webdataset tars (img2dataset-style ``jpg``/``txt``/``json``, or our own shards): the image
  bytes travel inside the row and keys are kept.

Listing happens once, on the driver. Inputs are cut into partitions of ``partition_size``
rows in listing order, so partition ids — and hence shard names and sample keys — depend only
on the source, and a rerun of the same command maps each input to the same shard.
"""

from __future__ import annotations

import json
import posixpath

import fsspec

from hyperhuman.config import ConfigError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
URL_LIST_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".csv.gz", ".tsv.gz", ".jsonl.gz")


def _row(kind: str, source: str, caption: str | None = "", key: str | None = None, data=None, extra=None) -> dict:
    return {
        "kind": kind,  # "file" | "url" | "bytes"
        "source": source,
        "caption": caption or "",
        "key": key,
        "data": data,
        "extra": json.dumps(extra or {}, sort_keys=True, default=str),
    }


def folder_rows(root: str, storage_options: dict | None = None) -> list[dict]:
    fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    files = sorted(p for p in fs.find(path) if posixpath.splitext(p)[1].lower() in IMAGE_EXTENSIONS)
    rows = []
    for file in files:
        caption_path = posixpath.splitext(file)[0] + ".txt"
        caption = fs.cat_file(caption_path).decode("utf-8", "replace").strip() if fs.exists(caption_path) else ""
        rows.append(_row("file", fs.unstrip_protocol(file), caption))
    return rows


def url_list_rows(
    path: str, url_column: str = "url", caption_column: str | None = "caption", storage_options: dict | None = None
) -> list[dict]:
    import pandas as pd

    compression = "gzip" if path.endswith(".gz") else None
    base = path[:-3] if compression else path
    with fsspec.open(path, "rb", **(storage_options or {})) as handle:
        if base.endswith(".parquet"):
            table = pd.read_parquet(handle)
        elif base.endswith(".jsonl"):
            table = pd.read_json(handle, lines=True, compression=compression, dtype=False)
        else:
            table = pd.read_csv(handle, sep="\t" if base.endswith(".tsv") else ",", compression=compression, dtype=str)
    if url_column not in table.columns:
        raise ConfigError(
            f"URL list {path} has no column {url_column!r} (columns: {list(table.columns)}); set source.url_column"
        )
    extra_columns = [c for c in table.columns if c not in (url_column, caption_column)]
    rows = []
    for record in table.to_dict("records"):
        caption = record.get(caption_column) if caption_column else ""
        caption = "" if caption is None or (isinstance(caption, float) and caption != caption) else str(caption)
        extra = {column: record[column] for column in extra_columns}
        rows.append(_row("url", str(record[url_column]), caption, extra=extra))
    return rows


def tar_rows(pattern: str, storage_options: dict | None = None) -> list[dict]:
    from shards.reader import expand_urls, read_shard

    rows = []
    for url in expand_urls(pattern, storage_options):
        for sample in read_shard(url, decode=False, storage_options=storage_options):
            image = next((sample[ext] for ext in ("jpg", "jpeg", "png", "webp") if ext in sample), None)
            if image is None:
                continue
            caption = sample.get("txt", b"").decode("utf-8", "replace")
            key = sample["__key__"].rsplit("/", 1)[-1]
            rows.append(_row("bytes", f"{url}#{key}", caption, key=key, data=image))
    return rows


def list_inputs(source: str, options: dict) -> list[dict]:
    """Rows of the source, in a deterministic order.

    ``options["storage_options"]`` are fsspec options for the source (e.g. ``{endpoint_url: ...}``
    for an S3-compatible store); folder images are read with them again in the fetch tasks.
    """
    storage_options = options.get("storage_options") or {}
    fs, path = fsspec.core.url_to_fs(source, **storage_options)
    if path.endswith(".tar") or "{" in path:
        return tar_rows(source, storage_options)
    if any(path.endswith(suffix) for suffix in URL_LIST_SUFFIXES):
        return url_list_rows(
            source, options.get("url_column", "url"), options.get("caption_column", "caption"), storage_options
        )
    if fs.isdir(path):
        tars = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".tar"))
        if tars and not any(posixpath.splitext(p)[1].lower() in IMAGE_EXTENSIONS for p in fs.ls(path, detail=False)):
            return [row for tar in tars for row in tar_rows(fs.unstrip_protocol(tar), storage_options)]
        return folder_rows(source, storage_options)
    raise ConfigError(
        f"source {source!r} is not a folder, a URL list ({', '.join(URL_LIST_SUFFIXES)}) or webdataset tars"
    )


def partition_inputs(rows: list[dict], partition_size: int) -> list[dict]:
    """``[{"partition": id, "rows": [...]}]``; rows without a key get ``PPPPPPIIIII``."""
    if partition_size < 1:
        raise ConfigError(f"partition_size must be ≥ 1, got {partition_size}")
    partitions = []
    for start in range(0, len(rows), partition_size):
        partition = start // partition_size
        chunk = []
        for offset, row in enumerate(rows[start : start + partition_size]):
            chunk.append({**row, "key": row["key"] or f"{partition:06d}{offset:05d}"})
        partitions.append({"partition": partition, "rows": chunk})
    return partitions
