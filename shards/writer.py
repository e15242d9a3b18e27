"""ShardWriter: samples in, complete HumanVerse partitions out — never a half-written one.

Files of one input partition, all beside each other under the output root::

    PPPPPP-NNNN.tar          the samples (PPPPPP = input partition id, NNNN = part)
    PPPPPP-NNNN.parquet      one row per input sample, kept or rejected, with status, rule, reason
    PPPPPP_partition.json    written last: the partition's commit record (see shards.commit)

A partition rolls over into a new part by sample count or tar size. Each part is written under a
temporary name unique to this writer, renamed once complete; the commit record naming every part
(sizes, sha256, counts) replaces the previous one in one atomic step, and only then are the parts
it replaced removed. A rewrite of a committed partition uses the next *generation*'s names
(``PPPPPP-NNNN-gG``), so at every instant the record names a complete set of parts. Names depend
only on the partition id, the order of its samples and the generation, and member headers carry
no timestamps, so the first write of a partition always has the same names and bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
import uuid
from collections import Counter

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from shards.commit import (
    PART_PATTERN,
    TMP_MARKER,
    committed_names,
    fault_point,
    join,
    new_record,
    part_stem,
    read_record,
    read_records,
    record_name,
    write_json_atomic,
)
from shards.sample import FORMAT_VERSION, Sample, check_key, encode_sample

STATUS_OK, STATUS_REJECTED, STATUS_FAILED = "ok", "rejected", "failed"
STATUSES = (STATUS_OK, STATUS_REJECTED, STATUS_FAILED)
MANIFEST_NAME = "manifest.json"

ROW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),
        ("rule", pa.string()),  # the filter that rejected the row ("" when kept, or failed without one)
        ("reason", pa.string()),
        ("source", pa.string()),
        ("caption", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("num_people", pa.int32()),
        ("sha256", pa.string()),
    ]
)


def shard_name(partition: int, part: int, generation: int = 0) -> str:
    return part_stem(partition, part, generation)


class _HashingFile:
    """A write-only file that hashes and counts what passes through (tarfile needs ``tell``)."""

    def __init__(self, handle):
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        self.handle.close()


class ShardWriter:
    """Writes the samples of one input partition into one or more shards, committed together.

    ``output`` is any fsspec URL (a local path, ``s3://bucket/prefix``, ``memory://x``); ``job``
    (the job's fingerprint) is stored in the commit record, so a resumed job can tell its own
    partitions from those of an earlier job with other settings. Use as a context manager:
    leaving the block normally commits the partition; leaving it with an exception removes this
    writer's files and leaves the committed partition (if any) as it was.
    """

    def __init__(
        self,
        output: str,
        partition: int,
        *,
        job: str = "",
        max_samples: int = 1000,
        max_bytes: int = 1 << 30,
        jpeg_quality: int = 95,
        storage_options: dict | None = None,
    ):
        if max_samples < 1:
            raise ValueError(f"max_samples must be ≥ 1, got {max_samples}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be ≥ 1, got {max_bytes}")
        self.fs, self.root = fsspec.core.url_to_fs(output, **(storage_options or {}))
        self.fs.makedirs(self.root, exist_ok=True)
        self.partition = int(partition)
        self.job = job
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.jpeg_quality = jpeg_quality
        previous = read_record(self.fs, self.root, self.partition)
        self.generation = 0 if previous is None else int(previous["generation"]) + 1
        self.completed: list[dict] = []
        self._placed: list[str] = []  # parts of the new generation renamed into place
        self._part = 0
        self._keys: set[str] = set()
        self._token = uuid.uuid4().hex[:8]  # temporary names unique to this attempt
        self._open_part()

    # -- public API ----------------------------------------------------------------------------

    def write(self, sample: Sample) -> None:
        """Encode and add a kept sample (status ``ok``)."""
        members = encode_sample(sample, jpeg_quality=self.jpeg_quality)
        meta = json.loads(members["json"])
        people = sample.pose["people"] if sample.pose is not None else None
        self.write_encoded(
            sample.key,
            members,
            source=sample.source,
            caption=sample.caption,
            width=meta["width"],
            height=meta["height"],
            num_people=None if people is None else len(people),
            sha256=meta["sha256"],
        )

    def write_encoded(self, key: str, members: dict[str, bytes], **row) -> None:
        """Add a sample already encoded by :func:`shards.sample.encode_sample` (e.g. on a Ray
        worker), with its parquet row fields (``source``, ``caption``, ``width``, ...)."""
        self._claim_key(key)
        size = sum(len(data) + 1024 for data in members.values())  # + header and padding
        if self._samples and (self._samples >= self.max_samples or self._tar_bytes + size > self.max_bytes):
            self._complete_part()
            self._open_part()
        for extension, data in members.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0  # deterministic bytes: a rerun rewrites the identical file
            self._tar.addfile(info, io.BytesIO(data))
        self._tar_bytes += size
        self._samples += 1
        self._members.update(members.keys())
        self._add_row(key, STATUS_OK, "", "", row)

    def reject(self, key: str, reason: str, *, status: str = STATUS_REJECTED, rule: str = "", **row) -> None:
        """Record an input that was not kept (filtered out by ``rule``, or failed) with its reason."""
        if status not in (STATUS_REJECTED, STATUS_FAILED):
            raise ValueError(f"status for a sample not kept must be 'rejected' or 'failed', got {status!r}")
        if not reason:
            raise ValueError(f"a {status} row needs a reason (key {key!r})")
        self._claim_key(key)
        self._add_row(key, status, rule or "", reason, row)

    def close(self) -> list[dict]:
        """Commit the partition; returns the stats of every part it now has."""
        if self._tar is not None:
            self._complete_part()
            fault_point("parts_written", self.partition)
            record = new_record(self.partition, self.generation, self.job, self.completed)
            write_json_atomic(
                self.fs, join(self.root, record_name(self.partition)), record, fault="record_staged",
                partition=self.partition,
            )  # fmt: skip
            fault_point("record_swapped", self.partition)
            self._remove_replaced(committed_names(record))
        return self.completed

    def abort(self) -> None:
        """Drop what this writer wrote; the committed partition (if any) stays as it was."""
        if self._tar is not None:
            self._tar.close()
            self._tar_file.close()
            self._tar = None
        for path in [self._tmp(self._tar_name), *self._placed]:
            if self.fs.exists(path):
                self.fs.rm(path)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- internals -----------------------------------------------------------------------------

    @property
    def _name(self) -> str:
        return shard_name(self.partition, self._part, self.generation)

    @property
    def _tar_name(self) -> str:
        return f"{self._name}.tar"

    def _tmp(self, final_name: str) -> str:
        return join(self.root, f"{final_name}{TMP_MARKER}{self._token}")

    def _open_part(self) -> None:
        self._tar_file = _HashingFile(self.fs.open(self._tmp(self._tar_name), "wb"))
        self._tar = tarfile.open(fileobj=self._tar_file, mode="w", format=tarfile.USTAR_FORMAT)
        self._rows: dict[str, list] = {name: [] for name in ROW_SCHEMA.names}
        self._samples = 0
        self._tar_bytes = 0
        self._members: Counter = Counter()

    def _claim_key(self, key: str) -> None:
        check_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r} in partition {self.partition}; keys must be unique")
        self._keys.add(key)

    def _add_row(self, key: str, status: str, rule: str, reason: str, fields: dict) -> None:
        unknown = set(fields) - set(ROW_SCHEMA.names)
        if unknown:
            raise ValueError(f"unknown parquet row fields {sorted(unknown)}; allowed: {ROW_SCHEMA.names}")
        values = {**fields, "key": key, "status": status, "rule": rule, "reason": reason}
        for name in ROW_SCHEMA.names:
            self._rows[name].append(values.get(name))

    def _complete_part(self) -> None:
        """Close the open part and rename its tar and parquet into the new generation's names."""
        name = self._name
        self._tar.close()
        self._tar_file.close()
        self._tar = None

        buffer = io.BytesIO()
        table = pa.table(self._rows, schema=ROW_SCHEMA)
        pq.write_table(table, buffer)
        parquet = buffer.getvalue()
        self.fs.pipe_file(self._tmp(f"{name}.parquet"), parquet)

        counts = Counter(self._rows["status"])
        self.completed.append(
            {
                "shard": name,
                "part": self._part,
                "samples": self._samples,
                "rows": table.num_rows,
                "counts": {status: counts.get(status, 0) for status in STATUSES},
                "tar_bytes": self._tar_file.size,
                "tar_sha256": self._tar_file.sha256.hexdigest(),
                "parquet_bytes": len(parquet),
                "parquet_sha256": hashlib.sha256(parquet).hexdigest(),
                "members": dict(sorted(self._members.items())),
            }
        )
        for extension in ("tar", "parquet"):
            final = join(self.root, f"{name}.{extension}")
            self.fs.mv(self._tmp(f"{name}.{extension}"), final)
            self._placed.append(final)
        fault_point("part_written", self.partition)
        self._part += 1

    def _remove_replaced(self, keep: set[str]) -> None:
        """Remove this partition's part files the new record does not name: the generation it
        replaced and anything an earlier killed attempt left under final names."""
        prefix = f"{self.partition:06d}-"
        for path in self.fs.glob(join(self.root, prefix + "*")):
            base = posixpath.basename(path)
            if PART_PATTERN.fullmatch(base) and base not in keep:
                self.fs.rm(path)


def write_manifest(output: str, storage_options: dict | None = None, records: dict | None = None) -> dict:
    """(Re)build ``manifest.json`` from the commit records under ``output`` (written atomically;
    ``records`` when the caller has just read them)."""
    fs, root = fsspec.core.url_to_fs(output, **(storage_options or {}))
    records = read_records(fs, root) if records is None else records
    shards = [
        {
            "shard": part["shard"],
            "partition": partition,
            "part": part["part"],
            "generation": record["generation"],
            **{key: part[key] for key in ("samples", "rows", "counts", "tar_bytes")},
        }
        for partition, record in sorted(records.items())
        for part in record["parts"]
    ]
    totals = Counter()
    for shard in shards:
        totals.update(shard["counts"])
    manifest = {
        "format": FORMAT_VERSION,
        "partitions": len(records),
        "num_shards": len(shards),
        "samples": sum(shard["samples"] for shard in shards),
        "rows": sum(shard["rows"] for shard in shards),
        "counts": {status: totals.get(status, 0) for status in STATUSES},
        "shards": shards,
    }
    write_json_atomic(fs, join(root, MANIFEST_NAME), manifest)
    return manifest
