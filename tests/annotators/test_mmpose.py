"""MMPose top-down at real architecture (RTMPose-t / RTMW-m configs shipped in mmpose) with
random weights saved as a checkpoint and loaded through the same code path as real weights."""

import importlib.util
import os

import numpy as np
import pytest
import torch

from annotators.base import WeightsNotFoundError
from annotators.registry import build_annotator

RTMPOSE_T = "body_2d_keypoint/rtmpose/coco/rtmpose-t_8xb256-420e_aic-coco-256x192.py"
RTMW_M = "wholebody_2d_keypoint/rtmpose/cocktail14/rtmw-m_8xb1024-270e_cocktail14-256x192.py"


def random_checkpoint(config: str, path) -> str:
    from mmpose.apis import init_model

    from annotators.mmpose_topdown import mmpose_config_path

    torch.manual_seed(0)
    model = init_model(mmpose_config_path(config), None, device="cpu")
    torch.save({"state_dict": model.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def rtmpose(tmp_path_factory):
    checkpoint = random_checkpoint(RTMPOSE_T, tmp_path_factory.mktemp("rtmpose") / "rtmpose-t.pth")
    return build_annotator({"name": "mmpose", "weights": checkpoint, "options": {"config": RTMPOSE_T}})


def test_rtmpose_keypoints_in_pixels_for_each_box(rtmpose):
    image = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    boxes = np.array([[10, 10, 100, 110], [60, 0, 150, 120]], np.float32)
    pose = rtmpose([image], boxes=[boxes])[0]
    assert (pose["width"], pose["height"]) == (160, 120) and len(pose["people"]) == 2
    for person in pose["people"]:
        keypoints = person["keypoints"]
        assert keypoints.shape == (17, 3) and keypoints.dtype == np.float32
        assert (keypoints[:, 0] <= 160).all() and (keypoints[:, 1] <= 120).all()
        assert ((keypoints[:, 2] >= 0) & (keypoints[:, 2] <= 1)).all()
        assert "wholebody" not in person
    whole_image = rtmpose([image])[0]
    assert len(whole_image["people"]) == 1 and whole_image["people"][0]["bbox"] == [0, 0, 160, 120]
    assert rtmpose.provenance()["weights"].startswith("rtmpose-t_8xb256-420e_aic-coco-256x192.py:")


def test_batch_equals_one_by_one(rtmpose):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(120, 160, 3), (90, 60, 3)]]
    together = rtmpose(images)
    for image, pose in zip(images, together, strict=True):
        np.testing.assert_allclose(pose["people"][0]["keypoints"], rtmpose([image])[0]["people"][0]["keypoints"])


@pytest.mark.slow
def test_rtmw_wholebody_fills_133_keypoints(tmp_path):
    checkpoint = random_checkpoint(RTMW_M, tmp_path / "rtmw-m.pth")
    annotator = build_annotator({"name": "mmpose", "weights": checkpoint, "options": {"config": RTMW_M}})
    person = annotator([np.zeros((96, 64, 3), np.uint8)])[0]["people"][0]
    assert person["wholebody"].shape == (133, 3)
    np.testing.assert_array_equal(person["keypoints"], person["wholebody"][:17])


def test_missing_checkpoint_and_config_are_clear(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="needs a checkpoint file: set 'weights'"):
        build_annotator({"name": "mmpose", "options": {"config": RTMPOSE_T}})
    with pytest.raises(ValueError, match="needs options.config"):
        build_annotator({"name": "mmpose", "weights": str(tmp_path)})
    (tmp_path / "x.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="neither a file nor under mmpose's configs"):
        build_annotator({"name": "mmpose", "weights": str(tmp_path / "x.pth"), "options": {"config": "nope.py"}})


YOLOX_TINY = "yolox/yolox_tiny_8xb8-300e_coco.py"


def test_mmdet_detector_boxes_feed_dwpose(tmp_path):
    """YOLOX (tiny) + DWPose (the controlnet-aux config, RTMPose-l whole-body) at real
    architecture, random weights: the ControlNet DWPose preprocessor's two stages."""
    from mmdet.apis import init_detector

    from annotators.mmdet_detection import shipped_config

    torch.manual_seed(0)
    detector_model = init_detector(shipped_config("mmdet", YOLOX_TINY), None, device="cpu")
    torch.save({"state_dict": detector_model.state_dict()}, tmp_path / "yolox.pth")
    detector = build_annotator(
        {
            "name": "mmdet-detector",
            "weights": str(tmp_path / "yolox.pth"),
            "options": {"config": YOLOX_TINY, "threshold": 0.0, "max_people": 3},
        }
    )
    image = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    detections = detector([image])[0]
    assert detections["boxes"].shape[1] == 4 and 0 < len(detections["boxes"]) <= 3
    assert (np.diff(detections["scores"]) <= 0).all()
    assert (detections["boxes"][:, [0, 2]] <= 160).all() and (detections["boxes"][:, [1, 3]] <= 120).all()

    shipped = os.path.join(
        importlib.util.find_spec("controlnet_aux").submodule_search_locations[0], "dwpose", "dwpose_config"
    )
    checkpoint = random_checkpoint(os.path.join(shipped, "dwpose-l_384x288.py"), tmp_path / "dw-ll_ucoco_384.pth")
    dwpose = build_annotator({"name": "dwpose", "weights": checkpoint})
    pose = dwpose([image], boxes=[detections["boxes"]])[0]
    assert len(pose["people"]) == len(detections["boxes"])
    assert all(person["wholebody"].shape == (133, 3) for person in pose["people"])
    assert dwpose.provenance()["annotator"] == "dwpose"


def test_mmdet_missing_checkpoint_is_clear():
    with pytest.raises(WeightsNotFoundError, match="needs a checkpoint file"):
        build_annotator({"name": "mmdet-detector", "options": {"config": YOLOX_TINY}})
