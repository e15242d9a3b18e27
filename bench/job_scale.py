"""The annotation job at scale, section by section; each prints a table and its results go under
its own name in bench/results/job_scale.json, with the headline numbers in ``summary``.

    .venv/bin/python bench/job_scale.py [--only fetch] [--urls 2000] [--baseline-urls 300]

fetch — downloads do not serialise on latency. A loopback HTTP server (its own process, so it
does not share the GIL with what is measured) answers every URL after ``--latency-ms`` (100)
with the same 512x512 JPEG, except every 50th URL (2%), which never answers. Each input goes
through fetch + decode + the image filter, as the job's fetch task does, with timeout_s=2,
retries=2, backoff_s=0.5: a hanging URL costs 2 + 0.5 + 2 + 1 + 2 = 7.5 s. Side by side:
(a) today's code, the loop fetch_decode ran before this change: one row at a time, a fresh
    requests session per URL (what ``requests.get`` did), on the first ``--baseline-urls``
    URLs (its rate does not depend on the count: 2,000 would take ~8 min);
(b)-(e) ``pipelines.job.fetch_decode`` on all ``--urls`` URLs cut into partitions the way the
    job cuts them, at a concurrency (``fetch.concurrency``) and a number of fetch tasks at once
    (threads standing for Ray's parallel fetch tasks; ``ray.fetch.num_cpus: 0.5`` allows 4 on
    2 cores). A partition lasts at least as long as its slowest URL.
The items of (b) on the baseline's URLs are checked to equal the baseline's (status, reason,
image digest, in order; keys differ, as they follow the partition size).

plan — the driver never holds the inputs. Synthetic URL lists of 10^5, 10^6 and 10^7 rows
(url, caption, and two extra columns, like LAION's), as parquet (10 files, row groups of 100k
rows) and as one csv, made once under ~/.cache/hyperhuman/bench/job_scale (~3 GB). Each is planned
in a fresh process, and that process's peak RSS (``ru_maxrss``) is the driver's memory:
(a) today's listing: the previous ``pipelines.sources.url_list_rows`` (pandas of every file,
    then one row dict per input on the driver, as ``from_items`` needed);
(b) ``hyperhuman annotate SOURCE OUT --plan-only``: parquet footers on the driver, csv chunks
    counted in Ray tasks (``ray.init`` included in the process; Ray's own processes are not
    the driver). Planning seconds exclude starting Ray.
Goal: (b) flat in the number of rows (within 1.5x from 10^5 to 10^7) and under 1 GiB at 10^7.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "job_scale.json"
HANG_EVERY = 50  # every 50th URL never answers: 2%
FETCH = {"timeout_s": 2.0, "retries": 2, "backoff_s": 0.5, "max_bytes": 32 << 20}
FILTERS = {"min_side": 64, "max_aspect": 3.0}


# ---------------------------------------------------------------------------------------------
# fetch


def serve(ports, latency_s: float, image: bytes, stop) -> None:
    """The loopback server (run in a child process): ``/img/N`` answers after ``latency_s``;
    every ``HANG_EVERY``-th N never answers (until ``stop``)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, so sessions can reuse connections

        def log_message(self, *args):
            pass

        def do_GET(self):
            index = int(self.path.rsplit("/", 1)[-1].split(".")[0])
            if index % HANG_EVERY == HANG_EVERY // 2:
                stop.wait(600)
                self.close_connection = True
                return
            time.sleep(latency_s)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

    class Server(ThreadingHTTPServer):
        request_queue_size = 1024

        def handle_error(self, request, client_address):  # clients that gave up on a hanging URL
            pass

    server = Server(("127.0.0.1", 0), Handler)
    ports.put(server.server_address[1])
    server.serve_forever()


def today_fetch_decode(rows: list[dict], fetch_options: dict, filters: dict) -> list[dict]:
    """The fetch task's loop before concurrent downloads: each row read, then decoded, in turn
    (``read_bytes`` without a session makes a fresh one per URL, as ``requests.get`` did)."""
    from pipelines import fetch
    from pipelines.filters import image_rule

    items = []
    for row in rows:
        data, reason = fetch.read_bytes(row, fetch_options)
        decoded = None
        if reason is None:
            decoded, reason = fetch.decode(data)
        if reason is None and image_rule(decoded["rgb"], filters) is None:
            items.append({"key": row["key"], "status": None, "reason": None, "sha256": decoded["sha256"]})
        else:
            items.append({"key": row["key"], "status": "failed" if reason else "rejected", "reason": reason})
    return items


def new_fetch_decode(url_list: str, fetch_options: dict, filters: dict, partition_size: int, tasks: int):
    """``pipelines.job.fetch_decode`` on the list's partitions as the job plans them, ``tasks`` at once."""
    from pipelines.job import _pack, _unpack, fetch_decode
    from pipelines.sources import plan_source

    def run(descriptor):
        packed = _pack(descriptor["partition"], descriptor)
        items = _unpack(fetch_decode(packed, fetch_options, filters))["items"]
        return [
            {
                "key": item["key"],
                "status": item["status"],
                "reason": item.get("reason"),
                **({"sha256": item["decoded"]["sha256"]} if item["status"] is None else {}),
            }
            for item in items
        ]

    with ThreadPoolExecutor(tasks) as pool:
        descriptors = plan_source(url_list, {}, partition_size).descriptors()
        return [item for items in pool.map(run, descriptors) for item in items]


def bench_fetch(args) -> dict:
    from PIL import Image

    from hyperhuman.demo import packaged_photos
    from pipelines.filters import check_filters
    from pipelines.sources import plan_source, read_partition

    buffer = io.BytesIO()
    Image.fromarray(packaged_photos()["astronaut"]).save(buffer, format="JPEG", quality=90)
    image = buffer.getvalue()
    context = multiprocessing.get_context("spawn")
    ports, stop = context.Queue(), context.Event()
    server = context.Process(target=serve, args=(ports, args.latency_ms / 1000, image, stop), daemon=True)
    server.start()
    try:
        base = f"http://127.0.0.1:{ports.get(timeout=60)}"
        url_list = Path(tempfile.mkdtemp()) / "urls.csv"
        url_list.write_text("url\n" + "".join(f"{base}/img/{i}.jpg\n" for i in range(args.urls)))
        plan = plan_source(str(url_list), {}, args.urls)
        rows = read_partition(plan.descriptor(0), {})
        filters = check_filters(FILTERS)
        hang_cost = FETCH["timeout_s"] * (FETCH["retries"] + 1) + sum(
            FETCH["backoff_s"] * 2**attempt for attempt in range(FETCH["retries"])
        )
        runs = [
            ("(a) today's code: one URL at a time", rows[: args.baseline_urls], None, 1, 1),
            ("(b) concurrency 16 (default), partitions of 100 (offline.yaml)", rows, 16, 100, 1),
            ("(c) concurrency 16, partitions of 100, 4 fetch tasks at once", rows, 16, 100, 4),
            ("(d) concurrency 16, partitions of 1000 (full.yaml)", rows, 16, 1000, 1),
            ("(e) concurrency 64 (full.yaml), partitions of 1000", rows, 64, 1000, 1),
        ]
        table, outputs = [], {}
        for name, subset, concurrency, partition_size, tasks in runs:
            print(f"job_scale fetch: running {name} on {len(subset)} URLs ...", flush=True)
            started = time.perf_counter()
            if concurrency is None:
                items = today_fetch_decode(subset, FETCH, filters)
            else:
                options = {**FETCH, "concurrency": concurrency}
                items = new_fetch_decode(str(url_list), options, filters, partition_size, tasks)
            wall_s = time.perf_counter() - started
            outputs[name] = items
            images = sum(item["status"] is None for item in items)
            table.append(
                {
                    "run": name,
                    "urls": len(subset),
                    "concurrency": concurrency or 1,
                    "partition_size": partition_size if concurrency else None,
                    "fetch_tasks": tasks,
                    "wall_s": round(wall_s, 2),
                    "images": images,
                    "failed": len(items) - images,
                    "images_per_s": images / wall_s,
                    "inputs_per_s": len(items) / wall_s,
                }
            )
    finally:
        stop.set()
        server.terminate()
        server.join(10)

    baseline, new = outputs[runs[0][0]], outputs[runs[1][0]]
    # Keys depend on partition_size (PPPPPPIIIII) by design; what must match is each input's outcome.
    outcome = [{name: value for name, value in item.items() if name != "key"} for item in baseline + new]
    same = outcome[: len(baseline)] == outcome[len(baseline) : 2 * len(baseline)]
    rate0 = table[0]["images_per_s"]
    print(
        f"job_scale fetch: loopback server, {args.latency_ms:.0f} ms per answer, every {HANG_EVERY}th URL "
        f"({100 / HANG_EVERY:.0f}%) never answers; fetch timeout_s={FETCH['timeout_s']:g}, retries={FETCH['retries']}, "
        f"backoff_s={FETCH['backoff_s']:g} (a hanging URL costs {hang_cost:g} s); one 512x512 JPEG "
        f"({len(image) // 1024} KiB) decoded per URL"
    )
    print(f"{'':64} {'URLs':>5} {'wall s':>7} {'images/s':>9} {'inputs/s':>9} {'vs (a)':>7}")
    for row in table:
        print(
            f"{row['run']:64} {row['urls']:5d} {row['wall_s']:7.1f} {row['images_per_s']:9.1f} "
            f"{row['inputs_per_s']:9.1f} {row['images_per_s'] / rate0:6.1f}x"
        )
    print(f"(b)'s items on (a)'s {len(baseline)} URLs equal (a)'s (status, reason, image digest, order): {same}")
    return {
        "summary": {
            "fetch_img_s": table[1]["images_per_s"],
            "baseline_fetch_img_s": rate0,
            "fetch_speedup": table[1]["images_per_s"] / rate0,
            "fetch_img_s_full_config": table[4]["images_per_s"],
            "fetch_same_items_as_sequential": same,
        },
        "settings": {
            "urls": args.urls,
            "baseline_urls": args.baseline_urls,
            "latency_ms": args.latency_ms,
            "hanging": f"every {HANG_EVERY}th URL ({100 / HANG_EVERY:g}%)",
            "hanging_url_cost_s": hang_cost,
            "fetch": FETCH,
            "image_bytes": len(image),
            "baseline": "today's code: fetch_decode's sequential loop before concurrent downloads (today_fetch_decode)",
        },
        "runs": table,
        "same_items_as_sequential": same,
    }


# ---------------------------------------------------------------------------------------------
# plan

CACHE = Path(os.environ.get("HYPERHUMAN_CACHE", Path.home() / ".cache" / "hyperhuman")) / "bench" / "job_scale"
PLAN_SIZES = (10**5, 10**6, 10**7)
PARQUET_FILES = 10
ROW_GROUP = 100_000


def url_table(start: int, stop: int):
    import pyarrow as pa
    import pyarrow.compute as pc

    index = pa.array(range(start, stop), pa.int64())
    text = pc.cast(index, pa.string())
    return pa.table(
        {
            "url": pc.binary_join_element_wise("https://images.example.invalid/", text, ".jpg", ""),
            "caption": pc.binary_join_element_wise("a photo of person number ", text, ""),
            "width": pc.add(pc.bit_wise_and(index, 1023), 256),
            "similarity": pc.divide(pc.cast(pc.bit_wise_and(index, 255), pa.float64()), 255.0),
        }
    )


def synthetic_lists(rows: int) -> dict[str, Path]:
    """``{"parquet": folder of PARQUET_FILES files, "csv": one file}`` with ``rows`` rows, made once."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    folder = CACHE / f"rows-{rows}"
    parquet, csv = folder / "parquet", folder / "urls.csv"
    if not (folder / "done").exists():
        parquet.mkdir(parents=True, exist_ok=True)
        per_file = rows // PARQUET_FILES
        with pacsv.CSVWriter(csv, url_table(0, 1).schema) as writer:
            for index in range(PARQUET_FILES):
                for start in range(index * per_file, (index + 1) * per_file, 1_000_000):
                    table = url_table(start, min(start + 1_000_000, (index + 1) * per_file))
                    writer.write_table(table)
                pq.write_table(
                    url_table(index * per_file, (index + 1) * per_file), parquet / f"part-{index:03d}.parquet",
                    row_group_size=ROW_GROUP,
                )  # fmt: skip
        (folder / "done").write_text("ok")
    return {"parquet": parquet, "csv": csv}


def today_listing(source: Path) -> int:
    """The previous sources.url_list_rows on every file: pandas, then a row dict per input."""
    import pandas as pd

    rows = []
    for path in sorted(source.glob("*.parquet")) if source.is_dir() else [source]:
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype=str)
        extra_columns = [c for c in table.columns if c not in ("url", "caption")]
        for record in table.to_dict("records"):
            extra = {column: record[column] for column in extra_columns}
            row = {"kind": "url", "source": str(record["url"]), "caption": str(record["caption"]), "key": None}
            rows.append({**row, "data": None, "extra": json.dumps(extra, sort_keys=True, default=str)})
    return len(rows)


def _ready() -> bool:
    return True


def measure_plan(method: str, source: str) -> dict:
    """Runs in a fresh process: plan ``source`` one way; the process's peak RSS and seconds."""
    started = time.perf_counter()
    if method == "today":
        inputs, ray_s = today_listing(Path(source)), 0.0
    else:
        import ray

        from hyperhuman.config import load_config
        from pipelines.job import run_job

        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.get([ray.remote(num_cpus=0.5)(_ready).remote() for _ in range(4)])  # workers up, as on a live cluster
        ray_s = time.perf_counter() - started
        output = tempfile.mkdtemp()
        inputs = run_job(source, output, load_config("annotate/offline"), plan_only=True)["inputs"]
    return {
        "inputs": inputs,
        "plan_s": time.perf_counter() - started - ray_s,
        "ray_init_s": ray_s,
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def bench_plan(args) -> dict:
    table = []
    for rows in args.plan_rows:
        lists = synthetic_lists(rows)
        for kind, source in lists.items():
            for method in ("today", "plan-only"):
                print(f"job_scale plan: {method} on {rows:,} rows of {kind} ...", flush=True)
                command = [sys.executable, __file__, "--measure-plan", method, str(source)]
                done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
                if done.returncode != 0:
                    raise RuntimeError(f"{command} failed:\n{done.stderr[-3000:]}")
                measured = json.loads(done.stdout.strip().splitlines()[-1])
                assert measured["inputs"] == rows, measured
                table.append({"rows": rows, "format": kind, "method": method, **measured})
    by = {(r["rows"], r["format"], r["method"]): r for r in table}
    header = ("rows", "format", "today RSS MiB", "plan-only RSS MiB", "ratio", "today s", "plan-only s")
    print("{:>10} {:8} {:>14} {:>18} {:>6} {:>8} {:>12}".format(*header))
    for rows in args.plan_rows:
        for kind in ("parquet", "csv"):
            today, new = by[(rows, kind, "today")], by[(rows, kind, "plan-only")]
            ratio = today["rss_mib"] / new["rss_mib"]
            print(
                f"{rows:>10,} {kind:8} {today['rss_mib']:14.0f} {new['rss_mib']:18.0f} {ratio:5.1f}x "
                f"{today['plan_s']:8.1f} {new['plan_s']:12.1f}"
            )

    def column(kind, method, field):
        return {str(rows): round(by[(rows, kind, method)][field], 2) for rows in args.plan_rows}

    new_rss = column("parquet", "plan-only", "rss_mib")
    smallest, largest = min(args.plan_rows), max(args.plan_rows)
    growth = max(
        by[(largest, kind, "plan-only")]["rss_mib"] / by[(smallest, kind, "plan-only")]["rss_mib"]
        for kind in ("parquet", "csv")
    )
    print(f"plan-only driver RSS growth from {smallest:,} to {largest:,} rows: {growth:.2f}x")
    return {
        "summary": {
            "driver_rss_mib": new_rss,
            "driver_rss_mib_csv": column("csv", "plan-only", "rss_mib"),
            "plan_s": column("parquet", "plan-only", "plan_s"),
            "plan_s_csv": column("csv", "plan-only", "plan_s"),
            "baseline_driver_rss_mib": column("parquet", "today", "rss_mib"),
            "baseline_driver_rss_mib_csv": column("csv", "today", "rss_mib"),
            "baseline_plan_s": column("parquet", "today", "plan_s"),
            "driver_rss_growth": round(growth, 3),
        },
        "settings": {
            "parquet_files": PARQUET_FILES,
            "row_group": ROW_GROUP,
            "columns": ["url", "caption", "width", "similarity"],
            "cache": str(CACHE),
        },  # fmt: skip
        "runs": table,
    }


SECTIONS = {"fetch": bench_fetch, "plan": bench_plan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    parser.add_argument("--urls", type=int, default=2000)
    parser.add_argument("--baseline-urls", type=int, default=300)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--plan-rows", type=int, nargs="+", default=list(PLAN_SIZES))
    parser.add_argument("--measure-plan", nargs=2, metavar=("METHOD", "SOURCE"), help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    if args.measure_plan:  # a child process of bench_plan
        sys.path.insert(0, str(REPO))
        print(json.dumps(measure_plan(*args.measure_plan)))
        return

    output = Path(args.output)
    result = json.loads(output.read_text()) if output.is_file() else {}  # keep the sections not rerun
    result.setdefault("summary", {})
    result["machine"] = {"platform": platform.platform(), "python": platform.python_version()}
    output.parent.mkdir(parents=True, exist_ok=True)
    for name in args.only or list(SECTIONS):
        section = SECTIONS[name](args)
        result["summary"].update(section.pop("summary"))
        result[name] = section
        output.write_text(json.dumps(result, indent=2))  # after each section: a later failure keeps it
    print(f"summary: {json.dumps(result['summary'])}")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
