"""The EfficientFormerV2 student pose annotator (annotators/efficientformer_pose.py), on a toy
student exported to ONNX: missing weights name the training command, the exported file matches
torch and carries its settings, the crop the model sees and the keypoints it returns sit where they
should in the image (planted heatmaps), and a real photo gives 17 keypoints per person in the shard
schema, from given boxes and from the default box source (MoveNet MultiPose, when installed)."""

import numpy as np
import pytest
import torch
from PIL import Image

from annotators.base import AnnotatorConfig, WeightsNotFoundError
from annotators.efficientformer_pose import EfficientFormerPose, box_region, crop_matrix, transform_points
from annotators.registry import annotator_class, build_annotator, resolve
from distill.annotator_student.data import heatmap_targets
from distill.annotator_student.export import check_onnx, export_onnx
from distill.annotator_student.model import PoseStudent
from shards.codecs import normalize_pose
from tests.annotators.planted import MAGENTA, paint

TOY_BACKBONE = {"depths": [1, 1, 1, 1], "embed_dims": [8, 8, 16, 16], "mlp_ratios": 2}
INPUT = (64, 32)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A toy student (random weights) and its run folder holding student.onnx."""
    torch.manual_seed(0)
    model = PoseStudent(input_size=INPUT, head_channels=8, backbone_overrides=TOY_BACKBONE).eval()
    run = tmp_path_factory.mktemp("pose-student")
    export_onnx(model, run / "student.onnx", {"crop_padding": 1.25, "teacher": "test-pose"})
    return model, run


def test_missing_weights_name_the_path_and_the_training_command(tmp_path):
    config = AnnotatorConfig("efficientformer-pose", weights=str(tmp_path / "nowhere"))
    assert annotator_class("efficientformer-pose") is EfficientFormerPose
    message = EfficientFormerPose.missing_weights(config)
    assert "nowhere" in message and "hyperhuman distill annotator" in message
    with pytest.raises(WeightsNotFoundError, match="distill annotator"):
        build_annotator(config)
    with pytest.raises(WeightsNotFoundError, match="needs 'weights'"):
        build_annotator("efficientformer-pose")
    fallback = {"name": "efficientformer-pose", "weights": str(tmp_path), "options": {"fallback": "mediapipe-pose"}}
    assert resolve(fallback).name == "mediapipe-pose"  # no student.onnx in the folder


def test_the_onnx_file_matches_torch_and_carries_its_settings(student):
    model, run = student
    assert check_onnx(model, run / "student.onnx", batch=3) < 1e-4  # batch 3: the export's batch is dynamic
    annotator = build_annotator({"name": "efficientformer-pose", "weights": str(run)})  # the run folder
    assert annotator.metadata["input_size"] == list(INPUT) and annotator.metadata["heatmap_stride"] == 4
    assert annotator.metadata["crop_padding"] == 1.25 and annotator.metadata["num_keypoints"] == 17
    provenance = annotator.provenance()
    assert provenance["annotator"] == "efficientformer-pose" and "sha256:" in provenance["weights"]
    assert "test-pose" in provenance["weights"]
    direct = build_annotator({"name": "efficientformer-pose", "weights": str(run / "student.onnx")})
    assert direct.weights_id == annotator.weights_id


class PlantedSession:
    """The real session's inputs, but heatmaps planted at given image keypoints (seen through the
    crop of ``box``), and the crops it was fed kept for inspection."""

    def __init__(self, session, box, keypoints, padding):
        self.session, self.keypoints, self.fed = session, keypoints, []
        self.matrix = crop_matrix(*box_region(box, INPUT[1] / INPUT[0], padding), INPUT)

    def get_inputs(self):
        return self.session.get_inputs()

    def run(self, outputs, feeds):
        crops = next(iter(feeds.values()))
        self.fed.append(crops)
        in_crop = transform_points(self.keypoints, self.matrix)
        seen = self.keypoints[:, 2] > 0
        target = heatmap_targets(in_crop, seen, (INPUT[0] // 4, INPUT[1] // 4), 4, 1.5)
        # a perfect student's logits: the target's log, its mass for a presence of 0.8; flat (0.2) unseen
        logits = np.log(np.maximum(target, 1e-12))
        logits += np.log(target[0].size * 4) - np.log(np.maximum(target.sum(axis=(1, 2), keepdims=True), 1e-12))
        logits[~seen] = np.log(0.25)
        return [np.repeat(logits[None].astype(np.float32), len(crops), axis=0)]


def bright_box(crop: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the pixels of a (3, H, W) crop brighter than half in the red channel
    (the painted box fills most of the crop, too much for planted.painted_box's median rule)."""
    rows, cols = np.flatnonzero((crop[0] > 127).any(1)), np.flatnonzero((crop[0] > 127).any(0))
    return cols[0], rows[0], cols[-1] + 1, rows[-1] + 1


def test_planted_heatmaps_come_back_at_their_image_pixels(student):
    _, run = student
    annotator = build_annotator({"name": "efficientformer-pose", "weights": str(run)})
    box = [50, 40, 110, 160]  # 60 × 120: the input's aspect ratio, so the crop is the box × 1.25
    image = paint(np.zeros((200, 180, 3), np.uint8), box, MAGENTA)
    rng = np.random.default_rng(0)
    keypoints = np.stack([rng.uniform(55, 105, 17), rng.uniform(45, 155, 17), np.ones(17)], axis=1)
    keypoints[3, 2] = 0.0  # a joint the model does not see
    planted = PlantedSession(annotator._session, box, keypoints.astype(np.float32), padding=1.25)
    annotator._session = planted
    pose = annotator([image], boxes=[np.array([box], np.float32)])[0]
    # the model saw the box in the middle 80% of its 32 × 64 input
    assert planted.fed[0].shape == (1, 3, 64, 32) and planted.fed[0].dtype == np.float32
    assert np.allclose(bright_box(planted.fed[0][0]), (3.2, 6.4, 28.8, 57.6), atol=1.0)
    [person] = pose["people"]
    seen = keypoints[:, 2] > 0
    assert np.allclose(person["keypoints"][seen, :2], keypoints[seen, :2], atol=0.05)
    assert person["keypoints"][seen, 2] == pytest.approx(0.8) and person["keypoints"][3, 2] == pytest.approx(0.2)
    assert person["bbox"] == box and person["score"] == pytest.approx(person["keypoints"][:, 2].mean())


def gt_photo(shared_humans, coco_ground_truth):
    """The first ground-truth photo with one labelled person, and that person's box (x0, y0, x1, y1)."""
    counts = {}
    for annotation in coco_ground_truth["annotations"]:
        counts.setdefault(annotation["image_id"], []).append(annotation)
    for image in coco_ground_truth["images"]:
        annotations = counts.get(image["id"], [])
        if len(annotations) == 1:
            x, y, w, h = annotations[0]["bbox"]
            rgb = np.asarray(Image.open(shared_humans / "images" / image["file_name"]).convert("RGB"))
            return rgb, [x, y, x + w, y + h]
    pytest.skip("no ground-truth photo with exactly one person")


def check_schema(pose: dict, rgb: np.ndarray) -> None:
    assert (pose["height"], pose["width"]) == rgb.shape[:2]
    for person in pose["people"]:
        keypoints = person["keypoints"]
        assert keypoints.shape == (17, 3) and keypoints.dtype == np.float32
        assert (keypoints[:, 0] >= 0).all() and (keypoints[:, 0] <= pose["width"]).all()
        assert (keypoints[:, 1] >= 0).all() and (keypoints[:, 1] <= pose["height"]).all()
        assert (keypoints[:, 2] >= 0).all() and (keypoints[:, 2] <= 1).all()
        assert len(person["bbox"]) == 4 and 0 <= person["score"] <= 1
    normalize_pose(pose)  # what the shard writer stores


def test_a_real_photo_gives_17_keypoints_per_person_in_the_shard_schema(student, shared_humans, coco_ground_truth):
    _, run = student
    rgb, box = gt_photo(shared_humans, coco_ground_truth)
    annotator = build_annotator(
        {"name": "efficientformer-pose", "weights": str(run), "options": {"min_person_score": 0}}
    )
    [pose] = annotator([rgb], boxes=[np.array([box], np.float32)])
    assert len(pose["people"]) == 1
    check_schema(pose, rgb)
    assert pose["people"][0]["bbox"] == pytest.approx(box, abs=1e-3)


def test_without_boxes_the_default_box_source_finds_the_people(student, shared_humans, coco_ground_truth):
    box_source = EfficientFormerPose.default_options["box_source"]
    missing = annotator_class(box_source["name"]).missing_weights(AnnotatorConfig.from_dict(box_source))
    if missing:
        pytest.skip(f"the default box source (MoveNet) is not installed: {missing}")
    _, run = student
    rgb, box = gt_photo(shared_humans, coco_ground_truth)
    annotator = build_annotator(
        {"name": "efficientformer-pose", "weights": str(run), "options": {"min_person_score": 0}}
    )
    [pose] = annotator([rgb])
    assert pose["people"], "MultiPose found nobody in a one-person photo"
    check_schema(pose, rgb)
    best = max(pose["people"], key=lambda person: person["score"])
    x0, y0, x1, y1 = best["bbox"]
    overlap = max(0, min(x1, box[2]) - max(x0, box[0])) * max(0, min(y1, box[3]) - max(y0, box[1]))
    assert overlap > 0.3 * (box[2] - box[0]) * (box[3] - box[1])  # a box on the labelled person
