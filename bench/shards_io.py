"""Shard I/O benchmark: ShardWriter vs a bare tarfile loop, and the training reader vs plain
webdataset decoding, measured side by side in one run.

    .venv/bin/python bench/shards_io.py [--samples 200] [--size 512] [--repeats 3]

Prints a table and writes bench/results/shards_io.json. Ratios are what to compare across
machines; absolute numbers depend on the disk and CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import webdataset as wds

import shards
from shards import ShardWriter, write_manifest
from shards.dataset import SampleTransform, humanverse_dataset
from shards.sample import encode_sample
from shards.testing import make_sample


def median_time(repeats: int, run) -> float:
    """Median wall time of ``repeats`` runs (seconds), after one untimed warm-up run."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_writers(encoded: list[tuple[str, dict]], repeats: int) -> dict:
    total_bytes = sum(len(data) for _, members in encoded for data in members.values())

    def bare_tarfile():
        with tempfile.TemporaryDirectory() as root, tarfile.open(f"{root}/000000.tar", "w") as archive:
            for key, members in encoded:
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))

    def shard_writer():
        with tempfile.TemporaryDirectory() as root:
            with ShardWriter(root, 0) as writer:
                for key, members in encoded:
                    writer.write_encoded(key, members, source="bench")
            write_manifest(root)

    results = {
        "bare tarfile loop": median_time(repeats, bare_tarfile),
        "ShardWriter (+parquet, stats, manifest)": median_time(repeats, shard_writer),
    }
    return {
        name: {"seconds": t, "samples_per_s": len(encoded) / t, "MB_per_s": total_bytes / t / 1e6}
        for name, t in results.items()
    }


def bench_readers(root: str, samples: int, size: int, repeats: int) -> dict:
    urls = shards.complete_shard_urls(root)

    def consume(dataset):
        count = sum(1 for _ in dataset)
        assert count == samples, (count, samples)

    runs = {
        "plain webdataset .decode('rgb8') (8-bit depth!)": lambda: consume(
            wds.WebDataset(urls, shardshuffle=False).decode("rgb8")
        ),
        "plain webdataset .decode(shards.wds_handler)": lambda: consume(
            wds.WebDataset(urls, shardshuffle=False).decode(shards.wds_handler)
        ),
        "humanverse_dataset, decode only": lambda: consume(humanverse_dataset(root)),
        f"humanverse_dataset + SampleTransform({size // 2})": lambda: consume(
            humanverse_dataset(root, SampleTransform(size // 2, seed=0))
        ),
    }
    return {
        name: {"seconds": t, "samples_per_s": samples / t}
        for name, t in ((n, median_time(repeats, r)) for n, r in runs.items())
    }


def table(title: str, rows: dict, baseline: str) -> str:
    lines = [f"\n{title}", f"{'':52} {'samples/s':>10} {'MB/s':>8} {'vs baseline':>12}"]
    for name, row in rows.items():
        ratio = row["samples_per_s"] / rows[baseline]["samples_per_s"]
        megabytes = f"{row['MB_per_s']:8.1f}" if "MB_per_s" in row else f"{'':8}"
        lines.append(f"{name:52} {row['samples_per_s']:10.1f} {megabytes} {ratio:11.2f}x")
        row["ratio_vs_baseline"] = ratio
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "shards_io.json"))
    args = parser.parse_args()

    encoded = [
        (f"s{index:06d}", encode_sample(make_sample(f"s{index:06d}", height=args.size, width=args.size, seed=index)))
        for index in range(args.samples)
    ]
    writers = bench_writers(encoded, args.repeats)
    with tempfile.TemporaryDirectory() as root:
        with ShardWriter(root, 0, max_samples=max(1, args.samples // 4)) as writer:
            for key, members in encoded:
                writer.write_encoded(key, members)
        readers = bench_readers(root, args.samples, args.size, args.repeats)

    sizes = f"{args.samples} samples of {args.size}x{args.size} (jpg, depth, normal, mask, pose)"
    print(f"shards_io: {sizes}, median of {args.repeats} runs")
    print(table("Writing (same encoded bytes)", writers, "bare tarfile loop"))
    print(table("Reading and decoding", readers, "plain webdataset .decode('rgb8') (8-bit depth!)"))
    result = {
        "benchmark": "shards_io",
        "samples": args.samples,
        "size": args.size,
        "repeats": args.repeats,
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor(),
            "cpus": __import__("os").cpu_count(),
        },
        "writers": writers,
        "readers": readers,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
