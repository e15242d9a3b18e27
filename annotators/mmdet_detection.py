"""Person detection with MMDetection (e.g. YOLOX, as DWPose uses) from a config + checkpoint.

    {"name": "mmdet-detector", "weights": "/ckpt/yolox_l_8x8_300e_coco.pth",
     "options": {"config": "yolox/yolox_l_8xb8-300e_coco.py"}}

``options.config`` is a path or a path relative to the configs that ship inside mmdet. Boxes
of the ``person`` class above ``threshold`` are kept after NMS (IoU ``nms_iou``), at most
``max_people``, best first.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from annotators.base import Annotator, AnnotatorConfig, WeightsNotFoundError, to_rgb
from annotators.mmpose_stack import require_mmpose_stack

DEFAULT_OPTIONS = {"config": None, "threshold": 0.5, "nms_iou": 0.7, "max_people": 10}


def shipped_config(package: str, config: str, option_name: str = "options.config") -> str:
    """A config path as given, or relative to the ``.mim/configs`` that ship inside ``package``."""
    if os.path.isfile(config):
        return config
    package_dir = importlib.util.find_spec(package).submodule_search_locations[0]
    shipped = os.path.join(package_dir, ".mim", "configs", config)
    if os.path.isfile(shipped):
        return shipped
    raise FileNotFoundError(
        f"{package} config {config!r} is neither a file nor under {package}'s configs "
        f"({os.path.dirname(shipped)}); set {option_name}"
    )


def require_checkpoint(config: AnnotatorConfig, what: str) -> str:
    if not config.weights or not os.path.isfile(config.weights):
        raise WeightsNotFoundError(
            f"annotator {config.name!r} needs a checkpoint file: set 'weights' to the .pth of {what} "
            f"(got {config.weights!r})"
        )
    return config.weights


class MMDetPersonDetector(Annotator):
    name = "mmdet-person-detector"
    version = "3.3.0"
    modality = "detection"
    default_options = DEFAULT_OPTIONS

    def __init__(self, config: AnnotatorConfig):
        super().__init__(config)
        require_mmpose_stack(config.name, ("mmcv", "mmengine", "mmdet.apis", "mmpose.utils"))
        if not self.options["config"]:
            raise ValueError(f"annotator {config.name!r} needs options.config: an MMDetection config file")
        checkpoint = require_checkpoint(config, self.options["config"])
        from mmdet.apis import init_detector
        from mmpose.utils import adapt_mmdet_pipeline

        self.config_path = shipped_config("mmdet", self.options["config"])
        self.model = init_detector(self.config_path, checkpoint, device=config.device)
        self.model.cfg = adapt_mmdet_pipeline(self.model.cfg)  # accept in-memory arrays
        classes = [name.lower() for name in self.model.dataset_meta["classes"]]
        if "person" not in classes:
            raise ValueError(f"{self.config_path} has no 'person' class (classes: {classes[:10]}...)")
        self.person_label = classes.index("person")

    @property
    def weights_id(self) -> str:
        return f"{os.path.basename(self.config_path)}:{self.config.weights}"

    def detect_one(self, rgb: np.ndarray) -> dict:
        from mmdet.apis import inference_detector
        from mmpose.evaluation.functional import nms

        # MMDetection models take BGR arrays (their preprocessor converts to RGB).
        found = inference_detector(self.model, np.ascontiguousarray(rgb[..., ::-1])).pred_instances.cpu().numpy()
        keep = (found.labels == self.person_label) & (found.scores > self.options["threshold"])
        boxes = np.concatenate([found.bboxes[keep], found.scores[keep, None]], axis=1).astype(np.float32)
        if len(boxes):
            boxes = boxes[nms(boxes, self.options["nms_iou"])]
        boxes = boxes[np.argsort(-boxes[:, 4], kind="stable")][: self.options["max_people"]]
        height, width = rgb.shape[:2]
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
        return {"boxes": boxes[:, :4], "scores": boxes[:, 4]}

    def __call__(self, images: list) -> list[dict]:
        """Per image: ``{"boxes": (N, 4) x0 y0 x1 y1 pixels, "scores": (N,)}``, best first."""
        return [self.detect_one(to_rgb(image)) for image in images]
