"""HumanVerse's outpainting step: pad the source image, let a diffusers inpainting model fill the
padding, annotate the larger canvas, keep the labels of the source area only.

Web photos crop people at the frame, and pose estimators guess badly at a body cut by the border.
HumanVerse outpainted its images with SD-2 inpainting before annotating them and kept the labels
only inside the original area. Here the outpainter runs in the annotate actor, after the aesthetic
filter and before the people stages (:mod:`pipelines.annotate`); the stored image is the canvas.

Geometry. A ``W × H`` source gets ``round(margin · W)`` columns left and right and
``round(margin · H)`` rows above and below (``options.margin``, the same fraction of each side,
so the aspect ratio stays). The model runs on the canvas resized so its longer side is
``options.resolution`` (each side a multiple the VAE and UNet accept); its output is resized
back to the canvas and the source pixels are pasted over their area, so the source area of the
stored image is the source itself. The sample's metadata records that area as
``outpaint.box = [x0, y0, x1, y1]`` in the stored image's pixels (x1, y1 exclusive): readers
crop back with ``image[y0:y1, x0:x1]`` and subtract ``(x0, y0)`` from keypoints.

What "kept only inside the original area" means for each label (:func:`keep_inside`):

- pose: a person is kept when at least one of its COCO-17 keypoints with a score > 0 lies in
  the box; keypoints outside the box (body and whole-body) get score 0 and coordinates clamped to
  the box, the rule ``annotators.base.keypoints_in_image`` applies at an image border; the
  person's bbox is clipped to the box. People the model painted into the padding are dropped.
- mask: pixels outside the box are 0 (background).
- people filter: ``filters.min_people``/``max_people`` count the people kept, and
  ``min_person_area`` is the mask's share of the box, not of the canvas.
- caption: the captioner sees the source image, not the canvas (a caption cannot be cut to an
  area); the source caption is also the outpainting prompt unless ``options.prompt`` is set.
- depth and normal: computed on the canvas and stored for all of it. The 16-bit depth and 8-bit
  normal codecs have no "no label" value, and any constant would be a false geometry; outside
  the box they describe generated pixels. Only the box holds labels of the source photo:
  crop to it, or mask a loss with it.

``weights`` is a diffusers inpainting pipeline folder (or a hub id already in the cache) whose
UNet takes 9 input channels, e.g. ``stabilityai/stable-diffusion-2-inpainting``. Its safety
checker, if it has one, is not loaded: it would black out a canvas silently, and filtering a
dataset for content is a separate step.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
from PIL import Image

from annotators.base import Annotator, AnnotatorConfig, resolve_weights, to_rgb

DEFAULT_OPTIONS = {
    "margin": 0.25,  # fraction of the width (height) added on the left and right (top and bottom)
    "resolution": 512,  # the longer side of the canvas the model runs at (SD-2 inpainting: 512)
    "num_inference_steps": 50,
    "guidance_scale": 7.5,
    "prompt": None,  # None: each image's source caption ("" when it has none)
    "negative_prompt": None,
    "seed": 0,  # each image's noise: seed + crc32 of its pixels, so a batch equals the images one by one
}
INPAINT_CHANNELS = 9  # 4 noisy latents + 1 mask + 4 masked-image latents


def canvas_geometry(width: int, height: int, margin: float) -> tuple[int, int, list[int]]:
    """``(canvas width, canvas height, box)`` for a ``width × height`` source; ``box`` is the
    source's area in the canvas, ``[x0, y0, x1, y1]`` with x1, y1 exclusive."""
    pad_x, pad_y = round(margin * width), round(margin * height)
    return width + 2 * pad_x, height + 2 * pad_y, [pad_x, pad_y, pad_x + width, pad_y + height]


def work_size(width: int, height: int, resolution: int, multiple: int) -> tuple[int, int]:
    """The canvas resized so its longer side is about ``resolution``, each side a multiple of ``multiple``."""
    scale = resolution / max(width, height)
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (width, height))


def keep_inside(pose: dict, mask: np.ndarray, box: list[int]) -> tuple[dict, np.ndarray]:
    """The labels of an outpainted image kept only inside ``box`` (see the module's notes)."""
    x0, y0, x1, y1 = box
    people = []
    for person in pose["people"]:
        keypoints = _clamp(person["keypoints"], box)
        if not (keypoints[:, 2] > 0).any():
            continue  # nothing of this person is in the source area: painted into the padding
        bx0, by0, bx1, by1 = (float(value) for value in person["bbox"])
        kept = {**person, "keypoints": keypoints, "bbox": [max(bx0, x0), max(by0, y0), min(bx1, x1), min(by1, y1)]}
        if person.get("wholebody") is not None:
            kept["wholebody"] = _clamp(person["wholebody"], box)
        people.append(kept)
    inside = np.zeros(np.shape(mask), dtype=bool)
    inside[y0:y1, x0:x1] = True
    return {**pose, "people": people}, np.where(inside, mask, 0).astype(np.asarray(mask).dtype)


def _clamp(keypoints, box: list[int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    keypoints = np.array(keypoints, dtype=np.float32, copy=True)
    x, y = keypoints[:, 0], keypoints[:, 1]
    outside = (x < x0) | (x > x1) | (y < y0) | (y > y1)
    keypoints[outside, 2] = 0.0
    keypoints[:, 0] = np.clip(x, x0, x1)
    keypoints[:, 1] = np.clip(y, y0, y1)
    return keypoints


def load_inpainting(config: AnnotatorConfig):
    """The ``StableDiffusionInpaintPipeline`` of ``config.weights`` in ``config.dtype`` on ``config.device``."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline

    path = resolve_weights(config)
    pipeline = StableDiffusionInpaintPipeline.from_pretrained(
        path, dtype=getattr(torch, config.dtype), safety_checker=None, requires_safety_checker=False
    )
    channels = pipeline.unet.config.in_channels
    if channels != INPAINT_CHANNELS:
        raise ValueError(
            f"annotator {config.name!r}: {config.weights!r} is not an inpainting model (its UNet takes {channels} "
            f"input channels, an inpainting UNet {INPAINT_CHANNELS}); set 'weights' to e.g. "
            "stabilityai/stable-diffusion-2-inpainting"
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(config.device)


class DiffusersOutpaint(Annotator):
    """Per image: ``{"image": canvas (H', W', 3) uint8, "box": [x0, y0, x1, y1], "prompt": str}``."""

    name = "diffusers-outpaint"
    version = "1"
    modality = "outpaint"
    inputs = ("captions",)
    default_options = DEFAULT_OPTIONS

    def __init__(self, config: AnnotatorConfig):
        super().__init__(config)
        self.pipeline = load_inpainting(config)
        # Both the VAE and the UNet's down blocks halve the size: a side must divide by their
        # product (and by 8, which the pipeline checks).
        unet_factor = 2 ** (len(self.pipeline.unet.config.block_out_channels) - 1)
        self.multiple = math.lcm(8, self.pipeline.vae_scale_factor * unet_factor)

    def provenance(self) -> dict:
        settings = {key: value for key, value in self.options.items() if key not in ("prompt", "negative_prompt")}
        return {**super().provenance(), **settings}

    def __call__(self, images: list, captions: list[str | None] | None = None) -> list[dict]:
        rgb = [to_rgb(image) for image in images]
        captions = captions if captions is not None else [None] * len(rgb)
        prompts = [self.options["prompt"] if self.options["prompt"] is not None else (c or "") for c in captions]
        # Batch equal sizes only: one canvas and work size per batch, no padding between images.
        by_size: dict[tuple, list[int]] = {}
        for index, image in enumerate(rgb):
            by_size.setdefault(image.shape, []).append(index)
        results: list = [None] * len(rgb)
        for indices in by_size.values():
            for start in range(0, len(indices), self.config.batch_size):
                chunk = indices[start : start + self.config.batch_size]
                outputs = self._outpaint([rgb[i] for i in chunk], [prompts[i] for i in chunk])
                for index, output in zip(chunk, outputs, strict=True):
                    results[index] = output
        return results

    def _outpaint(self, images: list[np.ndarray], prompts: list[str]) -> list[dict]:
        import torch

        height, width = images[0].shape[:2]
        canvas_width, canvas_height, box = canvas_geometry(width, height, self.options["margin"])
        work_width, work_height = work_size(canvas_width, canvas_height, self.options["resolution"], self.multiple)
        sx, sy = work_width / canvas_width, work_height / canvas_height
        work_box = [round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy)]
        # The pipeline zeroes the masked pixels before encoding them, so the padding's fill is irrelevant.
        mask = Image.new("L", (work_width, work_height), 255)  # white: paint
        mask.paste(0, work_box)
        padded = []
        for image in images:
            canvas = Image.new("RGB", (work_width, work_height))
            size = (work_box[2] - work_box[0], work_box[3] - work_box[1])
            canvas.paste(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC), work_box[:2])
            padded.append(canvas)
        seeds = [self.options["seed"] + zlib.crc32(np.ascontiguousarray(image).tobytes()) for image in images]
        negative = self.options["negative_prompt"]
        with torch.inference_mode():
            generated = self.pipeline(
                prompt=prompts,
                negative_prompt=None if negative is None else [negative] * len(images),
                image=padded,
                mask_image=[mask] * len(images),
                height=work_height,
                width=work_width,
                num_inference_steps=self.options["num_inference_steps"],
                guidance_scale=self.options["guidance_scale"],
                generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],  # same noise on any device
                output_type="np",
            ).images
        results = []
        for image, output, prompt in zip(images, generated, prompts, strict=True):
            pixels = Image.fromarray(np.clip(np.round(output * 255), 0, 255).astype(np.uint8))
            canvas = np.array(pixels.resize((canvas_width, canvas_height), Image.Resampling.BICUBIC))
            canvas[box[1] : box[3], box[0] : box[2]] = image  # the source area is the source, exactly
            results.append({"image": canvas, "box": list(box), "prompt": prompt})
        return results
