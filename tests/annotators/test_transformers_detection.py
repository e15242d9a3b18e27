"""The transformers detector at real architecture (YOLOS) with random weights saved to disk,
loaded through the same path as a real checkpoint."""

import numpy as np
import pytest
import torch

from annotators.base import WeightsNotFoundError
from annotators.registry import build_annotator


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
        height, width = image.shape[:2]
        assert result["boxes"].shape[1] == 4 and len(result["boxes"]) > 0
        assert (result["boxes"][:, [0, 2]] <= width).all() and (result["boxes"][:, [1, 3]] <= height).all()
        assert (np.diff(result["scores"]) <= 0).all()  # best first
    assert detector.provenance() == {"annotator": "transformers-person-detector", "version": "1", "weights": tiny_yolos}


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
    assert sample.annotations["pose"]["annotator"] == "mediapipe-blazepose"
    with pytest.raises(ValueError, match="unknown modalities \\['segmentation'\\]"):
        AnnotateStage({**config, "segmentation": {"name": "mediapipe-selfie"}})
