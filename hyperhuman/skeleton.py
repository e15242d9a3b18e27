"""The skeleton renderer: how a pose annotation becomes the pose condition of the LSDM and the SGR.

It is part of the models' input contract, not only a visualisation: a model learns the pictures
this renderer draws, so a model trained on one drawing and sampled with another sees inputs it
never saw. :data:`RENDERER_VERSION` names the drawing; the training recipes record it in the model
configs (``pose_renderer``) and the pipelines warn when they render with another one. Any change
to what is drawn (colours, widths, thresholds, limb set) must bump the version;
``tests/hyperhuman/test_skeleton.py`` pins each version's pixels.

The drawing follows ControlNet's OpenPose drawing (``draw_bodypose``): black background; COCO-17
is converted to OpenPose-18 (neck = mean of the shoulders); the 17 limbs are filled ellipses of
width ``stick_width`` in the OpenPose limb colours at 60% intensity; joints are filled circles of
radius ``stick_width`` in the joint colours. Joints with score below ``threshold`` and limbs
touching them are not drawn. Whole-body hands are drawn as OpenPose hand skeletons (HSV-coloured
edges, red joints) and face points as white dots. The output depends only on the keypoints and
the canvas size (no antialiasing, no randomness).
"""

from __future__ import annotations

import colorsys
import logging
import math

import cv2
import numpy as np

from shards.keypoints import coco17_to_openpose18

logger = logging.getLogger(__name__)

# The drawing's name: bump it with any change to what render_pose draws.
RENDERER_VERSION = "openpose18-controlnet-v1"

# OpenPose-18 limbs (0-based joint pairs) and colours, as in ControlNet's annotator/openpose.
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
# Joints scored below this are not drawn: the LSDM never sees them, so eval does not score them.
SCORE_THRESHOLD = 0.3
HAND_EDGES = tuple((0 if i % 4 == 0 else i, i + 1) for i in range(20))
_WHOLEBODY_LEFT_HAND, _WHOLEBODY_RIGHT_HAND, _WHOLEBODY_FACE = (91, 112), (112, 133), (23, 91)


def _limb(canvas: np.ndarray, a: np.ndarray, b: np.ndarray, color, width: int) -> None:
    center = (int(round((a[0] + b[0]) / 2)), int(round((a[1] + b[1]) / 2)))
    length = float(np.hypot(a[0] - b[0], a[1] - b[1]))
    angle = math.degrees(math.atan2(a[1] - b[1], a[0] - b[0]))
    polygon = cv2.ellipse2Poly(center, (int(length / 2), width), int(angle), 0, 360, 1)
    cv2.fillConvexPoly(canvas, polygon, tuple(int(c * 0.6) for c in color))


def draw_body(canvas: np.ndarray, keypoints: np.ndarray, threshold: float, stick_width: int) -> None:
    joints = coco17_to_openpose18(keypoints)
    for index, (i, j) in enumerate(LIMBS):
        if joints[i, 2] >= threshold and joints[j, 2] >= threshold:
            _limb(canvas, joints[i], joints[j], COLORS[index], stick_width)
    for index, (x, y, score) in enumerate(joints):
        if score >= threshold:
            cv2.circle(canvas, (int(round(x)), int(round(y))), stick_width, COLORS[index], thickness=-1)


def draw_hand(canvas: np.ndarray, hand: np.ndarray, threshold: float, width: int) -> None:
    for index, (i, j) in enumerate(HAND_EDGES):
        if hand[i, 2] >= threshold and hand[j, 2] >= threshold:
            r, g, b = colorsys.hsv_to_rgb(index / len(HAND_EDGES), 1.0, 1.0)
            start = (int(round(hand[i, 0])), int(round(hand[i, 1])))
            end = (int(round(hand[j, 0])), int(round(hand[j, 1])))
            cv2.line(canvas, start, end, (int(r * 255), int(g * 255), int(b * 255)), thickness=width)
    for x, y, score in hand:
        if score >= threshold:
            cv2.circle(canvas, (int(round(x)), int(round(y))), width + 1, (255, 0, 0), thickness=-1)


def render_pose(
    pose: dict,
    *,
    threshold: float = SCORE_THRESHOLD,
    stick_width: int | None = None,
    wholebody: bool = True,
) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)`` skeleton image of a pose annotation (shard schema).

    ``stick_width`` defaults to 4 px at 512 px and scales with the canvas' shorter side.
    """
    width, height = int(pose["width"]), int(pose["height"])
    if stick_width is None:
        stick_width = max(1, round(4 * min(width, height) / 512))
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for person in pose["people"]:
        draw_body(canvas, np.asarray(person["keypoints"], dtype=np.float32), threshold, stick_width)
        if wholebody and person.get("wholebody") is not None:
            points = np.asarray(person["wholebody"], dtype=np.float32)
            for start, end in (_WHOLEBODY_LEFT_HAND, _WHOLEBODY_RIGHT_HAND):
                draw_hand(canvas, points[start:end], threshold, max(1, stick_width // 2))
            for x, y, score in points[_WHOLEBODY_FACE[0] : _WHOLEBODY_FACE[1]]:
                if score >= threshold:
                    cv2.circle(canvas, (int(round(x)), int(round(y))), max(1, stick_width // 2), (255, 255, 255), -1)
    return canvas


def check_renderer_version(trained_with: str | None, model: str) -> None:
    """Warn when ``model`` was trained on pose renders of another :data:`RENDERER_VERSION`
    (``None``: a model saved before versions were recorded; nothing to compare)."""
    if trained_with is not None and trained_with != RENDERER_VERSION:
        logger.warning(
            "%s was trained on skeletons drawn by renderer %r but this code draws %r: its pose conditions "
            "differ from the ones it learnt. Pass a skeleton image rendered the old way, or retrain.",
            model,
            trained_with,
            RENDERER_VERSION,
        )
