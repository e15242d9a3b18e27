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
    """Ray map task: a partition's rows → decoded images, or failed/rejected items with reasons.
    Up to ``fetch.concurrency`` rows are read at once (threads); each is decoded here as its
    bytes arrive and put at its own index, so the items are the sequential ones, in input order."""
    started = time.perf_counter()
    payload = _unpack(row)
    rows = payload["rows"]
    items = [None] * len(rows)
    for index, data, reason in fetching.read_many(rows, fetch_options, storage_options):
        source_row = rows[index]
        item = {key: source_row[key] for key in ("key", "source", "caption", "extra")}
        decoded = None
        if reason is None:
            decoded, reason = fetching.decode(data)
        if reason is not None:
            item.update(status=STATUS_FAILED, rule="fetch_decode", reason=reason)
        elif (rejection := image_rule(decoded["rgb"], filters)) is not None:
            item.update(status=STATUS_REJECTED, rule=rejection[0], reason=rejection[1])
        else:
            item.update(status=None, decoded=decoded)
        items[index] = item
    timings = {"fetch_decode_s": time.perf_counter() - started}
    return _pack(row["partition"], {"items": items, "timings": timings})


class AnnotatePartition:
    """Ray actor: runs the annotators on a partition's decoded images (loaded once per actor).

    An annotator exception costs only its image (a ``failed`` row naming the annotator). A
    resource error (out of memory) raises ``ResourceError``, which Ray retries
    (``actor_task_retry_on_errors``); an actor that dies (killed, out of memory) is restarted by
    Ray and its partitions resubmitted (Ray Data's actor pool defaults: ``max_restarts=-1``,
    ``max_task_retries=-1``). ``ledger`` (an :class:`AttemptLedger` actor) counts the attempts that
    actually started on each partition: after ``max_retries + 1`` of them the partition's
    remaining rows are recorded ``failed`` with a transient reason, so the job completes.
    ``registry`` is the driver's ``annotators.registry`` entries for the configured names, so an
    annotator registered at run time (a plugin, a test) is built in the worker too."""

    def __init__(
        self,
        annotators: dict,
        filters: dict,
        batch_size: int,
        registry: dict | None = None,
        ledger=None,
        max_retries: int = 0,
    ):
        from annotators.registry import register
        from pipelines.annotate import AnnotateStage

        for name, target in (registry or {}).items():
            register(name, target)
        self.stage = AnnotateStage(annotators)
        self.filters = filters
        self.batch_size = batch_size
        self.ledger = ledger
        self.max_retries = max_retries

    def select(self, index, pose, mask):
        from pipelines.annotate import Rejection

        rejection = people_rule(pose, mask, self.filters)
        return None if rejection is None else Rejection(*rejection)

    def __call__(self, row: dict) -> dict:
        started = time.perf_counter()
        payload = _unpack(row)
        todo = [item for item in payload["items"] if item["status"] is None]
        given_up = self._given_up(int(row["partition"])) if todo and self.ledger is not None else None
        if given_up is not None:
            for item in todo:
                item.pop("decoded")
                item.update(status=STATUS_FAILED, rule="", reason=given_up)
            todo = []
        try:
            for start in range(0, len(todo), self.batch_size):
                self._annotate(todo[start : start + self.batch_size])
        except Exception as error:
            from pipelines.annotate import ResourceError, is_resource_error

            if not is_resource_error(error):
                raise  # a bug in our code: the job fails loudly
            resource = error if isinstance(error, ResourceError) else ResourceError(f"{type(error).__name__}: {error}")
            if self.ledger is not None:
                import ray

                ray.get(self.ledger.failed.remote(int(row["partition"]), f"resource error: {resource}"))
            if resource is error:
                raise
            raise resource from error
        payload["annotators"] = {modality: a.provenance() for modality, a in self.stage.annotators.items()}
        payload["timings"]["annotate_s"] = time.perf_counter() - started
        return _pack(row["partition"], payload)

    def _given_up(self, partition: int) -> str | None:
        """Count this attempt; the reason to record instead when the earlier ones used up the retries."""
        import ray

        failures = ray.get(self.ledger.begin.remote(partition))
        if len(failures) <= self.max_retries:
            return None
        return (
            f"{fetching.TRANSIENT}annotating the partition failed {len(failures)} times "
            f"(ray.annotate.max_retries={self.max_retries}); last: {failures[-1]}"
        )

    def _annotate(self, batch: list[dict]) -> None:
        from pipelines.annotate import Failure, Rejection

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
            if isinstance(result, Failure):
                item.update(status=STATUS_FAILED, rule="", reason=result.reason)
                continue
            if decoded["image_bytes"] is not None:
                result.image = decoded["image_bytes"]  # keep the source JPEG byte-exact
            result.meta.update(
                source_sha256=decoded["sha256"], source_size=decoded["source_size"], extra=json.loads(item["extra"])
            )
            item.update(status="ok", sample=result)


class AttemptLedger:
    """Ray actor (one per job, no CPUs): the annotate attempts started on each partition and how
    each ended, surviving the annotate actors' deaths. An attempt counts as a death until an
    error is recorded for it; a completed attempt is never asked about again."""

    DIED = "the annotate actor died (process killed or out of memory)"

    def __init__(self):
        self.attempts: dict[int, list[str]] = {}

    def begin(self, partition: int) -> list[str]:
        """The earlier attempts' outcomes; records this one as started."""
        earlier = list(self.attempts.get(partition, []))
        self.attempts[partition] = [*earlier, self.DIED]
        return earlier

    def failed(self, partition: int, reason: str) -> None:
        self.attempts[partition][-1] = reason


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
                if item["rule"]:  # an annotator's exception is a failure with no rule
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
    fetching.check_fetch(config.get("fetch"))
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
    max_retries = config["ray"]["annotate"].get("max_retries", 2)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ConfigError(f"ray.annotate.max_retries must be an integer >= 0, got {max_retries!r}")
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
            fn_constructor_kwargs=_annotate_kwargs(config["annotators"], filters, resources["annotate"], dataset),
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


def _annotate_kwargs(annotators: dict, filters: dict, stage: dict, dataset) -> dict:
    """The annotate actors' arguments: the registry entries they build from, a fresh attempt
    ledger and the retry bound (``ray.annotate.max_retries``). Sets the dataset's context so Ray
    retries resource errors; actor restarts and task resubmission are Ray Data's actor pool
    defaults (``max_restarts=-1``, ``max_task_retries=-1``), bounded by the ledger."""
    import ray

    from annotators.registry import REGISTRY
    from pipelines.annotate import ResourceError

    max_retries = stage.get("max_retries", 2)  # checked by check_job_config
    # Ray retries a task that raised ResourceError; the ledger decides when to stop.
    dataset.context.actor_task_retry_on_errors = [ResourceError]
    return {
        "annotators": annotators,
        "filters": filters,
        "batch_size": stage.get("batch_size", 8),
        "registry": {spec["name"]: REGISTRY[spec["name"]] for spec in annotators.values()},
        "ledger": ray.remote(num_cpus=0)(AttemptLedger).remote(),
        "max_retries": max_retries,
    }


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
