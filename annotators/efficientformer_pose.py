"""A student pose annotator: an EfficientFormerV2 keypoint model distilled from the job's own pose
teacher (``hyperhuman distill annotator``, :mod:`distill.annotator_student`), run by onnxruntime.

``efficientformer-pose`` is top-down like ``movenet-pose``: a box source proposes people, and the
student finds the 17 COCO keypoints of each on a crop around its box. Boxes come from a detection
stage of the job (``boxes``) when it has one, else from option ``box_source``, any registered
annotator that returns person boxes (default: MoveNet MultiPose alone at a long side of 160 px,
``movenet-person-boxes`` with ``thunder: false``, under half the cost of MultiPose at the
teacher's 256 px; the student only needs its boxes, not its keypoints). A person's score is the geometric
mean of the student's mean keypoint score and the box's score, as ``movenet-pose`` rescores.

The crop: the box, widened or heightened to the model's input aspect ratio, enlarged by the
``crop_padding`` the student was trained with, warped to the input size (:func:`crop_matrix`,
:func:`warp_crop`). The model outputs heatmap logits, one map per joint at ``heatmap_stride``: a
spatial softmax of a map says where the joint is, its log-sum-exp whether it is there. A joint is
the map's peak, refined to a fraction of a cell by a parabola through the logits of three
neighbouring cells (exact for a Gaussian), and its score is ``sigmoid(logsumexp(map) − log(cells))``
(:func:`decode_heatmaps`; :mod:`distill.annotator_student.train` trains both). The same functions
cut the training crops, so training and inference see the same geometry.

Weights: ``weights`` names the ONNX file or the run folder holding ``student.onnx``. The ONNX file
carries what the annotator needs to know in its metadata (``hyperhuman_pose_student``: input size,
heatmap stride, crop padding, the teacher it was distilled from); its input is float32 RGB
``[N, 3, H, W]`` in 0..255 (normalisation is inside the model), its output heatmap logits
``[N, 17, H / stride, W / stride]``. Keypoints are in continuous pixel coordinates of the image
(:mod:`shards.keypoints`).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import cv2
import numpy as np

from annotators.base import Annotator, AnnotatorConfig, WeightsNotFoundError, keypoints_in_image, to_rgb
from shards.keypoints import NUM_COCO17

ONNX_FILE = "student.onnx"
METADATA_KEY = "hyperhuman_pose_student"
TRAIN_HINT = (
    "train one with `hyperhuman distill annotator --config distill/pose-student` (it writes OUTPUT/student.onnx), "
    "then set the annotator's 'weights' to that run folder or ONNX file"
)

DEFAULT_OPTIONS = {
    # person boxes when the job has no detection stage: an annotator config whose output is
    # {"boxes", "scores"} per image (modality "detection")
    "box_source": {"name": "movenet-person-boxes", "options": {"thunder": False, "multipose_size": 160}},
    "min_person_score": 0.2,  # people reported: mean keypoint score ≥ this
    "max_people": 10,  # report up to this many, best first
    "num_threads": 1,  # onnxruntime intra-op threads (one annotator actor = one core)
    # An annotator config built instead when the student's ONNX file is missing, with a logged
    # warning (e.g. {name: movenet-pose}); None: raise WeightsNotFoundError.
    "fallback": None,
}


# -- crop geometry (shared with the training crops of distill.annotator_student.data) ------------


def box_region(box, aspect: float, padding: float) -> tuple[np.ndarray, np.ndarray]:
    """The crop region of a person box ``(x0, y0, x1, y1)``: its centre and ``(width, height)``,
    the box grown to the ``aspect`` (width / height) of the model input, then by ``padding``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    width, height = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    if width > aspect * height:
        height = width / aspect
    else:
        width = height * aspect
    return np.array([(x0 + x1) / 2, (y0 + y1) / 2]), np.array([width, height]) * padding


def crop_matrix(center, region, input_size, rotation_deg: float = 0.0, flip: bool = False) -> np.ndarray:
    """The 2×3 affine map from image to model-input coordinates (continuous pixels) of a crop of
    ``region = (width, height)`` image pixels about ``center``, rotated by ``rotation_deg`` (the
    person turns counter-clockwise in the crop) and mirrored when ``flip``, onto ``input_size =
    (height, width)``."""
    out_h, out_w = input_size
    scale_x, scale_y = out_w / float(region[0]), out_h / float(region[1])
    angle = math.radians(rotation_deg)
    cos, sin = math.cos(angle), math.sin(angle)
    rotate = np.array([[cos, sin], [-sin, cos]])  # image y points down: this turns the picture counter-clockwise
    linear = np.diag([-scale_x if flip else scale_x, scale_y]) @ rotate
    offset = np.array([out_w / 2, out_h / 2]) - linear @ np.asarray(center, dtype=np.float64)
    return np.concatenate([linear, offset[:, None]], axis=1)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Keypoints ``(..., 2+)`` (x, y first) through a 2×3 affine ``matrix``; other columns kept."""
    points = np.array(points, dtype=np.float32, copy=True)
    xy = points[..., :2].astype(np.float64)
    points[..., :2] = xy @ matrix[:, :2].T + matrix[:, 2]
    return points


def invert_matrix(matrix: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))


def warp_crop(rgb: np.ndarray, matrix: np.ndarray, input_size) -> np.ndarray:
    """The crop the 2×3 ``matrix`` (image → input, continuous pixels) describes, ``(H, W, 3)``
    float32 in 0..255, zeros beyond the image. A crop that shrinks the image more than twofold is
    cut from a copy first shrunk with area averaging, so the crop does not alias."""
    out_h, out_w = input_size
    matrix = np.asarray(matrix, dtype=np.float64)
    shrink = math.sqrt(abs(np.linalg.det(matrix[:, :2])))
    if shrink < 0.5:
        factor = 2 * shrink  # area-average down to twice the crop's resolution
        height, width = rgb.shape[:2]
        small = cv2.resize(rgb, (max(1, round(width * factor)), max(1, round(height * factor))),
                           interpolation=cv2.INTER_AREA)  # fmt: skip
        exact = np.diag([small.shape[1] / width, small.shape[0] / height])  # the rounded sizes' own factors
        matrix = np.concatenate([matrix[:, :2] @ np.linalg.inv(exact), matrix[:, 2:]], axis=1)
        rgb = small
    # cv2 maps pixel indices (centres at integers); ours are continuous (centres at i + 0.5)
    index_matrix = matrix.copy()
    index_matrix[:, 2] = matrix[:, 2] + matrix[:, :2] @ np.array([0.5, 0.5]) - 0.5
    crop = cv2.warpAffine(rgb, index_matrix, (out_w, out_h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))  # fmt: skip
    return crop.astype(np.float32)


# -- heatmaps → keypoints ------------------------------------------------------------------------


def presence(logits: np.ndarray) -> np.ndarray:
    """``sigmoid(logsumexp(map) − log(cells))`` of heatmap logits ``(..., h, w)``: 0.5 for a flat
    map of zeros (an untrained model), towards 1 as the map's mass grows."""
    logits = np.asarray(logits, dtype=np.float64)
    peak = logits.max(axis=(-2, -1))
    total = peak + np.log(np.exp(logits - peak[..., None, None]).sum(axis=(-2, -1)))
    return 1.0 / (1.0 + np.exp(np.log(logits.shape[-2] * logits.shape[-1]) - total))


def decode_heatmaps(logits: np.ndarray, stride: int) -> np.ndarray:
    """Heatmap logits ``(N, K, h, w)`` → keypoints ``(N, K, 3)``: x, y in model-input pixels (cell
    ``j`` covers input pixels ``[j·stride, (j+1)·stride)``) and the score :func:`presence`. The
    peak is refined per axis by the parabola through the logits of three neighbouring cells (exact
    for a Gaussian; at the map's edge the three innermost), within half a cell of the peak."""
    logits = np.asarray(logits, dtype=np.float32)
    count, joints, height, width = logits.shape
    peak = logits.reshape(count, joints, -1).argmax(axis=2)
    rows, cols = np.divmod(peak, width)
    n, k = np.meshgrid(np.arange(count), np.arange(joints), indexing="ij")

    def refine(index, size, sample):
        """The sub-cell position along one axis; ``sample(i)`` reads the logits at index ``i``."""
        if size < 3:
            return index.astype(np.float64)
        middle = np.clip(index, 1, size - 2)
        before, centre, after = sample(middle - 1), sample(middle), sample(middle + 1)
        curvature = before - 2 * centre + after
        vertex = middle + 0.5 * (before - after) / np.where(curvature < 0, curvature, -1.0)
        return np.where(curvature < 0, np.clip(vertex, index - 0.5, index + 0.5), index)

    x = (refine(cols, width, lambda i: logits[n, k, rows, i]) + 0.5) * stride
    y = (refine(rows, height, lambda i: logits[n, k, i, cols]) + 0.5) * stride
    return np.stack([x, y, presence(logits)], axis=2).astype(np.float32)


# -- weights -------------------------------------------------------------------------------------


def onnx_path(weights: str | None) -> Path:
    """The student's ONNX file named by ``weights``: the file itself or ``student.onnx`` in a run folder."""
    if not weights:
        raise WeightsNotFoundError(
            f"efficientformer-pose needs 'weights' (a student ONNX file or run folder); {TRAIN_HINT}"
        )
    path = Path(weights)
    path = path / ONNX_FILE if path.is_dir() else path
    if not path.is_file():
        raise WeightsNotFoundError(f"efficientformer-pose weights {str(path)!r} do not exist; {TRAIN_HINT}")
    return path


def read_metadata(session) -> dict:
    """The student's settings stored in its ONNX file (see :mod:`distill.annotator_student.export`)."""
    found = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if found is None:
        raise WeightsNotFoundError(
            f"the ONNX file has no {METADATA_KEY!r} metadata: it was not exported by "
            f"distill.annotator_student.export; {TRAIN_HINT}"
        )
    return json.loads(found)


class EfficientFormerPose(Annotator):
    """Top-down COCO-17 pose: person boxes → the EfficientFormerV2 student on each crop."""

    name = "efficientformer-pose"
    version = "1"
    modality = "pose"
    inputs = ("boxes",)
    default_options = DEFAULT_OPTIONS

    @classmethod
    def missing_weights(cls, config: AnnotatorConfig) -> str | None:
        try:
            onnx_path(config.weights)
        except WeightsNotFoundError as missing:
            return str(missing)
        return None

    def __init__(self, config: AnnotatorConfig):
        super().__init__(config)
        import onnxruntime

        path = onnx_path(config.weights)
        session_options = onnxruntime.SessionOptions()
        session_options.intra_op_num_threads = int(self.options["num_threads"])
        session_options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])
        self.metadata = read_metadata(self._session)
        if self.metadata.get("num_keypoints") != NUM_COCO17:
            raise ValueError(
                f"{path} predicts {self.metadata.get('num_keypoints')} keypoints; efficientformer-pose reports "
                f"COCO-17 ({NUM_COCO17}): export a student with model.num_keypoints={NUM_COCO17}"
            )
        self.input_size = tuple(self.metadata["input_size"])
        self._sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        self._path = path
        self._box_source = None  # built on first use: a job with a detection stage never needs it

    @property
    def weights_id(self) -> str:
        return f"{self._path.name} sha256:{self._sha256[:12]} (student of {self.metadata.get('teacher', '?')})"

    def boxes_for(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._box_source is None:
            from annotators.registry import build_annotator

            self._box_source = build_annotator(self.options["box_source"])
        found = self._box_source([rgb])[0]
        return np.asarray(found["boxes"], dtype=np.float32).reshape(-1, 4), np.asarray(found["scores"], np.float32)

    def estimate(self, rgb: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
        """Keypoints ``(17, 3)`` in image pixels for each box, from one batch of crops."""
        if not len(boxes):
            return []
        height, width = self.input_size
        matrices = [
            crop_matrix(*box_region(box, width / height, self.metadata["crop_padding"]), self.input_size)
            for box in boxes
        ]
        crops = np.stack([warp_crop(rgb, matrix, self.input_size) for matrix in matrices]).transpose(0, 3, 1, 2)
        session = self._session
        heatmaps = session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(crops)})[0]
        in_input = decode_heatmaps(heatmaps, self.metadata["heatmap_stride"])
        return [
            transform_points(points, invert_matrix(matrix)) for points, matrix in zip(in_input, matrices, strict=True)
        ]

    def annotate_one(self, image, boxes=None) -> dict:
        rgb = to_rgb(image)
        height, width = rgb.shape[:2]
        if boxes is None:
            boxes, box_scores = self.boxes_for(rgb)
        else:
            boxes, box_scores = np.asarray(boxes, dtype=np.float32).reshape(-1, 4), None
        people = []
        for index, keypoints in enumerate(self.estimate(rgb, boxes)):
            keypoints = keypoints_in_image(keypoints, width, height)
            score = float(keypoints[:, 2].mean())
            if score < self.options["min_person_score"]:
                continue
            if box_scores is not None:  # top-down rescoring, as movenet-pose
                score = math.sqrt(score * float(box_scores[index]))
            x0, y0, x1, y1 = (float(v) for v in boxes[index])
            bbox = [
                min(max(x0, 0.0), width),
                min(max(y0, 0.0), height),
                min(max(x1, 0.0), width),
                min(max(y1, 0.0), height),
            ]
            people.append({"bbox": bbox, "score": score, "keypoints": keypoints.astype(np.float32)})
        people.sort(key=lambda person: -person["score"])
        return {"width": width, "height": height, "people": people[: self.options["max_people"]]}

    def __call__(self, images: list, boxes: list | None = None) -> list[dict]:
        """Pose annotations (shard schema) for each image; ``boxes[i]`` are optional person boxes."""
        return [self.annotate_one(image, None if boxes is None else boxes[i]) for i, image in enumerate(images)]
