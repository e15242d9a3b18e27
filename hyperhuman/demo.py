"""``make demo``: run what exists of the pipeline on photos that ship inside packages.

Today: export the public-domain photos, pack them into HumanVerse shards, validate and
inspect them. Later stages (annotation, LSDM sampling, evaluation) join as they land.
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


def run_demo(config: dict, output: str) -> int:
    from shards.pack import pack_folder
    from shards.validate import inspect, validate

    output_dir = Path(output)
    photo_dir = output_dir / "photos"
    photo_dir.mkdir(parents=True, exist_ok=True)
    photos = packaged_photos()
    for name, caption in config["photos"].items():
        Image.fromarray(photos[name]).save(photo_dir / f"{name}.jpg", quality=95)
        (photo_dir / f"{name}.txt").write_text(caption + "\n")
    print(f"[demo] exported {len(config['photos'])} public-domain photos to {photo_dir}")

    shard_dir = str(output_dir / "shards")
    manifest = pack_folder(str(photo_dir), shard_dir, extensions=["jpg"], **config["writer"])
    print(f"[demo] packed {manifest['samples']} samples into {manifest['num_shards']} shard(s) under {shard_dir}")

    problems = validate(shard_dir)
    for problem in problems:
        print(f"[demo] {problem}")
    if problems:
        print(f"[demo] validation FAILED with {len(problems)} problem(s)")
        return 1
    print("[demo] validation OK")
    print(json.dumps(inspect(shard_dir), indent=2))
    print("[demo] next stages (annotation, LSDM, evaluation) are not built yet; see README.md")
    return 0
