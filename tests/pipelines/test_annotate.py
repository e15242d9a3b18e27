import errno
import json

import numpy as np
import pytest

from hyperhuman.config import load_config
from hyperhuman.demo import packaged_photos
from pipelines.annotate import AnnotateStage, ResourceError, is_resource_error
from shards import ShardWriter, write_manifest
from shards.reader import complete_shard_urls, read_shard
from shards.validate import validate
from tests.annotators.planted import offline_pose_annotator


def test_offline_default_annotators_produce_valid_shards(tmp_path):
    stage = AnnotateStage(load_config("annotate/offline")["annotators"])
    photo = packaged_photos()["astronaut"]
    samples = stage(["a0"], [photo], ["  an astronaut "], ["package:astronaut"])
    sample = samples[0]
    assert sample.caption == "an astronaut" and sample.meta["num_people"] == 1
    assert sample.depth.shape == sample.mask.shape == photo.shape[:2] and sample.normal.shape == photo.shape
    with ShardWriter(str(tmp_path), 0) as writer:
        writer.write(sample)
    write_manifest(str(tmp_path))
    assert validate(str(tmp_path)) == []
    stored = next(read_shard(complete_shard_urls(str(tmp_path))[0]))
    annotations = stored["json"]["annotations"]
    assert annotations["pose"]["annotator"] == offline_pose_annotator()
    assert annotations["depth"]["kind"] == "coarse_metric_m_from_pose"
    assert annotations["normal"]["annotator"] == "normal-from-depth"
    # depth survives the 16-bit round trip to within one quantisation step of its range
    span = float(sample.depth.max() - sample.depth.min())
    assert np.abs(stored["depth.png"] - sample.depth).max() <= span / 65535 + 1e-6
    json.dumps(stored["json"])  # metadata is plain JSON


def faulty_stage(monkeypatch):
    from annotators.registry import REGISTRY
    from tests.pipelines.faulty_annotators import TARGET

    monkeypatch.setitem(REGISTRY, "faulty-caption", TARGET)
    config = load_config("annotate/offline")["annotators"]
    config["caption"] = {"name": "faulty-caption"}
    return AnnotateStage(config)


def test_a_batch_an_annotator_raises_on_is_rerun_image_by_image(monkeypatch):
    stage = faulty_stage(monkeypatch)
    photo = packaged_photos()["astronaut"]
    captions = ["first", "raise", "third"]
    results = stage(["a", "b", "c"], [photo] * 3, captions, ["s"] * 3)
    assert [type(result).__name__ for result in results] == ["Sample", "Failure", "Sample"]
    assert results[1].reason == "annotator 'faulty-caption' raised ValueError: this image cannot be captioned"
    assert [results[0].key, results[2].key] == ["a", "c"] and results[2].caption == "third"


def test_resource_errors_are_not_blamed_on_the_image(monkeypatch):
    stage = faulty_stage(monkeypatch)
    photo = packaged_photos()["astronaut"]
    with pytest.raises(ResourceError, match="annotator 'faulty-caption' raised MemoryError: cannot allocate"):
        stage(["a", "b"], [photo] * 2, ["fine", "memory"], ["s"] * 2)


class OutOfMemoryError(RuntimeError):  # how torch names its CUDA/MPS allocation failures
    pass


@pytest.mark.parametrize(
    ("error", "resource"),
    [
        (MemoryError(), True),
        (OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EMFILE, "Too many open files"), True),
        (OSError(errno.ENOENT, "No such file"), False),
        (ValueError("bad image"), False),
        (RuntimeError("shape mismatch"), False),
    ],
)
def test_is_resource_error(error, resource):
    assert is_resource_error(error) is resource
