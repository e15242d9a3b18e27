"""Annotations derived from other annotations, for when no depth or normal model is configured.

Both are honest about what they are: their ``kind`` / name says how they were made, and the
job records it in every sample's metadata.

- :class:`NormalFromDepth`: surface normals of a depth map under a pinhole camera: each pixel
  is back-projected to 3-D and the normal is the cross product of the neighbours' differences.
  Exact for any surface under the assumed field of view; normals do not depend on the depth's
  scale, so metric and up-to-scale depth give the same normals.
- :class:`PersonDepthFromPose`: a *coarse* per-person depth from BlazePose's metric world
  landmarks: each person's distance from the camera is estimated from their torso length in
  pixels vs metres (pinhole, assumed field of view), landmark depths are that distance plus the
  landmark's world z, and the person's mask pixels interpolate the landmark depths (inverse
  distance weighting); the background is a far plane. People with COCO-17 keypoints only are
  placed by an assumed torso length (0.47 m, BlazePose's own typical estimate), flat at their
  distance. It is a placeholder for a real depth model (DPT, Depth Anything, MiDaS), not a
  substitute.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from annotators.base import Annotator, AnnotatorConfig

DEFAULT_FOV_DEG = 60.0  # horizontal field of view assumed when the camera is unknown


def focal_length_px(width: int, fov_deg: float = DEFAULT_FOV_DEG) -> float:
    return width / (2.0 * math.tan(math.radians(fov_deg) / 2.0))


def backproject(depth: np.ndarray, focal_px: float) -> np.ndarray:
    """Depth (distance along the optical axis) → 3-D points ``(H, W, 3)`` in the camera frame
    x right, y up, z toward the viewer (so visible points have z = -depth)."""
    height, width = depth.shape
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    x = (u + 0.5 - width / 2.0) * depth / focal_px
    y = -(v + 0.5 - height / 2.0) * depth / focal_px
    return np.stack([x, y, -depth.astype(np.float64)], axis=2)


def normals_from_depth(depth: np.ndarray, focal_px: float) -> np.ndarray:
    """Unit normals ``(H, W, 3)`` (x right, y up, z toward the viewer) of a depth map."""
    points = backproject(np.asarray(depth, dtype=np.float64), focal_px)
    along_u = np.gradient(points, axis=1)  # central differences, one-sided at the border
    along_v = np.gradient(points, axis=0)
    normal = np.cross(along_v, along_u)  # v points down, u right: v × u faces the camera
    norm = np.linalg.norm(normal, axis=2, keepdims=True)
    normal = np.where(norm > 0, normal / np.maximum(norm, 1e-12), np.array([0.0, 0.0, 1.0]))
    return normal.astype(np.float32)


class NormalFromDepth(Annotator):
    name = "normal-from-depth"
    version = "1"
    modality = "normal"
    inputs = ("depths",)
    default_options = {"fov_deg": DEFAULT_FOV_DEG}

    def __init__(self, config: AnnotatorConfig):
        super().__init__(config)
        self.fov_deg = float(self.options["fov_deg"])

    @property
    def weights_id(self) -> str:
        return f"none (pinhole, fov {self.fov_deg:g} deg)"

    def __call__(self, images: list, depths: list[dict]) -> list[np.ndarray]:
        """``depths[i]``: a depth result ``{"depth": (H, W) array, "kind": str}`` for image i.
        Inverse depth kinds (``*inverse*``, ``disparity``) are inverted first."""
        normals = []
        for depth_result in depths:
            depth = np.asarray(depth_result["depth"], dtype=np.float64)
            kind = depth_result["kind"]
            if "inverse" in kind or "disparity" in kind:
                depth = 1.0 / np.maximum(depth, 1e-6)
            normals.append(normals_from_depth(depth, focal_length_px(depth.shape[1], self.fov_deg)))
        return normals


# Shoulders and hips (torso length): BlazePose-33 and COCO-17 indices.
_SHOULDERS, _HIPS = (11, 12), (23, 24)
_COCO_SHOULDERS, _COCO_HIPS = (5, 6), (11, 12)


class PersonDepthFromPose(Annotator):
    """Coarse metric depth of the people from their pose (BlazePose world landmarks, or COCO-17
    keypoints and an assumed torso length) and the person mask."""

    name = "person-depth-from-pose"
    version = "2"
    modality = "depth"
    inputs = ("poses", "masks")
    kind = "coarse_metric_m_from_pose"
    default_options = {
        "fov_deg": DEFAULT_FOV_DEG,
        "background_factor": 1.5,  # background plane at this times the farthest person
        "grid_size": 128,  # interpolation grid, pixels per side (upsampled to the image)
        # People without BlazePose world landmarks (a COCO-17 pose, e.g. movenet-pose without
        # option world) are placed by this shoulder-to-hip length, metres (BlazePose's own world
        # torso on ../shared/data/humans: median 0.47 m, 10-90% 0.40-0.49 m), their keypoints
        # scoring ≥ min_keypoint_score all at that distance.
        "torso_m": 0.47,
        "min_keypoint_score": 0.3,
    }

    def __init__(self, config: AnnotatorConfig):
        super().__init__(config)
        self.fov_deg = float(self.options["fov_deg"])
        self.background_factor = float(self.options["background_factor"])
        self.grid_size = int(self.options["grid_size"])
        self.torso_m = float(self.options["torso_m"])
        self.min_keypoint_score = float(self.options["min_keypoint_score"])
        if not self.torso_m > 0:
            raise ValueError(f"option torso_m must be > 0 metres, got {self.options['torso_m']!r}")

    @property
    def weights_id(self) -> str:
        return (
            f"none (BlazePose world landmarks, else COCO-17 with a {self.torso_m:g} m torso; "
            f"pinhole fov {self.fov_deg:g} deg)"
        )

    def landmarks(self, person: dict) -> tuple[np.ndarray, np.ndarray, float, float] | None:
        """A person's landmarks for the depth: pixels ``(N, 2)``, depth offsets from the person's
        distance ``(N,)`` in metres, and the torso length in pixels and in metres. BlazePose's 33
        landmarks and world coordinates when the pose has them, else the COCO-17 keypoints seen
        (offsets 0, torso ``torso_m``); None when no shoulder or no hip is seen."""
        if "world" in person and "blazepose33" in person:
            pixels, world = np.asarray(person["blazepose33"])[:, :2], np.asarray(person["world"])
            torso_px = np.linalg.norm(pixels[list(_SHOULDERS)].mean(0) - pixels[list(_HIPS)].mean(0))
            torso_m = np.linalg.norm(world[list(_SHOULDERS)].mean(0) - world[list(_HIPS)].mean(0))
            return pixels, world[:, 2], float(torso_px), float(torso_m)
        keypoints = np.asarray(person["keypoints"])
        seen = keypoints[:, 2] >= self.min_keypoint_score
        shoulders, hips = [i for i in _COCO_SHOULDERS if seen[i]], [i for i in _COCO_HIPS if seen[i]]
        if not shoulders or not hips:
            return None
        torso_px = np.linalg.norm(keypoints[shoulders, :2].mean(0) - keypoints[hips, :2].mean(0))
        return keypoints[seen, :2], np.zeros(int(seen.sum())), float(torso_px), self.torso_m

    def depth_one(self, width: int, height: int, pose: dict, mask: np.ndarray | None) -> np.ndarray:
        focal_px = focal_length_px(width, self.fov_deg)
        placed = []  # (landmark pixels, landmark depths, torso px, person distance) per person
        for person in pose["people"]:
            found = self.landmarks(person)
            if found is None:
                continue
            pixels, offsets, torso_px, torso_m = found
            if torso_px < 2 or torso_m <= 0:
                continue
            distance = focal_px * torso_m / torso_px  # pinhole: the torso's metres over its pixels
            placed.append((pixels, distance + offsets, torso_px, distance))
        if not placed:
            return np.full((height, width), 10.0, dtype=np.float32)  # nobody placed: a flat far plane
        far = self.background_factor * max(distance for *_, distance in placed)
        person_pixels = np.ones((height, width), bool) if mask is None else np.asarray(mask) > 127
        # The interpolation is smooth at the scale of a torso, so compute it on a grid of at most
        # `grid_size` px per side and upsample: same result, ~10x less time on 512 px photos.
        step = max(1, int(np.ceil(max(width, height) / self.grid_size)))
        grid = self.person_depth_grid(width, height, placed, step, far)
        upsampled = cv2.resize(grid, (width, height), interpolation=cv2.INTER_LINEAR) if step > 1 else grid
        return np.where(person_pixels, upsampled, far).astype(np.float32)

    def person_depth_grid(self, width: int, height: int, placed: list, step: int, far: float) -> np.ndarray:
        """Interpolated landmark depth on pixel centres ``step`` apart (each cell nearest a person)."""
        grid_h, grid_w = -(-height // step), -(-width // step)
        depth = np.full((grid_h, grid_w), far, dtype=np.float32)
        v, u = np.mgrid[0:grid_h, 0:grid_w].reshape(2, -1)
        points = np.stack([(u + 0.5) * step, (v + 0.5) * step], axis=1)
        nearest_so_far = np.full(len(u), np.inf)
        for pixels, landmark_depth, torso_px, _ in placed:
            softening = (0.25 * torso_px) ** 2 + 1.0  # IDW smooth between landmarks, no spikes at them
            squared = ((points[:, None, :] - pixels[None, :, :2]) ** 2).sum(axis=2)
            weights = 1.0 / (squared + softening)
            values = (weights * landmark_depth[None, :]).sum(1) / weights.sum(1)
            # each cell belongs to the person whose landmarks are nearest to it
            nearest = squared.min(axis=1)
            take = nearest < nearest_so_far
            nearest_so_far[take] = nearest[take]
            depth[v[take], u[take]] = values[take]
        return depth

    def __call__(self, images: list, poses: list[dict], masks: list | None = None) -> list[dict]:
        """Depth results ``{"depth": (H, W) float32 metres, "kind": ...}`` per image."""
        results = []
        for index, pose in enumerate(poses):
            mask = None if masks is None else masks[index]
            depth = self.depth_one(pose["width"], pose["height"], pose, mask)
            results.append({"depth": depth, "kind": self.kind})
        return results
