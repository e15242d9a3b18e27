import json

import numpy as np

from hyperhuman.config import load_config
from hyperhuman.demo import packaged_photos
from pipelines.annotate import AnnotateStage
from shards import ShardWriter, write_manifest
from shards.reader import complete_shard_urls, read_shard
from shards.validate import validate


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
    assert annotations["pose"]["annotator"] == "mediapipe-blazepose"
    assert annotations["depth"]["kind"] == "coarse_metric_m_from_pose"
    assert annotations["normal"]["annotator"] == "normal-from-depth"
    # depth survives the 16-bit round trip to within one quantisation step of its range
    span = float(sample.depth.max() - sample.depth.min())
    assert np.abs(stored["depth.png"] - sample.depth).max() <= span / 65535 + 1e-6
    json.dumps(stored["json"])  # metadata is plain JSON
