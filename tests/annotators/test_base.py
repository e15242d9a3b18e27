import numpy as np
import pytest

from annotators.base import AnnotatorConfig, WeightsNotFoundError, resolve_weights, to_rgb
from annotators.registry import build_annotator
from annotators.render import render_depth, render_normal
from hyperhuman.skeleton import LIMBS, render_pose


@pytest.mark.parametrize(
    "image, value",
    [
        (np.full((4, 5), 200, np.uint8), 200),
        (np.full((4, 5, 4), 200, np.uint8), 200),
        (np.full((4, 5), 65535, np.uint16), 255),
        (np.full((4, 5, 3), 1.0, np.float32), 255),
        (np.ones((4, 5, 1), bool), 255),
    ],
    ids=["gray", "rgba", "16bit", "float", "bool"],
)
def test_to_rgb_converts_inputs(image, value):
    rgb = to_rgb(image)
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 5, 3) and (rgb == value).all()


def test_to_rgb_rejects_other_shapes():
    with pytest.raises(ValueError, match="shape"):
        to_rgb(np.zeros((2, 2, 2), np.uint8))


def test_missing_weights_name_the_config_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="set 'weights'"):
        resolve_weights(AnnotatorConfig(name="dpt"))
    with pytest.raises(WeightsNotFoundError, match="HF_HUB_OFFLINE=1"):
        resolve_weights(AnnotatorConfig(name="dpt", weights="some-org/not-cached-anywhere"))
    assert resolve_weights(AnnotatorConfig(name="dpt", weights=str(tmp_path))) == str(tmp_path)


def test_config_from_dict_checks_keys():
    with pytest.raises(ValueError, match="unknown annotator config keys \\['weight'\\]"):
        AnnotatorConfig.from_dict({"name": "x", "weight": "y"})


def test_source_caption_passes_through():
    captions = build_annotator("source-caption")([None, None], ["  a  man\nrunning ", None])
    assert captions == ["a man running", ""]


def simple_pose():
    keypoints = np.zeros((17, 3), np.float32)
    keypoints[5] = [60, 40, 1]  # left shoulder
    keypoints[6] = [40, 40, 1]  # right shoulder
    keypoints[8] = [40, 70, 1]  # right elbow
    keypoints[0] = [50, 20, 0.1]  # nose below the threshold
    return {"width": 100, "height": 100, "people": [{"bbox": [0, 0, 100, 100], "score": 1, "keypoints": keypoints}]}


def test_render_pose_is_deterministic_and_uses_openpose_colours():
    image = render_pose(simple_pose(), stick_width=4)
    np.testing.assert_array_equal(image, render_pose(simple_pose(), stick_width=4))
    # limb right shoulder (OpenPose 2) → right elbow (3) is limb index 2: colour (255, 170, 0) at 60%
    assert LIMBS[2] == (2, 3)
    assert tuple(image[58, 40]) == (153, 102, 0)
    # the right shoulder joint (OpenPose index 2) is drawn in joint colour 2
    assert tuple(image[40, 40]) == (255, 170, 0)
    # nose under the threshold: nothing drawn there; background stays black
    assert tuple(image[20, 50]) == (0, 0, 0) and tuple(image[95, 95]) == (0, 0, 0)


def test_depth_and_normal_visualisations():
    depth = np.linspace(1, 5, 100).reshape(10, 10)
    picture = render_depth(depth, "metric_m")
    assert picture.shape == (10, 10, 3) and picture[0, 0].sum() > picture[-1, -1].sum()  # near is bright
    facing = np.zeros((2, 2, 3))
    facing[..., 2] = 1
    assert tuple(render_normal(facing)[0, 0]) == (128, 128, 255)
