"""OpenPose (body, optional hands and face) via controlnet-aux, from a local weights directory.

The directory holds the ControlNet annotator checkpoints under their usual names:
``body_pose_model.pth`` (required), ``hand_pose_model.pth`` (``options.hands``) and
``facenet.pth`` (``options.face``), e.g. from ``lllyasviel/Annotators``. OpenPose-18 bodies
become COCO-17 (the neck is dropped); with hands/face, ``wholebody`` (COCO-WholeBody-133) holds
the body, 21 points per hand and the first 68 of OpenPose's 70 face points; feet are not
predicted (score 0).
"""

from __future__ import annotations

import os

import numpy as np

from annotators.base import (
    Annotator,
    AnnotatorConfig,
    WeightsNotFoundError,
    keypoints_in_image,
    resolve_weights,
    to_rgb,
)
from shards.keypoints import NUM_COCO17, NUM_WHOLEBODY, openpose18_to_coco17

DEFAULT_OPTIONS = {"hands": False, "face": False}
FILES = {"body": "body_pose_model.pth", "hands": "hand_pose_model.pth", "face": "facenet.pth"}


def body_to_person(body, width: int, height: int) -> dict:
    """controlnet-aux ``BodyResult`` (OpenPose-18 keypoints in pixels, None when missing) → a
    shard-schema person."""
    openpose = np.zeros((18, 3), dtype=np.float32)
    for index, keypoint in enumerate(body.keypoints[:18]):
        if keypoint is not None:
            openpose[index] = (keypoint.x, keypoint.y, keypoint.score)
    keypoints = keypoints_in_image(openpose18_to_coco17(openpose), width, height)
    visible = keypoints[keypoints[:, 2] > 0, :2]
    if len(visible):
        (x0, y0), (x1, y1) = visible.min(0), visible.max(0)
        bbox = [float(x0), float(y0), float(x1), float(y1)]
    else:
        bbox = [0.0, 0.0, float(width), float(height)]
    score = float(body.total_score / max(body.total_parts, 1)) if body.total_parts else 0.0
    return {"bbox": bbox, "score": min(max(score, 0.0), 1.0), "keypoints": keypoints}


def part_points(points, width: int, height: int, count: int) -> np.ndarray:
    """Hand/face keypoints (normalised x, y; -1 when missing) → ``(count, 3)`` pixels."""
    out = np.zeros((count, 3), dtype=np.float32)
    for index, keypoint in enumerate((points or [])[:count]):
        if keypoint.x >= 0 and keypoint.y >= 0:
            out[index] = (keypoint.x * width, keypoint.y * height, 1.0)
    return out


class ControlNetAuxOpenPose(Annotator):
    name = "controlnet-aux-openpose"
    version = "0.0.10"
    modality = "pose"
    default_options = DEFAULT_OPTIONS

    def __init__(self, config: AnnotatorConfig):
        super().__init__(config)
        directory = resolve_weights(config, allow_patterns=list(FILES.values()))
        needed = ["body"] + [part for part in ("hands", "face") if self.options[part]]
        for part in needed:
            if not os.path.isfile(os.path.join(directory, FILES[part])):
                raise WeightsNotFoundError(
                    f"annotator {config.name!r}: {FILES[part]} is missing from {directory}; set 'weights' to a "
                    f"directory with the ControlNet annotator checkpoints (or turn options.{part} off)"
                )
        from controlnet_aux.open_pose import OpenposeDetector
        from controlnet_aux.open_pose.body import Body
        from controlnet_aux.open_pose.face import Face
        from controlnet_aux.open_pose.hand import Hand

        def load(part: str, cls):
            if part != "body" and not self.options[part]:
                return None
            return cls(os.path.join(directory, FILES[part])).to(config.device)

        # OpenposeDetector.to() assumes all three networks; move each one ourselves instead
        self.detector = OpenposeDetector(load("body", Body), load("hands", Hand), load("face", Face))

    def annotate_one(self, rgb: np.ndarray) -> dict:
        import torch

        height, width = rgb.shape[:2]
        bgr = np.ascontiguousarray(rgb[..., ::-1])  # the OpenPose networks take BGR
        with torch.no_grad():
            candidate, subset = self.detector.body_estimation(bgr)
            bodies = self.detector.body_estimation.format_body_result(candidate, subset)
            people = []
            for body in bodies:
                person = body_to_person(body, width, height)
                if self.options["hands"] or self.options["face"]:
                    wholebody = np.zeros((NUM_WHOLEBODY, 3), dtype=np.float32)
                    wholebody[:NUM_COCO17] = person["keypoints"]
                    if self.options["hands"]:
                        left, right = self.detector.detect_hands(body, bgr)
                        wholebody[91:112] = part_points(left, width, height, 21)
                        wholebody[112:133] = part_points(right, width, height, 21)
                    if self.options["face"]:
                        wholebody[23:91] = part_points(self.detector.detect_face(body, bgr), width, height, 68)
                    person["wholebody"] = keypoints_in_image(wholebody, width, height)
                people.append(person)
        people.sort(key=lambda person: -person["score"])
        return {"width": width, "height": height, "people": people}

    def __call__(self, images: list) -> list[dict]:
        return [self.annotate_one(to_rgb(image)) for image in images]
