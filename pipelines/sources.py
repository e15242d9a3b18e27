"""Where the annotation job's images come from: a plan made from metadata, read by the tasks.

Three kinds of source, all through fsspec (local paths, ``s3://``, ``memory://``):
- a folder of images (recursive, symlinked folders followed once; ``NAME.txt`` beside an image
  is its caption);
- URL lists: a parquet, csv, tsv or jsonl file (optionally ``.gz``), or a folder of them, with a
  url column, an optional caption column and extra columns carried into the sample metadata
  (:mod:`pipelines.url_lists`);
- webdataset tars (img2dataset-style, or our own shards), a ``.tar``, a brace pattern or a folder
  of tars: one tar is one partition (:mod:`pipelines.tar_source`).

The driver only *plans*: it lists paths, reads row counts (parquet footers; text lists counted in
tasks) and tar headers (in tasks), and keeps a compact :class:`Plan`. A partition is a small
descriptor (rows ``[start, stop)`` of the concatenated lists, a tar, or ``partition_size`` image
paths) that the partition's own task turns into rows with :func:`read_partition`; no image byte
and no URL-list row passes through the driver. Partition ids, shard names and keys
(``PPPPPPIIIII``, or a tar's own validated keys) are functions of the source only, and the
plan's fingerprint changes when the listing does (a file added, a list rewritten).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import posixpath
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import fsspec

from hyperhuman.config import ConfigError, json_digest
from pipelines import url_lists
from pipelines.settings import DEFAULT_MAX_CAPTION_BYTES
from shards.commit import is_local

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_LISTED_FILES = 1000  # files named one by one in job.json, to say which one changed


@dataclass
class Plan:
    """What the driver knows about a source: enough to build any partition's descriptor."""

    source: str
    kind: str  # "folder" | "url_list" | "tar"
    inputs: int
    partition_size: int
    files: list[dict] = field(repr=False)  # url lists: file entries; tars: one per tar; folders: paths
    fingerprint: str = ""

    @property
    def partitions(self) -> int:
        if self.kind == "tar":
            return len(self.files)
        return math.ceil(self.inputs / self.partition_size)

    def descriptor(self, partition: int) -> dict:
        if self.kind == "tar":
            return {"kind": "tar", "partition": partition, **self.files[partition]}
        start, stop = partition * self.partition_size, min((partition + 1) * self.partition_size, self.inputs)
        if self.kind == "folder":
            return {"kind": "folder", "partition": partition, "paths": self.files[start:stop]}
        return {"kind": "url_list", "partition": partition, "segments": self._rows.segments(start, stop)}

    @functools.cached_property
    def _rows(self) -> url_lists.RowIndex:
        return url_lists.RowIndex(self.files)

    def rows_in(self, partition: int) -> int:
        """How many inputs (hence parquet rows) the partition has."""
        if self.kind == "tar":
            return self.files[partition]["samples"]
        return min(self.partition_size, self.inputs - partition * self.partition_size)

    def descriptors(self) -> Iterator[dict]:
        return (self.descriptor(partition) for partition in range(self.partitions))

    def listing(self) -> dict:
        """The listing as recorded in ``job.json``: enough to say what changed on a rerun."""
        listing = {"kind": self.kind, "inputs": self.inputs, "fingerprint": self.fingerprint}
        if self.kind != "folder" and len(self.files) <= MAX_LISTED_FILES:
            listing["files"] = {entry["path"]: entry["fingerprint"][:16] for entry in self.files}
        return listing

    def summary(self) -> dict:
        """``plan.json``: the source, its fingerprint, the partitions (listed when few) and a
        digest of every descriptor."""
        digest = hashlib.sha256()
        listed = []
        for descriptor in self.descriptors():
            digest.update(json.dumps(descriptor, sort_keys=True, default=str).encode())
            if len(listed) < MAX_LISTED_FILES:
                listed.append(descriptor)
        summary = {
            "source": self.source,
            "kind": self.kind,
            "inputs": self.inputs,
            "partition_size": self.partition_size,
            "partitions": self.partitions,
            "fingerprint": self.fingerprint,
            "partitions_digest": digest.hexdigest(),
        }
        if self.partitions <= MAX_LISTED_FILES:
            summary["descriptors"] = listed
        return summary


def plan_source(source: str, options: dict, partition_size: int, run_tasks: Callable | None = None) -> Plan:
    """Plan ``source`` (see the module docstring). ``options`` is the config's ``source``
    section; ``run_tasks(fn, args_list)`` runs the per-file / per-chunk / per-tar metadata reads
    (the job passes Ray tasks; default: in this process)."""
    if isinstance(partition_size, bool) or not isinstance(partition_size, int) or partition_size < 1:
        raise ConfigError(f"partition_size must be an integer ≥ 1, got {partition_size!r}")
    storage_options = options.get("storage_options") or {}
    try:
        fs, path = fsspec.core.url_to_fs(source, **storage_options)
    except (ValueError, ImportError) as exc:
        raise ConfigError(f"source {source!r} is not a path or URL fsspec can open: {exc}") from None
    if path.endswith(".tar") or "{" in path:
        return _plan_tars(source, _expand_tars(source), storage_options, partition_size, run_tasks)
    if url_lists.list_format(path):
        if not fs.exists(path):
            raise ConfigError(f"URL list {source} does not exist")
        return _plan_url_lists(source, [source], options, storage_options, partition_size, run_tasks)
    if not fs.isdir(path):
        raise ConfigError(
            f"source {source!r} is not a folder, a URL list ({', '.join(url_lists.SUFFIXES)}) or webdataset tars"
        )
    top = sorted(fs.ls(path, detail=False))
    tars = [p for p in top if p.endswith(".tar")]
    lists = [p for p in top if url_lists.list_format(p)]
    has_images = any(posixpath.splitext(p)[1].lower() in IMAGE_EXTENSIONS for p in top)
    if tars and not has_images:
        return _plan_tars(source, [fs.unstrip_protocol(p) for p in tars], storage_options, partition_size, run_tasks)
    if lists and not has_images:
        urls = [fs.unstrip_protocol(p) for p in lists]
        return _plan_url_lists(source, urls, options, storage_options, partition_size, run_tasks)
    return _plan_folder(source, fs, path, partition_size)


def _plan_url_lists(source, paths, options, storage_options, partition_size, run_tasks) -> Plan:
    entries = url_lists.plan_files(paths, options, storage_options, run_tasks)
    fingerprint = json_digest([[entry["path"], entry["fingerprint"]] for entry in entries])
    inputs = sum(entry["rows"] for entry in entries)
    return Plan(source, "url_list", inputs, partition_size, entries, fingerprint)


def _expand_tars(source: str) -> list[str]:
    from braceexpand import braceexpand

    return list(braceexpand(source))


def _plan_tars(source, urls, storage_options, partition_size, run_tasks) -> Plan:
    from pipelines import tar_source

    run_tasks = run_tasks or (lambda fn, args_list: [fn(*args) for args in args_list])
    scans = run_tasks(tar_source.scan_tar, [(url, storage_options) for url in urls])
    planned = tar_source.plan_keys(scans)
    for entry, scan in zip(planned, scans, strict=True):
        entry["fingerprint"] = json_digest(
            [scan["url"], scan["bytes"], entry["samples"], sorted(entry["rekey"].items())]
        )
        entry["path"] = entry["url"]
    fingerprint = json_digest([entry["fingerprint"] for entry in planned])
    return Plan(source, "tar", sum(entry["samples"] for entry in planned), partition_size, planned, fingerprint)


# -- folders -----------------------------------------------------------------------------------


def _plan_folder(source: str, fs, root: str, partition_size: int) -> Plan:
    """Images in path order; the fingerprint covers them and the caption files (both change the
    output: an added image shifts keys, an edited caption changes a sample)."""
    files = sorted((path, size) for path, size in _walk(fs, root) if _is_image(path) or path.endswith(".txt"))
    relative = len(root.rstrip("/")) + 1
    fingerprint = json_digest([[path[relative:], size] for path, size in files])
    paths = [fs.unstrip_protocol(path) for path, _ in files if _is_image(path)]
    return Plan(source, "folder", len(paths), partition_size, paths, fingerprint)


def _is_image(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _walk(fs, root: str) -> Iterator[tuple[str, int]]:
    """(path, size) of every file under ``root``. On a local disk symlinked folders are followed,
    each real folder once (a link back up is a loop, reported and skipped); a folder that cannot
    be listed is reported and skipped, never an aborted listing."""
    if not is_local(fs):
        for path, info in fs.find(root, detail=True).items():
            yield path, int(info.get("size") or 0)
        return
    seen: set[tuple[int, int]] = set()

    def unreadable(error: OSError) -> None:
        _warn(f"cannot list {error.filename}: {error.strerror or error}; its images are skipped")

    for folder, folders, files in os.walk(root, followlinks=True, onerror=unreadable):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen:
            _warn(f"{folder} is a symlink loop (it leads back to a folder already listed); skipped")
            folders[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        folders.sort()
        for name in files:
            path = os.path.join(folder, name)
            try:
                yield path, os.stat(path).st_size
            except OSError:
                yield path, -1  # a dangling link: its read fails, as a row


def _warn(message: str) -> None:
    print(f"[annotate] warning: {message}", file=sys.stderr)


# -- reading a partition (in its task) ---------------------------------------------------------


def read_partition(descriptor: dict, options: dict) -> list[dict]:
    """The rows of one partition, in order; never raises for bad input. A row is ``{kind, source,
    caption, key, data, extra, problem}``; ``problem`` (rule, reason) marks an input that is a
    row without being fetched (an unreadable caption, a record that does not parse, ...)."""
    storage_options = options.get("storage_options") or {}
    max_caption = options.get("max_caption_bytes", DEFAULT_MAX_CAPTION_BYTES)
    partition = descriptor["partition"]
    if descriptor["kind"] == "tar":
        from pipelines import tar_source

        rows = tar_source.read_tar_partition(descriptor, storage_options)
    elif descriptor["kind"] == "folder":
        rows = [_folder_row(path, storage_options) for path in descriptor["paths"]]
    else:
        rows = [_url_row(record, options) for record in _url_records(descriptor, storage_options)]
    for offset, row in enumerate(rows):
        row["key"] = row.get("key") or f"{partition:06d}{offset:05d}"
        if row.get("problem") is None:
            row["problem"] = caption_problem(row["caption"], max_caption)
        if not isinstance(row["caption"], str):
            row["caption"] = ""
    return rows


def _row(kind: str, source: str, caption="", data=None, extra: str = "{}", problem=None) -> dict:
    return {"kind": kind, "source": source, "caption": caption, "key": None, "data": data, "extra": extra,
            "problem": problem}  # fmt: skip


def _folder_row(path: str, storage_options: dict) -> dict:
    caption_path = posixpath.splitext(path)[0] + ".txt"
    try:
        fs, local = fsspec.core.url_to_fs(caption_path, **storage_options)
        raw = fs.cat_file(local) if fs.exists(local) else b""
    except OSError as exc:
        problem = ("caption_read", f"cannot read caption file {caption_path}: {type(exc).__name__}: {exc}")
        return _row("file", path, problem=problem)
    try:
        return _row("file", path, raw.decode("utf-8").strip())
    except UnicodeDecodeError:
        return _row("file", path, problem=("caption", f"caption file {caption_path} is not UTF-8 text"))


def _url_records(descriptor: dict, storage_options: dict) -> Iterator[dict | str]:
    for piece in descriptor["segments"]:
        try:
            yield from url_lists.read_segment(piece, storage_options)
        except Exception as exc:  # the list changed or broke since planning: its rows fail, as rows
            reason = f"cannot read rows of {piece['path']}: {type(exc).__name__}: {str(exc)[:200]}"
            yield from [reason] * piece["count"]


def _url_row(record: dict | str, options: dict) -> dict:
    if isinstance(record, str):
        return _row("url", "", problem=("source_read", record))
    url_column, caption_column = options.get("url_column", "url"), options.get("caption_column", "caption")
    caption = record.get(caption_column) if caption_column else ""
    extra = {column: value for column, value in record.items() if column not in (url_column, caption_column)}
    url = record.get(url_column)
    return _row("url", url if isinstance(url, str) else repr(url), _caption_value(caption), extra=to_json(extra))


def _caption_value(caption):
    """Missing captions (None, NaN) are empty; anything else is kept for caption_problem."""
    if caption is None or (isinstance(caption, float) and caption != caption):
        return ""
    return caption


def caption_problem(caption, max_bytes: int) -> tuple[str, str] | None:
    """Why a caption is a rejected row: not text, or longer than ``source.max_caption_bytes``."""
    if not isinstance(caption, str):
        return "caption", f"caption is {type(caption).__name__}, not text"
    size = len(caption.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        return "caption", f"caption is {size} bytes, more than source.max_caption_bytes={max_bytes}"
    return None


def to_json(value) -> str:
    """Extra URL-list columns as strict JSON: NaN/inf → null, bytes → base64 text (``{"$base64":
    ...}``), timestamps and dates → ISO 8601 strings, numpy values → their Python values,
    lists/dicts kept as lists/objects."""
    return json.dumps(_jsonable(value), sort_keys=True, allow_nan=False)


def _jsonable(value):
    import base64
    import datetime

    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$base64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(item) for item in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _jsonable(value.tolist())
    if hasattr(value, "isoformat"):  # pandas.Timestamp
        return value.isoformat()
    return str(value)
