"""``make demo``: run what exists of the pipeline on photos that ship inside packages.

Today: annotate the public-domain photos with the offline default annotators (pose, mask,
coarse depth, normals, source captions), write HumanVerse shards, validate and inspect them,
and save a preview strip per sample. Later stages (the Ray job, LSDM sampling, evaluation)
join as they land.
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


def preview(sample) -> np.ndarray:
    """Image | skeleton | mask | depth | normal, side by side."""
    from annotators.render import render_depth, render_normal, render_pose

    mask = np.repeat(sample.mask[..., None], 3, axis=2)
    panels = [sample.image, render_pose(sample.pose), mask, render_depth(sample.depth), render_normal(sample.normal)]
    return np.concatenate(panels, axis=1)


def run_demo(config: dict, output: str) -> int:
    from pipelines.annotate import AnnotateStage
    from shards import ShardWriter, write_manifest
    from shards.validate import inspect, validate

    output_dir = Path(output)
    photos = packaged_photos()
    names = list(config["photos"])
    stage = AnnotateStage(config["annotators"])
    samples = stage(
        keys=[f"demo{index:04d}" for index in range(len(names))],
        images=[photos[name] for name in names],
        captions=[config["photos"][name] for name in names],
        sources=[f"package:{name}" for name in names],
    )
    for name, sample in zip(names, samples, strict=True):
        print(f"[demo] {name}: {len(sample.pose['people'])} person(s) found")

    shard_dir = output_dir / "shards"
    with ShardWriter(str(shard_dir), 0, **config["writer"]) as writer:
        for sample in samples:
            writer.write(sample)
    manifest = write_manifest(str(shard_dir))
    print(f"[demo] wrote {manifest['samples']} annotated samples in {manifest['num_shards']} shard(s) to {shard_dir}")

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
    for name, sample in zip(names, samples, strict=True):
        Image.fromarray(preview(sample)).save(preview_dir / f"{name}.png")
    print(f"[demo] previews (image | pose | mask | depth | normal) in {preview_dir}")
    print("[demo] not built yet: the Ray annotation job, LSDM, evaluation (see README.md)")
    return 0
