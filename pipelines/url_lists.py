"""URL lists (parquet, csv, tsv, jsonl; csv/tsv/jsonl optionally ``.gz``) planned from metadata
and read one row range at a time.

Planning never loads a list: a parquet file's row count comes from its footer; a text file is
cut into byte chunks whose rows are counted by tasks (Ray tasks in a job), each returning only
``(first byte of its first row, rows)``. The driver keeps one small entry per file and per chunk,
so a billion-row list plans in the memory of a few thousand numbers. A partition's task then
reads its row range itself: the parquet row groups it overlaps, or the text from the start of
the chunk holding its first row (a gzip file is one chunk: it can only be read from the start,
so split big lists into several files or use parquet).

A text chunk starts at the first line break after its nominal byte offset, so line breaks
inside quoted csv fields would split a row: such a file is refused at planning with the advice
to convert it to parquet. Blank lines are not rows.
"""

from __future__ import annotations

import bisect
import csv
import gzip
import hashlib
import io
import itertools
import json
import math
from collections.abc import Callable

import fsspec

from hyperhuman.config import ConfigError, json_digest

CHUNK_BYTES = 8 << 20  # text bytes per counting chunk: tasks count ~100k rows each
PROBE_BYTES = 64 << 10  # head and tail hashed into the listing fingerprint
TEXT_FORMATS = ("csv", "tsv", "jsonl")
SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".csv.gz", ".tsv.gz", ".jsonl.gz")


def list_format(path: str) -> str | None:
    """``parquet`` / ``csv`` / ``tsv`` / ``jsonl`` for a URL-list file name, else None."""
    base = path[:-3] if path.endswith(".gz") else path
    for name in ("parquet", *TEXT_FORMATS):
        if base.endswith("." + name) and not (name == "parquet" and path.endswith(".gz")):
            return name
    return None


class UrlListError(ConfigError):
    """A URL-list file that cannot be planned (unreadable, empty, no url column)."""


def plan_files(paths: list[str], options: dict, storage_options: dict, run_tasks: Callable | None = None) -> list[dict]:
    """One entry per file: ``{path, format, size, rows, fingerprint, ...}`` plus, for parquet,
    its row-group sizes and, for text, its chunks ``[(offset, rows), ...]`` and header.
    ``run_tasks(fn, args_list)`` maps the chunk counting (default: in this process)."""
    run_tasks = run_tasks or (lambda fn, args_list: [fn(*args) for args in args_list])
    entries, jobs = [], []
    for path in paths:
        fs, local = fsspec.core.url_to_fs(path, **storage_options)
        kind = list_format(path)
        entry = {"path": path, "format": kind, "size": _size(fs, local, path)}
        entry["probe"] = _probe(fs, local, entry["size"])
        if kind == "parquet":
            entry.update(_parquet_footer(fs, local, path))
        else:
            starts = [0] if path.endswith(".gz") else list(range(0, max(entry["size"], 1), CHUNK_BYTES))
            stops = [*starts[1:], entry["size"]]
            jobs += [
                (len(entries), (path, kind, start, stop, storage_options))
                for start, stop in zip(starts, stops, strict=True)
            ]
        entries.append(entry)
    counted = run_tasks(count_chunk, [args for _, args in jobs])
    for (index, _), chunk in zip(jobs, counted, strict=True):
        entry = entries[index]
        entry.setdefault("chunks", []).append((chunk["offset"], chunk["rows"]))
        if chunk.get("header") is not None:
            entry["header"] = chunk["header"]
    first_row = 0
    for entry in entries:
        if entry["format"] != "parquet":
            entry["rows"] = sum(rows for _, rows in entry["chunks"])
            if entry["format"] != "jsonl" and "header" not in entry:
                raise UrlListError(f"URL list {entry['path']} is empty: no header row; a csv/tsv list needs one")
        sizes = entry["row_groups"] if entry["format"] == "parquet" else [rows for _, rows in entry["chunks"]]
        entry["starts"] = list(itertools.accumulate(sizes, initial=0))[:-1]  # first row of each group/chunk
        entry["first_row"], first_row = first_row, first_row + entry["rows"]
        _check_columns(entry, options)
        entry["fingerprint"] = json_digest([entry["path"], entry["size"], entry["rows"], entry["probe"]])
        del entry["probe"]
    return entries


def _size(fs, local: str, path: str) -> int:
    try:
        return int(fs.size(local))
    except OSError as exc:
        raise UrlListError(f"cannot read URL list {path}: {type(exc).__name__}: {exc}") from None


def _probe(fs, local: str, size: int) -> str:
    """sha256 of the first and last 64 KiB: a rewritten list of the same size still changes."""
    with fs.open(local, "rb") as handle:
        head = handle.read(PROBE_BYTES)
        handle.seek(max(0, size - PROBE_BYTES))
        tail = handle.read(PROBE_BYTES)
    return hashlib.sha256(head + tail).hexdigest()


def _parquet_footer(fs, local: str, path: str) -> dict:
    import pyarrow.parquet as pq

    try:
        with fs.open(local, "rb") as handle:
            metadata = pq.ParquetFile(handle).metadata
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise UrlListError(
            f"URL list {path} is not a readable parquet file ({type(exc).__name__}: {str(exc)[:200]}); "
            "re-export it or remove it from the source"
        ) from None
    return {
        "rows": metadata.num_rows,
        "row_groups": [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)],
        "header": list(metadata.schema.names),
    }


def _check_columns(entry: dict, options: dict) -> None:
    url_column = options.get("url_column", "url")
    header = entry.get("header")
    if header is not None and url_column not in header:
        raise UrlListError(
            f"URL list {entry['path']} has no column {url_column!r} (columns: {header[:20]}); set source.url_column"
        )


# -- counting (a task per chunk) ---------------------------------------------------------------


def count_chunk(path: str, kind: str, start: int, stop: int, storage_options: dict) -> dict:
    """Rows whose first byte lies in ``[start, stop)`` of a text list, and where the first one
    starts. The chunk holding byte 0 also returns the csv/tsv header (not a row)."""
    fs, local = fsspec.core.url_to_fs(path, **storage_options)
    try:
        with fs.open(local, "rb") as raw:
            if path.endswith(".gz"):
                return _count_text(gzip.GzipFile(fileobj=raw), path, kind, 0, math.inf)
            if start > 0:
                # The line holding byte ``start - 1`` belongs to the chunk before (a line that starts
                # exactly at ``start`` is ours: then this reads just the line break before it).
                raw.seek(start - 1)
                raw.readline()
            return _count_text(raw, path, kind, raw.tell(), stop)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise UrlListError(f"cannot read URL list {path}: {type(exc).__name__}: {exc}") from None


def _count_text(handle, path: str, kind: str, offset: int, stop: float) -> dict:
    result = {"offset": offset, "rows": 0, "header": None}
    position, lines = offset, []
    while position < stop:
        line = handle.readline()
        if not line:
            break
        position += len(line)
        if not line.strip():
            continue
        if offset == 0 and kind != "jsonl" and result["header"] is None:
            result["header"] = _parse_csv_lines([line], kind)[0]
            continue
        result["rows"] += 1
        if kind != "jsonl" and b'"' in line:
            lines.append(line)
    if lines and len(_parse_csv_lines(lines, kind)) != len(lines):
        raise UrlListError(
            f"URL list {path} has line breaks inside quoted fields (near byte {offset}), so it cannot be "
            "split for parallel reading; convert it to parquet (e.g. pandas.read_csv(...).to_parquet(...))"
        )
    return result


def _parse_csv_lines(lines: list[bytes], kind: str) -> list[list[str]]:
    text = io.StringIO(b"".join(lines).decode("utf-8", "replace"), newline="")
    return [row for row in csv.reader(text, delimiter="\t" if kind == "tsv" else ",") if row]


# -- reading one partition's rows (in its task) ------------------------------------------------


class RowIndex:
    """Finds the rows of a partition in the planned files by bisection (files, then row groups
    or chunks), so building a descriptor costs O(log) however many files and chunks there are."""

    def __init__(self, entries: list[dict]):
        self.entries = entries
        self.firsts = [entry["first_row"] for entry in entries]

    def segments(self, start: int, stop: int) -> list[dict]:
        """The per-file pieces of global rows ``[start, stop)`` (files in order, rows concatenated):
        ``{path, format, header, first, count}`` plus where to begin reading (``row_groups`` for
        parquet; ``offset`` and ``skip`` for text)."""
        pieces = []
        for entry in self.entries[max(bisect.bisect_right(self.firsts, start) - 1, 0) :]:
            base = entry["first_row"]
            if base >= stop:
                break
            first, last = max(start, base), min(stop, base + entry["rows"])
            if first < last:
                piece = {key: entry.get(key) for key in ("path", "format", "header")}
                piece.update(first=first - base, count=last - first)
                piece.update(_locate(entry, first - base, last - base))
                pieces.append(piece)
        return pieces


def _locate(entry: dict, first: int, last: int) -> dict:
    """Where rows ``[first, last)`` of one file begin: the last group/chunk starting at or before
    ``first`` (among several starting there, the last: the earlier ones are empty)."""
    starts = entry["starts"]
    index = bisect.bisect_right(starts, first) - 1
    if entry["format"] == "parquet":
        sizes = entry["row_groups"]
        groups = list(itertools.takewhile(lambda i: starts[i] < last, range(index, len(starts))))
        return {"row_groups": [i for i in groups if sizes[i] > 0], "skip": first - starts[index]}
    return {"offset": entry["chunks"][index][0], "skip": first - starts[index]}


def read_segment(piece: dict, storage_options: dict) -> list[dict | str]:
    """The ``count`` records of one segment as dicts (column → value); a record that cannot be
    parsed is its reason (a string) instead, so it still becomes exactly one row."""
    fs, local = fsspec.core.url_to_fs(piece["path"], **storage_options)
    with fs.open(local, "rb") as raw:
        if piece["format"] == "parquet":
            return _read_parquet(raw, piece)
        handle = gzip.GzipFile(fileobj=raw) if piece["path"].endswith(".gz") else raw
        if not piece["path"].endswith(".gz"):
            raw.seek(piece["offset"])
        return _read_text(handle, piece)


def _read_parquet(raw, piece: dict) -> list[dict]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(raw)
    records, skip = [], piece["skip"]
    for batch in parquet.iter_batches(batch_size=max(piece["count"], 1024), row_groups=piece["row_groups"]):
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        records += batch.slice(skip, piece["count"] - len(records)).to_pylist()
        skip = 0
        if len(records) >= piece["count"]:
            break
    return records


def _read_text(handle, piece: dict) -> list[dict | str]:
    kind, header = piece["format"], piece.get("header")
    text = io.TextIOWrapper(handle, encoding="utf-8", errors="replace", newline="")
    lines = (line for line in text if line.strip())
    if kind != "jsonl" and piece.get("offset", 0) == 0:
        next(lines, None)  # the header
    for _ in range(piece["skip"]):
        next(lines, None)
    records: list[dict | str] = []
    for line in lines:
        records.append(_parse_json_line(line) if kind == "jsonl" else _parse_csv_line(line, header, kind))
        if len(records) == piece["count"]:
            break
    while len(records) < piece["count"]:  # the file shrank since planning
        records.append(f"row missing from {piece['path']}: it has fewer rows than when the job was planned")
    return records


def _parse_json_line(line: str) -> dict | str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"line is not JSON ({exc})"
    return record if isinstance(record, dict) else f"line is a JSON {type(record).__name__}, not an object"


def _parse_csv_line(line: str, header: list[str], kind: str) -> dict:
    values = next(csv.reader([line], delimiter="\t" if kind == "tsv" else ","), [])
    return {name: (values[i] if i < len(values) else None) for i, name in enumerate(header)}
