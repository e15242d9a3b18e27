"""``make demo``: run what exists of the pipeline on photos that ship inside packages.

Today: export the public-domain photos (with captions), run the annotation job on Ray Data
with the offline default annotators (``configs/annotate/offline.yaml``), validate and inspect
the shards, and save a preview strip per sample rendered from what the shards hold. Later
stages (LSDM sampling, evaluation) join as they land.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def packaged_photos() -> dict[str, np.ndarray]:
    """Public-domain photos of people that ship inside installed packages (RGB uint8)."""
    import matplotlib.cbook
    import skimage.data

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        grace_hopper = np.asarray(Image.open(handle).convert("RGB"))
    return {"astronaut": skimage.data.astronaut(), "grace_hopper": grace_hopper}


def preview(sample: dict) -> np.ndarray:
    """Image | skeleton | mask | depth | normal, side by side, from a decoded shard sample."""
    from annotators.render import render_depth, render_normal, render_pose

    kind = sample["json"]["annotations"]["depth"]["kind"]
    mask = np.repeat(sample["mask.png"][..., None], 3, axis=2)
    panels = [
        sample["jpg"],
        render_pose(sample["pose.json"]),
        mask,
        render_depth(sample["depth.png"], kind),
        render_normal(sample["normal.png"]),
    ]
    return np.concatenate(panels, axis=1)


def run_demo(config: dict, output: str) -> int:
    from hyperhuman.config import apply_overrides, load_config
    from pipelines.job import run_job
    from shards.reader import complete_shard_urls, read_shard
    from shards.validate import inspect, validate

    output_dir = Path(output)
    photo_dir = output_dir / "photos"
    photo_dir.mkdir(parents=True, exist_ok=True)
    photos = packaged_photos()
    for name, caption in config["photos"].items():
        Image.fromarray(photos[name]).save(photo_dir / f"{name}.png")
        (photo_dir / f"{name}.txt").write_text(caption + "\n")
    print(f"[demo] exported {len(config['photos'])} public-domain photos to {photo_dir}")

    job_config = apply_overrides(load_config(config["job_config"]), config.get("job_overrides", []))
    shard_dir = output_dir / "shards"
    report = run_job(str(photo_dir), str(shard_dir), job_config, overwrite=True)
    print(f"[demo] annotation job: {report['samples']} samples kept, rows {report['counts']}")

    problems = validate(str(shard_dir))
    for problem in problems:
        print(f"[demo] {problem}")
    if problems:
        print(f"[demo] validation FAILED with {len(problems)} problem(s)")
        return 1
    print("[demo] validation OK")
    print(json.dumps(inspect(str(shard_dir)), indent=2))

    preview_dir = output_dir / "previews"
    preview_dir.mkdir(parents=True, exist_ok=True)
    for url in complete_shard_urls(str(shard_dir)):
        for sample in read_shard(url):
            name = Path(sample["json"]["source"]).stem
            Image.fromarray(preview(sample)).save(preview_dir / f"{name}.png")
    print(f"[demo] previews (image | pose | mask | depth | normal) in {preview_dir}")
    print("[demo] not built yet: LSDM, SGR, evaluation (see README.md)")
    return 0
