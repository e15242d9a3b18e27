"""The annotation job's output folder as the job sees it: ``job.json`` (what made the output),
the partitions committed by this job, and what a rerun, ``--retry-failed`` or ``--overwrite``
does with the others."""

from __future__ import annotations

import json

import fsspec

from hyperhuman.config import ConfigError, json_digest
from pipelines import fetch as fetching
from pipelines.sources import Plan
from shards.commit import join, read_records, record_name, write_json_atomic
from shards.writer import STATUS_FAILED

JOB_FILE = "job.json"


def complete_partitions(output: str, storage_options: dict, job: str, records: dict | None = None) -> set[int]:
    """Partitions committed by this job (same fingerprint): what a rerun skips. ``records``: the
    output's commit records when the caller has read them already."""
    records = _records(output, storage_options) if records is None else records
    return {partition for partition, record in records.items() if record.get("job") == job}


def partitions_with_transient_failures(output: str, storage_options: dict, records: dict | None = None) -> set[int]:
    """Committed partitions with a failed row whose reason is transient (what --retry-failed redoes)."""
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(output, **storage_options)
    retry = set()
    for partition, record in (read_records(fs, root) if records is None else records).items():
        for part in record["parts"]:
            with fs.open(join(root, part["shard"] + ".parquet"), "rb") as handle:
                rows = pq.read_table(handle, columns=["status", "reason"], use_threads=False).to_pylist()
            if any(r["status"] == STATUS_FAILED and (r["reason"] or "").startswith(fetching.TRANSIENT) for r in rows):
                retry.add(partition)
                break
    return retry


def job_settings(source: str, config: dict, filters: dict, plan: Plan) -> dict:
    """What ``job.json`` records: every setting that changes the output, and the listing. Not
    recorded: storage options (they may hold credentials) and settings that only change speed
    (``fetch.concurrency``, the ``ray`` resources)."""
    source_options = {key: value for key, value in config.get("source", {}).items() if key != "storage_options"}
    writer = {key: value for key, value in config.get("writer", {}).items() if key != "storage_options"}
    fetch = {key: value for key, value in fetching.check_fetch(config.get("fetch")).items() if key != "concurrency"}
    return {
        "source": source,
        "source_options": source_options,
        "listing": plan.listing(),
        "partition_size": config["partition_size"],
        "annotators": config["annotators"],
        "filters": filters,
        "fetch": fetch,
        "writer": writer,
    }


def fingerprint(job: dict) -> str:
    return json_digest(job)


def check_job_file(output: str, job: dict, overwrite: bool, storage_options: dict) -> None:
    """Refuse to mix shards made with different settings, or from a changed listing, in one
    output unless --overwrite; then record this job's settings (atomically)."""
    fs, root = fsspec.core.url_to_fs(output, **storage_options)
    path = join(root, JOB_FILE)
    if fs.exists(path) and not overwrite:
        with fs.open(path, "r") as handle:
            previous = json.load(handle)
        if previous.get("listing") != job["listing"] and previous.get("source") == job["source"]:
            change = _listing_change(previous.get("listing"), job["listing"])
            raise ConfigError(
                f"the source listing changed since {output} was written: {change}. "
                "Resuming would shift inputs between partitions; pass --overwrite to rewrite the output from "
                "the new listing, or use another output"
            )
        if previous != job:
            changed = sorted(key for key in set(previous) | set(job) if previous.get(key) != job.get(key))
            raise ConfigError(
                f"{output} was written by a job with different settings (changed: {changed}); "
                "rerun with the same config to resume, use another output, or pass --overwrite to rewrite it"
            )
    write_json_atomic(fs, path, job)


def _listing_change(before: dict | None, after: dict) -> str:
    before = before or {}
    parts = []
    if before.get("inputs") != after["inputs"]:
        parts.append(f"{after['inputs']} inputs now, {before.get('inputs')} then")
    old, new = before.get("files") or {}, after.get("files") or {}
    if old or new:
        added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
        rewritten = sorted(name for name in set(old) & set(new) if old[name] != new[name])
        for what, names in (("added", added), ("removed", removed), ("rewritten", rewritten)):
            if names:
                parts.append(f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}")
    parts = parts or ["the same number of inputs, other contents"]
    return "; ".join(parts) + f" (fingerprint {str(before.get('fingerprint'))[:12]} → {after['fingerprint'][:12]})"


def remove_partitions_beyond(
    output: str, storage_options: dict, partitions: int, records: dict | None = None
) -> list[int]:
    """--overwrite: drop the committed partitions the new plan does not produce (a smaller
    partition_size, a shorter list), record first so no reader trusts a half-removed one; they
    leave ``records`` too when it is given."""
    fs, root = fsspec.core.url_to_fs(output, **storage_options)
    records = read_records(fs, root) if records is None else records
    dropped = []
    for partition, record in list(records.items()):
        if partition >= partitions:
            del records[partition]
            fs.rm(join(root, record_name(partition)))
            for part in record["parts"]:
                for extension in ("tar", "parquet"):
                    if fs.exists(path := join(root, f"{part['shard']}.{extension}")):
                        fs.rm(path)
            dropped.append(partition)
    return dropped


def _records(output: str, storage_options: dict) -> dict[int, dict]:
    fs, root = fsspec.core.url_to_fs(output, **storage_options)
    return read_records(fs, root)
