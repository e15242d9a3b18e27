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
image digest, in order).

plan — URL-list planning at 10^5..10^7 rows: to be added here as its own section.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import platform
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


def new_fetch_decode(rows: list[dict], fetch_options: dict, filters: dict, partition_size: int, tasks: int):
    """``pipelines.job.fetch_decode`` on the rows as the job partitions them, ``tasks`` at once."""
    from pipelines.job import _pack, _unpack, fetch_decode
    from pipelines.sources import partition_inputs

    def run(partition):
        items = _unpack(fetch_decode(_pack(partition["partition"], partition), fetch_options, filters))["items"]
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
        return [item for items in pool.map(run, partition_inputs(rows, partition_size)) for item in items]


def bench_fetch(args) -> dict:
    from PIL import Image

    from hyperhuman.demo import packaged_photos
    from pipelines.filters import check_filters
    from pipelines.sources import _row, partition_inputs

    buffer = io.BytesIO()
    Image.fromarray(packaged_photos()["astronaut"]).save(buffer, format="JPEG", quality=90)
    image = buffer.getvalue()
    context = multiprocessing.get_context("spawn")
    ports, stop = context.Queue(), context.Event()
    server = context.Process(target=serve, args=(ports, args.latency_ms / 1000, image, stop), daemon=True)
    server.start()
    try:
        base = f"http://127.0.0.1:{ports.get(timeout=60)}"
        rows = partition_inputs([_row("url", f"{base}/img/{i}.jpg") for i in range(args.urls)], args.urls)[0]["rows"]
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
                items = new_fetch_decode(subset, {**FETCH, "concurrency": concurrency}, filters, partition_size, tasks)
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
    same = baseline == new[: len(baseline)]
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


SECTIONS = {"fetch": bench_fetch}  # "plan": URL-list planning at 10^5..10^7 rows (to come)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    parser.add_argument("--urls", type=int, default=2000)
    parser.add_argument("--baseline-urls", type=int, default=300)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()

    output = Path(args.output)
    result = json.loads(output.read_text()) if output.is_file() else {}  # keep the sections not rerun
    result.setdefault("summary", {})
    for name in args.only or list(SECTIONS):
        section = SECTIONS[name](args)
        result["summary"].update(section.pop("summary"))
        result[name] = section
    result["machine"] = {"platform": platform.platform(), "python": platform.python_version()}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"summary: {json.dumps(result['summary'])}")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
