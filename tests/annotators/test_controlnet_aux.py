"""controlnet-aux OpenPose at real architecture with random weights saved under the real file
name and loaded through the same code path as real weights."""

import numpy as np
import pytest
import torch

from annotators.base import WeightsNotFoundError
from annotators.registry import build_annotator
from shards.keypoints import COCO17_NAMES


@pytest.fixture(scope="module")
def openpose_dir(tmp_path_factory):
    from controlnet_aux.open_pose.model import bodypose_model

    torch.manual_seed(0)
    model = bodypose_model()
    # the checkpoint's names lack the first component of the module path (see open_pose.util.transfer)
    weights = {".".join(name.split(".")[1:]): value for name, value in model.state_dict().items()}
    directory = tmp_path_factory.mktemp("openpose")
    torch.save(weights, directory / "body_pose_model.pth")
    return str(directory)


def test_openpose_loads_and_annotates_in_the_schema(openpose_dir):
    annotator = build_annotator({"name": "controlnet-openpose", "weights": openpose_dir})
    images = [np.zeros((96, 128, 3), np.uint8), np.full((64, 48), 200, np.uint8)]
    poses = annotator(images)
    assert [(p["width"], p["height"]) for p in poses] == [(128, 96), (48, 64)]
    for pose in poses:
        for person in pose["people"]:  # random weights rarely find anyone; when they do, schema holds
            assert person["keypoints"].shape == (17, 3)


def test_openpose18_body_maps_to_coco17():
    from controlnet_aux.open_pose.body import BodyResult, Keypoint

    from annotators.controlnet_aux_openpose import body_to_person

    keypoints = [Keypoint(x=10.0 + i, y=20.0 + i, score=0.5) for i in range(18)]
    keypoints[3] = None  # right elbow missing
    person = body_to_person(BodyResult(keypoints=keypoints, total_score=9.0, total_parts=18), 100, 100)
    coco = person["keypoints"]
    assert coco[COCO17_NAMES.index("right_elbow")].tolist() == [0, 0, 0]
    assert coco[COCO17_NAMES.index("right_shoulder")].tolist() == [12.0, 22.0, 0.5]  # OpenPose index 2
    assert coco[COCO17_NAMES.index("left_ear")].tolist() == [27.0, 37.0, 0.5]  # OpenPose index 17
    assert person["score"] == pytest.approx(0.5)


def test_missing_files_name_the_weights_key(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="body_pose_model.pth is missing"):
        build_annotator({"name": "controlnet-openpose", "weights": str(tmp_path)})


@pytest.fixture(scope="module")
def normalbae_dir(tmp_path_factory):
    import types

    from controlnet_aux.normalbae.nets.NNET import NNET

    torch.manual_seed(0)
    args = types.SimpleNamespace(
        mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4, importance_ratio=0.7
    )
    directory = tmp_path_factory.mktemp("normalbae")
    torch.save({"model": NNET(args).state_dict()}, directory / "scannet.pt")
    return str(directory)


def test_normalbae_gives_unit_normals_at_image_size_with_our_axes(normalbae_dir):
    options = {"detect_resolution": 64}
    ours = build_annotator({"name": "controlnet-normalbae", "weights": normalbae_dir, "options": options})
    raw = build_annotator(
        {"name": "controlnet-normalbae", "weights": normalbae_dir, "options": {**options, "flip_x": False}}
    )
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    normal = ours([image])[0]
    assert normal.shape == (50, 70, 3) and normal.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(normal, axis=2), 1.0, atol=1e-4)
    unflipped = raw([image])[0]
    np.testing.assert_allclose(normal[..., 0], -unflipped[..., 0], atol=1e-5)
    np.testing.assert_allclose(normal[..., 1:], unflipped[..., 1:], atol=1e-5)
    with pytest.raises(WeightsNotFoundError, match="scannet.pt is missing"):
        build_annotator({"name": "controlnet-normalbae", "weights": str(normalbae_dir) + "/.."})


@pytest.mark.slow
def test_midas_dpt_hybrid_gives_float_disparity_at_image_size(tmp_path):
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    torch.manual_seed(0)
    model = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
    torch.save(model.state_dict(), tmp_path / "dpt_hybrid-midas-501f0c75.pt")
    del model
    annotator = build_annotator(
        {"name": "controlnet-midas", "weights": str(tmp_path), "options": {"detect_resolution": 64}}
    )
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    result = annotator([image])[0]
    assert result["kind"] == "relative_inverse"
    assert result["depth"].shape == (50, 70) and result["depth"].dtype == np.float32
    assert (result["depth"] >= 0).all()  # MiDaS is built non-negative
    with pytest.raises(WeightsNotFoundError, match="dpt_large-midas-2f21e586.pt is missing"):
        build_annotator({"name": "controlnet-midas", "weights": str(tmp_path), "options": {"model_type": "dpt_large"}})
