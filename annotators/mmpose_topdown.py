"""MMPose top-down pose (RTMPose, RTMW whole-body, HRNet, ViTPose where it installs).

Built from an MMPose config and a checkpoint file:

    {"name": "mmpose", "weights": "/ckpt/rtmw-l_cocktail14-384x288.pth",
     "options": {"config": "wholebody_2d_keypoint/rtmpose/cocktail14/rtmw-l_8xb320-270e_cocktail14-384x288.py"}}

``options.config`` is a path, or a path relative to the configs that ship inside mmpose.
Top-down models need person boxes: from a detector (``boxes``), else the whole image is one
box. 17-keypoint models fill ``keypoints``; 133-keypoint (COCO-WholeBody) models fill
``wholebody`` and its first 17 points as ``keypoints``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import numpy as np

from annotators.base import Annotator, AnnotatorConfig, keypoints_in_image, to_rgb
from annotators.mmdet_detection import require_checkpoint, shipped_config
from annotators.mmpose_stack import require_mmpose_stack
from shards.keypoints import NUM_COCO17, NUM_WHOLEBODY

DEFAULT_OPTIONS = {"config": None}


def mmpose_config_path(config: str) -> str:
    return shipped_config("mmpose", config)


class MMPoseTopDown(Annotator):
    name = "mmpose-topdown"
    version = "1.3.2"
    modality = "pose"
    inputs = ("boxes",)
    default_options = DEFAULT_OPTIONS

    def __init__(self, config: AnnotatorConfig):
        super().__init__(config)
        require_mmpose_stack(config.name, ("mmcv", "mmengine", "mmpose.apis"))
        if not self.options["config"]:
            raise ValueError(f"annotator {config.name!r} needs options.config: an MMPose config file")
        checkpoint = require_checkpoint(config, self.options["config"])
        from mmpose.apis import init_model

        self.config_path = mmpose_config_path(self.options["config"])
        self.model = init_model(self.config_path, checkpoint, device=config.device)
        self.num_keypoints = int(self.model.dataset_meta["num_keypoints"])
        if self.num_keypoints not in (NUM_COCO17, NUM_WHOLEBODY):
            raise ValueError(
                f"{self.config_path} predicts {self.num_keypoints} keypoints; the shards hold COCO-17 or "
                "COCO-WholeBody-133"
            )

    @property
    def weights_id(self) -> str:
        return f"{os.path.basename(self.config_path)}:{self.config.weights}"

    def annotate_one(self, rgb: np.ndarray, boxes) -> dict:
        from mmpose.apis import inference_topdown

        height, width = rgb.shape[:2]
        boxes = np.asarray([[0, 0, width, height]] if boxes is None or len(boxes) == 0 else boxes, dtype=np.float32)
        # MMPose models take BGR arrays (their preprocessor converts to RGB).
        results = inference_topdown(self.model, np.ascontiguousarray(rgb[..., ::-1]), boxes, bbox_format="xyxy")
        people = []
        for box, result in zip(boxes, results, strict=True):
            instances = result.pred_instances
            points = np.concatenate(
                [instances.keypoints[0], np.clip(instances.keypoint_scores[0], 0, 1)[:, None]], axis=1
            ).astype(np.float32)
            points = keypoints_in_image(points, width, height)
            person = {"bbox": [float(v) for v in box], "score": float(points[:NUM_COCO17, 2].mean())}
            person["keypoints"] = points[:NUM_COCO17]
            if self.num_keypoints == NUM_WHOLEBODY:
                person["wholebody"] = points
            people.append(person)
        people.sort(key=lambda person: -person["score"])
        return {"width": width, "height": height, "people": people}

    def __call__(self, images: list, boxes: list | None = None) -> list[dict]:
        return [
            self.annotate_one(to_rgb(image), None if boxes is None else boxes[index])
            for index, image in enumerate(images)
        ]


class DWPose(MMPoseTopDown):
    """DWPose (Yang et al. 2023): RTMPose-l whole-body distilled on UBody-COCO, as ControlNet's
    DWPose preprocessor runs it. ``weights`` is ``dw-ll_ucoco_384.pth``; the config defaults to
    the one controlnet-aux ships. Pair it with a detection stage (``mmdet-detector`` with YOLOX-L
    reproduces ControlNet's preprocessor)."""

    name = "dwpose"

    def __init__(self, config: AnnotatorConfig):
        if not config.options.get("config"):
            package_dir = importlib.util.find_spec("controlnet_aux").submodule_search_locations[0]
            shipped = os.path.join(package_dir, "dwpose", "dwpose_config", "dwpose-l_384x288.py")
            config = dataclasses.replace(config, options={**config.options, "config": shipped})
        super().__init__(config)
