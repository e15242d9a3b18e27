"""ShardWriter: samples in, complete HumanVerse shards out — never a half-written one.

Files of one shard, all beside each other under the output root::

    PPPPPP-NNNN.tar           the samples (PPPPPP = input partition id, NNNN = part)
    PPPPPP-NNNN.parquet       one row per input sample, kept or rejected, with status and reason
    PPPPPP-NNNN_stats.json    written last: the shard's commit marker

A partition rolls over into a new part by sample count or tar size. Tar and parquet are
written under temporary names and renamed once complete; the stats marker comes after both.
A killed writer therefore leaves only temporary files (removed by the next writer of that
partition) and no tar under a final name. Names depend only on the partition id and the
order of its samples, and member headers carry no timestamps, so writing the same partition
again replaces each file with identical bytes instead of adding a second copy.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import tarfile
import uuid
from collections import Counter

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from shards.sample import FORMAT_VERSION, Sample, check_key, encode_sample

STATUS_OK, STATUS_REJECTED, STATUS_FAILED = "ok", "rejected", "failed"
STATUSES = (STATUS_OK, STATUS_REJECTED, STATUS_FAILED)
STATS_SUFFIX = "_stats.json"
MANIFEST_NAME = "manifest.json"
TMP_MARKER = ".tmp-"

ROW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("source", pa.string()),
        ("caption", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("num_people", pa.int32()),
        ("sha256", pa.string()),
    ]
)


def shard_name(partition: int, part: int) -> str:
    if partition < 0 or part < 0:
        raise ValueError(f"partition and part must be ≥ 0, got {partition}, {part}")
    return f"{partition:06d}-{part:04d}"


def _join(root: str, name: str) -> str:
    return posixpath.join(root.rstrip("/"), name)


class ShardWriter:
    """Writes the samples of one input partition into one or more shards.

    ``output`` is any fsspec URL (a local path, ``s3://bucket/prefix``, ``memory://x``).
    Use as a context manager: leaving the block normally completes the last shard; leaving it
    with an exception removes the temporary files and writes no marker for the open shard.
    """

    def __init__(
        self,
        output: str,
        partition: int,
        *,
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
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.jpeg_quality = jpeg_quality
        self.completed: list[dict] = []
        self._part = 0
        self._keys: set[str] = set()
        self._token = uuid.uuid4().hex[:8]
        self._remove_temporaries()
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
            self._complete_part(final=False)
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
        self._add_row(key, STATUS_OK, "", row)

    def reject(self, key: str, reason: str, *, status: str = STATUS_REJECTED, **row) -> None:
        """Record an input that was not kept (filtered out, or failed) with its reason."""
        if status not in (STATUS_REJECTED, STATUS_FAILED):
            raise ValueError(f"status for a sample not kept must be 'rejected' or 'failed', got {status!r}")
        if not reason:
            raise ValueError(f"a {status} row needs a reason (key {key!r})")
        self._claim_key(key)
        self._add_row(key, status, reason, row)

    def close(self) -> list[dict]:
        """Complete the open shard; returns the stats of every shard this writer completed."""
        if self._tar is not None:
            self._complete_part(final=True)
            self._remove_stale_parts()
        return self.completed

    def abort(self) -> None:
        """Drop the open shard: close and delete its temporary files, write no marker."""
        if self._tar is not None:
            self._tar.close()
            self._tar_handle.close()
            self._tar = None
        self._remove_temporaries()

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
        return shard_name(self.partition, self._part)

    def _tmp(self, final_name: str) -> str:
        return _join(self.root, f"{final_name}{TMP_MARKER}{self._token}")

    def _open_part(self) -> None:
        self._tar_path = _join(self.root, f"{self._name}.tar")
        self._tar_handle = self.fs.open(self._tmp(f"{self._name}.tar"), "wb")
        self._tar = tarfile.open(fileobj=self._tar_handle, mode="w", format=tarfile.USTAR_FORMAT)
        self._rows: dict[str, list] = {name: [] for name in ROW_SCHEMA.names}
        self._samples = 0
        self._tar_bytes = 0
        self._members: Counter = Counter()

    def _claim_key(self, key: str) -> None:
        check_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r} in partition {self.partition}; keys must be unique")
        self._keys.add(key)

    def _add_row(self, key: str, status: str, reason: str, fields: dict) -> None:
        unknown = set(fields) - set(ROW_SCHEMA.names)
        if unknown:
            raise ValueError(f"unknown parquet row fields {sorted(unknown)}; allowed: {ROW_SCHEMA.names}")
        values = {**fields, "key": key, "status": status, "reason": reason}
        for name in ROW_SCHEMA.names:
            self._rows[name].append(values.get(name))

    def _complete_part(self, final: bool) -> None:
        name = self._name
        self._tar.close()
        self._tar_handle.close()
        self._tar = None
        tar_bytes = self.fs.size(self._tmp(f"{name}.tar"))

        table = pa.table(self._rows, schema=ROW_SCHEMA)
        with self.fs.open(self._tmp(f"{name}.parquet"), "wb") as handle:
            pq.write_table(table, handle)

        counts = Counter(self._rows["status"])
        stats = {
            "shard": name,
            "format": FORMAT_VERSION,
            "partition": self.partition,
            "part": self._part,
            "final": final,
            "samples": self._samples,
            "rows": table.num_rows,
            "counts": {status: counts.get(status, 0) for status in STATUSES},
            "tar_bytes": tar_bytes,
            "members": dict(sorted(self._members.items())),
        }
        # An old marker must not vouch for the new files while they are being swapped in.
        stats_path = _join(self.root, name + STATS_SUFFIX)
        if self.fs.exists(stats_path):
            self.fs.rm(stats_path)
        self.fs.mv(self._tmp(f"{name}.tar"), self._tar_path)
        self.fs.mv(self._tmp(f"{name}.parquet"), _join(self.root, f"{name}.parquet"))
        with self.fs.open(self._tmp(name + STATS_SUFFIX), "w") as handle:
            json.dump(stats, handle, indent=1, sort_keys=True)
        self.fs.mv(self._tmp(name + STATS_SUFFIX), stats_path)
        self.completed.append(stats)
        self._part += 1

    def _partition_files(self) -> list[str]:
        return self.fs.glob(_join(self.root, f"{self.partition:06d}-*"))

    def _remove_temporaries(self) -> None:
        """Temporary files of this partition are leftovers of a killed writer (or ours)."""
        for path in self._partition_files():
            if TMP_MARKER in posixpath.basename(path):
                self.fs.rm(path)

    def _remove_stale_parts(self) -> None:
        """Parts beyond the last one written now belong to an older, longer run of this
        partition; they would otherwise be read as duplicates."""
        shard_file = re.compile(rf"{self.partition:06d}-(\d{{4}})(\.tar|\.parquet|{re.escape(STATS_SUFFIX)})")
        for path in self._partition_files():
            match = shard_file.fullmatch(posixpath.basename(path))
            if match and int(match.group(1)) >= self._part:
                self.fs.rm(path)


def write_manifest(output: str, storage_options: dict | None = None) -> dict:
    """(Re)build ``manifest.json`` from the stats markers of the complete shards under ``output``."""
    fs, root = fsspec.core.url_to_fs(output, **(storage_options or {}))
    shards = []
    for path in sorted(fs.glob(_join(root, "*" + STATS_SUFFIX))):
        with fs.open(path, "r") as handle:
            stats = json.load(handle)
        shards.append(
            {
                key: stats[key]
                for key in ("shard", "partition", "part", "final", "samples", "rows", "counts", "tar_bytes")
            }
        )
    totals = Counter()
    for shard in shards:
        totals.update(shard["counts"])
    manifest = {
        "format": FORMAT_VERSION,
        "num_shards": len(shards),
        "samples": sum(shard["samples"] for shard in shards),
        "rows": sum(shard["rows"] for shard in shards),
        "counts": {status: totals.get(status, 0) for status in STATUSES},
        "shards": shards,
    }
    tmp = _join(root, MANIFEST_NAME + TMP_MARKER + uuid.uuid4().hex[:8])
    with fs.open(tmp, "w") as handle:
        json.dump(manifest, handle, indent=1, sort_keys=True)
    fs.mv(tmp, _join(root, MANIFEST_NAME))
    return manifest
