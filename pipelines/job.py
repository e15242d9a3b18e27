"""The annotation job: sources → fetch/decode/filter → annotators → HumanVerse shards, on Ray Data.

One dataset row is one input *partition* (``partition_size`` inputs), and a partition is the
unit of exactly-once: it is fetched and decoded by a task, annotated by an actor of a pool
(models load once per actor), and written by :class:`HumanVerseDatasink` through
:class:`shards.ShardWriter` — temp files, renames, stats marker last. A rerun skips partitions
whose final stats marker exists, so a killed job resumes without losing or duplicating a key.
Rows travel between stages as one pickled payload, so samples with arrays never need an
Arrow schema.
"""

from __future__ import annotations

import json
import pickle
import time
from collections import Counter

import fsspec

from hyperhuman.config import ConfigError
from pipelines import fetch as fetching
from pipelines.filters import check_filters, image_rule, people_rule
from pipelines.progress import ProgressBar
from pipelines.sources import list_inputs, partition_inputs
from shards.writer import STATS_SUFFIX, STATUS_FAILED, STATUS_REJECTED, ShardWriter, _join, write_manifest

JOB_FILE = "job.json"
REPORT_FILE = "report.json"


def _pack(partition: int, payload: dict) -> dict:
    return {"partition": partition, "payload": pickle.dumps(payload, protocol=5)}


def _unpack(row: dict) -> dict:
    return pickle.loads(row["payload"])


def fetch_decode(row: dict, fetch_options: dict, filters: dict, storage_options: dict | None = None) -> dict:
    """Ray map task: a partition's rows → decoded images, or failed/rejected items with reasons."""
    started = time.perf_counter()
    payload = _unpack(row)
    items = []
    for source_row in payload["rows"]:
        item = {key: source_row[key] for key in ("key", "source", "caption", "extra")}
        data, reason = fetching.read_bytes(source_row, fetch_options, storage_options)
        decoded = None
        if reason is None:
            decoded, reason = fetching.decode(data)
        if reason is not None:
            item.update(status=STATUS_FAILED, rule="fetch_decode", reason=reason)
        elif (rejection := image_rule(decoded["rgb"], filters)) is not None:
            item.update(status=STATUS_REJECTED, rule=rejection[0], reason=rejection[1])
        else:
            item.update(status=None, decoded=decoded)
        items.append(item)
    timings = {"fetch_decode_s": time.perf_counter() - started}
    return _pack(row["partition"], {"items": items, "timings": timings})


class AnnotatePartition:
    """Ray actor: runs the annotators on a partition's decoded images (loaded once per actor)."""

    def __init__(self, annotators: dict, filters: dict, batch_size: int):
        from pipelines.annotate import AnnotateStage

        self.stage = AnnotateStage(annotators)
        self.filters = filters
        self.batch_size = batch_size

    def select(self, index, pose, mask):
        from pipelines.annotate import Rejection

        rejection = people_rule(pose, mask, self.filters)
        return None if rejection is None else Rejection(*rejection)

    def __call__(self, row: dict) -> dict:
        from pipelines.annotate import Rejection

        started = time.perf_counter()
        payload = _unpack(row)
        todo = [item for item in payload["items"] if item["status"] is None]
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            results = self.stage(
                [item["key"] for item in batch],
                [item["decoded"]["rgb"] for item in batch],
                [item["caption"] for item in batch],
                [item["source"] for item in batch],
                select=self.select,
            )
            for item, result in zip(batch, results, strict=True):
                decoded = item.pop("decoded")
                if isinstance(result, Rejection):
                    item.update(status=STATUS_REJECTED, rule=result.rule, reason=result.reason)
                    continue
                if decoded["image_bytes"] is not None:
                    result.image = decoded["image_bytes"]  # keep the source JPEG byte-exact
                result.meta.update(
                    source_sha256=decoded["sha256"], source_size=decoded["source_size"], extra=json.loads(item["extra"])
                )
                item.update(status="ok", sample=result)
        payload["annotators"] = {modality: a.provenance() for modality, a in self.stage.annotators.items()}
        payload["timings"]["annotate_s"] = time.perf_counter() - started
        return _pack(row["partition"], payload)


def write_partition(output: str, writer_options: dict, row: dict) -> dict:
    """Write one partition's samples and rejected/failed rows, in input order."""
    started = time.perf_counter()
    payload = _unpack(row)
    counts, rules = Counter(), Counter()
    with ShardWriter(output, int(row["partition"]), **writer_options) as writer:
        for item in payload["items"]:
            if item["status"] == "ok":
                writer.write(item["sample"])
            else:
                writer.reject(
                    item["key"], item["reason"], status=item["status"], source=item["source"], caption=item["caption"]
                )
                rules[item["rule"]] += 1
            counts[item["status"]] += 1
    payload["timings"]["write_s"] = time.perf_counter() - started
    return {
        "partition": int(row["partition"]),
        "counts": dict(counts),
        "rules": dict(rules),
        "annotators": payload.get("annotators", {}),
        **payload["timings"],
    }


def make_datasink(output: str, writer_options: dict):
    """A Ray ``Datasink`` writing each partition row through ShardWriter (exactly once per
    partition: temp + rename, stats last); the manifest is rebuilt when all writes are done."""
    from ray.data import Datasink

    class HumanVerseDatasink(Datasink):
        def __init__(self):
            self.results: list[dict] = []

        def write(self, blocks, ctx) -> list[dict]:
            return [write_partition(output, writer_options, row) for block in blocks for row in _rows(block)]

        def on_write_complete(self, write_result) -> None:
            self.results = [result for returns in write_result.write_returns for result in returns]
            write_manifest(output, writer_options.get("storage_options"))

    return HumanVerseDatasink()


def _rows(block):
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(block).iter_rows(public_row_format=False)


def complete_partitions(output: str, storage_options: dict) -> set[int]:
    """Partitions whose last shard's stats marker (``final``) exists."""
    fs, root = fsspec.core.url_to_fs(output, **storage_options)
    done = set()
    for path in fs.glob(_join(root, "*" + STATS_SUFFIX)):
        with fs.open(path, "r") as handle:
            stats = json.load(handle)
        if stats.get("final"):
            done.add(int(stats["partition"]))
    return done


def partitions_with_transient_failures(output: str, storage_options: dict) -> set[int]:
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(output, **storage_options)
    retry = set()
    for path in fs.glob(_join(root, "*.parquet")):
        with fs.open(path, "rb") as handle:
            rows = pq.read_table(handle, columns=["status", "reason"], use_threads=False).to_pylist()
        if any(r["status"] == STATUS_FAILED and (r["reason"] or "").startswith(fetching.TRANSIENT) for r in rows):
            retry.add(int(path.rsplit("/", 1)[-1][:6]))
    return retry


def check_job_file(output: str, job: dict, overwrite: bool, storage_options: dict) -> None:
    """Refuse to mix shards made with different settings in one output, unless --overwrite."""
    fs, root = fsspec.core.url_to_fs(output, **storage_options)
    fs.makedirs(root, exist_ok=True)
    path = _join(root, JOB_FILE)
    if fs.exists(path) and not overwrite:
        with fs.open(path, "r") as handle:
            previous = json.load(handle)
        if previous != job:
            changed = sorted(key for key in set(previous) | set(job) if previous.get(key) != job.get(key))
            raise ConfigError(
                f"{output} was written by a job with different settings (changed: {changed}); "
                "rerun with the same config to resume, use another output, or pass --overwrite to rewrite it"
            )
    with fs.open(path, "w") as handle:
        json.dump(job, handle, indent=1, sort_keys=True)


def check_job_config(config: dict) -> dict:
    """Fail at start, not an hour in: every section present, filters and annotator names known."""
    from annotators.registry import REGISTRY
    from pipelines.annotate import MODALITIES, STAGES

    for section in ("partition_size", "annotators", "ray"):
        if section not in config:
            raise ConfigError(f"job config lacks {section!r}; see configs/annotate/offline.yaml")
    filters = check_filters(config.get("filters", {}))
    annotators = config["annotators"]
    missing = [modality for modality in MODALITIES if modality not in annotators]
    unknown = set(annotators) - {modality for modality, _ in STAGES}
    if missing or unknown:
        raise ConfigError(f"annotators: missing modalities {missing}, unknown {sorted(unknown)}")
    for modality, annotator in annotators.items():
        if annotator.get("name") not in REGISTRY:
            raise ConfigError(f"annotators.{modality}.name {annotator.get('name')!r} is not one of {sorted(REGISTRY)}")
    for stage in ("fetch", "annotate", "write"):
        if stage not in config["ray"]:
            raise ConfigError(f"job config lacks ray.{stage} (resources for that stage)")
    return filters


def run_job(
    source: str,
    output: str,
    config: dict,
    *,
    address: str | None = None,
    overwrite=False,
    retry_failed=False,
    show_progress=False,
) -> dict:
    import ray

    filters = check_job_config(config)
    job = {
        "source": source,
        "annotators": config["annotators"],
        "filters": filters,
        "partition_size": config["partition_size"],
    }
    started = time.perf_counter()
    rows = list_inputs(source, config.get("source", {}))
    partitions = partition_inputs(rows, config["partition_size"])
    storage_options = config.get("writer", {}).get("storage_options") or {}
    check_job_file(output, job, overwrite, storage_options)
    done = set() if overwrite else complete_partitions(output, storage_options)
    if retry_failed:
        done -= partitions_with_transient_failures(output, storage_options)
    todo = [p for p in partitions if p["partition"] not in done]
    listing_s = time.perf_counter() - started
    already = len(done & {p["partition"] for p in partitions})
    print(f"[annotate] {len(rows)} inputs in {len(partitions)} partitions: {already} complete, {len(todo)} to do")

    results = []
    if todo:
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        resources = config["ray"]
        dataset = ray.data.from_items([_pack(p["partition"], p) for p in todo], override_num_blocks=len(todo))
        dataset = dataset.map(
            fetch_decode,
            fn_kwargs={
                "fetch_options": config.get("fetch", {}),
                "filters": filters,
                "storage_options": config.get("source", {}).get("storage_options") or {},
            },
            **_task_args(resources["fetch"]),
        )
        dataset = dataset.map(
            AnnotatePartition,
            fn_constructor_args=(config["annotators"], filters, resources["annotate"].get("batch_size", 8)),
            compute=ray.data.ActorPoolStrategy(size=resources["annotate"].get("actors", 1)),
            **_task_args(resources["annotate"]),
        )
        sink = make_datasink(output, config.get("writer", {}))
        progress = ProgressBar(output, sum(len(p["rows"]) for p in todo), storage_options) if show_progress else None
        if progress:
            ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts written rows
            progress.start()
        try:
            dataset.write_datasink(sink, ray_remote_args={"num_cpus": resources["write"].get("num_cpus", 0.25)})
        finally:
            if progress:
                progress.stop()
        results = sink.results
    manifest = write_manifest(output, storage_options)
    report = build_report(output, manifest, results, time.perf_counter() - started, listing_s)
    with fsspec.open(_join(output, REPORT_FILE), "w", **storage_options) as handle:
        json.dump(report, handle, indent=1, sort_keys=True)
    return report


def _task_args(stage: dict) -> dict:
    return {key: stage[key] for key in ("num_cpus", "num_gpus", "memory") if key in stage}


def build_report(output: str, manifest: dict, results: list[dict], total_s: float, listing_s: float) -> dict:
    rules = Counter()
    for result in results:
        rules.update(result["rules"])
    timings = Counter()
    for result in results:
        timings.update({k: v for k, v in result.items() if k.endswith("_s")})
    return {
        "output": output,
        "counts": manifest["counts"],
        "samples": manifest["samples"],
        "shards": manifest["num_shards"],
        "rejections_per_rule_this_run": dict(rules),
        "annotators_this_run": next((r["annotators"] for r in results if r["annotators"]), {}),
        "partitions_written_this_run": len(results),
        "time_s": {"total": total_s, "listing": listing_s, **{k: round(v, 3) for k, v in timings.items()}},
    }
