"""Synthetic HumanVerse samples for tests and benchmarks: valid, fully annotated, random.

Not data: the pixels are noise and the keypoints random points inside the image. Use them to
exercise codecs, writers and readers at any size without model weights.
"""

from __future__ import annotations

import numpy as np

from shards.sample import Sample

PROVENANCE = {
    "pose": {"annotator": "test-pose", "version": "0", "weights": "none"},
    "depth": {"annotator": "test-depth", "version": "0", "weights": "none", "kind": "relative_inverse"},
    "normal": {"annotator": "test-normal", "version": "0", "weights": "none"},
    "mask": {"annotator": "test-mask", "version": "0", "weights": "none"},
}


def make_sample(key: str, height: int = 48, width: int = 64, seed: int = 0, people: int = 2) -> Sample:
    """A fully annotated sample with random but valid content (keypoints inside the image)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    depth = 1.0 + xx / width + 0.5 * np.sin(yy / 5.0) + rng.uniform(0, 0.01, (height, width))
    gy, gx = np.gradient(depth)
    normal = np.stack([-gx, gy, np.ones_like(depth)], axis=2)
    normal /= np.linalg.norm(normal, axis=2, keepdims=True)
    keypoints = [
        np.concatenate(
            [rng.uniform(0, width, (17, 1)), rng.uniform(0, height, (17, 1)), rng.uniform(0.1, 1.0, (17, 1))], axis=1
        )
        for _ in range(people)
    ]
    return Sample(
        key=key,
        image=rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
        caption=f"a photo {key}",
        source=f"synthetic://{key}",
        pose={
            "width": width,
            "height": height,
            "people": [{"bbox": [0, 0, width, height], "score": 0.9, "keypoints": k} for k in keypoints],
        },
        depth=depth,
        normal=normal,
        mask=rng.random((height, width)) > 0.5,
        annotations={name: dict(value) for name, value in PROVENANCE.items()},
    )
