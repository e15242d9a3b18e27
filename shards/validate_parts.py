"""The checks of one part of a HumanVerse dataset, for :mod:`shards.validate`: its tar (safe
members, contiguous keys, every sample's members decodable and consistent, JSON members strict)
and its parquet (schema, statuses, rules, reasons, keys against the tar)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shards import tario
from shards.sample import (
    ANNOTATION_MEMBERS,
    DEPTH,
    IMAGE,
    MASK,
    MEMBER_ORDER,
    META,
    NORMAL,
    POSE,
    PROVENANCE_FIELDS,
    REQUIRED_MEMBERS,
    decode_member,
    strict_json,
)
from shards.writer import ROW_SCHEMA, STATUS_OK, STATUS_REJECTED, STATUSES


@dataclass(frozen=True)
class Problem:
    shard: str
    key: str | None
    message: str

    def __str__(self) -> str:
        where = self.shard + (f" key={self.key}" if self.key else "")
        return f"{where}: {self.message}"


def _is_json_member(extension: str) -> bool:
    return extension == "json" or extension.endswith(".json")


# -- one sample ------------------------------------------------------------------------------


def _check_json_members(shard: str, sample: dict, problems: list[Problem]) -> set[str]:
    """Parse every JSON member strictly; returns the extensions that failed."""
    key, bad = sample["__key__"], set()
    for extension, data in sample.items():
        if extension.startswith("__") or not _is_json_member(extension):
            continue
        try:
            strict_json(data)
        except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
            problems.append(Problem(shard, key, f"{key}.{extension} is not strict JSON: {exc}"))
            bad.add(extension)
    return bad


def _check_sample(shard: str, sample: dict, problems: list[Problem], skip: set[str] = frozenset()) -> None:
    """Members, decoding and cross-member consistency of one sample; members in ``skip``
    (already reported) are not decoded."""
    key = sample["__key__"]

    def problem(message: str) -> None:
        problems.append(Problem(shard, key, message))

    for extension in REQUIRED_MEMBERS:
        if extension not in sample:
            problem(f"missing required member {key}.{extension}")
    for extension in sample:
        if not extension.startswith("__") and extension not in MEMBER_ORDER:
            problem(f"unexpected member {key}.{extension}")

    decoded = {}
    for extension in MEMBER_ORDER:
        if extension in sample and extension not in skip:
            try:
                decoded[extension] = decode_member(extension, sample[extension])
            except Exception as exc:  # report every undecodable member, whatever the cause
                problem(f"{key}.{extension} does not decode: {type(exc).__name__}: {exc}")
    meta = decoded.get(META)
    image = decoded.get(IMAGE)
    if not isinstance(meta, dict):
        return
    if meta.get("key") != key:
        problem(f"metadata key {meta.get('key')!r} differs from the member key")
    if IMAGE in sample and meta.get("sha256") != hashlib.sha256(sample[IMAGE]).hexdigest():
        problem("image sha256 differs from the one recorded in the metadata")
    annotations = meta.get("annotations", {})
    for modality, extension in ANNOTATION_MEMBERS.items():
        if extension in sample:
            missing = [name for name in PROVENANCE_FIELDS if name not in annotations.get(modality, {})]
            if missing:
                problem(f"annotations.{modality} lacks provenance fields {missing}")
    if image is None:
        return
    height, width = image.shape[:2]
    if (meta.get("width"), meta.get("height")) != (width, height):
        problem(f"metadata size {meta.get('width')}x{meta.get('height')} differs from image size {width}x{height}")
    for extension in (DEPTH, NORMAL, MASK):
        if extension in decoded and decoded[extension].shape[:2] != (height, width):
            got_h, got_w = decoded[extension].shape[:2]
            problem(f"{extension} is {got_w}x{got_h} but the image is {width}x{height}")
    pose = decoded.get(POSE)
    if pose is not None:
        if (pose["width"], pose["height"]) != (width, height):
            problem(f"pose.json size {pose['width']}x{pose['height']} differs from image size {width}x{height}")
        for index, person in enumerate(pose["people"]):
            for field in ("keypoints", "wholebody"):
                if field not in person:
                    continue
                points = person[field]
                visible = points[:, 2] > 0
                outside = visible & (
                    (points[:, 0] < 0) | (points[:, 0] > width) | (points[:, 1] < 0) | (points[:, 1] > height)
                )
                if outside.any():
                    first = int(np.flatnonzero(outside)[0])
                    problem(
                        f"person {index} {field}[{first}] at ({points[first, 0]:.1f}, {points[first, 1]:.1f}) "
                        f"lies outside the {width}x{height} image ({int(outside.sum())} such keypoints)"
                    )


# -- one part: its tar and its parquet ---------------------------------------------------------


class _HashingReader:
    """A read-only file that hashes and counts what passes through, so a tar is read once."""

    def __init__(self, handle):
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.sha256.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def read_tar_part(fs, path: str, shard: str, problems: list[Problem], decode: bool) -> dict:
    """Check one tar. Returns what was measured: ``keys`` (sample keys in order, None if the tar
    cannot be read to its end), ``members``, ``tar_bytes`` and ``tar_sha256``."""
    keys: list[str] = []
    seen: set[str] = set()
    members: Counter = Counter()
    current: dict | None = None

    def finish(sample: dict | None) -> None:
        if sample is None:
            return
        bad = _check_json_members(shard, sample, problems)
        if decode:
            _check_sample(shard, sample, problems, skip=bad)

    with fs.open(path, "rb") as handle:
        reader = _HashingReader(handle)
        try:
            with tarfile.open(fileobj=reader, mode="r|*") as archive:
                for member in archive:
                    try:
                        tario.check_member(member)
                        key, extension = tario.split_member_name(member.name)
                    except ValueError as exc:  # UnsafeMemberError is a ValueError too
                        problems.append(Problem(shard, None, str(exc)))
                        continue
                    data = archive.extractfile(member).read()
                    members[extension] += 1
                    if current is None or key != current["__key__"]:
                        finish(current)
                        if key in seen:
                            problems.append(Problem(shard, key, "members of this key are not contiguous"))
                            current = None
                            continue
                        seen.add(key)
                        keys.append(key)
                        current = {"__key__": key}
                    if extension in current:
                        problems.append(Problem(shard, key, f"duplicate member {member.name}"))
                    current[extension] = data
                finish(current)
        except (tarfile.TarError, EOFError, OSError) as exc:
            problems.append(Problem(shard, None, f"tar is unreadable or truncated: {type(exc).__name__}: {exc}"))
            keys = None
        try:
            reader.drain()  # the end-of-archive padding tarfile leaves unread counts for the sha256 too
        except OSError as exc:
            problems.append(Problem(shard, None, f"tar cannot be read to its end: {type(exc).__name__}: {exc}"))
            reader = None
    return {
        "keys": keys,
        "samples": None if keys is None else len(keys),
        "members": None if keys is None else dict(sorted(members.items())),
        "tar_bytes": None if reader is None else reader.size,
        "tar_sha256": None if reader is None else reader.sha256.hexdigest(),
    }


def read_parquet_part(fs, path: str, shard: str, tar_keys: list[str] | None, problems: list[Problem]) -> dict:
    """Check one parquet (and its 'ok' rows against the tar's keys). Returns what was measured:
    ``parquet_bytes``, ``parquet_sha256``, and where the table is readable ``row_keys``,
    ``rows`` and ``counts``."""

    def problem(message: str, key: str | None = None) -> None:
        problems.append(Problem(shard, key, message))

    with fs.open(path, "rb") as handle:
        data = handle.read()
    measured = {"parquet_bytes": len(data), "parquet_sha256": hashlib.sha256(data).hexdigest()}
    try:
        table = pq.read_table(io.BytesIO(data), use_threads=False)  # see apache/arrow#34314: pool threads abort at exit
    except Exception as exc:  # any pyarrow parse error
        problem(f"parquet is unreadable: {type(exc).__name__}: {exc}")
        return measured
    measured["rows"] = table.num_rows
    missing_columns = set(ROW_SCHEMA.names) - set(table.column_names) - {"rule"}
    if missing_columns:
        problem(f"parquet lacks columns {sorted(missing_columns)}")
        return measured
    rows = table.to_pydict()
    measured["row_keys"] = rows["key"]
    statuses = Counter(rows["status"])
    unknown = set(statuses) - set(STATUSES)
    if unknown:
        problem(f"parquet has unknown statuses {sorted(unknown)}")
    measured["counts"] = {status: statuses.get(status, 0) for status in STATUSES}
    duplicates = [key for key, count in Counter(rows["key"]).items() if count > 1]
    if duplicates:
        problem(f"parquet lists keys more than once: {duplicates[:5]}")
    for key, status, reason in zip(rows["key"], rows["status"], rows["reason"], strict=True):
        if status != STATUS_OK and not reason:
            problem(f"{status} row has no reason", key)
    if "rule" not in table.column_names:
        problem("parquet has no 'rule' column: written before the rule column; rewrite with --overwrite")
    elif not (pa.types.is_string(rule_type := table.schema.field("rule").type) or pa.types.is_large_string(rule_type)):
        problem(f"parquet 'rule' column is {rule_type}, not a string column")
    else:
        for key, status, rule in zip(rows["key"], rows["status"], rows["rule"], strict=True):
            if status == STATUS_REJECTED and not rule:
                problem("rejected row has no rule (the filter that rejected it)", key)
    if tar_keys is not None:
        ok_keys = {key for key, status in zip(rows["key"], rows["status"], strict=True) if status == STATUS_OK}
        for key in sorted(set(tar_keys) - ok_keys):
            problem("sample is in the tar but not an 'ok' row of the parquet", key)
        for key in sorted(ok_keys - set(tar_keys)):
            problem("'ok' row in the parquet but no sample in the tar", key)
    return measured


# -- commit records --------------------------------------------------------------------------
