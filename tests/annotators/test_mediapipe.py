"""Offline defaults on real photos (public-domain photos shipped in scikit-image / matplotlib)."""

import numpy as np
import pytest
from PIL import Image

from annotators.registry import build_annotator
from hyperhuman.demo import packaged_photos
from shards.keypoints import COCO17_NAMES, hflip_keypoints

NOSE, LEFT_HIP, RIGHT_HIP = 0, COCO17_NAMES.index("left_hip"), COCO17_NAMES.index("right_hip")


@pytest.fixture(scope="module")
def pose_annotator():
    annotator = build_annotator("mediapipe-pose")
    yield annotator
    annotator.close()


@pytest.fixture(scope="module")
def photos():
    return packaged_photos()


def confident(keypoints, threshold=0.5):
    return keypoints[:, 2] > threshold


def test_astronaut_is_one_person_with_nose_above_hips(pose_annotator, photos):
    pose = pose_annotator([photos["astronaut"]])[0]
    assert (pose["width"], pose["height"]) == (512, 512)
    assert len(pose["people"]) == 1
    keypoints = pose["people"][0]["keypoints"]
    assert keypoints[NOSE, 2] > 0.9
    assert keypoints[NOSE, 1] < min(keypoints[LEFT_HIP, 1], keypoints[RIGHT_HIP, 1])
    assert pose_annotator.provenance()["annotator"] == "mediapipe-blazepose"


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_flipped_photo_gives_mirrored_keypoints_with_sides_swapped(pose_annotator, photos, name):
    image = photos[name]
    width = image.shape[1]
    original = pose_annotator([image])[0]["people"][0]["keypoints"]
    flipped = pose_annotator([image[:, ::-1]])[0]["people"][0]["keypoints"]
    expected = hflip_keypoints(original, width)
    both = confident(expected) & confident(flipped)
    assert both.sum() >= 5
    error = np.linalg.norm(flipped[both, :2] - expected[both, :2], axis=1)
    assert np.median(error) < 0.02 * width and error.max() < 0.06 * width


def test_cropped_photo_gives_keypoints_shifted_by_the_offset(pose_annotator, photos):
    image = photos["astronaut"]
    x0, y0 = 40, 30
    original = pose_annotator([image])[0]["people"][0]["keypoints"]
    cropped = pose_annotator([image[y0:, x0:]])[0]["people"][0]["keypoints"]
    both = confident(original) & confident(cropped)
    assert both.sum() >= 5
    shifted = original[both, :2] - [x0, y0]
    error = np.linalg.norm(cropped[both, :2] - shifted, axis=1)
    # Head and shoulders move exactly with the crop; arms cut by the frame's bottom edge may
    # jump (BlazePose re-guesses occluded limbs), so require most, not all, joints to agree.
    assert np.median(error) < 10 and (error < 15).mean() >= 0.7


def test_batch_equals_one_by_one_with_mixed_sizes_and_modes(pose_annotator, photos):
    astronaut, hopper = photos["astronaut"], photos["grace_hopper"]
    gray = (astronaut.mean(axis=2)).astype(np.uint8)
    rgba = np.concatenate([hopper, np.full(hopper.shape[:2] + (1,), 255, np.uint8)], axis=2)
    sixteen = astronaut.astype(np.uint16) * 257
    batch = [astronaut, hopper, gray, rgba, sixteen]
    together = pose_annotator(batch)
    alone = [pose_annotator([image])[0] for image in batch]
    for a, b in zip(together, alone, strict=True):
        assert (a["width"], a["height"]) == (b["width"], b["height"])
        assert len(a["people"]) == len(b["people"])
        for pa, pb in zip(a["people"], b["people"], strict=True):
            np.testing.assert_allclose(pa["keypoints"], pb["keypoints"], atol=1e-3)
    # the 16-bit copy is the same picture
    np.testing.assert_allclose(together[4]["people"][0]["keypoints"], together[0]["people"][0]["keypoints"], atol=1.0)
    assert (together[1]["width"], together[1]["height"]) == (hopper.shape[1], hopper.shape[0])


def test_selfie_mask_covers_the_person(photos):
    masks = build_annotator("mediapipe-selfie")([photos["astronaut"], photos["grace_hopper"]])
    astronaut_mask = masks[0]
    assert astronaut_mask.dtype == np.uint8 and astronaut_mask.shape == (512, 512)
    assert astronaut_mask[200, 230] > 200  # her face
    assert astronaut_mask[20, 20] < 50  # the flag behind her
    binary = build_annotator({"name": "mediapipe-selfie", "options": {"threshold": 0.5}})([photos["astronaut"]])[0]
    assert set(np.unique(binary)) <= {0, 255}
    assert 0.15 < (masks[1] > 127).mean() < 0.9


def test_unknown_options_and_names_are_refused():
    with pytest.raises(ValueError, match="unknown options \\['erase'\\]"):
        build_annotator({"name": "mediapipe-pose", "options": {"erase": 1}})
    with pytest.raises(ValueError, match="unknown annotator 'vitpose-h'"):
        build_annotator("vitpose-h")


@pytest.fixture(scope="module")
def holistic_annotator():
    annotator = build_annotator({"name": "mediapipe-pose", "options": {"wholebody": True, "erase_rounds": 0}})
    yield annotator
    annotator.close()


def test_wholebody_face_lands_on_the_face(holistic_annotator, photos):
    person = holistic_annotator([photos["astronaut"]])[0]["people"][0]
    wholebody = person["wholebody"]
    assert wholebody.shape == (133, 3)
    np.testing.assert_array_equal(wholebody[:17], person["keypoints"])
    face = wholebody[23:91]
    assert (face[:, 2] > 0).sum() == 68
    nose_tip = face[30]  # iBUG point 31 (0-based 30): tip of the nose
    assert np.linalg.norm(nose_tip[:2] - person["keypoints"][NOSE, :2]) < 15
    assert (wholebody[[18, 21], 2] == 0).all()  # BlazePose has no small toes


def test_wholebody_hands_sit_on_the_same_side_wrists(holistic_annotator, shared_humans):
    image = np.asarray(Image.open(shared_humans / "images" / "dwpose_cn11_m2.jpg").convert("RGB"))
    person = holistic_annotator([image])[0]["people"][0]
    wholebody = person["wholebody"]
    for hand_start, wrist, other_wrist in ((91, 9, 10), (112, 10, 9)):
        assert wholebody[hand_start, 2] > 0, "hand not found"
        same = np.linalg.norm(wholebody[hand_start, :2] - wholebody[wrist, :2])
        other = np.linalg.norm(wholebody[hand_start, :2] - wholebody[other_wrist, :2])
        assert same < 20 and same < other / 5


def test_offline_person_boxes_cover_the_person(photos):
    detector = build_annotator("mediapipe-person-boxes")
    result = detector([photos["astronaut"], np.zeros((64, 64, 3), np.uint8)])
    boxes, scores = result[0]["boxes"], result[0]["scores"]
    assert boxes.shape == (1, 4) and scores.shape == (1,) and detector.modality == "detection"
    x0, y0, x1, y1 = boxes[0]
    assert x0 < 230 < x1 and y0 < 200 < y1  # her face is inside
    assert result[1]["boxes"].shape == (0, 4)  # nobody in a black image
