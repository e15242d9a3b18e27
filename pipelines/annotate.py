"""The annotate stage: one image in, one annotated HumanVerse :class:`~shards.Sample` out.

It runs the annotators named in the config (``configs/annotate/offline.yaml``), one per modality,
in dependency order (pose and mask first; the derived depth needs them; normals need depth),
and records each annotator's provenance in the sample. The Ray Data job wraps this in an
actor so models load once per worker.

Two optional curation steps run first, on the source image (``configs/annotate/full.yaml``):
``aesthetic`` scores it (:mod:`annotators.aesthetic`; the score goes to the sample's metadata
and a ``screen`` callback may reject on it before anything costly runs), and ``outpaint`` pads
and outpaints it (:mod:`pipelines.outpaint`): the annotators then see the larger canvas, which is
the stored image, and the people labels are kept only inside the source's area.

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
from pipelines.outpaint import keep_inside
from shards.sample import Sample

# Run order, and the keyword under which each output reaches later annotators (Annotator.inputs).
STAGES = (
    ("aesthetic", None),  # optional: the source's aesthetic score (filters.min_aesthetic reads it)
    ("outpaint", None),  # optional: the stages below annotate the outpainted canvas
    ("detection", "boxes"),  # optional: pose annotators then run on the detected person boxes
    ("pose", "poses"),
    ("mask", "masks"),
    ("depth", "depths"),
    ("normal", "normals"),
    ("caption", None),
)
MODALITIES = ("pose", "mask", "depth", "normal", "caption")  # required in every config
CURATION = ("aesthetic", "outpaint")  # optional steps whose outputs this stage interprets itself
# Stages that see the source image even when it was outpainted: the filter judges the source, the
# outpainter extends it, and a caption describes it (a caption cannot be cut to the source's area).
SOURCE_STAGES = ("aesthetic", "outpaint", "caption")


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
        self.annotators = {}
        for modality, _ in STAGES:
            if modality not in config:
                continue
            annotator = self.annotators[modality] = build_annotator(AnnotatorConfig.from_dict(config[modality]))
            if modality in CURATION and annotator.modality != modality:  # this stage reads their outputs itself
                raise ConfigError(
                    f"annotators.{modality}.name {annotator.config.name!r} is an annotator of kind "
                    f"{annotator.modality!r}; annotators.{modality} takes kind {modality!r} "
                    "(see configs/annotate/full.yaml)"
                )

    def __call__(
        self,
        keys: list[str],
        images: list,
        captions: list[str | None],
        sources: list[str],
        select=None,
        screen=None,
    ) -> list[Sample | Rejection | Failure]:
        """Annotate a batch. ``screen(index, aesthetic_score)`` may return a :class:`Rejection`
        after the aesthetic scorer, ``select(index, pose, mask)`` after the people stages
        (detection, pose, mask); rejected images skip the steps after. A batch an annotator
        raises on is rerun image by image: only the images it still raises on become
        :class:`Failure`. Resource errors raise :class:`ResourceError`."""
        try:
            return self._annotate(keys, images, captions, sources, select, screen)
        except AnnotatorError as error:
            if len(images) == 1:
                return [Failure(str(error))]
        results: list[Sample | Rejection | Failure] = []
        for index in range(len(images)):
            one = slice(index, index + 1)
            select_one = None if select is None else (lambda _, pose, mask, index=index: select(index, pose, mask))
            screen_one = None if screen is None else (lambda _, score, index=index: screen(index, score))
            try:
                results += self._annotate(keys[one], images[one], captions[one], sources[one], select_one, screen_one)
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

    def _annotate(self, keys, images, captions, sources, select, screen) -> list[Sample | Rejection]:
        originals = [to_rgb(image) for image in images]
        rgb = list(originals)  # what the annotators see: the source, or its outpainted canvas
        # Outputs by image index, so dropping a rejected image never shifts the others.
        outputs: dict[str, dict[int, object]] = {}
        available: dict[str, dict[int, object]] = {"captions": dict(enumerate(captions))}  # the source captions
        kept = list(range(len(rgb)))
        results: list[Sample | Rejection | None] = [None] * len(rgb)
        for modality, output_name in STAGES:
            if modality == "outpaint" and screen is not None and "aesthetic" in outputs:
                # the aesthetic filter, before outpainting and the people stages spend anything on the image
                kept = self._reject(kept, results, lambda index: screen(index, outputs["aesthetic"][index]))
            if modality == "depth":
                # an outpainted image's people labels are kept only inside the source's area, then filtered
                for index, outpainted in outputs.get("outpaint", {}).items():
                    if index in kept:
                        pose, mask = keep_inside(outputs["pose"][index], outputs["mask"][index], outpainted["box"])
                        outputs["pose"][index], outputs["mask"][index] = pose, mask
                if select is not None:
                    kept = self._reject(kept, results, lambda index: select(index, *self._people(outputs, index)))
            annotator = self.annotators.get(modality)
            if annotator is None or not kept:
                continue
            # optional inputs (person boxes when no detector is configured) are simply not passed
            inputs = {name: [available[name][i] for i in kept] for name in annotator.inputs if name in available}
            seen = originals if modality in SOURCE_STAGES else rgb
            outputs[modality] = dict(zip(kept, self._run(annotator, [seen[i] for i in kept], inputs), strict=True))
            if modality == "outpaint":
                for index, outpainted in outputs["outpaint"].items():
                    rgb[index] = outpainted["image"]
            elif output_name == "boxes":
                available["boxes"] = {index: detection["boxes"] for index, detection in outputs[modality].items()}
            elif output_name:
                available[output_name] = outputs[modality]
        provenance = {modality: self.annotators[modality].provenance() for modality in MODALITIES}
        for index in kept:
            pose, depth = outputs["pose"][index], outputs["depth"][index]
            annotations = {name: dict(value) for name, value in provenance.items()}
            annotations["depth"]["kind"] = depth["kind"]
            outpainted = outputs.get("outpaint", {}).get(index)
            results[index] = Sample(
                key=keys[index],
                # the source's own bytes when it is the stored image (a JPEG is never re-compressed)
                image=images[index] if isinstance(images[index], bytes) and outpainted is None else rgb[index],
                caption=outputs["caption"][index],
                source=sources[index],
                pose=pose,
                depth=depth["depth"],
                normal=outputs["normal"][index],
                mask=outputs["mask"][index],
                annotations=annotations,
                meta={"num_people": len(pose["people"]), **self._curation_meta(outputs, index)},
            )
        return results

    @staticmethod
    def _reject(kept: list[int], results: list, rule) -> list[int]:
        """The images of ``kept`` that ``rule(index)`` does not reject; the rejections go to ``results``."""
        for index in kept:
            results[index] = rule(index)
        return [index for index in kept if results[index] is None]

    @staticmethod
    def _people(outputs: dict, index: int) -> tuple[dict, object]:
        """The pose and mask the people filter reads: of an outpainted image, the mask of the
        source's area only, so ``min_person_area`` is a share of the source, not of the canvas."""
        pose, mask = outputs["pose"][index], outputs["mask"][index]
        outpainted = outputs.get("outpaint", {}).get(index)
        if outpainted is not None:
            x0, y0, x1, y1 = outpainted["box"]
            mask = mask[y0:y1, x0:x1]
        return pose, mask

    def _curation_meta(self, outputs: dict, index: int) -> dict:
        """What the curation steps add to the sample's metadata, with their provenance."""
        meta = {}
        if "aesthetic" in outputs:
            meta["aesthetic"] = {
                "score": float(outputs["aesthetic"][index]),
                **self.annotators["aesthetic"].provenance(),
            }
        if "outpaint" in outputs:
            outpainted = outputs["outpaint"][index]
            meta["outpaint"] = {
                # the source's area in the stored image: [x0, y0, x1, y1], x1 and y1 exclusive
                "box": outpainted["box"],
                "prompt": outpainted["prompt"],
                **self.annotators["outpaint"].provenance(),
            }
        return meta
