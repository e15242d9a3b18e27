"""MMPose top-down at real architecture (RTMPose-t / RTMW-m configs shipped in mmpose) with
random weights saved as a checkpoint and loaded through the same code path as real weights."""

import importlib.util
import os

import numpy as np
import pytest
import torch

from annotators.base import WeightsNotFoundError
from annotators.registry import build_annotator
from tests.annotators.planted import GREEN, MAGENTA, painted_box, painted_people

RTMPOSE_T = "body_2d_keypoint/rtmpose/coco/rtmpose-t_8xb256-420e_aic-coco-256x192.py"
RTMW_M = "wholebody_2d_keypoint/rtmpose/cocktail14/rtmw-m_8xb1024-270e_cocktail14-256x192.py"
RTMPOSE_T_INPUT = (192, 256)  # width, height of the crop the model sees (the config's 256x192)
DWPOSE_INPUT = (288, 384)


def plant_keypoints(model, monkeypatch, crop_points: np.ndarray, scores: list[float]):
    """Make the pose head's decode (network output → keypoints in the model's input crop)
    return ``crop_points`` (K, 2: pixels of the input crop) for every box, scored ``scores[i]``
    for the i-th box of the batch (the boxes of one image, in order)."""
    from mmengine.structures import InstanceData

    def decode(outputs):
        batch = len(outputs[0]) if isinstance(outputs, tuple) else len(outputs)
        return [
            InstanceData(
                keypoints=crop_points[None].astype(np.float32),
                keypoint_scores=np.full((1, len(crop_points)), scores[index], np.float32),
            )
            for index in range(batch)
        ]

    monkeypatch.setattr(model.head, "decode", decode)


def crop_to_image(points: np.ndarray, box, input_size, padding: float = 1.25) -> np.ndarray:
    """Input-crop pixels → image pixels. A top-down model's crop is the box grown by
    ``padding`` (mmpose's GetBBoxCenterScale), then grown along one axis to the input's aspect
    ratio (TopdownAffine), around the box centre."""
    (x0, y0, x1, y1), (input_w, input_h) = box, input_size
    width, height = (x1 - x0) * padding, (y1 - y0) * padding
    if width > height * input_w / input_h:
        height = width * input_h / input_w
    else:
        width = height * input_w / input_h
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
    return centre + (points / [input_w, input_h] - 0.5) * [width, height]


def expected_person(crop_points, score, box, input_size, image_width, image_height) -> np.ndarray:
    """The (K, 3) keypoints the annotator must return: mapped to the image; those outside it
    scored 0 and clamped to the border."""
    xy = crop_to_image(crop_points, box, input_size)
    outside = (xy[:, 0] < 0) | (xy[:, 0] > image_width) | (xy[:, 1] < 0) | (xy[:, 1] > image_height)
    xy = np.clip(xy, 0, [image_width, image_height])
    return np.concatenate([xy, np.where(outside, 0.0, score)[:, None]], axis=1)


def crop_points_for(count: int, input_size) -> np.ndarray:
    """``count`` points spread over the input crop, the first two at its corners (outside the
    image for a box at the image border)."""
    points = np.random.default_rng(0).uniform(0.1, 0.9, (count, 2)) * input_size
    points[0], points[1] = (0, 0), input_size
    return points


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


def test_rtmpose_keypoints_land_where_the_box_crop_puts_them(rtmpose, monkeypatch):
    """Keypoints planted in the model's input crop come back where the crop of each box (or of
    the whole image without boxes) puts them in a non-square image; those past the border get
    score 0. The two boxes differ in size and position, so a swapped axis, a missing scale or a
    box mixed up with the other shows."""
    crop_points = crop_points_for(17, RTMPOSE_T_INPUT)
    plant_keypoints(rtmpose.model, monkeypatch, crop_points, scores=[0.9, 0.6])
    image = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    boxes = np.array([[10, 14, 100, 110], [84, 0, 156, 70]], np.float32)
    pose = rtmpose([image], boxes=[boxes])[0]
    assert (pose["width"], pose["height"]) == (160, 120) and len(pose["people"]) == 2
    for person, box, score in zip(pose["people"], boxes, [0.9, 0.6], strict=True):  # best first
        assert person["bbox"] == box.tolist() and "wholebody" not in person
        assert person["keypoints"].shape == (17, 3) and person["keypoints"].dtype == np.float32
        expected = expected_person(crop_points, score, box, RTMPOSE_T_INPUT, 160, 120)
        np.testing.assert_allclose(person["keypoints"][:, :2], expected[:, :2], atol=0.5)
        np.testing.assert_allclose(person["keypoints"][:, 2], expected[:, 2], atol=1e-6)
        assert 2 <= (expected[:, 2] == 0).sum() <= 5  # the crop corners (and a few more) are outside the image
        assert person["score"] == pytest.approx(expected[:, 2].mean())
    whole_image = rtmpose([image])[0]["people"]
    assert len(whole_image) == 1 and whole_image[0]["bbox"] == [0, 0, 160, 120]
    expected = expected_person(crop_points, 0.9, [0, 0, 160, 120], RTMPOSE_T_INPUT, 160, 120)
    np.testing.assert_allclose(whole_image[0]["keypoints"][:, :2], expected[:, :2], atol=0.5)
    np.testing.assert_allclose(whole_image[0]["keypoints"][:, 2], expected[:, 2], atol=1e-6)
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
YOLOX_STRIDE = 8  # the finest of YOLOX's output levels (strides 8, 16, 32)


@pytest.fixture(scope="module")
def yolox_checkpoint(tmp_path_factory):
    from mmdet.apis import init_detector

    from annotators.mmdet_detection import shipped_config

    torch.manual_seed(0)
    model = init_detector(shipped_config("mmdet", YOLOX_TINY), None, device="cpu")
    path = tmp_path_factory.mktemp("yolox") / "yolox.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    return str(path)


def plant_detections(detector, monkeypatch, people: list[tuple]):
    """Make YOLOX's head output, on its stride-8 level, a person box on each rectangle painted
    in ``people``'s colours (scored as given) as the rectangle appears in the network's input
    (the image resized to 416 on its long side and padded to a square), and a confident box of
    another class in the padding; nothing anywhere else."""
    model, seen = detector.model, {}
    extract_feat = model.extract_feat

    def extract(batch_inputs):
        seen["inputs"] = batch_inputs
        return extract_feat(batch_inputs)

    def head(feats):
        cls_scores = [torch.full((len(f), model.bbox_head.num_classes, *f.shape[2:]), -20.0) for f in feats]
        bbox_preds = [torch.zeros((len(f), 4, *f.shape[2:])) for f in feats]
        objectness = [torch.full((len(f), 1, *f.shape[2:]), -20.0) for f in feats]
        for index, pixels in enumerate(seen["inputs"]):
            planted = [(painted_box(pixels, colour), detector.person_label, score) for colour, score in people]
            planted.append(((300.0, 380.0, 340.0, 410.0), detector.person_label + 2, 0.95))
            for (x0, y0, x1, y1), label, score in planted:
                # YOLOX regresses the centre from the cell's top-left corner (priors with offset 0)
                # in strides, and log width and height in strides
                x, y = (x0 + x1) / 2 / YOLOX_STRIDE, (y0 + y1) / 2 / YOLOX_STRIDE
                col, row = int(x), int(y)
                regression = [x - col, y - row, np.log((x1 - x0) / YOLOX_STRIDE), np.log((y1 - y0) / YOLOX_STRIDE)]
                bbox_preds[0][index, :, row, col] = torch.tensor(regression)
                cls_scores[0][index, label, row, col] = float(np.log(score / (1 - score)))
                objectness[0][index, 0, row, col] = 20.0
        return cls_scores, bbox_preds, objectness

    monkeypatch.setattr(model, "extract_feat", extract)
    monkeypatch.setattr(model.bbox_head, "forward", head)


def test_yolox_boxes_land_on_the_painted_people(yolox_checkpoint, monkeypatch):
    """Boxes planted in YOLOX's input frame come back on the rectangles painted in a landscape
    and a portrait image (scaled by 2.08 and 2.77, padded below and to the right); the other
    class is dropped; best first."""
    detector = build_annotator(
        {"name": "mmdet-detector", "weights": yolox_checkpoint, "options": {"config": YOLOX_TINY}}
    )
    plant_detections(detector, monkeypatch, [(MAGENTA, 0.9), (GREEN, 0.6)])
    painted = [((22, 15, 71, 110), (120, 31, 185, 97)), ((50, 80, 86, 146), (4, 6, 40, 70))]
    images = [painted_people(120, 200, *painted[0]), painted_people(150, 90, *painted[1])]
    for (magenta, green), detections in zip(painted, detector(images), strict=True):
        np.testing.assert_allclose(detections["scores"], [0.9, 0.6], atol=1e-3)
        np.testing.assert_allclose(detections["boxes"], [magenta, green], atol=1.0)


def test_mmdet_detector_boxes_feed_dwpose(yolox_checkpoint, tmp_path, monkeypatch):
    """YOLOX (tiny) + DWPose (the controlnet-aux config, RTMPose-l whole-body) at real
    architecture, random weights: the ControlNet DWPose preprocessor's two stages. The boxes
    found on the painted people become DWPose's crops; its 133 planted keypoints land where
    each box's crop puts them."""
    detector = build_annotator(
        {"name": "mmdet-detector", "weights": yolox_checkpoint, "options": {"config": YOLOX_TINY}}
    )
    plant_detections(detector, monkeypatch, [(MAGENTA, 0.9), (GREEN, 0.6)])
    image = painted_people(120, 200, (22, 15, 71, 110), (120, 31, 185, 97))
    boxes = detector([image])[0]["boxes"]
    np.testing.assert_allclose(boxes, [(22, 15, 71, 110), (120, 31, 185, 97)], atol=1.0)

    shipped = os.path.join(
        importlib.util.find_spec("controlnet_aux").submodule_search_locations[0], "dwpose", "dwpose_config"
    )
    checkpoint = random_checkpoint(os.path.join(shipped, "dwpose-l_384x288.py"), tmp_path / "dw-ll_ucoco_384.pth")
    dwpose = build_annotator({"name": "dwpose", "weights": checkpoint})
    assert dwpose.provenance()["annotator"] == "dwpose"
    crop_points = crop_points_for(133, DWPOSE_INPUT)
    plant_keypoints(dwpose.model, monkeypatch, crop_points, scores=[0.8, 0.7])
    pose = dwpose([image], boxes=[boxes])[0]
    assert len(pose["people"]) == 2
    for person, box, score in zip(pose["people"], boxes, [0.8, 0.7], strict=True):
        assert person["bbox"] == box.tolist()
        expected = expected_person(crop_points, score, box, DWPOSE_INPUT, 200, 120)
        np.testing.assert_allclose(person["wholebody"][:, :2], expected[:, :2], atol=0.5)
        np.testing.assert_allclose(person["wholebody"][:, 2], expected[:, 2], atol=1e-6)
        np.testing.assert_array_equal(person["keypoints"], person["wholebody"][:17])


def test_mmdet_missing_checkpoint_is_clear():
    with pytest.raises(WeightsNotFoundError, match="needs a checkpoint file"):
        build_annotator({"name": "mmdet-detector", "options": {"config": YOLOX_TINY}})
