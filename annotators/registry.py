"""Annotators by name, so a config picks the model for each modality."""

from __future__ import annotations

import importlib

from annotators.base import Annotator, AnnotatorConfig

# name → "module:Class"; imported only when built, so unused model families cost nothing.
REGISTRY: dict[str, str] = {
    "mediapipe-pose": "annotators.mediapipe_pose:MediaPipePose",
    "mediapipe-person-boxes": "annotators.mediapipe_pose:MediaPipePersonBoxes",
    "mediapipe-selfie": "annotators.mediapipe_segmentation:MediaPipeSelfieMask",
    "pose-depth": "annotators.derived:PersonDepthFromPose",
    "depth-normal": "annotators.derived:NormalFromDepth",
    "source-caption": "annotators.caption:SourceCaption",
    "transformers-detector": "annotators.transformers_detection:TransformersPersonDetector",
    "transformers-depth": "annotators.transformers_depth:TransformersDepth",
    "mmpose": "annotators.mmpose_topdown:MMPoseTopDown",
    "dwpose": "annotators.mmpose_topdown:DWPose",
    "mmdet-detector": "annotators.mmdet_detection:MMDetPersonDetector",
    "controlnet-openpose": "annotators.controlnet_aux_openpose:ControlNetAuxOpenPose",
    "controlnet-normalbae": "annotators.controlnet_aux_normalbae:ControlNetAuxNormalBae",
    "controlnet-midas": "annotators.controlnet_aux_midas:ControlNetAuxMidas",
    "transformers-caption": "annotators.transformers_caption:TransformersCaption",
}


def register(name: str, target: str) -> None:
    """Add an annotator class (``"package.module:Class"``) under ``name``."""
    REGISTRY[name] = target


def build_annotator(config: AnnotatorConfig | dict | str) -> Annotator:
    config = config if isinstance(config, AnnotatorConfig) else AnnotatorConfig.from_dict(config)
    if config.name not in REGISTRY:
        raise ValueError(f"unknown annotator {config.name!r}; registered: {sorted(REGISTRY)}")
    module_name, class_name = REGISTRY[config.name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(config)
