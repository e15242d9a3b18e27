"""Annotators by name, so a config picks the model for each modality."""

from __future__ import annotations

import importlib
import logging

from annotators.base import Annotator, AnnotatorConfig

logger = logging.getLogger(__name__)

# name → "module:Class"; imported only when built, so unused model families cost nothing.
REGISTRY: dict[str, str] = {
    "mediapipe-pose": "annotators.mediapipe_pose:MediaPipePose",
    "mediapipe-person-boxes": "annotators.mediapipe_pose:MediaPipePersonBoxes",
    "movenet-pose": "annotators.movenet:MoveNetPose",
    "movenet-person-boxes": "annotators.movenet:MoveNetPersonBoxes",
    "efficientformer-pose": "annotators.efficientformer_pose:EfficientFormerPose",
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
    "laion-aesthetic": "annotators.aesthetic:LaionAesthetic",
    "diffusers-outpaint": "pipelines.outpaint:DiffusersOutpaint",
}


def register(name: str, target: str) -> None:
    """Add an annotator class (``"package.module:Class"``) under ``name``."""
    REGISTRY[name] = target


def annotator_class(name: str) -> type[Annotator]:
    if name not in REGISTRY:
        raise ValueError(f"unknown annotator {name!r}; registered: {sorted(REGISTRY)}")
    module_name, class_name = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def resolve(config: AnnotatorConfig | dict | str) -> AnnotatorConfig:
    """The annotator that runs for ``config``: itself or, when its weights are not installed here
    (:meth:`Annotator.missing_weights`) and ``options.fallback`` names another annotator, that one
    (resolved in turn), with a logged warning."""
    config = config if isinstance(config, AnnotatorConfig) else AnnotatorConfig.from_dict(config)
    fallback = config.options.get("fallback")
    if fallback is None:
        return config
    missing = annotator_class(config.name).missing_weights(config)
    if missing is None:
        return config
    fallback = AnnotatorConfig.from_dict(fallback)
    logger.warning("annotator %r falls back to %r: %s", config.name, fallback.name, missing)
    return resolve(fallback)


def build_annotator(config: AnnotatorConfig | dict | str) -> Annotator:
    config = resolve(config)
    return annotator_class(config.name)(config)
