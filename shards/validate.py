"""``hyperhuman shards validate`` / ``inspect``: check a HumanVerse dataset end to end.

Only parts a partition commit record (``PPPPPP_partition.json``, see :mod:`shards.commit`)
names are trusted, and each is checked against its record: size and sha256 of the tar and
parquet, samples, rows and status counts. Every problem names its shard (or file) and, where it
has one, its sample key. Nothing here modifies the dataset.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections import Counter

import fsspec

from shards import tario
from shards.commit import (
    PART_FIELDS,
    PART_PATTERN,
    RECORD_FIELDS,
    RECORD_PATTERN,
    RECORD_SUFFIX,
    join,
    leftovers,
    part_stem,
    read_records,
    record_name,
)
from shards.sample import (
    FORMAT_VERSION,
    META,
    strict_json,
)
from shards.validate_parts import Problem, read_parquet_part, read_tar_part
from shards.writer import MANIFEST_NAME, STATUSES

# What each part field of a record is compared with, in words.
_MEASURED = {
    "samples": "samples in the tar",
    "members": "member counts in the tar",
    "tar_bytes": "tar size in bytes",
    "tar_sha256": "tar sha256",
    "rows": "rows in the parquet",
    "counts": "status counts in the parquet",
    "parquet_bytes": "parquet size in bytes",
    "parquet_sha256": "parquet sha256",
}
MANIFEST_SHARD_FIELDS = ("partition", "part", "generation", "samples", "rows", "counts", "tar_bytes")
ORPHAN_MESSAGE = (
    "orphan part file: no commit record names it; a leftover of an interrupted write, "
    "which the next `hyperhuman annotate` run on this output removes"
)


_TYPE_WORDS = {int: "int ≥ 0", str: "str", list: "list", dict: "dict of str → int ≥ 0"}


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _fields_problems(value, fields: dict[str, type]) -> list[str]:
    if not isinstance(value, dict):
        return [f"is not a JSON object but {type(value).__name__}"]
    missing = [name for name in fields if name not in value]
    if missing:
        return [f"lacks fields {missing}"]
    wrong = [
        f"{name} ({_TYPE_WORDS[kind]}, got {value[name]!r})"
        for name, kind in fields.items()
        if not isinstance(value[name], kind)
        or (kind is int and not _is_count(value[name]))
        or (kind is dict and not all(isinstance(k, str) and _is_count(v) for k, v in value[name].items()))
    ]
    return [f"has fields of the wrong type: {', '.join(wrong)}"] if wrong else []


def _record_shape(record) -> list[str]:
    """What keeps ``record`` from being a well-formed commit record (empty when it is one)."""
    found = _fields_problems(record, RECORD_FIELDS)
    if found:
        return found
    if not record["parts"]:
        return ["names no parts"]
    for index, part in enumerate(record["parts"]):
        found += [f"parts[{index}] {message}" for message in _fields_problems(part, PART_FIELDS)]
    return found


def _read_valid_records(fs, root: str, problems: list[Problem]) -> dict[int, dict]:
    """Every commit record under ``root`` that parses strictly and is well formed, by partition
    id; every other ``*_partition.json`` is a problem (and names no trusted part)."""
    records = {}
    for path in sorted(fs.glob(join(root, "*" + RECORD_SUFFIX))):
        name = posixpath.basename(path)
        match = RECORD_PATTERN.fullmatch(name)
        if not match:
            message = f"is not a commit record name (PPPPPP{RECORD_SUFFIX}); readers ignore it"
            problems.append(Problem(name, None, message))
            continue
        try:
            with fs.open(path, "rb") as handle:
                record = strict_json(handle.read())
        except (UnicodeDecodeError, ValueError) as exc:
            problems.append(Problem(name, None, f"commit record does not parse as strict JSON: {exc}"))
            continue
        shape = _record_shape(record)
        for message in shape:
            problems.append(Problem(name, None, f"commit record {message}"))
        if not shape:
            records[int(match.group(1))] = record
    return records


def _check_record_structure(name: str, partition: int, record: dict, problems: list[Problem]) -> None:
    """The record against its own file name and its parts' names, and its totals against its parts."""

    def problem(message: str) -> None:
        problems.append(Problem(name, None, message))

    if record["partition"] != partition:
        problem(f"record partition {record['partition']!r} differs from the file name's {partition}")
    if record["format"] != FORMAT_VERSION:
        problem(f"record format {record['format']!r}, expected {FORMAT_VERSION!r}")
    numbers = [part["part"] for part in record["parts"]]
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(max(numbers) + 1)) - set(numbers)) if numbers else []
        problem(
            f"parts are numbered {numbers}; a partition's parts are 0..{len(numbers) - 1} in order"
            + (f" (missing {missing})" if missing else "")
        )
    for part in record["parts"]:
        expected = part_stem(partition, part["part"], record["generation"])  # the shape check made both ≥ 0
        if part["shard"] != expected:
            problem(
                f"part {part['shard']!r} is not named after partition {partition}, part {part['part']} and "
                f"generation {record['generation']} (expected {expected!r})"
            )
    for field in ("samples", "rows"):
        total = sum(part[field] for part in record["parts"])
        if record[field] != total:
            problem(f"record {field} {record[field]} ≠ {total} summed over its parts")
    counts = Counter()
    for part in record["parts"]:
        counts.update(part["counts"])
    if Counter(record["counts"]) != counts:  # missing statuses count as zero
        problem(f"record counts {record['counts']} ≠ {dict(counts)} summed over its parts")


def _check_part(fs, root: str, name: str, part: dict, decode: bool, problems: list[Problem]) -> set[str]:
    """One part named by record ``name``: its files against the record. Returns its keys (tar
    samples and parquet rows)."""
    shard = part["shard"]
    if not PART_PATTERN.fullmatch(shard + ".tar"):
        return set()  # not a part name (reported with the record): its files are not looked for
    measured: dict = {}
    keys: set[str] = set()
    tar, parquet = join(root, shard + ".tar"), join(root, shard + ".parquet")
    tar_keys = None
    if fs.exists(tar):
        measured.update(read_tar_part(fs, tar, shard, problems, decode))
        tar_keys = measured.pop("keys")
        keys.update(tar_keys or ())
    else:
        problems.append(Problem(shard, None, f"tar is missing; {name} names it"))
    if fs.exists(parquet):
        measured.update(read_parquet_part(fs, parquet, shard, tar_keys, problems))
        keys.update(measured.pop("row_keys", ()))
    else:
        problems.append(Problem(shard, None, f"parquet is missing; {name} names it"))
    for field, words in _MEASURED.items():
        if measured.get(field) is not None and measured[field] != part[field]:
            problems.append(Problem(shard, None, f"{words} {measured[field]} ≠ {part[field]} in {name}"))
    return keys


# -- the manifest ----------------------------------------------------------------------------


def _check_manifest(fs, root: str, records: dict[int, dict], problems: list[Problem]) -> None:
    def problem(message: str) -> None:
        problems.append(Problem(MANIFEST_NAME, None, message))

    path = join(root, MANIFEST_NAME)
    if not fs.exists(path):
        problem("missing; rebuild it with shards.writer.write_manifest")
        return
    try:
        with fs.open(path, "rb") as handle:
            manifest = strict_json(handle.read())
    except (UnicodeDecodeError, ValueError) as exc:
        problem(f"does not parse as strict JSON: {exc}; rebuild it with shards.writer.write_manifest")
        return
    if not isinstance(manifest, dict):
        problem("is not a JSON object; rebuild it with shards.writer.write_manifest")
        return
    expected = {
        part["shard"]: {"partition": partition, "generation": record["generation"], **part}
        for partition, record in sorted(records.items())
        for part in record["parts"]
    }
    entries = manifest.get("shards", [])
    listed = {
        entry["shard"]: entry for entry in entries if isinstance(entry, dict) and isinstance(entry.get("shard"), str)
    }
    for shard in sorted(set(expected) - set(listed)):
        problem(f"does not list complete shard {shard}")
    for shard in sorted(set(listed) - set(expected)):
        problem(f"lists {shard}, which no commit record names")
    for shard in sorted(set(listed) & set(expected)):
        for field in MANIFEST_SHARD_FIELDS:
            if listed[shard].get(field) != expected[shard][field]:
                problem(f"{shard} {field} {listed[shard].get(field)} ≠ {expected[shard][field]} in its commit record")
    counts = Counter()
    for record in records.values():
        counts.update(record["counts"])
    totals = {
        "partitions": len(records),
        "num_shards": len(expected),
        "samples": sum(record["samples"] for record in records.values()),
        "rows": sum(record["rows"] for record in records.values()),
        "counts": {status: counts.get(status, 0) for status in STATUSES},
    }
    for field, total in totals.items():
        if manifest.get(field) != total:
            problem(f"total {field} {manifest.get(field)} ≠ {total} in the commit records")


# -- entry points ----------------------------------------------------------------------------


def validate(root: str, *, decode: bool = True, storage_options: dict | None = None) -> list[Problem]:
    """Every problem found in the dataset under ``root`` (an empty list means valid)."""
    fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    if not fs.isdir(path):
        return [Problem(root, None, "is not a directory")]
    problems: list[Problem] = []
    records = _read_valid_records(fs, path, problems)
    if not records:
        problems.append(Problem(root, None, f"holds no shards: no commit record (PPPPPP{RECORD_SUFFIX}) names a part"))
    temporaries, orphans = leftovers(fs, path, records)
    for temporary in temporaries:
        name = posixpath.basename(temporary)
        problems.append(Problem(name, None, "temporary file left by an interrupted writer; rerun that partition"))
    for orphan in orphans:
        problems.append(Problem(posixpath.basename(orphan), None, ORPHAN_MESSAGE))
    owner: dict[str, str] = {}  # every key seen so far → the shard that holds it
    for partition, record in sorted(records.items()):
        name = record_name(partition)
        _check_record_structure(name, partition, record, problems)
        for part in record["parts"]:
            shard = part["shard"]
            for key in sorted(_check_part(fs, path, name, part, decode, problems)):
                if key in owner and owner[key] != shard:
                    problems.append(Problem(shard, key, f"duplicate key: {owner[key]} holds it too"))
                else:
                    owner[key] = shard
    _check_manifest(fs, path, records, problems)
    return problems


def inspect(root: str, *, max_keys: int = 5, storage_options: dict | None = None) -> dict:
    """Counts, sizes, annotators and example keys of the complete partitions of a dataset (from
    their commit records; reads the metadata members only)."""
    fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    records = read_records(fs, path)
    temporaries, orphans = leftovers(fs, path, records)
    counts, members, annotators = Counter(), Counter(), Counter()
    keys: list[str] = []
    shards = samples = tar_bytes = 0
    for _, record in sorted(records.items()):
        counts.update(record["counts"])
        for part in record["parts"]:
            shards += 1
            members.update(part["members"])
            samples += part["samples"]
            tar_bytes += part["tar_bytes"]
            with fs.open(join(path, part["shard"] + ".tar"), "rb") as handle:
                with tarfile.open(fileobj=handle, mode="r|*") as archive:
                    for member in archive:
                        if not member.name.endswith("." + META) or member.name.count(".") != 1:
                            continue
                        tario.check_member(member)
                        meta = json.loads(archive.extractfile(member).read())
                        if len(keys) < max_keys:
                            keys.append(meta["key"])
                        for modality, info in meta.get("annotations", {}).items():
                            annotators[
                                f"{modality}: {info.get('annotator')} {info.get('version')} ({info.get('weights')})"
                            ] += 1
    return {
        "root": root,
        "complete_partitions": len(records),
        "complete_shards": shards,
        "orphan_part_files": len(orphans),
        "temporary_files": len(temporaries),
        "samples": samples,
        "rows": {status: counts.get(status, 0) for status in (*STATUSES, *sorted(set(counts) - set(STATUSES)))},
        "tar_bytes": tar_bytes,
        "members": dict(members),
        "annotators": dict(annotators),
        "example_keys": keys,
    }
