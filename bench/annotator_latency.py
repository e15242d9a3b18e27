"""Per-image latency of each offline default annotator on this CPU.

    .venv/bin/python bench/annotator_latency.py [--data ../shared/data/humans] [--limit 30]

Runs pose, mask, coarse depth, normals and the whole annotate stage on real photos (the
``--data`` folder if present, else the two packaged public-domain photos, and it says so), one
image per call, after one warm-up call. The default ``--data``, ``../shared/data/humans``, is the
development checkout's photo set beside the repository, not part of it. Prints a table and
writes bench/results/annotator_latency.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def load_photos(data: Path, limit: int) -> list[np.ndarray]:
    paths = sorted((data / "images").glob("*.jpg"))[:limit] if (data / "images").is_dir() else []
    if paths:
        return [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    print(f"annotator_latency: no photos in {data / 'images'} (pass --data DIR): timing the 2 packaged photos")
    from hyperhuman.demo import packaged_photos

    return list(packaged_photos().values())


def timed(function, photos: list) -> list[float]:
    function(photos[0])  # warm-up: graph initialisation, lazy imports
    times = []
    for photo in photos:
        start = time.perf_counter()
        function(photo)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "humans"))
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "annotator_latency.json"))
    args = parser.parse_args()

    from hyperhuman.config import load_config
    from pipelines.annotate import AnnotateStage

    photos = load_photos(Path(args.data), args.limit)
    stage = AnnotateStage(load_config("annotate/offline")["annotators"])
    pose, mask, depth, normal = (stage.annotators[m] for m in ("pose", "mask", "depth", "normal"))
    cache = {}

    def run_pose(photo):
        cache["pose"] = pose([photo])

    def run_mask(photo):
        cache["mask"] = mask([photo])

    def run_depth(photo):
        cache["pose"], cache["mask"] = pose([photo]), mask([photo])  # inputs, untimed below
        start = time.perf_counter()
        cache["depth"] = depth([photo], poses=cache["pose"], masks=cache["mask"])
        cache["depth_time"] = time.perf_counter() - start

    rows = {
        f"pose ({pose.name})": timed(run_pose, photos),
        f"mask ({mask.name})": timed(run_mask, photos),
    }
    depth_times, normal_times = [], []
    for photo in photos:
        run_depth(photo)
        depth_times.append(cache["depth_time"])
        start = time.perf_counter()
        normal([photo], depths=cache["depth"])
        normal_times.append(time.perf_counter() - start)
    rows[f"depth ({depth.name})"] = depth_times
    rows[f"normal ({normal.name})"] = normal_times
    rows["whole annotate stage (all of the above + caption)"] = timed(
        lambda photo: stage(["k"], [photo], [""], ["bench"]), photos
    )

    megapixels = [p.shape[0] * p.shape[1] / 1e6 for p in photos]
    print(
        f"annotator latency: {len(photos)} real photos ({min(megapixels):.2f}-{max(megapixels):.2f} MP), "
        "one image per call"
    )
    print(f"{'annotator':52} {'median ms':>10} {'mean ms':>8}")
    result = {}
    for name, times in rows.items():
        median, mean = 1000 * statistics.median(times), 1000 * statistics.mean(times)
        result[name] = {"median_ms": median, "mean_ms": mean, "images": len(times)}
        print(f"{name:52} {median:10.1f} {mean:8.1f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
