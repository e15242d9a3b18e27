"""Keypoint layouts used in the shards and conversions between them.

Keypoints are stored in pixels of the stored image as ``[x, y, score]`` rows, with continuous
coordinates: pixel column ``i`` covers ``[i, i + 1)``. A keypoint with score 0 is "not
detected"; its x and y carry no meaning.

Layouts:
- COCO-17: the body layout of every sample (``COCO17_NAMES``).
- COCO-WholeBody 133: body 0-16 (= COCO-17), feet 17-22, face 23-90 (68 points, iBUG/300W
  order), left hand 91-111, right hand 112-132 (21 points each, OpenPose hand order).
- OpenPose-18: the layout ControlNet-style skeleton renderers use; derived from COCO-17 with
  the neck as the mean of the shoulders (scored by the weaker shoulder).
"""

from __future__ import annotations

import numpy as np

COCO17_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
COCO17_FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))

OPENPOSE18_NAMES = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist",
    "left_shoulder", "left_elbow", "left_wrist", "right_hip", "right_knee", "right_ankle",
    "left_hip", "left_knee", "left_ankle", "right_eye", "left_eye", "right_ear", "left_ear",
)  # fmt: skip
# For every OpenPose-18 joint, its COCO-17 index (None for the neck, which COCO lacks).
OPENPOSE18_FROM_COCO17 = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)

NUM_COCO17 = 17
NUM_WHOLEBODY = 133
_FEET = (17, 23)
_FACE = (23, 91)
_LEFT_HAND = (91, 112)
_RIGHT_HAND = (112, 133)

# Left/right pairs of the 68-point iBUG face layout (indices within the face block).
_FACE68_FLIP_PAIRS = (
    *((i, 16 - i) for i in range(8)),  # jaw line
    (17, 26), (18, 25), (19, 24), (20, 23), (21, 22),  # eyebrows
    (31, 35), (32, 34),  # lower nose
    (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46),  # eyes
    (48, 54), (49, 53), (50, 52), (55, 59), (56, 58),  # outer lips
    (60, 64), (61, 63), (65, 67),  # inner lips
)  # fmt: skip

WHOLEBODY_FLIP_PAIRS = (
    *COCO17_FLIP_PAIRS,
    (17, 20), (18, 21), (19, 22),  # big toe, small toe, heel
    *((_FACE[0] + a, _FACE[0] + b) for a, b in _FACE68_FLIP_PAIRS),
    *((_LEFT_HAND[0] + i, _RIGHT_HAND[0] + i) for i in range(21)),
)  # fmt: skip


def flip_permutation(num_keypoints: int) -> np.ndarray:
    """Index array that swaps left and right joints of a COCO-17 or WholeBody-133 layout."""
    pairs = {NUM_COCO17: COCO17_FLIP_PAIRS, NUM_WHOLEBODY: WHOLEBODY_FLIP_PAIRS}.get(num_keypoints)
    if pairs is None:
        raise ValueError(
            f"no left/right flip table for {num_keypoints} keypoints; "
            f"expected {NUM_COCO17} (COCO-17) or {NUM_WHOLEBODY} (COCO-WholeBody)"
        )
    perm = np.arange(num_keypoints)
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return perm


def as_keypoints(keypoints, num_keypoints: int | None = None) -> np.ndarray:
    """Return keypoints as a float32 ``(K, 3)`` array, checking the shape."""
    array = np.asarray(keypoints, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != 3:
        raise ValueError(f"keypoints must be a (K, 3) array of [x, y, score], got shape {array.shape}")
    if num_keypoints is not None and array.shape[0] != num_keypoints:
        raise ValueError(f"expected {num_keypoints} keypoints, got {array.shape[0]}")
    return array


def hflip_keypoints(keypoints, image_width: float) -> np.ndarray:
    """Mirror keypoints for a horizontally flipped image and swap left/right joints."""
    array = as_keypoints(keypoints).copy()
    array[:, 0] = image_width - array[:, 0]
    return array[flip_permutation(array.shape[0])]


def coco17_to_openpose18(keypoints) -> np.ndarray:
    """COCO-17 ``(17, 3)`` → OpenPose-18 ``(18, 3)``; the neck is the mean of the shoulders."""
    coco = as_keypoints(keypoints, NUM_COCO17)
    openpose = np.zeros((18, 3), dtype=np.float32)
    for target, source in enumerate(OPENPOSE18_FROM_COCO17):
        if source is not None:
            openpose[target] = coco[source]
    left, right = coco[5], coco[6]
    neck_score = min(left[2], right[2])
    if neck_score > 0:
        openpose[1, :2] = (left[:2] + right[:2]) / 2
        openpose[1, 2] = neck_score
    return openpose


def openpose18_to_coco17(keypoints) -> np.ndarray:
    """OpenPose-18 ``(18, 3)`` → COCO-17 ``(17, 3)`` (the neck is dropped)."""
    openpose = as_keypoints(keypoints, 18)
    coco = np.zeros((NUM_COCO17, 3), dtype=np.float32)
    for source, target in enumerate(OPENPOSE18_FROM_COCO17):
        if target is not None:
            coco[target] = openpose[source]
    return coco
