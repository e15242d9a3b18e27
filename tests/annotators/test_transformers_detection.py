"""The transformers detector at real architecture (YOLOS) with random weights saved to disk,
loaded through the same path as a real checkpoint."""

import numpy as np
import pytest
import torch

from annotators.base import WeightsNotFoundError
from annotators.registry import build_annotator
from tests.annotators.planted import GREEN, MAGENTA, offline_pose_annotator, painted_box, painted_people


@pytest.fixture(scope="module")
def tiny_yolos(tmp_path_factory):
    from transformers import YolosConfig, YolosForObjectDetection, YolosImageProcessor

    torch.manual_seed(0)
    config = YolosConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        image_size=[64, 64], patch_size=16, num_detection_tokens=10,
        id2label={0: "N/A", 1: "person"}, label2id={"N/A": 0, "person": 1},
    )  # fmt: skip
    path = tmp_path_factory.mktemp("yolos")
    YolosForObjectDetection(config).save_pretrained(path)
    YolosImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(path)
    return str(path)


def test_detects_in_image_pixels_and_batch_equals_one_by_one(tiny_yolos):
    detector = build_annotator(
        {"name": "transformers-detector", "weights": tiny_yolos, "batch_size": 2, "options": {"threshold": 0.0}}
    )
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(50, 70, 3), (80, 40, 3), (50, 70, 3)]]
    images.append(np.full((50, 70), 128, np.uint8))  # grayscale is converted
    together = detector(images)
    for image, result in zip(images, together, strict=True):
        alone = detector([image])[0]
        np.testing.assert_allclose(result["boxes"], alone["boxes"], atol=1e-4)
        np.testing.assert_allclose(result["scores"], alone["scores"], atol=1e-5)
        assert result["boxes"].shape[1] == 4 and len(result["boxes"]) > 0
        assert (np.diff(result["scores"]) <= 0).all()  # best first
    assert detector.provenance() == {"annotator": "transformers-person-detector", "version": "1", "weights": tiny_yolos}


def plant_detections(model):
    """Make the YOLOS forward return, per image of the batch, a person box on the magenta
    rectangle (score 0.9) and one on the green rectangle (0.6) as found in ``pixel_values``,
    a confident "N/A" box (not a person) and a person box past the right and bottom border."""
    from transformers.models.yolos.modeling_yolos import YolosObjectDetectionOutput

    def forward(pixel_values, **_):
        batch, _, height, width = pixel_values.shape
        tokens = model.config.num_detection_tokens
        logits = torch.full((batch, tokens, 3), -20.0)  # classes: N/A, person, no object
        logits[..., 2] = 20.0
        boxes = torch.full((batch, tokens, 4), 0.5)  # normalised centre x, y, width, height
        for index in range(batch):
            for token, colour, score in ((3, MAGENTA, 0.9), (7, GREEN, 0.6)):
                x0, y0, x1, y1 = painted_box(pixel_values[index], colour)
                boxes[index, token] = torch.tensor([(x0 + x1) / 2 / width, (y0 + y1) / 2 / height,
                                                    (x1 - x0) / width, (y1 - y0) / height])  # fmt: skip
                logits[index, token] = torch.tensor([-20.0, np.log(score), np.log(1 - score)])
            logits[index, 5] = torch.tensor([20.0, -20.0, -20.0])  # "N/A", dropped
            boxes[index, 8] = torch.tensor([0.9, 0.8, 0.4, 0.6])  # to x 1.1, y 1.1: clipped
            logits[index, 8] = torch.tensor([-20.0, np.log(0.55), np.log(0.45)])
        return YolosObjectDetectionOutput(logits=logits, pred_boxes=boxes)

    model.forward = forward


def test_boxes_land_on_the_painted_people_in_image_pixels(tiny_yolos):
    """Planted boxes in the model's input frame (YOLOS resizes 50x70 to 64x80, 80x40 to 96x48:
    a different scale per axis) come back where the rectangles were painted. Same-size images
    are batched (batch_size 2): a batch padded to its largest image would move the boxes of the others."""
    detector = build_annotator(
        {"name": "transformers-detector", "weights": tiny_yolos, "batch_size": 2, "options": {"threshold": 0.5}}
    )
    plant_detections(detector.model)
    painted = [((6, 9, 27, 44), (41, 2, 66, 20)), ((30, 4, 38, 30), (3, 41, 20, 77)), ((50, 25, 69, 48), (0, 0, 9, 13))]
    sizes = [(50, 70), (80, 40), (50, 70)]
    images = [painted_people(*size, *boxes) for size, boxes in zip(sizes, painted, strict=True)]
    for image, (magenta, green), result in zip(images, painted, detector(images), strict=True):
        height, width = image.shape[:2]
        np.testing.assert_allclose(result["scores"], [0.9, 0.6, 0.55], atol=1e-5)
        np.testing.assert_allclose(result["boxes"][0], magenta, atol=1.0)
        np.testing.assert_allclose(result["boxes"][1], green, atol=1.0)
        np.testing.assert_allclose(result["boxes"][2], [0.7 * width, 0.5 * height, width, height], atol=1e-3)


def test_missing_label_and_missing_weights_are_clear(tiny_yolos, monkeypatch):
    with pytest.raises(ValueError, match="no 'pedestrian' label"):
        build_annotator({"name": "transformers-detector", "weights": tiny_yolos, "options": {"label": "pedestrian"}})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="set 'weights'"):
        build_annotator("transformers-detector")


def test_detector_boxes_drive_the_pose_annotator_in_the_annotate_stage(tiny_yolos):
    from hyperhuman.config import load_config
    from hyperhuman.demo import packaged_photos
    from pipelines.annotate import AnnotateStage

    config = load_config("annotate/offline")["annotators"]
    config["detection"] = {"name": "transformers-detector", "weights": tiny_yolos, "options": {"threshold": 0.0}}
    stage = AnnotateStage(config)
    sample = stage(["k"], [packaged_photos()["astronaut"]], [None], ["test"])[0]
    assert "detection" not in sample.annotations  # boxes are an input to pose, not stored
    assert sample.annotations["pose"]["annotator"] == offline_pose_annotator()
    with pytest.raises(ValueError, match="unknown modalities \\['segmentation'\\]"):
        AnnotateStage({**config, "segmentation": {"name": "mediapipe-selfie"}})
