"""The annotate stage: one image in, one annotated HumanVerse :class:`~shards.Sample` out.

It runs the annotators named in the config (``configs/annotators.yaml``), one per modality,
in dependency order (pose and mask first; the derived depth needs them; normals need depth),
and records each annotator's provenance in the sample. The Ray Data job wraps this in an
actor so models load once per worker.
"""

from __future__ import annotations

from annotators.base import AnnotatorConfig, to_rgb
from annotators.registry import build_annotator
from shards.sample import Sample

# Run order, and the keyword under which each output reaches later annotators (Annotator.inputs).
STAGES = (
    ("detection", "boxes"),  # optional: pose annotators then run on the detected person boxes
    ("pose", "poses"),
    ("mask", "masks"),
    ("depth", "depths"),
    ("normal", "normals"),
    ("caption", None),
)
MODALITIES = ("pose", "mask", "depth", "normal", "caption")  # required in every config


class AnnotateStage:
    """Holds one annotator per modality; call it on a batch of images."""

    def __init__(self, config: dict):
        missing = [modality for modality in MODALITIES if modality not in config]
        if missing:
            raise ValueError(f"annotator config lacks modalities {missing}; see configs/annotators.yaml")
        unknown = set(config) - {modality for modality, _ in STAGES}
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)} in the annotator config")
        self.annotators = {
            modality: build_annotator(AnnotatorConfig.from_dict(config[modality]))
            for modality, _ in STAGES
            if modality in config
        }

    def __call__(self, keys: list[str], images: list, captions: list[str | None], sources: list[str]) -> list[Sample]:
        rgb = [to_rgb(image) for image in images]
        available = {"captions": captions}  # the source captions
        outputs = {}
        for modality, output_name in STAGES:
            annotator = self.annotators.get(modality)
            if annotator is None:
                continue
            # optional inputs (person boxes when no detector is configured) are simply not passed
            inputs = {name: available[name] for name in annotator.inputs if name in available}
            outputs[modality] = annotator(rgb, **inputs)
            if output_name == "boxes":
                available["boxes"] = [detection["boxes"] for detection in outputs[modality]]
            elif output_name:
                available[output_name] = outputs[modality]
        poses, masks, depths, normals, texts = (outputs[modality] for modality in MODALITIES)
        provenance = {modality: self.annotators[modality].provenance() for modality in MODALITIES}
        samples = []
        for index, key in enumerate(keys):
            annotations = {name: dict(value) for name, value in provenance.items()}
            annotations["depth"]["kind"] = depths[index]["kind"]
            samples.append(
                Sample(
                    key=key,
                    image=images[index] if isinstance(images[index], bytes) else rgb[index],
                    caption=texts[index],
                    source=sources[index],
                    pose=poses[index],
                    depth=depths[index]["depth"],
                    normal=normals[index],
                    mask=masks[index],
                    annotations=annotations,
                    meta={"num_people": len(poses[index]["people"])},
                )
            )
        return samples
