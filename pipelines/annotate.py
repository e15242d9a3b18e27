"""The annotate stage: one image in, one annotated HumanVerse :class:`~shards.Sample` out.

It runs the annotators named in the config (``configs/annotate/offline.yaml``), one per modality,
in dependency order (pose and mask first; the derived depth needs them; normals need depth),
and records each annotator's provenance in the sample. The Ray Data job wraps this in an
actor so models load once per worker.

One bad image never costs its batch: an annotator that raises on a batch has the batch rerun
image by image, and the image it still raises on becomes a :class:`Failure` naming the annotator
and the exception. Resource errors (out of memory, no space, no file handles) are not the image's
fault: they raise :class:`ResourceError`, so the job retries the whole partition instead.
"""

from __future__ import annotations

import errno
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


@dataclass(frozen=True)
class Failure:
    """An image an annotator raised on (``reason``: which annotator, which exception)."""

    reason: str


class AnnotatorError(Exception):
    """An annotator raised (or returned the wrong number of results) on a batch."""

    def __init__(self, name: str, error: BaseException):
        message = " ".join(str(error).split())[:300]
        super().__init__(f"annotator {name!r} raised {type(error).__name__}: {message}")


class ResourceError(Exception):
    """The machine ran out of something (memory, disk, file handles): retry elsewhere or later,
    never blame the image."""


RESOURCE_ERRNOS = {errno.ENOMEM, errno.ENOSPC, errno.EMFILE, errno.ENFILE}


def is_resource_error(error: BaseException) -> bool:
    """MemoryError, a framework's out-of-memory error (torch's ``OutOfMemoryError``, "CUDA out of
    memory"), or an OSError for lack of memory, disk space or file handles."""
    if isinstance(error, (MemoryError, ResourceError)):
        return True
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(error).__mro__):
        return True
    if isinstance(error, OSError):
        return error.errno in RESOURCE_ERRNOS
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


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
    ) -> list[Sample | Rejection | Failure]:
        """Annotate a batch. ``select(index, pose, mask)`` may return a :class:`Rejection` after
        the people stages (detection, pose, mask); rejected images skip the other annotators.
        A batch an annotator raises on is rerun image by image: only the images it still raises
        on become :class:`Failure`. Resource errors raise :class:`ResourceError`."""
        try:
            return self._annotate(keys, images, captions, sources, select)
        except AnnotatorError as error:
            if len(images) == 1:
                return [Failure(str(error))]
        results: list[Sample | Rejection | Failure] = []
        for index in range(len(images)):
            one = slice(index, index + 1)
            select_one = None if select is None else (lambda _, pose, mask, index=index: select(index, pose, mask))
            try:
                results += self._annotate(keys[one], images[one], captions[one], sources[one], select_one)
            except AnnotatorError as error:
                results.append(Failure(str(error)))
        return results

    def _run(self, annotator, images: list, inputs: dict) -> list:
        """One annotator on a batch; its exceptions become AnnotatorError or ResourceError."""
        try:
            outputs = annotator(images, **inputs)
            if len(outputs) != len(images):
                raise ValueError(f"returned {len(outputs)} results for {len(images)} images")
        except Exception as error:
            if is_resource_error(error):
                raise ResourceError(str(AnnotatorError(annotator.config.name, error))) from error
            raise AnnotatorError(annotator.config.name, error) from error
        return outputs

    def _annotate(self, keys, images, captions, sources, select) -> list[Sample | Rejection]:
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
            outputs[modality] = self._run(annotator, [rgb[index] for index in kept], inputs)
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
