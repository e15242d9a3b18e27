"""The annotate stage: one image in, one annotated HumanVerse :class:`~shards.Sample` out.

It runs the annotators named in the config (``configs/annotate/offline.yaml``), one per modality,
in dependency order (pose and mask first; the derived depth needs them; normals need depth),
and records each annotator's provenance in the sample. The Ray Data job wraps this in an
actor so models load once per worker.
"""

from __future__ import annotations

from dataclasses import dataclass

from annotators.base import AnnotatorConfig, to_rgb
from annotators.registry import build_annotator
from hyperhuman.config import ConfigError
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


@dataclass(frozen=True)
class Rejection:
    rule: str
    reason: str


class AnnotateStage:
    """Holds one annotator per modality; call it on a batch of images."""

    def __init__(self, config: dict):
        missing = [modality for modality in MODALITIES if modality not in config]
        if missing:
            raise ConfigError(f"annotator config lacks modalities {missing}; see configs/annotate/offline.yaml")
        unknown = set(config) - {modality for modality, _ in STAGES}
        if unknown:
            raise ConfigError(f"unknown modalities {sorted(unknown)} in the annotator config")
        self.annotators = {
            modality: build_annotator(AnnotatorConfig.from_dict(config[modality]))
            for modality, _ in STAGES
            if modality in config
        }

    def __call__(
        self,
        keys: list[str],
        images: list,
        captions: list[str | None],
        sources: list[str],
        select=None,
    ) -> list[Sample | Rejection]:
        """Annotate a batch. ``select(index, pose, mask)`` may return a :class:`Rejection` after
        the people stages (detection, pose, mask); rejected images skip the other annotators."""
        rgb = [to_rgb(image) for image in images]
        available = {"captions": list(captions)}  # the source captions
        outputs: dict[str, list] = {}
        kept = list(range(len(rgb)))
        rejections: dict[int, Rejection] = {}
        for modality, output_name in STAGES:
            if modality == "depth" and select is not None:
                for index in list(kept):
                    position = kept.index(index)
                    rejection = select(index, outputs["pose"][position], outputs["mask"][position])
                    if rejection is not None:
                        rejections[index] = rejection
                survivors = [position for position, index in enumerate(kept) if index not in rejections]
                kept = [kept[position] for position in survivors]
                outputs = {name: [values[p] for p in survivors] for name, values in outputs.items()}
                available = {name: [values[p] for p in survivors] for name, values in available.items()}
            annotator = self.annotators.get(modality)
            if annotator is None or not kept:
                continue
            # optional inputs (person boxes when no detector is configured) are simply not passed
            inputs = {name: available[name] for name in annotator.inputs if name in available}
            outputs[modality] = annotator([rgb[index] for index in kept], **inputs)
            if output_name == "boxes":
                available["boxes"] = [detection["boxes"] for detection in outputs[modality]]
            elif output_name:
                available[output_name] = outputs[modality]
        provenance = {modality: self.annotators[modality].provenance() for modality in MODALITIES}
        results: list[Sample | Rejection] = [rejections.get(index) for index in range(len(rgb))]
        for position, index in enumerate(kept):
            pose, depth = outputs["pose"][position], outputs["depth"][position]
            annotations = {name: dict(value) for name, value in provenance.items()}
            annotations["depth"]["kind"] = depth["kind"]
            results[index] = Sample(
                key=keys[index],
                image=images[index] if isinstance(images[index], bytes) else rgb[index],
                caption=outputs["caption"][position],
                source=sources[index],
                pose=pose,
                depth=depth["depth"],
                normal=outputs["normal"][position],
                mask=outputs["mask"][position],
                annotations=annotations,
                meta={"num_people": len(pose["people"])},
            )
        return results
