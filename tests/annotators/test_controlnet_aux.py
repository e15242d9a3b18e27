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


# OpenPose-18 limbs (joint index pairs) and, for each, the PAF channels of its x and y
# components: the body model's output layout (CMU OpenPose; controlnet_aux.open_pose.body).
LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
         (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17))  # fmt: skip
PAF_CHANNELS = ((12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7),
                (8, 9), (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27))  # fmt: skip
# A person facing the camera (their right on the image's left), OpenPose-18 order, pixels from the neck.
BODY = ((0, -14), (0, 0), (-12, 0), (-16, 18), (-18, 34), (12, 0), (16, 18), (19, 34), (-8, 38), (-9, 60),
        (-10, 82), (8, 38), (9, 60), (10, 82), (-4, -18), (4, -18), (-8, -16), (8, -16))  # fmt: skip


def plant_people(body_model, height: int, width: int, people: list[np.ndarray], peak: list[float]):
    """Make the OpenPose body network return heatmaps with a Gaussian peak at every joint of
    ``people`` (OpenPose-18 pixels of the ``height`` x ``width`` image) and PAFs holding the
    unit limb vector along every limb, on its stride-8 output grid. The image reaches the
    network resized by 184 / height (boxsize 368 at scale 0.5, sizes rounded down) and padded
    right/down to a multiple of 8 (checked here), so a joint at image x sits at output cell
    x * resized width / width / 8 - 0.5 (cell c covers input pixels 8c to 8c + 8)."""
    scale = 0.5 * 368 / height
    resized = (int(height * scale), int(width * scale))
    padded = tuple(-(-size // 8) * 8 for size in resized)

    def forward(data):
        assert tuple(data.shape[2:]) == padded, (data.shape, padded)
        grid_h, grid_w = padded[0] // 8, padded[1] // 8
        rows, cols = np.mgrid[:grid_h, :grid_w].astype(np.float64)
        heatmaps = np.zeros((19, grid_h, grid_w))
        pafs = np.zeros((38, grid_h, grid_w))
        for joints, amplitude in zip(people, peak, strict=True):
            grid = joints * [resized[1] / width / 8, resized[0] / height / 8] - 0.5
            for part, (x, y) in enumerate(grid):
                gaussian = amplitude * np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / 2)  # sigma: one cell
                heatmaps[part] = np.maximum(heatmaps[part], gaussian)
            for (a, b), (channel_x, channel_y) in zip(LIMBS, PAF_CHANNELS, strict=True):
                along = grid[b] - grid[a]
                length = np.linalg.norm(along)
                t = np.clip(((cols - grid[a][0]) * along[0] + (rows - grid[a][1]) * along[1]) / length**2, 0, 1)
                near = np.hypot(cols - grid[a][0] - t * along[0], rows - grid[a][1] - t * along[1]) <= 1.0
                pafs[channel_x][near], pafs[channel_y][near] = along / length
        return torch.from_numpy(pafs[None]).float(), torch.from_numpy(heatmaps[None]).float()

    body_model.forward = forward


def test_openpose_decodes_planted_people_to_image_pixels(openpose_dir):
    """The real controlnet-aux decode (peaks, PAF limb scoring, person assembly) on planted
    network outputs gives each person back at the joints planted, in pixels of a non-square
    image (115 x 182: scaled by 1.6 and padded to 184 x 296 on the way in), as COCO-17."""
    from shards.keypoints import openpose18_to_coco17

    annotator = build_annotator({"name": "controlnet-openpose", "weights": openpose_dir})
    height, width = 115, 182
    people = [np.array(BODY, np.float64) + neck for neck in ([52.5, 24.5], [131.5, 27.5])]
    plant_people(annotator.detector.body_estimation.model, height, width, people, peak=[1.0, 0.7])
    pose = annotator([np.zeros((height, width, 3), np.uint8)])[0]
    assert (pose["width"], pose["height"]) == (width, height) and len(pose["people"]) == 2
    found = sorted(pose["people"], key=lambda person: person["keypoints"][0, 0])  # left person first
    for person, joints, amplitude in zip(found, people, [1.0, 0.7], strict=True):
        expected = openpose18_to_coco17(np.concatenate([joints, np.ones((18, 1))], axis=1))
        np.testing.assert_allclose(person["keypoints"][:, :2], expected[:, :2], atol=1.0)
        np.testing.assert_allclose(person["keypoints"][:, 2], amplitude, atol=0.1)
        x0, y0 = expected[:, :2].min(0)
        x1, y1 = expected[:, :2].max(0)
        np.testing.assert_allclose(person["bbox"], [x0, y0, x1, y1], atol=1.0)


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
