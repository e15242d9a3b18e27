"""MoveNet top-down pose (annotators/movenet.py).

Without the converted models: the decoding of MultiPose, Thunder and NanoDet outputs against
hand-made tensors, the letterbox and crop mappings (a point at a known pixel comes back at that
pixel), and the whole annotator on planted ONNX models that return fixed tensors. With the models
installed (``make setup``), real photos: the people of group photos that the mediapipe default
misses, whole body, the offline config and its fallback.
"""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from annotators import movenet
from annotators.base import WeightsNotFoundError
from annotators.movenet import (
    MoveNetPose,
    crop_square,
    decode_multipose,
    decode_nanodet,
    decode_singlepose,
    default_models_dir,
    letterbox,
    load_manifest,
    nanodet_input,
    square_region,
)
from annotators.registry import build_annotator
from hyperhuman.config import load_config
from hyperhuman.demo import packaged_photos

# -- decoding of hand-made outputs -----------------------------------------------------------------


def multipose_row(keypoints_yx, box_yxyx, score, keypoint_score=0.8):
    row = np.zeros(56, np.float32)
    row[:51] = np.concatenate([keypoints_yx, np.full((17, 1), keypoint_score)], axis=1).reshape(-1)
    row[51:55], row[55] = box_yxyx, score
    return row


def test_multipose_output_decodes_to_image_pixels_y_before_x():
    width, height = 640, 426
    tensor, factors = letterbox(np.zeros((height, width, 3), np.uint8), 256)
    assert tensor.shape == (1, 192, 256, 3) and tensor.dtype == np.int32  # 256 x 170, padded to 192
    points = np.stack([np.linspace(0.1, 0.5, 17), np.linspace(0.2, 0.9, 17)], axis=1)  # (y, x)
    output = np.zeros((1, 6, 56), np.float32)
    output[0, 0] = multipose_row(points, (0.1, 0.2, 0.6, 0.9), score=0.3)
    output[0, 1] = multipose_row(points[::-1], (0.0, 0.0, 0.5, 0.5), score=0.9)
    output[0, 2] = multipose_row(points, (0.0, 0.0, 1.0, 1.0), score=0.01)  # below min_score
    people = decode_multipose(output, factors, min_score=0.05)
    assert [person["score"] for person in people] == pytest.approx([0.9, 0.3])  # best first
    # normalised to the padded 256 x 192 input, whose 256 x 170 top-left part is the image
    fx, fy = 256 / 256 * width, 192 / 170 * height
    assert factors == pytest.approx((fx, fy))
    second = people[1]
    np.testing.assert_allclose(second["keypoints"][:, 0], points[:, 1] * fx, rtol=1e-6)
    np.testing.assert_allclose(second["keypoints"][:, 1], points[:, 0] * fy, rtol=1e-6)
    np.testing.assert_allclose(second["keypoints"][:, 2], 0.8)
    assert second["bbox"] == pytest.approx([0.2 * fx, 0.1 * fy, 0.9 * fx, 0.6 * fy])


def test_singlepose_output_decodes_into_the_crop_region():
    output = np.zeros((1, 1, 17, 3), np.float32)
    output[0, 0, :, 0] = np.linspace(0, 1, 17)  # y
    output[0, 0, :, 1] = np.linspace(1, 0, 17)  # x
    output[0, 0, :, 2] = 0.7
    keypoints = decode_singlepose(output, (-30, 40, 200))
    np.testing.assert_allclose(keypoints[:, 0], -30 + np.linspace(1, 0, 17) * 200, rtol=1e-6)
    np.testing.assert_allclose(keypoints[:, 1], 40 + np.linspace(0, 1, 17) * 200, rtol=1e-6)
    np.testing.assert_allclose(keypoints[:, 2], 0.7)


def nanodet_outputs(planted):
    """NanoDet-m's six outputs, zero scores and flat side distributions, except ``planted``:
    (stride, row, column, class, score, (left, top, right, bottom) in bins)."""
    outputs = {}
    for stride in (8, 16, 32):
        cells = (416 // stride) ** 2
        outputs[stride] = (np.zeros((1, cells, 80), np.float32), np.zeros((1, cells, 44), np.float32))
    for stride, row, column, class_id, score, sides in planted:
        scores, regression = outputs[stride]
        cell = row * (416 // stride) + column
        scores[0, cell, class_id] = score
        for side, bins in enumerate(sides):
            regression[0, cell, side * 11 + bins] = 50.0  # softmax ~ one-hot at `bins`
    flat = [array for pair in outputs.values() for array in pair]
    return flat[::-1]  # any order: outputs are told apart by shape


def test_nanodet_output_decodes_person_boxes_with_nms():
    width, height = 832, 208  # factors 2 and 0.5
    outputs = nanodet_outputs(
        [
            (16, 5, 7, 0, 0.9, (2, 3, 4, 1)),  # a person
            (16, 5, 8, 0, 0.6, (2, 3, 4, 1)),  # the same person, one cell right: suppressed
            (32, 2, 2, 0, 0.5, (1, 1, 1, 1)),  # another person
            (8, 1, 1, 2, 0.99, (1, 1, 1, 1)),  # a car
            (8, 3, 3, 0, 0.1, (1, 1, 1, 1)),  # below min_score
        ]
    )
    _, factors = nanodet_input(np.zeros((height, width, 3), np.uint8))
    boxes, scores = decode_nanodet(outputs, factors, min_score=0.3, iou=0.6)
    np.testing.assert_allclose(scores, [0.9, 0.5])
    cx, cy = 7.5 * 16, 5.5 * 16
    np.testing.assert_allclose(boxes[0], [(cx - 32) * 2, (cy - 48) * 0.5, (cx + 64) * 2, (cy + 16) * 0.5], atol=1e-3)
    np.testing.assert_allclose(boxes[1], [(80 - 32) * 2, 48 * 0.5, 112 * 2, 112 * 0.5], atol=1e-3)
    empty_boxes, empty_scores = decode_nanodet(outputs, factors, min_score=0.95, iou=0.6)
    assert empty_boxes.shape == (0, 4) and empty_scores.shape == (0,)


def test_nanodet_input_is_normalised_bgr_chw():
    rgb = np.zeros((100, 50, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    tensor, factors = nanodet_input(rgb)
    assert tensor.shape == (1, 3, 416, 416) and tensor.dtype == np.float32
    assert factors == pytest.approx((50 / 416, 100 / 416))
    np.testing.assert_allclose(tensor[0, :, 10, 10], [-103.53 / 57.375, -116.28 / 57.12, (255 - 123.675) / 58.395])


# -- the mappings round trip -------------------------------------------------------------------------


def blob_centroid(array: np.ndarray) -> np.ndarray:
    """Brightness centroid (x, y) of an image, in continuous pixel coordinates."""
    weights = array.astype(np.float64).sum(axis=-1) if array.ndim == 3 else array.astype(np.float64)
    rows, columns = np.mgrid[0 : weights.shape[0], 0 : weights.shape[1]]
    return np.array([(weights * (columns + 0.5)).sum(), (weights * (rows + 0.5)).sum()]) / weights.sum()


def image_with_dot(width, height, x, y, radius=6):
    image = np.zeros((height, width, 3), np.uint8)
    image[y - radius : y + radius, x - radius : x + radius] = 255  # centred on the point (x, y)
    return image


@pytest.mark.parametrize(("width", "height", "x", "y"), [(640, 426, 500, 300), (300, 1000, 40, 900), (90, 60, 30, 20)])
def test_letterbox_mapping_brings_a_pixel_back(width, height, x, y):
    tensor, factors = letterbox(image_with_dot(width, height, x, y), 256)
    padded_h, padded_w = tensor.shape[1:3]
    assert padded_w % 32 == padded_h % 32 == 0 and max(padded_w, padded_h) == 256
    u, v = blob_centroid(tensor[0]) / (padded_w, padded_h)  # where the model sees the dot, normalised
    output = np.zeros((1, 6, 56), np.float32)
    output[0, 0] = multipose_row(np.tile([v, u], (17, 1)), (0, 0, 1, 1), score=1.0)
    back = decode_multipose(output, factors, 0.5)[0]["keypoints"][0, :2]
    np.testing.assert_allclose(back, (x, y), atol=0.02 * max(width, height) / 256)


@pytest.mark.parametrize("box", [(100, 50, 200, 350), (-40, 300, 60, 420), (250, -10, 330, 30)])
def test_crop_mapping_brings_a_pixel_back_also_beyond_the_border(box):
    width, height, x, y = 320, 400, 0, 0
    x0, y0, x1, y1 = box
    x, y = int(np.clip((x0 + x1) / 2 + 10, 8, width - 8)), int(np.clip((y0 + y1) / 2 - 5, 8, height - 8))
    region = square_region(box, 0.25)
    side = region[2]
    assert side == round(1.25 * max(x1 - x0, y1 - y0))
    assert region[0] + side / 2 == pytest.approx((x0 + x1) / 2, abs=1) and region[1] + side / 2 == pytest.approx(
        (y0 + y1) / 2, abs=1
    )
    crop = crop_square(image_with_dot(width, height, x, y, radius=4), region)
    assert crop.shape == (1, 256, 256, 3) and crop.dtype == np.int32
    u, v = blob_centroid(crop[0]) / 256
    output = np.zeros((1, 1, 17, 3), np.float32)
    output[0, 0, :] = (v, u, 1.0)
    back = decode_singlepose(output, region)[0, :2]
    np.testing.assert_allclose(back, (x, y), atol=0.02 * side / 256 + 0.05)


def test_crop_beyond_the_image_is_black():
    image = np.full((100, 100, 3), 200, np.uint8)
    crop = crop_square(image, (-100, 0, 200))  # the image is the top-right quarter of the crop
    assert crop[0, :, :120].max() == 0 and crop[0, 136:].max() == 0 and crop[0, :120, 136:].min() == 200


# -- the annotator on planted models (fixed outputs) --------------------------------------------------

MULTIPOSE_BOXES = [(0.1, 0.1, 0.5, 0.3), (0.2, 0.5, 0.9, 0.8)]  # (ymin, xmin, ymax, xmax), normalised


def constant_model(path, input_name, input_type, input_shape, outputs: dict):
    """An ONNX model that ignores its input and returns fixed tensors."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, graph_outputs = [], []
    for name, value in outputs.items():
        nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name + "_value")))
        graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, value.shape))
    graph_input = helper.make_tensor_value_info(input_name, input_type, input_shape)
    graph = helper.make_graph(nodes, "planted", [graph_input], graph_outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)


@pytest.fixture(scope="module")
def planted_models(tmp_path_factory):
    """A models folder in the installed layout whose MultiPose proposes two people (and one below
    the threshold), whose Thunder puts every keypoint at fixed points of its crop, and whose
    NanoDet finds one person."""
    from onnx import TensorProto

    folder = tmp_path_factory.mktemp("planted_movenet")
    multipose = np.zeros((1, 6, 56), np.float32)
    for index, box in enumerate(MULTIPOSE_BOXES):
        ymin, xmin, ymax, xmax = box
        points = np.stack([np.linspace(ymin, ymax, 17), np.linspace(xmin, xmax, 17)], axis=1)
        multipose[0, index] = multipose_row(points, box, score=0.9 - 0.1 * index)
    multipose[0, 2] = multipose_row(np.full((17, 2), 0.5), (0.4, 0.4, 0.6, 0.6), score=0.01)
    thunder = np.zeros((1, 1, 17, 3), np.float32)
    thunder[0, 0, :, 0] = np.linspace(0.2, 0.8, 17)  # y in the crop
    thunder[0, 0, :, 1] = 0.5  # x: the crop's vertical centre line
    thunder[0, 0, :, 2] = 0.6
    nanodet = nanodet_outputs([(32, 6, 6, 0, 0.8, (2, 3, 2, 3))])
    names = ["Identity_2:0", "Identity_5:0", "Identity_1:0", "Identity:0", "Identity_4:0", "Identity_3:0"]
    constant_model(
        folder / "movenet-multipose.onnx", "input", TensorProto.INT32, [1, None, None, 3], {"out": multipose}
    )
    constant_model(folder / "movenet-thunder.onnx", "input:0", TensorProto.INT32, [1, 256, 256, 3], {"out": thunder})
    constant_model(
        folder / "nanodet.onnx",
        "input_1:0",
        TensorProto.FLOAT,
        [1, 3, 416, 416],
        dict(zip(names, nanodet, strict=True)),
    )
    manifest = {"package": "planted", "version": "0", "integrity": "none", "converter": {"tf2onnx": "none"}}
    manifest["models"] = {
        model: {"file": file, "sha256": movenet.sha256_file(folder / file)}
        for model, file in movenet.MODEL_FILES.items()
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def planted(folder, **options):
    return build_annotator({"name": "movenet-pose", "weights": str(folder), "options": options})


def test_annotator_maps_thunder_keypoints_into_each_proposals_crop(planted_models):
    width, height = 640, 480  # letterbox 256 x 192: factors (640, 480)
    pose = planted(planted_models)([np.zeros((height, width, 3), np.uint8)])[0]
    assert (pose["width"], pose["height"]) == (width, height)
    assert len(pose["people"]) == 2
    for index, (person, (ymin, xmin, ymax, xmax)) in enumerate(zip(pose["people"], MULTIPOSE_BOXES, strict=True)):
        box = [xmin * width, ymin * height, xmax * width, ymax * height]
        assert person["bbox"] == pytest.approx(box, abs=1e-3)
        x0, y0, side = square_region(box, 0.25)
        keypoints = person["keypoints"]
        assert keypoints.shape == (17, 3) and keypoints.dtype == np.float32
        np.testing.assert_allclose(keypoints[:, 0], x0 + 0.5 * side, atol=1e-3)
        np.testing.assert_allclose(keypoints[:, 1], y0 + np.linspace(0.2, 0.8, 17) * side, atol=1e-3)
        # rescored: geometric mean of the mean keypoint score (0.6) and MultiPose's score (0.9, 0.8)
        assert person["score"] == pytest.approx(np.sqrt(0.6 * (0.9 - 0.1 * index)))


def test_annotator_without_thunder_reports_multipose_keypoints(planted_models):
    width, height = 640, 480
    pose = planted(planted_models, thunder=False)([np.zeros((height, width, 3), np.uint8)])[0]
    first = pose["people"][0]["keypoints"]
    ymin, xmin, ymax, xmax = MULTIPOSE_BOXES[0]
    np.testing.assert_allclose(first[:, 0], np.linspace(xmin, xmax, 17) * width, atol=1e-3)
    np.testing.assert_allclose(first[:, 1], np.linspace(ymin, ymax, 17) * height, atol=1e-3)
    with pytest.raises(ValueError, match="cannot use person boxes"):
        planted(planted_models, thunder=False)([np.zeros((10, 10, 3), np.uint8)], boxes=[np.zeros((1, 4))])


def test_annotator_with_nanodet_boxes_and_with_given_boxes(planted_models):
    image = np.zeros((416, 832, 3), np.uint8)  # NanoDet factors (2, 1)
    people = planted(planted_models, detector="nanodet")([image])[0]["people"]
    cx, cy = 6.5 * 32, 6.5 * 32
    assert len(people) == 1
    assert people[0]["bbox"] == pytest.approx([(cx - 64) * 2, cy - 96, (cx + 64) * 2, cy + 96], abs=1e-2)
    given = np.array([[10, 20, 110, 220], [300, 100, 340, 140]], np.float32)
    people = planted(planted_models)([image], boxes=[given])[0]["people"]
    assert [person["bbox"] for person in people] == [pytest.approx(box) for box in given.tolist()]
    x0, y0, side = square_region(given[0], 0.25)
    np.testing.assert_allclose(people[0]["keypoints"][:, 0], x0 + 0.5 * side, atol=1e-3)
    assert people[0]["score"] == pytest.approx(0.6)  # given boxes have no score: the keypoint score


def test_annotator_thresholds_deduplicates_and_reports_boxes(planted_models):
    image = np.zeros((480, 640, 3), np.uint8)
    assert planted(planted_models, min_person_score=0.7)([image])[0]["people"] == []
    # the threshold is on the mean keypoint score (0.6), not on the rescored person (0.73, 0.69)
    assert planted(planted_models, min_person_score=0.65)([image])[0]["people"] == []
    same = np.array([[100, 100, 200, 300], [101, 100, 201, 300]], np.float32)  # one person twice
    assert len(planted(planted_models)([image], boxes=[same])[0]["people"]) == 1
    boxes = build_annotator({"name": "movenet-person-boxes", "weights": str(planted_models)})
    result = boxes([image, image])
    assert boxes.modality == "detection" and len(result) == 2
    assert result[0]["boxes"].shape == (2, 4) and result[0]["scores"].shape == (2,)


def test_keypoints_beyond_the_image_get_score_zero(planted_models):
    box_outside = np.array([[-300, -300, -100, -100]], np.float32)  # crop entirely above-left
    person = planted(planted_models, min_person_score=0.0)([np.zeros((50, 50, 3), np.uint8)], boxes=[box_outside])
    keypoints = person[0]["people"][0]["keypoints"]
    assert (keypoints[:, 2] == 0).all() and (keypoints[:, :2] == 0).all()


def test_provenance_names_the_package_and_model_digests(planted_models):
    annotator = planted(planted_models, detector="nanodet")
    provenance = annotator.provenance()
    assert provenance["annotator"] == "movenet-topdown"
    digest = load_manifest(planted_models)["models"]["nanodet"]["sha256"][:12]
    assert provenance["weights"].startswith("planted@0") and f"nanodet.onnx sha256:{digest}" in provenance["weights"]
    assert "multipose" not in provenance["weights"]


def test_bad_options_are_refused(planted_models):
    with pytest.raises(ValueError, match="detector must be"):
        planted(planted_models, detector="yolo")
    with pytest.raises(ValueError, match="multiple of 32"):
        planted(planted_models, multipose_size=250)
    with pytest.raises(ValueError, match="needs detector 'movenet'"):
        planted(planted_models, detector="nanodet", thunder=False)
    with pytest.raises(ValueError, match="unknown options"):
        planted(planted_models, crop_pad=0.2)


# -- missing or damaged models ---------------------------------------------------------------------


def test_missing_models_name_the_set_up_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERHUMAN_CACHE", str(tmp_path))
    assert default_models_dir() == tmp_path / "models" / "movenet"
    with pytest.raises(WeightsNotFoundError, match="make setup.*setup_pose_models.sh"):
        build_annotator("movenet-pose")
    with pytest.raises(WeightsNotFoundError, match="not installed"):
        build_annotator({"name": "movenet-person-boxes", "weights": str(tmp_path / "elsewhere")})


def test_a_model_file_that_does_not_match_its_manifest_is_refused(planted_models, tmp_path):
    for file in planted_models.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    (tmp_path / "movenet-thunder.onnx").write_bytes(b"not the model")
    with pytest.raises(WeightsNotFoundError, match="does not match the sha256"):
        planted(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(WeightsNotFoundError, match="not a complete model manifest"):
        planted(tmp_path)


def test_offline_config_falls_back_to_mediapipe_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HYPERHUMAN_CACHE", str(tmp_path))
    config = load_config("annotate/offline")["annotators"]["pose"]
    assert config["name"] == "movenet-pose"
    with caplog.at_level(logging.WARNING, logger="annotators.registry"):
        annotator = build_annotator(config)
    try:
        assert annotator.provenance()["annotator"] == "mediapipe-blazepose"
        assert annotator.options["erase_rounds"] == 3
    finally:
        annotator.close()
    assert "falls back to 'mediapipe-pose'" in caplog.text and "make setup" in caplog.text


def test_fallback_is_not_used_when_the_models_are_there(planted_models):
    annotator = planted(planted_models, fallback={"name": "mediapipe-pose"})
    assert isinstance(annotator, MoveNetPose)


def test_the_job_settings_name_the_pose_model_that_runs(planted_models, tmp_path, monkeypatch, capsys):
    from pipelines.job import with_fallbacks_resolved

    monkeypatch.setenv("HYPERHUMAN_CACHE", str(tmp_path))  # nothing installed there
    config = load_config("annotate/offline")
    resolved = with_fallbacks_resolved(config)
    assert resolved["annotators"]["pose"]["name"] == "mediapipe-pose"  # what job.json and the fingerprint hold
    assert resolved["annotators"]["pose"]["options"] == {"erase_rounds": 3}
    assert config["annotators"]["pose"]["name"] == "movenet-pose"  # the caller's config is left as it was
    assert "its fallback mediapipe-pose runs instead" in capsys.readouterr().out
    config["annotators"]["pose"]["weights"] = str(planted_models)
    assert with_fallbacks_resolved(config) is config


# -- real photos with the installed models ----------------------------------------------------------


@pytest.fixture(scope="module")
def models_dir():
    try:
        load_manifest(default_models_dir())
    except WeightsNotFoundError as error:
        pytest.skip(f"MoveNet models not installed (make setup / scripts/setup_pose_models.sh): {error}")
    return default_models_dir()


@pytest.fixture(scope="module")
def pose_annotator(models_dir):
    return build_annotator("movenet-pose")


COCO17_SIGMAS = (
    np.array([0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89])
    / 10.0
)


def oks(keypoints: np.ndarray, annotation: dict) -> float:
    """COCO object keypoint similarity of a prediction with one ground-truth person."""
    truth = np.asarray(annotation["keypoints"], np.float64).reshape(17, 3)
    labeled = truth[:, 2] > 0
    squared = ((keypoints[:, :2] - truth[:, :2]) ** 2).sum(axis=1)
    similarity = np.exp(-squared / (2 * annotation["area"] * (2 * COCO17_SIGMAS) ** 2 + np.spacing(1)))
    return float(similarity[labeled].mean())


def load_photo(shared_humans, coco_ground_truth, name):
    image = next(image for image in coco_ground_truth["images"] if image["file_name"] == name)
    people = [
        annotation
        for annotation in coco_ground_truth["annotations"]
        if annotation["image_id"] == image["id"] and annotation["num_keypoints"] > 0
    ]
    return np.asarray(Image.open(shared_humans / "images" / name).convert("RGB")), people


GROUP_PHOTOS = {  # file → labeled people; the mediapipe default finds 1 and 2 of them
    "mmpose_aic_fa436c914fe4a8ec1ec5474af4d3820b84d17561.jpg": 3,
    "mmpose_coco_000000196141.jpg": 4,
}


@pytest.mark.parametrize("name", sorted(GROUP_PHOTOS))
def test_group_photo_people_the_old_default_misses_are_found(name, pose_annotator, shared_humans, coco_ground_truth):
    rgb, truth = load_photo(shared_humans, coco_ground_truth, name)
    assert len(truth) == GROUP_PHOTOS[name]
    people = pose_annotator([rgb])[0]["people"]
    matched = [max(oks(person["keypoints"], annotation) for person in people) for annotation in truth]
    assert min(matched) > 0.5, f"OKS of the best match of each labeled person: {np.round(matched, 2)}"
    mediapipe = build_annotator("mediapipe-pose")
    try:
        old = mediapipe([rgb])[0]["people"]
    finally:
        mediapipe.close()
    old_matched = [max([oks(person["keypoints"], annotation) for person in old], default=0) for annotation in truth]
    assert sum(value > 0.5 for value in old_matched) < len(truth)  # the old default misses some


def test_nanodet_boxes_find_the_group_too(models_dir, shared_humans, coco_ground_truth):
    rgb, truth = load_photo(shared_humans, coco_ground_truth, "mmpose_aic_fa436c914fe4a8ec1ec5474af4d3820b84d17561.jpg")
    people = build_annotator({"name": "movenet-pose", "options": {"detector": "nanodet"}})([rgb])[0]["people"]
    assert min(max(oks(person["keypoints"], annotation) for person in people) for annotation in truth) > 0.5


def test_astronaut_is_one_person_and_the_flipped_photo_mirrors(pose_annotator):
    from shards.keypoints import hflip_keypoints

    photo = packaged_photos()["astronaut"]
    people = pose_annotator([photo])[0]["people"]
    assert len(people) == 1
    keypoints = people[0]["keypoints"]
    assert keypoints[0, 2] > 0.5 and keypoints[0, 1] < keypoints[[11, 12], 1].min()  # nose above hips
    flipped = pose_annotator([photo[:, ::-1]])[0]["people"][0]["keypoints"]
    expected = hflip_keypoints(keypoints, photo.shape[1])
    both = (expected[:, 2] > 0.4) & (flipped[:, 2] > 0.4)
    assert both.sum() >= 7
    assert np.median(np.linalg.norm(flipped[both, :2] - expected[both, :2], axis=1)) < 0.02 * photo.shape[1]


def test_wholebody_and_world_from_mediapipe_on_each_crop(models_dir, shared_humans):
    annotator = build_annotator({"name": "movenet-pose", "options": {"wholebody": True}})
    try:
        rgb = np.asarray(Image.open(shared_humans / "images" / "dwpose_cn11_m2.jpg").convert("RGB"))
        person = annotator([rgb])[0]["people"][0]
    finally:
        annotator.close()
    wholebody = person["wholebody"]
    assert wholebody.shape == (133, 3)
    np.testing.assert_array_equal(wholebody[:17], person["keypoints"])  # MoveNet's body
    assert (wholebody[23:91, 2] > 0).sum() == 68  # Holistic's face
    assert np.linalg.norm(wholebody[23 + 30, :2] - person["keypoints"][0, :2]) < 20  # nose tip near the nose
    for hand_start, wrist in ((91, 9), (112, 10)):
        assert (
            wholebody[hand_start, 2] > 0
            and np.linalg.norm(wholebody[hand_start, :2] - person["keypoints"][wrist, :2]) < 30
        )
    assert person["blazepose33"].shape == (33, 3) and person["world"].shape == (33, 3)
    assert "holistic" in annotator.provenance()["weights"]


def test_offline_config_uses_movenet_and_the_depth_places_its_people(models_dir):
    config = load_config("annotate/offline")["annotators"]
    pose_annotator = build_annotator(config["pose"])
    try:
        assert pose_annotator.provenance()["annotator"] == "movenet-topdown"
        photo = packaged_photos()["astronaut"]
        pose = pose_annotator([photo])[0]
    finally:
        pose_annotator.close()
    assert "world" not in pose["people"][0]  # no BlazePose on the crops: COCO-17 only
    depth = build_annotator(config["depth"])([photo], poses=[pose])[0]["depth"]
    assert depth.std() > 0  # people placed (by an assumed torso length): not the flat plane of nobody placed
