"""The scores of ``hyperhuman eval``: pose accuracy of every generated image, and the feature
metrics (FID, KID×1000, FID_CLIP, CLIP score) of the generated set against the references.

Frames: a sample's conditioning pose, its reference crop and its generated images share one
pixel frame, ``eval.resolution`` square. The pose annotator runs on the scored image resized to
``pose_resolution`` and its detections are mapped back into that frame before they are compared
with the conditioning pose; an image of another size is refused, since its detections would be
compared in the wrong pixels.

Feature metrics read the images ``feature_batch_size`` samples at a time: FID and FID_CLIP keep
running statistics (:class:`hyperhuman.eval.fid.FeatureStatistics`), CLIP score a running sum, and
KID the float32 features its random subsets are drawn from, so memory does not grow with the
images of ``--num``. A Fréchet distance from fewer samples than feature dimensions is reported with
a warning (``warnings`` in ``metrics.json``).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from hyperhuman.eval import clip, fid, pose

FEATURE_METRICS = ("fid", "kid_x1000", "kid_x1000_std", "fid_clip", "clip_score")  # as metrics.json lists them


def sample_dir(output: Path, key: str) -> Path:
    return output / "samples" / key


def scored_image(settings: dict) -> str:
    """The generated image the metrics score: the refined one in two-stage runs."""
    return "refined" if settings["refiner"] else "rgb"


def detect_poses(conditions: list[dict], output: Path, settings: dict, name: str = "rgb") -> list[dict]:
    """The pose annotator on each generated image ``name`` (resized to ``pose_resolution``), people
    in the pixels of that sample's conditioning pose."""
    from annotators.registry import build_annotator

    annotator = build_annotator(settings["pose_annotator"])
    side = settings["pose_resolution"]
    detections = []
    for condition in conditions:
        path = sample_dir(output, condition["key"]) / f"{name}.png"
        image = PIL.Image.open(path).convert("RGB")
        width, height = condition["pose"]["width"], condition["pose"]["height"]
        if image.size != (width, height):
            raise ValueError(
                f"{path} is {image.width}×{image.height} but its conditioning pose is {width}×{height}: the pipeline "
                "did not generate at eval.resolution, so poses found in it cannot be compared with the condition"
            )
        found = annotator([np.asarray(image.resize((side, side), PIL.Image.BICUBIC))])[0]
        scale = np.array([width / side, height / side])
        people = []
        for person in found["people"]:
            keypoints = np.asarray(person["keypoints"], dtype=np.float64)
            keypoints[:, :2] *= scale
            bbox = np.asarray(person["bbox"], dtype=np.float64) * np.tile(scale, 2)
            people.append(
                {"bbox": bbox.tolist(), "score": float(person.get("score", 1.0)), "keypoints": keypoints.tolist()}
            )
        detections.append({"width": width, "height": height, "people": people})
    return detections


def load_images(conditions: list[dict], output: Path, name: str) -> torch.Tensor:
    """uint8 (N, 3, H, W) of one image kind of the given samples."""
    paths = [sample_dir(output, condition["key"]) / f"{name}.png" for condition in conditions]
    arrays = [np.asarray(PIL.Image.open(path).convert("RGB")) for path in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def feature_metrics(conditions: list[dict], output: Path, settings: dict) -> tuple[dict, dict, dict, dict]:
    """FID, KID×1000 (``inception`` weights) and FID_CLIP, CLIP score (``clip``), read batch by
    batch; returns ``(metrics, skipped, warnings, time_s)``."""
    results, skipped, cautions, timings = {}, {}, {}, {}
    inception = fid.InceptionFeatures(settings["inception"]) if settings["inception"] else None
    clip_model = clip.ClipFeatures(settings["clip"]) if settings["clip"] else None
    if inception is None:
        for name in ("fid", "kid_x1000"):
            results[name] = None
            skipped[name] = "no Inception weights: pass --set inception=PATH (the pt_inception-2015-12-05 .pth file)"
    if clip_model is None:
        for name in ("fid_clip", "clip_score"):
            results[name] = None
            skipped[name] = "no CLIP weights: pass --set clip=PATH (a CLIPModel folder, e.g. clip-vit-large-patch14)"
    if inception is None and clip_model is None:
        return results, skipped, cautions, timings

    final = scored_image(settings)
    inception_real, inception_fake = fid.FeatureStatistics(), fid.FeatureStatistics()
    kid_real, kid_fake = [], []
    clip_real, clip_fake = fid.FeatureStatistics(), fid.FeatureStatistics()
    clip_sum = 0.0
    timings = {"inception_s": 0.0} if inception else {}
    timings.update({"clip_s": 0.0} if clip_model else {})
    batch_size = settings["feature_batch_size"]
    for start in range(0, len(conditions), batch_size):
        chunk = conditions[start : start + batch_size]
        reference, generated = load_images(chunk, output, "reference"), load_images(chunk, output, final)
        if inception is not None:
            started = time.perf_counter()
            real, fake = inception(reference), inception(generated)
            inception_real.update(real)
            inception_fake.update(fake)
            kid_real.append(real)
            kid_fake.append(fake)
            timings["inception_s"] += time.perf_counter() - started
        if clip_model is not None:
            started = time.perf_counter()
            fake = clip_model.image_embeddings(generated)
            clip_real.update(clip_model.image_embeddings(reference))
            clip_fake.update(fake)
            text = clip_model.text_embeddings([condition["caption"] for condition in chunk])
            clip_sum += float(np.maximum(clip.similarities_from_embeddings(fake, text), 0).sum())
            timings["clip_s"] += time.perf_counter() - started

    if inception is not None:
        results["fid"] = fid.fid_from_statistics(inception_real, inception_fake)
        kid_mean, kid_std = fid.kid_from_features(
            torch.cat(kid_real), torch.cat(kid_fake), subsets=settings["kid_subsets"],
            subset_size=settings["kid_subset_size"], seed=settings["seed"],
        )  # fmt: skip
        results["kid_x1000"], results["kid_x1000_std"] = 1000 * kid_mean, 1000 * kid_std
        cautions["fid"] = fid.sample_size_warning("FID", len(conditions), inception_real.dim)
    if clip_model is not None:
        results["fid_clip"] = fid.fid_from_statistics(clip_real, clip_fake)
        results["clip_score"] = clip_sum / len(conditions)
        cautions["fid_clip"] = fid.sample_size_warning("FID_CLIP", len(conditions), clip_real.dim)
    cautions = {name: message for name, message in cautions.items() if message}
    for message in cautions.values():
        warnings.warn(message, UserWarning, stacklevel=3)
    ordered = {name: results[name] for name in FEATURE_METRICS if name in results}
    return ordered, skipped, cautions, {name: round(seconds, 2) for name, seconds in timings.items()}


def score(conditions: list[dict], output: Path, settings: dict) -> tuple[dict, list[dict | None]]:
    """All metrics the configured weights allow, plus per-sample pose scores."""
    started = time.perf_counter()
    ground_truth = [condition["pose"] for condition in conditions]
    detections = detect_poses(conditions, output, settings, scored_image(settings))
    results = pose.pose_metrics(ground_truth, detections)
    per_sample = [pose.pose_sample_score(truth, found) for truth, found in zip(ground_truth, detections, strict=True)]
    timings = {"pose_s": round(time.perf_counter() - started, 2)}

    features, skipped, cautions, feature_timings = feature_metrics(conditions, output, settings)
    report = {"metrics": {**results, **features}, "skipped": skipped, "time_s": {**timings, **feature_timings}}
    if cautions:
        report["warnings"] = cautions
    return report, per_sample
