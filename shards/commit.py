"""Partition commit records: the one file that makes a partition complete.

::

    PPPPPP_partition.json    its parts (tar + parquet: sizes, sha256, counts), generation, job

A writer first puts every part of a partition in place under names of a new *generation*
(``PPPPPP-NNNN`` for generation 0, ``PPPPPP-NNNN-gG`` after), which cannot collide with the
committed parts; then it replaces the record in one atomic step; then it removes the parts of
the generation it replaced. Whatever point a writer is killed at, a reader sees either the old
complete partition or the new complete one, never a mix: readers (``complete_shard_urls``, the
manifest, the training dataset, validate, the gallery) trust only parts a record names. Files
of a partition that no record names are leftovers of a killed writer (:func:`remove_leftovers`).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import signal
import uuid

from shards.sample import FORMAT_VERSION, strict_json

RECORD_SUFFIX = "_partition.json"
TMP_MARKER = ".tmp-"
PART_PATTERN = re.compile(r"(\d{6})-(\d{4})(?:-g(\d+))?\.(tar|parquet)")
RECORD_PATTERN = re.compile(r"(\d{6})" + re.escape(RECORD_SUFFIX))


def part_stem(partition: int, part: int, generation: int = 0) -> str:
    """``000003-0001`` (generation 0, what a fresh output holds) or ``000003-0001-g2``."""
    if partition < 0 or part < 0 or generation < 0:
        raise ValueError(f"partition, part and generation must be ≥ 0, got {partition}, {part}, {generation}")
    stem = f"{partition:06d}-{part:04d}"
    return stem if generation == 0 else f"{stem}-g{generation}"


def record_name(partition: int) -> str:
    return f"{partition:06d}{RECORD_SUFFIX}"


def join(root: str, name: str) -> str:
    return posixpath.join(root.rstrip("/"), name)


def write_atomic(fs, path: str, data: bytes, fault: str | None = None, partition: int | None = None) -> None:
    """Replace ``path`` with ``data`` in one step: a temporary file renamed over it on a local
    disk (``rename`` is atomic); a single PUT on object stores (atomic per object). ``fault``
    names the injection point between the temporary write and the rename."""
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    tmp = f"{path}{TMP_MARKER}{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as handle:
        handle.write(data)
    if fault:
        fault_point(fault, partition)
    os.replace(tmp, path)


def write_json_atomic(fs, path: str, value, **kwargs) -> None:
    write_atomic(fs, path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode(), **kwargs)


def is_local(fs) -> bool:
    """A local disk, where ``os.replace`` renames atomically."""
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def read_record(fs, root: str, partition: int) -> dict | None:
    """The partition's commit record, or None when it has none (or an unreadable one, which
    :func:`shards.validate.validate` reports and the next rewrite replaces)."""
    try:
        with fs.open(join(root, record_name(partition)), "rb") as handle:
            record = strict_json(handle.read())
    except (FileNotFoundError, ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        return None
    return record if _well_formed(record) else None


# The fields of a commit record and of each of its parts, with their JSON types (validate checks
# them all; readers need those in READ_FIELDS / READ_PART_FIELDS).
RECORD_FIELDS = {
    "format": str, "partition": int, "generation": int, "job": str, "samples": int, "rows": int, "counts": dict,
    "parts": list,
}  # fmt: skip
PART_FIELDS = {
    "shard": str, "part": int, "samples": int, "rows": int, "counts": dict, "tar_bytes": int, "tar_sha256": str,
    "parquet_bytes": int, "parquet_sha256": str, "members": dict,
}  # fmt: skip
READ_FIELDS = ("parts", "generation", "counts")
READ_PART_FIELDS = ("shard", "part", "samples", "rows", "counts", "tar_bytes")


def _well_formed(record) -> bool:
    """The fields readers rely on are there with their types (validate says what is wrong)."""
    if not isinstance(record, dict) or not all(isinstance(record.get(n), RECORD_FIELDS[n]) for n in READ_FIELDS):
        return False
    return all(
        isinstance(part, dict)
        and all(isinstance(part.get(name), PART_FIELDS[name]) for name in READ_PART_FIELDS)
        and PART_PATTERN.fullmatch(part["shard"] + ".tar") is not None  # never a path outside the root
        for part in record["parts"]
    )


def read_records(fs, root: str) -> dict[int, dict]:
    """Every readable commit record under ``root``, by partition id. Records are written by other
    processes (the job's workers), so a listing this process cached (s3fs does) is dropped first."""
    fs.invalidate_cache(root)
    records = {}
    for path in sorted(fs.glob(join(root, "*" + RECORD_SUFFIX))):
        match = RECORD_PATTERN.fullmatch(posixpath.basename(path))
        if match and (record := read_record(fs, root, int(match.group(1)))) is not None:
            records[int(match.group(1))] = record
    return records


def committed_names(record: dict) -> set[str]:
    return {f"{part['shard']}.{extension}" for part in record["parts"] for extension in ("tar", "parquet")}


def new_record(partition: int, generation: int, job: str, parts: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for part in parts:
        for status, count in part["counts"].items():
            counts[status] = counts.get(status, 0) + count
    return {
        "format": FORMAT_VERSION,
        "partition": partition,
        "generation": generation,
        "job": job,
        "samples": sum(part["samples"] for part in parts),
        "rows": sum(part["rows"] for part in parts),
        "counts": counts,
        "parts": parts,
    }


def leftovers(fs, root: str, records: dict[int, dict] | None = None) -> tuple[list[str], list[str]]:
    """(temporary files, orphan parts): files under ``root`` a killed writer left behind. An
    orphan is a part file of a partition that its commit record does not name."""
    records = read_records(fs, root) if records is None else records
    named = {partition: committed_names(record) for partition, record in records.items()}
    temporaries, orphans = [], []
    for path in fs.ls(root, detail=False):
        base = posixpath.basename(path)
        if TMP_MARKER in base:
            temporaries.append(path)
        elif (match := PART_PATTERN.fullmatch(base)) and base not in named.get(int(match.group(1)), ()):
            orphans.append(path)
    return sorted(temporaries), sorted(orphans)


def remove_leftovers(fs, root: str, records: dict[int, dict] | None = None) -> list[str]:
    """Remove what killed writers left. Only safe while no writer runs on ``root``: the job
    calls it holding the output lock, before its writers start and after they have all ended."""
    temporaries, orphans = leftovers(fs, root, records)
    for path in temporaries + orphans:
        fs.rm(path)
    return [posixpath.basename(path) for path in temporaries + orphans]


# -- fault injection (tests) -------------------------------------------------------------------

FAULT_ENV = "HYPERHUMAN_FAULT"  # "POINT" or "POINT:PARTITION": SIGKILL this process there
FAULT_ONCE_ENV = "HYPERHUMAN_FAULT_ONCE"  # a file path: fire only if it does not exist (then create it)
FAULT_LOG_ENV = "HYPERHUMAN_FAULT_LOG"  # a file path: a line is appended each time a fault fires
FAULT_POINTS = (
    "part_written",  # the first part of the new generation renamed into place, others not yet
    "parts_written",  # every new part in place, the old record still names the old parts
    "record_staged",  # the new record written under its temporary name, not yet renamed
    "record_swapped",  # the new record in place, the old generation's parts not yet removed
)


def fault_point(name: str, partition: int | None = None) -> None:
    """Kill this process with SIGKILL if ``HYPERHUMAN_FAULT`` names this point (and partition):
    how the tests prove that a writer killed at any step leaves a readable output."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    point, _, which = wanted.partition(":")
    if point != name or (which and partition is not None and int(which) != partition):
        return
    once = os.environ.get(FAULT_ONCE_ENV)
    if once:
        try:
            with open(once, "x"):
                pass
        except FileExistsError:
            return
    if log := os.environ.get(FAULT_LOG_ENV):
        with open(log, "a") as handle:
            handle.write(f"{name} {partition} {os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)
