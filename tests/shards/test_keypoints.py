import importlib.util
import runpy

import numpy as np
import pytest

from shards import keypoints as kp


def random_keypoints(count, seed=0, width=100, height=80):
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [rng.uniform(0, width, (count, 1)), rng.uniform(0, height, (count, 1)), rng.uniform(0.1, 1, (count, 1))], 1
    )


def test_openpose18_neck_is_mean_of_shoulders_and_round_trips():
    coco = random_keypoints(17)
    openpose = kp.coco17_to_openpose18(coco)
    np.testing.assert_allclose(openpose[1, :2], (coco[5, :2] + coco[6, :2]) / 2, rtol=1e-6)
    assert openpose[1, 2] == pytest.approx(min(coco[5, 2], coco[6, 2]))
    assert kp.OPENPOSE18_NAMES[2] == "right_shoulder"
    np.testing.assert_allclose(openpose[2], coco[kp.COCO17_NAMES.index("right_shoulder")], rtol=1e-6)
    np.testing.assert_allclose(kp.openpose18_to_coco17(openpose), coco, rtol=1e-6)


def test_openpose18_neck_missing_when_a_shoulder_is_missing():
    coco = random_keypoints(17)
    coco[5] = 0
    assert kp.coco17_to_openpose18(coco)[1].tolist() == [0, 0, 0]


@pytest.mark.parametrize("count", [17, 133])
def test_flip_twice_is_identity_and_swaps_sides(count):
    points = random_keypoints(count)
    once = kp.hflip_keypoints(points, 100)
    np.testing.assert_allclose(kp.hflip_keypoints(once, 100), points, rtol=1e-5)
    # After mirroring, the joint called "right wrist" sits where the left wrist was, mirrored.
    left_wrist, right_wrist = 9, 10
    assert once[right_wrist, 0] == pytest.approx(100 - points[left_wrist, 0])
    assert once[right_wrist, 1] == pytest.approx(points[left_wrist, 1])


def test_wholebody_flip_table_matches_mmpose_metainfo():
    """Our hand-written COCO-WholeBody swap table agrees with MMPose's dataset definition."""
    package_dir = importlib.util.find_spec("mmpose").submodule_search_locations[0]
    config = runpy.run_path(f"{package_dir}/.mim/configs/_base_/datasets/coco_wholebody.py")
    info = config["dataset_info"]["keypoint_info"]
    names = [info[i]["name"] for i in range(kp.NUM_WHOLEBODY)]
    expected = np.array([names.index(info[i]["swap"]) if info[i]["swap"] else i for i in range(kp.NUM_WHOLEBODY)])
    np.testing.assert_array_equal(kp.flip_permutation(kp.NUM_WHOLEBODY), expected)
    assert tuple(names[:17]) == kp.COCO17_NAMES


def test_flip_rejects_unknown_layout():
    with pytest.raises(ValueError, match="no left/right flip table for 18"):
        kp.hflip_keypoints(np.zeros((18, 3)), 10)
