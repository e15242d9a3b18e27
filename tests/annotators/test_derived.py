"""Depth → normals on analytic surfaces, and the coarse person depth."""

import numpy as np
import pytest

from annotators.derived import NormalFromDepth, PersonDepthFromPose, backproject, focal_length_px, normals_from_depth
from annotators.registry import build_annotator


def ray_directions(height, width, focal_px):
    """Unit-depth ray for each pixel centre (camera frame: x right, y up, z toward the viewer)."""
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    return np.stack([(u + 0.5 - width / 2) / focal_px, -(v + 0.5 - height / 2) / focal_px, -np.ones_like(u)], axis=2)


def test_plane_gives_its_normal_everywhere():
    height, width, focal = 60, 80, focal_length_px(80)
    normal = np.array([0.3, -0.2, 0.9])
    normal /= np.linalg.norm(normal)
    point_on_plane = np.array([0.0, 0.0, -5.0])
    rays = ray_directions(height, width, focal)
    depth = (point_on_plane @ normal) / (rays @ normal)  # ray-plane intersection, depth = -z
    estimated = normals_from_depth(depth, focal)
    assert np.abs(estimated - normal).max() < 1e-6


def test_sphere_gives_radial_normals():
    height, width, focal = 96, 96, focal_length_px(96)
    center, radius = np.array([0.1, -0.05, -4.0]), 1.0
    rays = ray_directions(height, width, focal)
    # |t * ray - c|^2 = r^2  →  t = (b - sqrt(b^2 - a (|c|^2 - r^2))) / a  (nearest hit)
    a = (rays * rays).sum(2)
    b = rays @ center
    disc = b * b - a * (center @ center - radius**2)
    hit = disc > 0
    t = np.where(hit, (b - np.sqrt(np.maximum(disc, 0))) / a, np.nan)
    points = rays * t[..., None]
    expected = (points - center) / radius
    estimated = normals_from_depth(np.where(hit, t, 10.0), focal)
    # interior pixels only (central differences straddle the silhouette at the rim)
    inner = hit.copy()
    for axis in (0, 1):
        inner &= np.roll(hit, 1, axis) & np.roll(hit, -1, axis)
    inner &= expected[..., 2] > 0.8  # within ~37° of facing the camera: differences stay on the sphere
    angle = np.degrees(np.arccos(np.clip((estimated[inner] * expected[inner]).sum(1), -1, 1)))
    assert inner.sum() > 500 and angle.max() < 1.0


def test_normals_are_scale_invariant_and_inverse_depth_is_inverted():
    depth = 2.0 + np.random.default_rng(0).random((20, 30))
    annotator = build_annotator("depth-normal")
    metric, scaled, inverse = annotator(
        [None] * 3,
        [
            {"depth": depth, "kind": "metric_m"},
            {"depth": 7.0 * depth, "kind": "relative"},
            {"depth": 1.0 / depth, "kind": "relative_inverse"},
        ],
    )
    np.testing.assert_allclose(metric, scaled, atol=1e-5)
    np.testing.assert_allclose(metric, inverse, atol=1e-4)
    assert isinstance(annotator, NormalFromDepth)


def test_backproject_puts_the_centre_pixel_on_the_axis():
    points = backproject(np.full((3, 3), 2.0), focal_px=10.0)
    np.testing.assert_allclose(points[1, 1], [0, 0, -2.0])
    assert points[0, 2, 0] > 0 and points[0, 2, 1] > 0  # top-right pixel: right and up


def synthetic_blazepose_person(torso_px=100.0, torso_m=0.5, offset=(200.0, 100.0)):
    """33 landmarks: shoulders at y=offset, hips torso_px below; world coordinates in metres."""
    pixels = np.zeros((33, 3), np.float32)
    world = np.zeros((33, 3), np.float32)
    pixels[:, 0], pixels[:, 1], pixels[:, 2] = offset[0], offset[1] + torso_px / 2, 1.0
    pixels[[11, 12], 1] = offset[1]
    pixels[[23, 24], 1] = offset[1] + torso_px
    world[[11, 12], 1] = -torso_m
    return {"blazepose33": pixels, "world": world, "keypoints": np.zeros((17, 3)), "bbox": [0, 0, 1, 1], "score": 1}


def test_person_depth_places_the_person_by_torso_size():
    width, height = 400, 300
    annotator = build_annotator({"name": "pose-depth", "options": {"fov_deg": 60}})
    assert isinstance(annotator, PersonDepthFromPose)
    person = synthetic_blazepose_person()
    mask = np.zeros((height, width), np.uint8)
    mask[100:200, 150:250] = 255
    pose = {"width": width, "height": height, "people": [person]}
    result = annotator([None], [pose], [mask])[0]
    expected = focal_length_px(width, 60) * 0.5 / 100.0  # pinhole: f * metres / pixels
    assert result["kind"] == "coarse_metric_m_from_pose"
    assert result["depth"][150, 200] == pytest.approx(expected, rel=1e-3)
    assert result["depth"][10, 10] == pytest.approx(1.5 * expected, rel=1e-3)  # background far plane


def coco17_person(torso_px=80.0, offset=(100.0, 60.0), score=0.9):
    """17 keypoints on a vertical line: shoulders at y=offset, hips torso_px below."""
    keypoints = np.zeros((17, 3), np.float32)
    keypoints[:, 0], keypoints[:, 1], keypoints[:, 2] = offset[0], offset[1] + torso_px / 2, score
    keypoints[[5, 6], 1] = offset[1]
    keypoints[[11, 12], 1] = offset[1] + torso_px
    return {"keypoints": keypoints, "bbox": [0, 0, 1, 1], "score": score}


def test_person_depth_places_a_coco17_person_by_the_assumed_torso():
    width, height = 400, 300
    annotator = build_annotator({"name": "pose-depth", "options": {"fov_deg": 60, "torso_m": 0.45}})
    assert "0.45 m torso" in annotator.provenance()["weights"]
    near, far = coco17_person(torso_px=80.0), coco17_person(torso_px=40.0, offset=(300.0, 100.0))
    unseen = coco17_person(offset=(200.0, 200.0))
    unseen["keypoints"][[11, 12], 2] = 0.1  # no hip seen: not placed
    pose = {"width": width, "height": height, "people": [near, far, unseen]}
    depth = annotator([None], [pose])[0]["depth"]  # no mask: every pixel takes its nearest person
    focal = focal_length_px(width, 60)
    assert depth[100, 100] == pytest.approx(focal * 0.45 / 80.0, rel=1e-3)  # flat at its distance
    assert depth[120, 300] == pytest.approx(focal * 0.45 / 40.0, rel=1e-3)
    # with BlazePose world landmarks they are used instead (torso 0.5 m there, not torso_m)
    blazepose = {**synthetic_blazepose_person(), "keypoints": coco17_person(torso_px=10.0)["keypoints"]}
    mask = np.zeros((height, width), np.uint8)
    mask[100:200, 150:250] = 255
    depth = annotator([None], [{"width": width, "height": height, "people": [blazepose]}], [mask])[0]["depth"]
    assert depth[150, 200] == pytest.approx(focal * 0.5 / 100.0, rel=1e-3)
    with pytest.raises(ValueError, match="torso_m"):
        build_annotator({"name": "pose-depth", "options": {"torso_m": 0}})
