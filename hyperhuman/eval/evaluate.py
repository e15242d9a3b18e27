"""``hyperhuman eval``: generate from the poses and captions of shards, score, write a gallery.

The eval set is the first ``num`` kept samples of the shards, in shard order: each one's caption
and COCO-17 pose (centre-cropped to the square eval resolution, as the training reader crops)
are the conditions, its photo (the same crop) is the reference image. Sample ``i`` is
generated with seed ``seed + i``, so a rerun gives the same images and the same numbers (with
another batch size, up to one level of rounding in a few pixels).

The pipeline generates at the eval resolution (``resolution``, default the model's own), so the
conditioning pose, the reference crop and every generated image share one pixel frame.

Scores (:mod:`hyperhuman.eval.scores`, metrics in :mod:`hyperhuman.eval.pose`, :mod:`~hyperhuman.eval.fid`,
:mod:`~hyperhuman.eval.clip`):

- pose accuracy, always: the pose annotator (the annotation job's offline default unless
  configured) runs on each generated RGB image, resized to ``pose_resolution``, and its people
  are scored against the conditioning pose with COCO OKS → AP, AP50, AP75, AR and the "clean"
  AP/AR over the 3 most salient people (the others ignored, as COCO ignores crowds); ground-truth
  joints are those the conditioning render drew; per sample, the OKS of each conditioning
  person's best match;
- FID and KID×1000 against the reference crops, when Inception weights are given
  (``inception: PATH``);
- FID_CLIP and CLIP score, when a CLIP folder is given (``clip: PATH``); feature metrics read the
  images batch by batch, and FID from fewer samples than feature dimensions comes with a warning.

A metric that cannot be computed is ``null`` in ``metrics.json`` with the reason under
``skipped``: numbers are never made up from weights we do not have.

Output (``--output``, default ``MODEL/eval``)::

    samples/KEY/{pose,rgb,depth,normal,reference}.png   generations and their conditions
    samples.jsonl     one line per sample: key, prompt, seed, images, pose_score
    metrics.json      the scores, what was skipped and why, warnings, and the settings that made them
    fingerprint.json  what determines the images (:mod:`hyperhuman.eval.fingerprint`)
    gallery/index.html

Generation resumes by key: a sample whose images all exist is not generated again, provided the
folder's fingerprint is this run's; another fingerprint is refused unless ``overwrite`` (CLI
``--overwrite``), which regenerates every sample.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from hyperhuman.config import ConfigError
from hyperhuman.eval.fingerprint import fingerprint_id, generation_fingerprint, prepare_output
from hyperhuman.eval.gallery.run import generation_gallery
from hyperhuman.eval.scores import sample_dir, score, scored_image

IMAGE_NAMES = ("pose", "rgb", "depth", "normal", "reference")
DEFAULTS = {
    "num": 16,
    "seed": 0,
    "batch_size": 4,
    "num_inference_steps": None,  # the model's own: a step-distilled student's distilled_steps, else 20
    "guidance_scale": 3.0,
    "resolution": None,
    "pose_annotator": {"name": "mediapipe-pose", "options": {"erase_rounds": 3}},
    "pose_resolution": 256,
    "inception": None,
    "clip": None,
    "feature_batch_size": 32,
    "kid_subsets": 100,
    "kid_subset_size": 1000,
    "storage_options": {},
    "refiner": None,
    "refiner_resolution": None,
    "refiner_steps": 20,
    "refiner_guidance_scale": 3.0,
}


def check_eval_config(config: dict) -> dict:
    """The ``eval`` settings with defaults filled in; a ValueError naming any bad key or value."""
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown eval keys {unknown}; known: {sorted(DEFAULTS)} (see configs/eval/default.yaml)")
    settings = {**DEFAULTS, **config}
    counts = ("num", "batch_size", "num_inference_steps", "pose_resolution", "feature_batch_size", "kid_subsets")
    models_own = ("resolution", "refiner_resolution", "num_inference_steps")  # null: the model's own
    for key in (*counts, "kid_subset_size", "refiner_steps", *models_own):
        value = settings[key]
        if value is None and key in models_own:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"eval.{key} must be a positive integer, got {value!r}")
    for key in ("inception", "clip"):
        if settings[key] and not os.path.exists(settings[key]):
            raise ConfigError(f"eval.{key}={settings[key]!r} does not exist; give a local path or null to skip")
    return settings


def pipeline_path(model: str | os.PathLike, command: str = "hyperhuman train-lsdm") -> Path:
    """A saved pipeline folder, or a training run folder holding one in ``pipeline/``."""
    model = Path(model)
    for candidate in (model, model / "pipeline"):
        if (candidate / "model_index.json").is_file():
            return candidate
    raise ConfigError(
        f"no pipeline at {str(model)!r} (no model_index.json there or in its pipeline/ folder): "
        f"train one with `{command}` and pass its output folder"
    )


def model_resolution(pipe) -> int:
    return pipe.unet.config.unet["sample_size"] * pipe.vae_scale_factor


def model_steps(pipe) -> int:
    """The step count a model samples at by default: a step-distilled student's own, else 20 (also
    for a pipeline without a UNet, such as the oracle generators of the tests)."""
    unet = getattr(pipe, "unet", None)
    return (unet.config.get("distilled_steps") if unet is not None else None) or 20


def eval_conditions(shards: str, num: int, resolution: int, storage_options: dict | None = None) -> list[dict]:
    """The first ``num`` samples of the shards as conditions: key, caption, the pose mapped into a
    centred square crop at ``resolution`` and that crop of the photo (uint8)."""
    from shards.dataset import SampleTransform, crop_keypoints
    from shards.reader import expand_urls, read_shard

    try:
        urls = expand_urls(shards, storage_options)
    except FileNotFoundError as exc:
        raise ConfigError(f"--shards {shards!r}: {exc}; make shards with `hyperhuman annotate`") from exc
    transform = SampleTransform(resolution, random_crop=False, flip_prob=0.0)
    conditions = []
    for url in urls:
        for sample in read_shard(url, storage_options=storage_options):
            image_h, image_w = sample["jpg"].shape[:2]
            box = transform.crop_box(image_w, image_h)
            x0, y0, crop_w, crop_h = box
            scale_x, scale_y = resolution / crop_w, resolution / crop_h
            people = []
            for person in sample.get("pose.json", {"people": []})["people"]:
                bx0, by0, bx1, by1 = person["bbox"]
                bbox = [(bx0 - x0) * scale_x, (by0 - y0) * scale_y, (bx1 - x0) * scale_x, (by1 - y0) * scale_y]
                bbox = np.clip(bbox, 0, resolution).tolist()
                keypoints = crop_keypoints(person["keypoints"], box, (resolution, resolution))
                people.append({"bbox": bbox, "score": person.get("score", 1.0), "keypoints": keypoints.tolist()})
            reference = transform(sample)["pixel_values"]
            conditions.append(
                {
                    "key": sample["__key__"],
                    "caption": sample.get("txt", ""),
                    "pose": {"width": resolution, "height": resolution, "people": people},
                    "reference": ((reference.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy(),
                }
            )
            if len(conditions) == num:
                return conditions
    if not conditions:
        raise ConfigError(f"--shards {shards!r} holds no samples; make shards with `hyperhuman annotate`")
    return conditions


def image_names(settings: dict) -> tuple[str, ...]:
    return (*IMAGE_NAMES[:-1], "refined", IMAGE_NAMES[-1]) if settings["refiner"] else IMAGE_NAMES


def generate(pipe, conditions: list[dict], output: Path, settings: dict) -> int:
    """Generate every condition whose images are not all on disk yet; returns how many were made."""
    names = image_names(settings)
    todo = [
        (index, condition)
        for index, condition in enumerate(conditions)
        if not all((sample_dir(output, condition["key"]) / f"{name}.png").is_file() for name in names)
    ]
    for start in range(0, len(todo), settings["batch_size"]):
        chunk = todo[start : start + settings["batch_size"]]
        generators = [torch.Generator().manual_seed(settings["seed"] + index) for index, _ in chunk]
        prompts = [condition["caption"] for _, condition in chunk]
        # at the eval resolution: the pixels of the conditioning pose and the reference crop
        common = {
            "pose": [condition["pose"] for _, condition in chunk],
            "height": settings["resolution"],
            "width": settings["resolution"],
            "generator": generators,
        }
        if settings["refiner"]:  # pipe is a TwoStagePipeline: stage 1 at the LSDM's size, refined at ours
            two_stage = pipe(
                prompts,
                stage1_steps=settings["num_inference_steps"],
                stage2_steps=settings["refiner_steps"],
                stage1_guidance_scale=settings["guidance_scale"],
                stage2_guidance_scale=settings["refiner_guidance_scale"],
                **common,
            )
            result, refined = two_stage.stage1, two_stage.refined
        else:
            steps, guidance = settings["num_inference_steps"], settings["guidance_scale"]
            result = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, **common)
        for position, (_, condition) in enumerate(chunk):
            folder = sample_dir(output, condition["key"])
            folder.mkdir(parents=True, exist_ok=True)
            images = {
                "pose": result.pose[position],
                "rgb": result.rgb[position],
                "depth": result.depth[position],
                "normal": result.normal[position],
                "reference": PIL.Image.fromarray(condition["reference"]),
            }
            if settings["refiner"]:
                images["refined"] = refined[position]
            # reference last: with it on disk the sample is complete, so a kill mid-write regenerates it
            for name in names:
                write_png_atomically(images[name], folder / f"{name}.png")
        print(f"[eval] generated {start + len(chunk)}/{len(todo)}", flush=True)
    return len(todo)


def write_png_atomically(image: PIL.Image.Image, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    image.save(partial, format="PNG")
    os.replace(partial, path)


def run_eval(model: str, shards: str, output: str | None, config: dict, overwrite: bool = False) -> dict:
    """Generate, score and render; returns what ``metrics.json`` holds.

    ``overwrite``: regenerate every sample even when ``output`` holds generations made with other
    settings (without it such a folder is refused, see :mod:`hyperhuman.eval.fingerprint`)."""
    from hyperhuman.lsdm.pipeline import HyperHumanPipeline

    settings = check_eval_config(config)
    started = time.perf_counter()
    path = pipeline_path(model)
    refiner_path = pipeline_path(settings["refiner"], "hyperhuman train-sgr") if settings["refiner"] else None
    output = Path(output) if output else path.parent / "eval" if path.name == "pipeline" else path / "eval"
    pipe = HyperHumanPipeline.from_pretrained(path)
    resolution = settings["resolution"] or model_resolution(pipe)
    steps = settings["num_inference_steps"] or model_steps(pipe)
    if refiner_path is not None:
        from hyperhuman.sgr.pipeline import StructureGuidedRefinerPipeline, TwoStagePipeline

        refiner = StructureGuidedRefinerPipeline.from_pretrained(refiner_path)
        pipe = TwoStagePipeline(pipe, refiner)
        resolution = settings["refiner_resolution"] or refiner.unet.config.sample_size * refiner.vae_scale_factor
    settings = {**settings, "resolution": resolution, "num_inference_steps": steps}
    pipe.set_progress_bar_config(disable=True)
    conditions = eval_conditions(shards, settings["num"], resolution, settings["storage_options"])
    fingerprint = generation_fingerprint(path, refiner_path, settings)
    prepare_output(output, fingerprint, overwrite)

    generation_started = time.perf_counter()
    generated = generate(pipe, conditions, output, settings)
    generation_s = time.perf_counter() - generation_started
    scores, per_sample = score(conditions, output, settings)

    records = []
    for index, (condition, pose_score) in enumerate(zip(conditions, per_sample, strict=True)):
        folder = sample_dir(output, condition["key"]).relative_to(output)
        records.append(
            {
                "key": condition["key"],
                "prompt": condition["caption"],
                "seed": settings["seed"] + index,
                "images": {name: f"{folder.as_posix()}/{name}.png" for name in image_names(settings)},
                "pose_score": pose_score,
                "meta": {"people": len(condition["pose"]["people"])},
            }
        )
    write_text_atomically(output / "samples.jsonl", "".join(json.dumps(record) + "\n" for record in records))
    report = {
        **scores,
        "info": {
            "model": str(path),
            "shards": str(shards),
            "samples": len(conditions),
            "generated_now": generated,
            "resolution": resolution,
            "refiner": settings["refiner"],
            "scored_image": scored_image(settings),
            "fingerprint": fingerprint_id(fingerprint),
            **{key: settings[key] for key in ("seed", "num_inference_steps", "guidance_scale", "pose_resolution")},
            "pose_annotator": settings["pose_annotator"],
            "generation_s": round(generation_s, 2),
            "wall_s": round(time.perf_counter() - started, 2),
        },
    }
    write_text_atomically(output / "metrics.json", json.dumps(report, indent=2))
    report["gallery"] = str(generation_gallery(str(output)))
    return report


def write_text_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)
