"""The skeleton renderer is part of the models' input contract: its drawing is pinned per version,
the recipes record the version, and the pipelines say so when they draw with another one."""

import hashlib
import logging

import numpy as np
import pytest

from hyperhuman.lsdm.pipeline import HyperHumanPipeline
from hyperhuman.lsdm.testing import dummy_components
from hyperhuman.skeleton import RENDERER_VERSION, render_pose

# sha256 of the reference render below, per renderer version. A change to what render_pose draws
# (or an OpenCV that draws differently) fails here: bump RENDERER_VERSION and add its digest, so
# that models trained on the old drawing are told apart from models trained on the new one.
PINNED = {"openpose18-controlnet-v1": "a7a59c9da9006744c49720dec19aa6d6f11c8e3e24d5dfa72f3346dcc0cec3fe"}


def reference_pose() -> dict:
    """Two people with joints above and below the score threshold, one with whole-body points."""
    rng = np.random.default_rng(7)
    people = [{"keypoints": rng.uniform([10, 10, 0.0], [150, 110, 1.0], (17, 3)).tolist()} for _ in range(2)]
    people[0]["wholebody"] = rng.uniform([10, 10, 0.0], [150, 110, 1.0], (133, 3)).tolist()
    return {"width": 160, "height": 120, "people": people}


def test_each_renderer_version_draws_the_pixels_pinned_for_it():
    assert RENDERER_VERSION in PINNED, f"new renderer version {RENDERER_VERSION!r}: pin its reference digest"
    image = render_pose(reference_pose())
    assert image.shape == (120, 160, 3) and 0.1 < (image > 0).any(-1).mean() < 0.5
    assert hashlib.sha256(image.tobytes()).hexdigest() == PINNED[RENDERER_VERSION]


POSE = {"width": 16, "height": 16, "people": [{"keypoints": [[8.0, 2.0 + i * 0.7, 0.9] for i in range(17)]}]}


@pytest.mark.parametrize(("trained_with", "warned"), [(RENDERER_VERSION, False), (None, False), ("older-v0", True)])
def test_the_pipeline_says_when_it_draws_with_another_renderer_than_the_model_learnt(trained_with, warned, caplog):
    components = dummy_components()
    unet = components["unet"]
    unet.register_to_config(pose_renderer=trained_with)
    pipe = HyperHumanPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    with caplog.at_level(logging.WARNING, logger="hyperhuman.skeleton"):
        pipe("a person", pose=POSE, num_inference_steps=1, output_type="latent")
    messages = [r.getMessage() for r in caplog.records if r.name == "hyperhuman.skeleton"]
    assert bool(messages) == warned, messages
    if warned:
        assert "older-v0" in messages[0] and RENDERER_VERSION in messages[0]
    caplog.clear()  # a pre-rendered skeleton image is not drawn by us: nothing to compare
    with caplog.at_level(logging.WARNING, logger="hyperhuman.skeleton"):
        pipe("a person", pose=render_pose(POSE), num_inference_steps=1, output_type="latent")
    assert not [r for r in caplog.records if r.name == "hyperhuman.skeleton"]
