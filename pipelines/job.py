"""The annotation job: sources → fetch/decode/filter → annotators → HumanVerse shards, on Ray Data.

The driver plans the source from metadata (:func:`pipelines.sources.plan_source`); one dataset
row is one input *partition*'s small descriptor, and a partition is the unit of exactly-once: its
task reads and decodes its own inputs, an actor of a pool annotates them (models load once per
actor), and :class:`HumanVerseDatasink` writes them through :class:`shards.ShardWriter`, which
commits the partition with one atomic record (:mod:`shards.commit`). The job holds the output's
lock (:mod:`pipelines.lock`) while it runs; a rerun skips partitions committed by the same job
(same settings, same listing), so a killed job resumes without losing or duplicating a key.
Rows travel between stages as one pickled payload, so samples with arrays never need an
Arrow schema.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import time
from collections import Counter

import fsspec

from hyperhuman.config import ConfigError
from pipelines import fetch as fetching
from pipelines.filters import aesthetic_rule, check_filters, image_rule, people_rule
from pipelines.lock import OutputLock
from pipelines.output import (
    check_job_file,
    complete_partitions,
    fingerprint,
    job_settings,
    partitions_with_transient_failures,
    remove_partitions_beyond,
)
from pipelines.progress import ProgressBar
from pipelines.settings import check_annotate_settings, check_output
from pipelines.sources import Plan, plan_source, read_partition
from shards.commit import join, read_records, remove_leftovers, write_json_atomic
from shards.writer import STATUS_FAILED, STATUS_REJECTED, ShardWriter, write_manifest

PLAN_FILE = "plan.json"
REPORT_FILE = "report.json"
REJECTING_RULES = {"caption"}  # source problems that are the input's content: rejected, not failed


def _pack(partition: int, payload: dict) -> dict:
    return {"partition": partition, "payload": pickle.dumps(payload, protocol=5)}


def _unpack(row: dict) -> dict:
    return pickle.loads(row["payload"])


def fetch_decode(row: dict, fetch_options: dict, filters: dict, source_options: dict | None = None) -> dict:
    """Ray map task: a partition's descriptor → its rows (read here, not on the driver) →
    :func:`fetch_rows`."""
    started = time.perf_counter()
    source_options = source_options or {}
    rows = read_partition(_unpack(row), source_options)
    items = fetch_rows(rows, fetch_options, filters, source_options.get("storage_options") or {})
    return _pack(row["partition"], {"items": items, "timings": {"fetch_decode_s": time.perf_counter() - started}})


def fetch_rows(rows: list[dict], fetch_options: dict, filters: dict, storage_options: dict | None = None) -> list:
    """Source rows → decoded images, or failed/rejected items with their rule and reason. Up to
    ``fetch.concurrency`` rows are read at once (threads); each is decoded as its bytes arrive and
    put at its own index, so the items are the sequential ones, in input order."""
    items = [{key: source_row[key] for key in ("key", "source", "caption", "extra")} for source_row in rows]
    for item, source_row in zip(items, rows, strict=True):
        if (problem := source_row.get("problem")) is not None:
            status = STATUS_REJECTED if problem[0] in REJECTING_RULES else STATUS_FAILED
            item.update(status=status, rule=problem[0], reason=problem[1])
    todo = [index for index, item in enumerate(items) if "status" not in item]
    for index, data, reason in fetching.read_many([rows[i] for i in todo], fetch_options, storage_options):
        item = items[todo[index]]
        decoded, rule = None, "fetch"
        if reason is None:
            decoded, reason = fetching.decode(data)
            rule = "decode"
        if reason is not None:
            rule = "transient" if reason.startswith(fetching.TRANSIENT) else rule
            item.update(status=STATUS_FAILED, rule=rule, reason=reason)
        elif (rejection := image_rule(decoded["rgb"], filters)) is not None:
            item.update(status=STATUS_REJECTED, rule=rejection[0], reason=rejection[1])
        else:
            item.update(status=None, decoded=decoded)
    return items


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

    def screen(self, index, aesthetic):
        from pipelines.annotate import Rejection

        rejection = aesthetic_rule(aesthetic, self.filters)
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
            screen=self.screen,
        )
        for item, result in zip(batch, results, strict=True):
            decoded = item.pop("decoded")
            if isinstance(result, Rejection):
                item.update(status=STATUS_REJECTED, rule=result.rule, reason=result.reason)
                continue
            if isinstance(result, Failure):
                item.update(status=STATUS_FAILED, rule="", reason=result.reason)
                continue
            if decoded["image_bytes"] is not None and "outpaint" not in result.meta:
                result.image = decoded["image_bytes"]  # keep the source JPEG byte-exact (an outpainted canvas is new)
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


def write_partition(output: str, writer_options: dict, row: dict, job: str = "") -> dict:
    """Write and commit one partition's samples and rejected/failed rows, in input order."""
    started = time.perf_counter()
    payload = _unpack(row)
    counts, rules = Counter(), Counter()
    with ShardWriter(output, int(row["partition"]), job=job, **writer_options) as writer:
        for item in payload["items"]:
            if item["status"] == "ok":
                writer.write(item["sample"])
            else:
                writer.reject(
                    item["key"], item["reason"], status=item["status"], rule=item["rule"], source=item["source"],
                    caption=item["caption"],
                )  # fmt: skip
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


def make_datasink(output: str, writer_options: dict, job: str = ""):
    """A Ray ``Datasink`` writing each partition row through ShardWriter (exactly once per
    partition: new parts, then the commit record); the manifest is rebuilt when all are done."""
    from ray.data import Datasink

    class HumanVerseDatasink(Datasink):
        def __init__(self):
            self.results: list[dict] = []

        def write(self, blocks, ctx) -> list[dict]:
            return [write_partition(output, writer_options, row, job) for block in blocks for row in _rows(block)]

        def on_write_complete(self, write_result) -> None:
            self.results = [result for returns in write_result.write_returns for result in returns]

    return HumanVerseDatasink()


def _rows(block):
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(block).iter_rows(public_row_format=False)


def check_job_config(config: dict) -> dict:
    """Fail at start, not an hour in (and before anything is written): every key known and of
    its type, annotator names registered. Returns the filters with their defaults."""
    check_annotate_settings(config)
    return check_filters(config.get("filters", {}))


def with_fallbacks_resolved(config: dict) -> dict:
    """``config`` with each annotator that cannot run here replaced by its ``fallback`` (e.g. the
    offline MoveNet pose without its installed models), said once on the driver: the job's
    settings, and so its fingerprint, name what runs (a job resumed after installing the models
    does not mix two pose models in one output), and the actors build it."""
    from annotators.base import AnnotatorConfig
    from annotators.registry import resolve

    annotators = dict(config["annotators"])
    for modality, entry in config["annotators"].items():
        asked, resolved = AnnotatorConfig.from_dict(entry), resolve(entry)
        if resolved != asked:
            annotators[modality] = dataclasses.asdict(resolved)
            print(f"[annotate] annotators.{modality}: {asked.name} cannot run here (see the warning above); "
                  f"its fallback {resolved.name} runs instead")  # fmt: skip
    if annotators == config["annotators"]:
        return config
    config = {**config, "annotators": annotators}
    check_job_config(config)  # the fallback's own settings
    return config


def run_job(
    source: str,
    output: str,
    config: dict,
    *,
    address: str | None = None,
    overwrite=False,
    retry_failed=False,
    plan_only=False,
    show_progress=False,
) -> dict:
    """Plan ``source``, then annotate and commit every partition of it not yet committed by this
    job into ``output``; returns the report (``plan.json``'s content with ``plan_only``)."""

    filters = check_job_config(config)
    config = with_fallbacks_resolved(config)
    storage_options = config.get("writer", {}).get("storage_options") or {}
    check_output(output, storage_options)
    started = time.perf_counter()
    plan = plan_source(
        source,
        config.get("source", {}),
        config["partition_size"],
        run_tasks=lambda fn, args: _ray_tasks(fn, args, address),
    )
    listing_s = time.perf_counter() - started
    if plan_only:
        summary = {**plan.summary(), "plan_s": round(listing_s, 3)}
        fs, root = fsspec.core.url_to_fs(output, **storage_options)
        write_json_atomic(fs, join(root, PLAN_FILE), summary)
        print(f"[annotate] planned {plan.inputs} inputs in {plan.partitions} partitions; plan in {output}/{PLAN_FILE}")
        return summary

    job = job_settings(source, config, filters, plan)
    job_id = fingerprint(job)
    with OutputLock(output, storage_options):
        check_job_file(output, job, overwrite, storage_options)
        fs, root = fsspec.core.url_to_fs(output, **storage_options)
        records = read_records(fs, root)  # read once for the decisions below
        if removed := remove_leftovers(fs, root, records):
            print(f"[annotate] removed {len(removed)} file(s) an interrupted write left (e.g. {removed[0]})")
        if overwrite and (dropped := remove_partitions_beyond(output, storage_options, plan.partitions, records)):
            print(f"[annotate] --overwrite: removed {len(dropped)} partition(s) the new plan does not produce")
        done = set() if overwrite else complete_partitions(output, storage_options, job_id, records)
        if retry_failed:
            done -= partitions_with_transient_failures(output, storage_options, records)
        todo = [partition for partition in range(plan.partitions) if partition not in done]
        already = plan.partitions - len(todo)
        print(f"[annotate] {plan.inputs} inputs in {plan.partitions} partitions: {already} complete, {len(todo)} to do")

        results = []
        if todo:
            _init_ray(address)
            results = _annotate_and_write(plan, todo, output, config, filters, job_id, show_progress)
        records = read_records(fs, root)
        remove_leftovers(fs, root, records)  # what killed attempts of this run left: no writer runs now
        manifest = write_manifest(output, storage_options, records)
        report = build_report(output, manifest, results, time.perf_counter() - started, listing_s)
        write_json_atomic(fs, join(root, REPORT_FILE), report)
    return report


def _annotate_and_write(plan: Plan, todo: list[int], output, config, filters, job_id, show_progress) -> list[dict]:
    import ray

    resources = config["ray"]
    storage_options = config.get("writer", {}).get("storage_options") or {}
    items = [_pack(partition, plan.descriptor(partition)) for partition in todo]
    dataset = ray.data.from_items(items, override_num_blocks=len(todo))
    del items
    dataset = dataset.map(
        fetch_decode,
        fn_kwargs={"fetch_options": config.get("fetch", {}), "filters": filters,
                   "source_options": config.get("source", {})},
        **_task_args(resources["fetch"]),
    )  # fmt: skip
    dataset = dataset.map(
        AnnotatePartition,
        fn_constructor_kwargs=_annotate_kwargs(config["annotators"], filters, resources["annotate"], dataset),
        compute=ray.data.ActorPoolStrategy(size=resources["annotate"].get("actors", 1)),
        **_task_args(resources["annotate"]),
    )
    sink = make_datasink(output, config.get("writer", {}), job_id)
    rows = sum(plan.rows_in(partition) for partition in todo)
    progress = ProgressBar(output, rows, storage_options) if show_progress else None
    if progress:
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts written rows
        progress.start()
    try:
        write_args = {"num_cpus": resources["write"].get("num_cpus", 0.25), **_fault_env()}
        dataset.write_datasink(sink, ray_remote_args=write_args)
    finally:
        if progress:
            progress.stop()
    return sink.results


def _init_ray(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)


def _ray_tasks(fn, args_list: list[tuple], address: str | None = None) -> list:
    """Run the planning reads (a chunk count, a tar's headers) as Ray tasks (Ray starts here when
    planning needs it, so a rerun with nothing to do on a folder never waits for it)."""
    import ray

    if len(args_list) <= 1:  # one small read: not worth a task
        return [fn(*args) for args in args_list]
    _init_ray(address)
    remote = ray.remote(num_cpus=0.5, max_retries=2)(fn)
    try:
        return ray.get([remote.remote(*args) for args in args_list])
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, ConfigError):
            raise error.cause from None  # a bad input file: its one-line message, not a remote traceback
        raise


def _fault_env() -> dict:
    """Tests inject faults into the writers (shards.commit.fault_point) through these variables;
    workers started before they were set see them through the write tasks' runtime env."""
    import os

    from shards.commit import FAULT_ENV, FAULT_LOG_ENV, FAULT_ONCE_ENV

    env = {name: os.environ[name] for name in (FAULT_ENV, FAULT_ONCE_ENV, FAULT_LOG_ENV) if name in os.environ}
    return {"runtime_env": {"env_vars": env}} if env else {}


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
