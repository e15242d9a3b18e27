"""Annotation job throughput vs the model-bound limit and a naive script, side by side.

    .venv/bin/python bench/annotate_throughput.py [--images 500] [--data ../shared/data/humans]

Builds ``--images`` JPEGs (the real photos, repeated with different deterministic crops, at
most 512 px; the default ``--data``, ``../shared/data/humans``, is the development checkout's
photo set beside the repository: without it the two packaged photos are used, and it says so)
and annotates them with the offline default annotators three ways:
(a) the annotate stage in a bare loop on already-decoded images, batches of 8 (model-bound);
(b) a naive script: read, decode, annotate and write one image at a time with ShardWriter;
(c) ``hyperhuman annotate`` (Ray Data). The job's start-up (Ray, actor and model loading) is
measured (``ray.init``, then a one-image job) and reported apart from its steady-state
throughput. Prints a
table and writes bench/results/annotate_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
LENIENT = {"min_side": 64, "min_person_area": 0.0}  # keep most images: every method does the same work


def make_images(data: Path, count: int, folder: Path) -> list[Path]:
    from hyperhuman.demo import packaged_photos

    sources = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((data / "images").glob("*.jpg"))]
    if not sources:
        print(f"annotate_throughput: no photos in {data / 'images'} (pass --data DIR): only the 2 packaged photos")
    sources += list(packaged_photos().values())
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        photo = sources[index % len(sources)]
        height, width = photo.shape[:2]
        scale = rng.uniform(0.75, 1.0) if index >= len(sources) else 1.0
        crop_w, crop_h = int(width * scale), int(height * scale)
        x0, y0 = rng.integers(0, width - crop_w + 1), rng.integers(0, height - crop_h + 1)
        image = Image.fromarray(photo[y0 : y0 + crop_h, x0 : x0 + crop_w])
        image.thumbnail((512, 512))
        path = folder / f"{index:05d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "humans"))
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "annotate_throughput.json"))
    args = parser.parse_args()

    from hyperhuman.config import load_config
    from pipelines.annotate import AnnotateStage, Failure, Rejection
    from pipelines.fetch import decode
    from pipelines.filters import check_filters, people_rule
    from pipelines.job import run_job
    from shards import ShardWriter

    config = load_config("annotate/offline")
    config["filters"].update(LENIENT)
    config["partition_size"] = 50
    filters = check_filters(config["filters"])

    def select(index, pose, mask):
        rejection = people_rule(pose, mask, filters)
        return None if rejection is None else Rejection(*rejection)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        paths = make_images(Path(args.data), args.images, tmp / "images")
        stage = AnnotateStage(config["annotators"])

        decoded = [decode(path.read_bytes())[0]["rgb"] for path in paths]
        start = time.perf_counter()
        for first in range(0, len(decoded), 8):
            batch = decoded[first : first + 8]
            keys = [f"k{first + i}" for i in range(len(batch))]
            stage(keys, batch, [""] * len(batch), [""] * len(batch), select=select)
        bare_s = time.perf_counter() - start

        start = time.perf_counter()
        with ShardWriter(str(tmp / "naive"), 0) as writer:
            for index, path in enumerate(paths):
                image = decode(path.read_bytes())[0]
                result = stage([f"{index:09d}"], [image["rgb"]], [""], [str(path)], select=select)[0]
                if isinstance(result, Rejection):
                    writer.reject(f"{index:09d}", result.reason, rule=result.rule)
                elif isinstance(result, Failure):  # an annotator raised on this image
                    writer.reject(f"{index:09d}", result.reason, status="failed")
                else:
                    writer.write(result)
        naive_s = time.perf_counter() - start

        import ray

        start = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray_init_s = time.perf_counter() - start
        # Each job starts its actor pool and loads the models: a one-image job measures that.
        (tmp / "one").mkdir()
        (tmp / "one" / "00000.jpg").write_bytes(paths[0].read_bytes())
        start = time.perf_counter()
        run_job(str(tmp / "one"), str(tmp / "startup"), config)
        startup_s = time.perf_counter() - start
        start = time.perf_counter()
        report = run_job(str(tmp / "images"), str(tmp / "job"), config)
        job_s = time.perf_counter() - start

    steady_s = max(job_s - startup_s, 1e-9)
    rows = {
        "(a) annotate stage, bare loop on decoded images": args.images / bare_s,
        "(b) naive script: decode, annotate, write one by one": args.images / naive_s,
        "(c) hyperhuman annotate (Ray Data), steady state": args.images / steady_s,
        "(c) hyperhuman annotate, including start-up": args.images / (job_s + ray_init_s),
    }
    print(f"annotate_throughput: {args.images} images (≤512 px), offline default annotators, {report['counts']}")
    print(f"{'':56} {'images/s':>9} {'vs (a)':>7}")
    for name, rate in rows.items():
        print(f"{name:56} {rate:9.2f} {rate / rows[list(rows)[0]]:6.2f}x")
    print(f"start-up: ray.init {ray_init_s:.1f} s; per job (actor pool + models, a one-image job) {startup_s:.1f} s")
    print(f"job total {job_s:.1f} s")
    print(f"job time per stage, summed over partitions (s): {report['time_s']}")
    result = {
        "images": args.images,
        "images_per_s": rows,
        "ray_init_s": ray_init_s,
        "job_startup_s": startup_s,
        "job_s": job_s,
        "bare_s": bare_s,
        "naive_s": naive_s,
        "stage_times_s": report["time_s"],
        "counts": report["counts"],
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
