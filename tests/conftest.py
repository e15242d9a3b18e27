"""Shared fixtures: synthetic HumanVerse samples, the real photo set, one Ray instance."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from shards.testing import make_sample

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_HUMANS = Path(os.environ.get("HYPERHUMAN_SHARED", REPO_ROOT.parent / "shared")) / "data" / "humans"


@pytest.fixture
def sample_factory():
    return make_sample


@pytest.fixture(scope="session")
def shared_humans() -> Path:
    if not (SHARED_HUMANS / "keypoints_coco.json").is_file():
        pytest.skip(f"real photo set not found at {SHARED_HUMANS} (../shared/data/humans beside the repo)")
    return SHARED_HUMANS


@pytest.fixture(scope="session")
def coco_ground_truth(shared_humans) -> dict:
    return json.loads((shared_humans / "keypoints_coco.json").read_text())


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
