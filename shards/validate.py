"""``hyperhuman shards validate`` / ``inspect``: check a HumanVerse dataset end to end.

Every problem names its shard and, where it has one, its sample key. Nothing here modifies
the dataset.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
from collections import Counter
from dataclasses import dataclass

import fsspec
import numpy as np
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
)
from shards.writer import MANIFEST_NAME, ROW_SCHEMA, STATS_SUFFIX, STATUS_OK, STATUSES, TMP_MARKER, _join


@dataclass(frozen=True)
class Problem:
    shard: str
    key: str | None
    message: str

    def __str__(self) -> str:
        where = self.shard + (f" key={self.key}" if self.key else "")
        return f"{where}: {self.message}"


def _shard_names(fs, root: str) -> tuple[set[str], set[str], list[str]]:
    tars, markers, temporaries = set(), set(), []
    for path in fs.ls(root, detail=False):
        base = posixpath.basename(path)
        if TMP_MARKER in base:
            temporaries.append(base)
        elif base.endswith(".tar"):
            tars.add(base[: -len(".tar")])
        elif base.endswith(STATS_SUFFIX):
            markers.add(base[: -len(STATS_SUFFIX)])
    return tars, markers, temporaries


def _check_sample(shard: str, sample: dict, problems: list[Problem]) -> None:
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
        if extension in sample:
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


def _read_tar(fs, path: str, shard: str, problems: list[Problem], decode: bool) -> list[str] | None:
    """Check one tar; returns its sample keys in order, or None if it cannot be read at all."""
    keys: list[str] = []
    seen: set[str] = set()
    current: dict | None = None

    def finish(sample: dict | None) -> None:
        if sample is not None and decode:
            _check_sample(shard, sample, problems)

    try:
        with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as archive:
            for member in archive:
                try:
                    tario.check_member(member)
                    key, extension = tario.split_member_name(member.name)
                except ValueError as exc:  # UnsafeMemberError is a ValueError too
                    problems.append(Problem(shard, None, str(exc)))
                    continue
                data = archive.extractfile(member).read()
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
        return None
    return keys


def _check_parquet_and_stats(fs, root: str, shard: str, keys: list[str] | None, problems: list[Problem]) -> dict | None:
    def problem(message: str, key: str | None = None) -> None:
        problems.append(Problem(shard, key, message))

    try:
        with fs.open(_join(root, shard + STATS_SUFFIX), "r") as handle:
            stats = json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        problem(f"stats marker is unreadable: {exc}")
        return None
    try:
        with fs.open(_join(root, shard + ".parquet"), "rb") as handle:
            table = pq.read_table(handle, use_threads=False)  # see apache/arrow#34314: pool threads abort at exit
    except Exception as exc:  # missing file, or any pyarrow parse error
        problem(f"parquet is missing or unreadable: {type(exc).__name__}: {exc}")
        return stats
    missing_columns = set(ROW_SCHEMA.names) - set(table.column_names)
    if missing_columns:
        problem(f"parquet lacks columns {sorted(missing_columns)}")
        return stats
    rows = table.to_pydict()
    statuses = Counter(rows["status"])
    unknown = set(statuses) - set(STATUSES)
    if unknown:
        problem(f"parquet has unknown statuses {sorted(unknown)}")
    duplicates = [key for key, count in Counter(rows["key"]).items() if count > 1]
    if duplicates:
        problem(f"parquet lists keys more than once: {duplicates[:5]}")
    counts = {status: statuses.get(status, 0) for status in STATUSES}
    if stats.get("counts") != counts:
        problem(f"stats counts {stats.get('counts')} disagree with the parquet's {counts}")
    if stats.get("rows") != table.num_rows:
        problem(f"stats rows {stats.get('rows')} disagree with the parquet's {table.num_rows}")
    for key, status, reason in zip(rows["key"], rows["status"], rows["reason"], strict=True):
        if status != STATUS_OK and not reason:
            problem(f"{status} row has no reason", key)
    if keys is not None:
        ok_keys = {key for key, status in zip(rows["key"], rows["status"], strict=True) if status == STATUS_OK}
        for key in sorted(set(keys) - ok_keys):
            problem("sample is in the tar but not an 'ok' row of the parquet", key)
        for key in sorted(ok_keys - set(keys)):
            problem("'ok' row in the parquet but no sample in the tar", key)
        if stats.get("samples") != len(keys):
            problem(f"stats says {stats.get('samples')} samples, the tar has {len(keys)}")
    tar_bytes = fs.size(_join(root, shard + ".tar"))
    if stats.get("tar_bytes") != tar_bytes:
        problem(f"stats says the tar has {stats.get('tar_bytes')} bytes, it has {tar_bytes}")
    return stats


def _check_manifest(fs, root: str, all_stats: dict[str, dict], problems: list[Problem]) -> None:
    path = _join(root, MANIFEST_NAME)
    if not fs.exists(path):
        problems.append(Problem(MANIFEST_NAME, None, "missing; rebuild it with shards.writer.write_manifest"))
        return
    with fs.open(path, "r") as handle:
        manifest = json.load(handle)
    listed = {entry["shard"]: entry for entry in manifest.get("shards", [])}
    for shard in sorted(set(all_stats) - set(listed)):
        problems.append(Problem(MANIFEST_NAME, None, f"does not list complete shard {shard}"))
    for shard in sorted(set(listed) - set(all_stats)):
        problems.append(Problem(MANIFEST_NAME, None, f"lists {shard}, which has no stats marker"))
    for shard in sorted(set(listed) & set(all_stats)):
        for field in ("samples", "rows", "counts"):
            if listed[shard].get(field) != all_stats[shard].get(field):
                problems.append(
                    Problem(
                        MANIFEST_NAME,
                        None,
                        f"{shard} {field} {listed[shard].get(field)} ≠ stats {all_stats[shard].get(field)}",
                    )
                )
    if manifest.get("samples") != sum(stats.get("samples", 0) for stats in all_stats.values()):
        problems.append(
            Problem(MANIFEST_NAME, None, f"total samples {manifest.get('samples')} disagree with the shards")
        )


def validate(root: str, *, decode: bool = True, storage_options: dict | None = None) -> list[Problem]:
    """Every problem found in the dataset under ``root`` (an empty list means valid)."""
    fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    if not fs.isdir(path):
        return [Problem(root, None, "is not a directory")]
    tars, markers, temporaries = _shard_names(fs, path)
    problems: list[Problem] = []
    if not tars and not markers:
        problems.append(Problem(root, None, "holds no shards"))
    for name in temporaries:
        problems.append(Problem(name, None, "temporary file left by an interrupted writer; rerun that partition"))
    all_stats = {}
    for shard in sorted(tars | markers):
        if shard not in markers:
            problems.append(Problem(shard, None, f"incomplete: tar without {shard}{STATS_SUFFIX} marker"))
        if shard not in tars:
            problems.append(Problem(shard, None, "stats marker without a tar"))
            continue
        keys = _read_tar(fs, _join(path, shard + ".tar"), shard, problems, decode)
        if shard in markers:
            stats = _check_parquet_and_stats(fs, path, shard, keys, problems)
            if stats is not None:
                all_stats[shard] = stats
    _check_manifest(fs, path, all_stats, problems)
    return problems


def inspect(root: str, *, max_keys: int = 5, storage_options: dict | None = None) -> dict:
    """Counts, sizes, annotators and example keys of a dataset (reads metadata members only)."""
    fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    tars, markers, temporaries = _shard_names(fs, path)
    counts, members, annotators = Counter(), Counter(), Counter()
    keys: list[str] = []
    samples = tar_bytes = 0
    for shard in sorted(markers):
        with fs.open(_join(path, shard + STATS_SUFFIX), "r") as handle:
            stats = json.load(handle)
        counts.update(stats["counts"])
        members.update(stats.get("members", {}))
        samples += stats["samples"]
        tar_bytes += stats["tar_bytes"]
        with fs.open(_join(path, shard + ".tar"), "rb") as handle:
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
        "complete_shards": len(markers),
        "incomplete_shards": len(tars - markers),
        "temporary_files": len(temporaries),
        "samples": samples,
        "rows": dict(counts),
        "tar_bytes": tar_bytes,
        "members": dict(members),
        "annotators": dict(annotators),
        "example_keys": keys,
    }
