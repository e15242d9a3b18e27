"""Offline default pose: MediaPipe BlazePose (bundled in mediapipe 0.10.21), multi-person.

BlazePose finds one person per call (the most prominent), so several people are found by
running it again with the people found so far greyed out ("erase rounds"); optionally also on
regions around faces from MediaPipe's full-range face detector and on overlapping strips. Given
person boxes from a detector, it runs on each box instead. Detections of the same person from
different calls are merged. On ../shared/data/humans this lifts COCO AP from 0.25 (one call)
to 0.33 at about 2x the time (bench/pose_accuracy.py).

Landmarks map to COCO-17 (BlazePose's left/right are the person's, as in COCO) with the
landmark visibility as score; landmarks outside the image get score 0. The 33 landmarks and
BlazePose's metric world coordinates (hip-centred, metres) are kept in ``blazepose33`` and
``world`` for annotators that build on them (the coarse person depth).
"""

from __future__ import annotations

import numpy as np

from annotators.base import Annotator, AnnotatorConfig, keypoints_in_image, person_boxes, to_rgb
from shards.keypoints import NUM_COCO17, NUM_WHOLEBODY

# BlazePose landmark index for every COCO-17 joint.
BLAZEPOSE_TO_COCO17 = (0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28)
# COCO-WholeBody feet (17-22: left big toe, small toe, heel, right ...) from BlazePose; BlazePose
# has no small toes (None: score 0).
BLAZEPOSE_TO_FEET = (31, None, 29, 32, None, 30)
# The 68 iBUG face points (COCO-WholeBody 23-90) as indices of MediaPipe's 468-point face mesh:
# jaw, eyebrows, nose bridge, lower nose, eyes, outer and inner lips.
FACEMESH_TO_FACE68 = (
    162, 234, 93, 58, 172, 136, 149, 148, 152, 377, 378, 365, 397, 288, 323, 454, 389,
    71, 63, 105, 66, 107, 336, 296, 334, 293, 301,
    168, 197, 5, 4, 75, 97, 2, 326, 305,
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,
    78, 82, 13, 312, 308, 317, 14, 87,
)  # fmt: skip

DEFAULT_OPTIONS = {
    "max_people": 5,  # report up to this many; the job's filter keeps images with 1-3
    "min_detection_confidence": 0.5,
    "min_face_confidence": 0.6,
    # How more people are found (bench/pose_accuracy.py compares these on real photos):
    "erase_rounds": 3,  # after each round, grey out the people found so far and look again
    "face_regions": False,  # also look around faces found by the face detector
    "strips": False,  # also look in overlapping left/centre/right strips of the image
    # MediaPipe Holistic instead of Pose: adds hands, face and feet in COCO-WholeBody-133
    # (``wholebody``), at ~3x the time.
    "wholebody": False,
    "region_scale": (6.0, 10.0),  # face box → person region: width, height in face sizes
    "duplicate_distance": 0.15,  # same person if median keypoint distance < this × person size
}


def _iou(a, b) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class MediaPipePose(Annotator):
    name = "mediapipe-blazepose"
    version = "0.10.21+regions1"
    modality = "pose"
    inputs = ("boxes",)
    default_options = DEFAULT_OPTIONS

    def __init__(self, config: AnnotatorConfig):
        super().__init__(config)
        import mediapipe as mp

        # model_complexity=1 is the only BlazePose landmark model bundled in the wheel (0 and 2 download).
        solution = mp.solutions.holistic.Holistic if self.options["wholebody"] else mp.solutions.pose.Pose
        self._pose = solution(
            static_image_mode=True,
            model_complexity=1,
            min_detection_confidence=self.options["min_detection_confidence"],
        )
        self._faces = mp.solutions.face_detection.FaceDetection(
            model_selection=1, min_detection_confidence=self.options["min_face_confidence"]
        )

    @property
    def weights_id(self) -> str:
        return "mediapipe-0.10.21/pose_landmark_full.tflite+face_detection_full_range_sparse.tflite"

    def close(self) -> None:
        self._pose.close()
        self._faces.close()

    # -- regions -------------------------------------------------------------------------------

    def face_regions(self, rgb: np.ndarray) -> list[tuple[float, float, float, float]]:
        height, width = rgb.shape[:2]
        result = self._faces.process(rgb)
        regions = []
        scale_w, scale_h = self.options["region_scale"]
        for detection in result.detections or []:
            box = detection.location_data.relative_bounding_box
            fx, fy, fw, fh = box.xmin * width, box.ymin * height, box.width * width, box.height * height
            cx = fx + fw / 2
            regions.append((cx - fw * scale_w / 2, fy - fh * 1.0, cx + fw * scale_w / 2, fy + fh * (scale_h - 1.0)))
        return regions

    def estimate(self, rgb: np.ndarray, region) -> dict | None:
        """BlazePose on one region (x0, y0, x1, y1) of the image → one person, or None."""
        height, width = rgb.shape[:2]
        x0, y0 = max(0, int(np.floor(region[0]))), max(0, int(np.floor(region[1])))
        x1, y1 = min(width, int(np.ceil(region[2]))), min(height, int(np.ceil(region[3])))
        if x1 - x0 < 16 or y1 - y0 < 16:
            return None
        crop = np.ascontiguousarray(rgb[y0:y1, x0:x1])
        result = self._pose.process(crop)
        if result.pose_landmarks is None:
            return None
        landmarks = np.array(
            [[lm.x * (x1 - x0) + x0, lm.y * (y1 - y0) + y0, lm.visibility] for lm in result.pose_landmarks.landmark],
            dtype=np.float32,
        )
        world = np.array([[lm.x, lm.y, lm.z] for lm in result.pose_world_landmarks.landmark], dtype=np.float32)
        keypoints = keypoints_in_image(landmarks[list(BLAZEPOSE_TO_COCO17)], width, height)
        visible = keypoints[keypoints[:, 2] > 0.3]
        if len(visible) < 3:
            return None
        (bx0, by0), (bx1, by1) = visible[:, :2].min(0), visible[:, :2].max(0)
        pad_x, pad_y = 0.1 * (bx1 - bx0) + 2, 0.1 * (by1 - by0) + 2
        bbox = [max(0.0, bx0 - pad_x), max(0.0, by0 - pad_y), min(width, bx1 + pad_x), min(height, by1 + pad_y)]
        person = {
            "bbox": [float(v) for v in bbox],
            "score": float(keypoints[:, 2].mean()),
            "keypoints": keypoints,
            "blazepose33": landmarks,
            "world": world,
        }
        if self.options["wholebody"]:
            person["wholebody"] = self.wholebody(result, landmarks, keypoints, (x0, y0, x1, y1), width, height)
        return person

    @staticmethod
    def wholebody(result, landmarks, keypoints, crop, width: int, height: int) -> np.ndarray:
        """Holistic's body, feet, face and hands → COCO-WholeBody-133 in image pixels."""
        x0, y0, x1, y1 = crop
        points = np.zeros((NUM_WHOLEBODY, 3), dtype=np.float32)
        points[:NUM_COCO17] = keypoints
        for offset, index in enumerate(BLAZEPOSE_TO_FEET):
            if index is not None:
                points[17 + offset] = landmarks[index]

        def place(start: int, parts, indices) -> None:
            if parts is None:
                return  # not found: scores stay 0
            marks = parts.landmark
            for offset, index in enumerate(indices):
                points[start + offset] = (marks[index].x * (x1 - x0) + x0, marks[index].y * (y1 - y0) + y0, 1.0)

        place(23, result.face_landmarks, FACEMESH_TO_FACE68)
        # Holistic's hands are found from the pose's wrists: left = the person's left, as in COCO.
        place(91, result.left_hand_landmarks, range(21))
        place(112, result.right_hand_landmarks, range(21))
        return keypoints_in_image(points, width, height)

    def _same_person(self, a: dict, b: dict) -> bool:
        both = (a["keypoints"][:, 2] > 0.3) & (b["keypoints"][:, 2] > 0.3)
        if both.sum() < 3:
            return _iou(a["bbox"], b["bbox"]) > 0.6
        distance = np.linalg.norm(a["keypoints"][both, :2] - b["keypoints"][both, :2], axis=1)
        size = np.sqrt(max(1.0, (a["bbox"][2] - a["bbox"][0]) * (a["bbox"][3] - a["bbox"][1])))
        return float(np.median(distance)) < self.options["duplicate_distance"] * size

    def _add_person(self, people: list[dict], person: dict | None) -> bool:
        """Add a new person, or keep the better of two detections of the same one."""
        if person is None:
            return False
        duplicate = next((i for i, kept in enumerate(people) if self._same_person(kept, person)), None)
        if duplicate is None:
            people.append(person)
            return True
        if person["score"] > people[duplicate]["score"]:
            people[duplicate] = person
        return False

    def annotate_one(self, image, boxes=None) -> dict:
        rgb = to_rgb(image)
        height, width = rgb.shape[:2]
        if boxes is not None:
            regions = []
            for x0, y0, x1, y1 in boxes:  # detector boxes, padded so the whole body is in the crop
                pad_x, pad_y = 0.15 * (x1 - x0), 0.15 * (y1 - y0)
                regions.append((x0 - pad_x, y0 - pad_y, x1 + pad_x, y1 + pad_y))
        else:
            regions = [(0, 0, width, height)]
            if self.options["face_regions"]:
                regions += self.face_regions(rgb)
            if self.options["strips"]:
                regions += [
                    (0, 0, 0.6 * width, height),
                    (0.2 * width, 0, 0.8 * width, height),
                    (0.4 * width, 0, width, height),
                ]
        people: list[dict] = []
        for region in regions:
            self._add_person(people, self.estimate(rgb, region))
        erased = rgb
        for _ in range(self.options["erase_rounds"]):
            if not people:
                break
            erased = erased.copy()
            for person in people:
                x0, y0, x1, y1 = (int(round(v)) for v in person["bbox"])
                erased[y0:y1, x0:x1] = 127
            if not self._add_person(people, self.estimate(erased, (0, 0, width, height))):
                break
        people.sort(key=lambda person: -person["score"])
        return {"width": width, "height": height, "people": people[: self.options["max_people"]]}

    def __call__(self, images: list, boxes: list | None = None) -> list[dict]:
        """Pose annotations (shard schema) for each image; ``boxes[i]`` are optional person boxes."""
        return [self.annotate_one(image, None if boxes is None else boxes[i]) for i, image in enumerate(images)]


assert len(BLAZEPOSE_TO_COCO17) == NUM_COCO17


class MediaPipePersonBoxes(MediaPipePose):
    """Offline default person detector: the boxes of the people the BlazePose search finds
    (BlazePose's own detector, run as above), scored by mean keypoint visibility."""

    name = "mediapipe-blazepose-boxes"
    modality = "detection"
    inputs = ()

    def __call__(self, images: list) -> list[dict]:
        """Per image: ``{"boxes": (N, 4) x0 y0 x1 y1 pixels, "scores": (N,)}``, best first."""
        return person_boxes(super().__call__(images))
