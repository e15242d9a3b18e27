"""The shard format on real photos with COCO-17 ground truth (../shared/data/humans)."""

import numpy as np
import pytest

from shards import Sample, ShardWriter, write_manifest
from shards.dataset import SampleTransform, humanverse_dataset
from shards.reader import complete_shard_urls, read_shard
from shards.validate import validate

pytestmark = pytest.mark.shared_data


def gt_samples(shared_humans, coco_ground_truth, limit=8):
    by_image = {}
    for annotation in coco_ground_truth["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    for image in coco_ground_truth["images"][:limit]:
        people = []
        for annotation in by_image.get(image["id"], []):
            x, y, w, h = annotation["bbox"]
            points = np.asarray(annotation["keypoints"], np.float32).reshape(17, 3)
            points[:, 2] = (points[:, 2] > 0).astype(np.float32)  # COCO visibility → score
            people.append({"bbox": [x, y, x + w, y + h], "score": 1.0, "keypoints": points})
        key = "gt" + image["file_name"].rsplit(".", 1)[0].replace(".", "_")[-20:]
        yield Sample(
            key=key.replace(".", "_"),
            image=(shared_humans / "images" / image["file_name"]).read_bytes(),
            source=image["file_name"],
            pose={"width": image["width"], "height": image["height"], "people": people},
            annotations={"pose": {"annotator": "coco-ground-truth", "version": "1", "weights": "none"}},
        )


def test_real_jpegs_are_stored_byte_exact_with_ground_truth_pose(tmp_path, shared_humans, coco_ground_truth):
    samples = list(gt_samples(shared_humans, coco_ground_truth))
    with ShardWriter(str(tmp_path), 0) as writer:
        for sample in samples:
            writer.write(sample)
    write_manifest(str(tmp_path))
    assert validate(str(tmp_path)) == []
    read = list(read_shard(complete_shard_urls(str(tmp_path))[0], decode=False))
    assert [raw["jpg"] for raw in read] == [sample.image for sample in samples]

    loader = humanverse_dataset(str(tmp_path), SampleTransform(128, seed=0))
    for out in loader:
        visible = out["keypoints"][..., 2] > 0
        xy = out["keypoints"][..., :2][visible]
        assert ((xy >= 0) & (xy <= 128)).all()
