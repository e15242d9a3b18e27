"""Pose accuracy: COCO keypoint AP/AR re-implemented in numpy (no pycocotools at run time), and
HyperHuman's "clean" AP/AR.

- :func:`pose_ap_ar`: OKS with the COCO-17 sigmas, greedy matching by detection score, AP as the
  mean of 101-point interpolated precision over OKS thresholds .50:.05:.95, AP50, AP75, AR
  (maxDets 20), and the medium/large variants — COCOeval's ``iouType="keypoints"`` semantics,
  tie-breaking included: a GT person with no labelled keypoint is ignored (detections matched to
  it count neither way), a detection's area is the extent of its keypoints, images with no GT
  still contribute false positives, an undefined value is ``-1`` as in COCO.
- :func:`clean_pose_ap_ar`: HyperHuman's "clean" AP/AR — the same evaluation with only the 3 most
  salient GT people of each image counted, salience = largest area (ties: first listed). The other
  GT people are marked *ignored* (COCO's ignore flag), not removed: a detection of one of them
  counts neither as a true nor as a false positive, as for a crowd region, so finding a fourth
  person is never punished. Detections are unchanged.
- :func:`coco_people` turns our shard pose dicts (``KEY.pose.json``: per person ``bbox``
  ``[x0, y0, x1, y1]``, ``score``, COCO-17 ``keypoints`` ``[x, y, score]``) into those inputs. A
  ground-truth keypoint is labelled when its score is at least ``min_score``: for eval, the skeleton
  renderer's :data:`hyperhuman.skeleton.SCORE_THRESHOLD`, i.e. exactly the joints the conditioning
  render drew (a joint the model never saw is not asked of it). Our poses carry no person mask, so
  a person's area is its bbox area unless the person dict has an ``area``; COCO uses the
  segmentation area (roughly half to two thirds of the box), so our OKS is somewhat more lenient
  than COCO's on the same keypoints. :func:`pose_metrics` and :func:`pose_sample_score` are the
  entry points ``hyperhuman eval`` uses (ground truth = the conditioning pose, detections = the
  pose annotator on the generated image, both in the conditioning pose's pixels).

How it was checked (``tests/hyperhuman/test_metrics.py``; pycocotools 2.0.11): all ten COCO
numbers, plain and clean (pycocotools given the non-salient people with ``num_keypoints = 0``,
which is how its ``COCOeval`` sets a person's ignore flag), against ``COCOeval`` on synthetic people
with jitter, misses, duplicates, false positives, tied scores, >20 detections and unlabelled
keypoints: bit-identical on 60 random sets of 12 images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hyperhuman.skeleton import SCORE_THRESHOLD

# COCO-17 per-keypoint OKS constants (pycocotools' Params.kpt_oks_sigmas).
COCO17_SIGMAS = (
    np.array([0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89])
    / 10.0
)
OKS_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RANGES = {"all": (0.0, 1e10), "medium": (32.0**2, 96.0**2), "large": (96.0**2, 1e10)}
MAX_DETECTIONS = 20
SALIENT_PEOPLE = 3


def coco_people(pose: dict, min_score: float | None = None) -> list[dict]:
    """Our pose dict (``KEY.pose.json`` layout, see ``shards.codecs.normalize_pose``) → people for
    :func:`pose_ap_ar`, for ground truth and detections alike.

    Per person: ``keypoints`` ``(17, 3)`` ``[x, y, v]`` with ``v = 2`` where the keypoint is
    labelled — its score is ``>= min_score``, or ``> 0`` with ``min_score=None`` (COCO's ``v > 0``)
    — and 0 otherwise; ``bbox`` COCO ``[x, y, w, h]`` from our ``[x0, y0, x1, y1]``;
    ``area`` = the person's ``area`` if given, else the bbox area (COCO uses the segmentation area,
    which our poses lack: bbox area is larger, so OKS is more lenient); ``score`` = person score
    (1.0 if absent). Coordinates of unlabelled keypoints are kept: COCO ignores them in ground truth,
    and in a detection they are a (likely wrong) guess, as in any COCO result file. NaN/inf values
    become 0 (unlabelled, at the origin); a person without ``bbox`` gets the extent of its labelled
    keypoints.
    """
    if not isinstance(pose, dict) or "people" not in pose:
        raise ValueError(f"a pose must be a dict with 'people' (shards.codecs layout), got {type(pose).__name__}")
    people = []
    for index, person in enumerate(pose["people"]):
        keypoints = np.asarray(person["keypoints"], dtype=np.float64)
        if keypoints.shape != (len(COCO17_SIGMAS), 3):
            raise ValueError(f"people[{index}].keypoints must be COCO-17 (17, 3) [x, y, score], got {keypoints.shape}")
        keypoints = np.nan_to_num(keypoints, nan=0.0, posinf=0.0, neginf=0.0)
        if min_score is None:
            labelled = keypoints[:, 2] > 0
        else:  # in float32, as the skeleton renderer compares: exactly the joints it draws
            labelled = keypoints[:, 2].astype(np.float32) >= np.float32(min_score)
        if person.get("bbox") is not None:
            x0, y0, x1, y1 = (float(value) for value in person["bbox"])
        elif labelled.any():
            (x0, y0), (x1, y1) = keypoints[labelled, :2].min(axis=0), keypoints[labelled, :2].max(axis=0)
        else:
            x0 = y0 = x1 = y1 = 0.0
        width, height = max(x1 - x0, 0.0), max(y1 - y0, 0.0)
        visibility = np.where(labelled, 2.0, 0.0)
        people.append(
            {
                "keypoints": np.column_stack([keypoints[:, :2], visibility]),
                "bbox": [float(x0), float(y0), float(width), float(height)],
                "area": float(person.get("area", float(width * height))),
                "score": float(person.get("score", 1.0)),
            }
        )
    return people


def _keypoints(person: dict, index: str, sigmas: np.ndarray) -> np.ndarray:
    keypoints = np.asarray(person["keypoints"], dtype=np.float64)
    if keypoints.ndim == 1 and keypoints.size == 3 * len(sigmas):
        keypoints = keypoints.reshape(-1, 3)  # COCO's flat [x1, y1, v1, x2, ...]
    if keypoints.shape != (len(sigmas), 3):
        raise ValueError(f"{index}.keypoints must be ({len(sigmas)}, 3) [x, y, v], got {keypoints.shape}")
    return keypoints


def oks_matrix(ground_truth: Sequence[dict], detections: Sequence[dict], sigmas=COCO17_SIGMAS) -> np.ndarray:
    """COCO object keypoint similarity ``(len(detections), len(ground_truth))``, in the given orders.

    As COCOeval's ``computeOks``: over the labelled GT keypoints,
    ``mean exp(-d² / (2 · area · (2σ)²))``; for a GT with no labelled keypoint, the distance of each
    detected keypoint outside the GT box enlarged to 3× its size (COCO's ignore region).
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    variances = (sigmas * 2) ** 2
    ious = np.zeros((len(detections), len(ground_truth)))
    if not len(detections) or not len(ground_truth):
        return ious
    found = np.stack([_keypoints(d, f"detections[{i}]", sigmas) for i, d in enumerate(detections)])
    xd, yd = found[:, :, 0], found[:, :, 1]
    for j, truth in enumerate(ground_truth):
        keypoints = _keypoints(truth, f"ground_truth[{j}]", sigmas)
        xg, yg, vg = keypoints.T
        labelled = vg > 0
        if labelled.any():
            dx, dy = xd - xg, yd - yg
        else:
            bx, by, bw, bh = (float(value) for value in truth["bbox"])
            x0, x1, y0, y1 = bx - bw, bx + bw * 2, by - bh, by + bh * 2
            dx = np.maximum(0, x0 - xd) + np.maximum(0, xd - x1)
            dy = np.maximum(0, y0 - yd) + np.maximum(0, yd - y1)
        e = (dx**2 + dy**2) / variances / (float(truth["area"]) + np.spacing(1)) / 2
        if labelled.any():
            e = e[:, labelled]
        ious[:, j] = np.exp(-e).sum(axis=1) / e.shape[1]
    return ious


def most_salient(people: Sequence[dict], keep: int = SALIENT_PEOPLE) -> np.ndarray:
    """A boolean mask of the ``keep`` people with the largest ``area`` (ties: first listed)."""
    salient = np.zeros(len(people), dtype=bool)
    salient[np.argsort([-float(person["area"]) for person in people], kind="mergesort")[:keep]] = True
    return salient


def _evaluate_image(oks, gt_ignore, gt_area, dt_area, area_range):
    """COCOeval.evaluateImg for one image and area range: matches per threshold (dts already sorted)."""
    low, high = area_range
    ignore = gt_ignore | (gt_area < low) | (gt_area > high)
    gt_order = np.argsort(ignore, kind="mergesort")
    ignore = ignore[gt_order]
    oks = oks[:, gt_order] if oks.size else oks
    thresholds, num_dt, num_gt = len(OKS_THRESHOLDS), len(dt_area), len(gt_order)
    gt_matched = np.zeros((thresholds, num_gt), dtype=bool)
    dt_matched = np.zeros((thresholds, num_dt), dtype=bool)
    dt_ignore = np.zeros((thresholds, num_dt), dtype=bool)
    if oks.size:
        for t, threshold in enumerate(OKS_THRESHOLDS):
            for d in range(num_dt):
                best, match = min(threshold, 1 - 1e-10), -1
                for g in range(num_gt):
                    if gt_matched[t, g]:  # no crowd people: a matched GT is taken
                        continue
                    if match > -1 and not ignore[match] and ignore[g]:
                        break
                    if oks[d, g] < best:
                        continue
                    best, match = oks[d, g], g
                if match == -1:
                    continue
                dt_ignore[t, d] = ignore[match]
                dt_matched[t, d] = True
                gt_matched[t, match] = True
    outside = (dt_area < low) | (dt_area > high)
    dt_ignore |= ~dt_matched & outside[None, :]
    return dt_matched, dt_ignore, ignore


def _accumulate(results, scores):
    """COCOeval.accumulate for one area range: precision ``(T, R)`` and recall ``(T,)``, -1 if undefined."""
    precision = -np.ones((len(OKS_THRESHOLDS), len(RECALL_THRESHOLDS)))
    recall = -np.ones(len(OKS_THRESHOLDS))
    if not results:
        return precision, recall
    dt_scores = np.concatenate(scores)
    order = np.argsort(-dt_scores, kind="mergesort")
    dt_matched = np.concatenate([r[0] for r in results], axis=1)[:, order]
    dt_ignore = np.concatenate([r[1] for r in results], axis=1)[:, order]
    gt_ignore = np.concatenate([r[2] for r in results])
    positives = np.count_nonzero(~gt_ignore)
    if positives == 0:
        return precision, recall
    tp_sum = np.cumsum(dt_matched & ~dt_ignore, axis=1).astype(float)
    fp_sum = np.cumsum(~dt_matched & ~dt_ignore, axis=1).astype(float)
    for t, (tp, fp) in enumerate(zip(tp_sum, fp_sum, strict=True)):
        num = len(tp)
        rc = tp / positives
        pr = (tp / (fp + tp + np.spacing(1))).tolist()
        recall[t] = rc[-1] if num else 0
        for i in range(num - 1, 0, -1):
            if pr[i] > pr[i - 1]:
                pr[i - 1] = pr[i]
        q = np.zeros(len(RECALL_THRESHOLDS))
        for r, index in enumerate(np.searchsorted(rc, RECALL_THRESHOLDS, side="left")):
            if index >= num:
                break
            q[r] = pr[index]
        precision[t] = q
    return precision, recall


def _mean_defined(values: np.ndarray) -> float:
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else -1.0


def pose_ap_ar(
    ground_truth: Sequence[Sequence[dict]],
    detections: Sequence[Sequence[dict]],
    sigmas=COCO17_SIGMAS,
    max_detections: int = MAX_DETECTIONS,
    keep_largest: int | None = None,
) -> dict[str, float]:
    """COCO keypoint AP/AR of detections against ground truth, one list of people per image.

    Ground-truth person: ``keypoints`` ``(17, 3)`` (or COCO's flat 51) ``[x, y, v]`` in pixels,
    ``v > 0`` = labelled; ``area`` (the OKS scale and the area-range filter); ``bbox`` COCO
    ``[x, y, w, h]`` (only used for a person with no labelled keypoint, who is ignored).
    Detection: ``keypoints`` ``[x, y, any]`` and ``score``; its area is the extent of its keypoints
    (as ``COCO.loadRes``). Only the ``max_detections`` best-scored detections of an image count.

    Returns COCOeval's ten keypoint numbers in [0, 1] (``-1`` where undefined, e.g. no labelled
    ground truth): ``AP`` (OKS .50:.05:.95, 101-point interpolated precision), ``AP50``, ``AP75``,
    ``APm``, ``APl``, ``AR``, ``AR50``, ``AR75``, ``ARm``, ``ARl``. ``keep_largest=k`` marks every
    GT person but the k largest-area ones of each image ignored (see :func:`clean_pose_ap_ar`).
    """
    if len(ground_truth) != len(detections):
        raise ValueError(
            f"{len(ground_truth)} images of ground truth but {len(detections)} of detections; give one list per image"
        )
    sigmas = np.asarray(sigmas, dtype=np.float64)
    per_area = {name: ([], []) for name in AREA_RANGES}
    for image, (truth, found) in enumerate(zip(ground_truth, detections, strict=True)):
        truth = list(truth)
        if not truth and not found:
            continue
        order = np.argsort([-float(d["score"]) for d in found], kind="mergesort")[:max_detections]
        found = [found[i] for i in order]
        gt_ignore = np.zeros(len(truth), dtype=bool)
        for j, person in enumerate(truth):
            gt_ignore[j] = not (_keypoints(person, f"ground_truth[{image}][{j}]", sigmas)[:, 2] > 0).any()
            if "area" not in person or (gt_ignore[j] and "bbox" not in person):
                raise ValueError(
                    f"ground_truth[{image}][{j}] needs 'area' (and 'bbox' when no keypoint is labelled); "
                    "build people from our poses with coco_people"
                )
        if keep_largest is not None:
            gt_ignore |= ~most_salient(truth, keep_largest)
        gt_area = np.array([float(p["area"]) for p in truth])
        dt_area = np.zeros(len(found))
        for i, person in enumerate(found):
            keypoints = _keypoints(person, f"detections[{image}][{i}]", sigmas)
            dt_area[i] = np.ptp(keypoints[:, 0]) * np.ptp(keypoints[:, 1])
        oks = oks_matrix(truth, found, sigmas) if truth and found else np.zeros((0, 0))
        scores = np.array([float(d["score"]) for d in found])
        for name, area_range in AREA_RANGES.items():
            results, score_lists = per_area[name]
            results.append(_evaluate_image(oks, gt_ignore, gt_area, dt_area, area_range))
            score_lists.append(scores)
    stats = {}
    for name, suffix in (("all", ""), ("medium", "m"), ("large", "l")):
        precision, recall = _accumulate(*per_area[name])
        stats[f"AP{suffix}"] = _mean_defined(precision)
        if name == "all":
            stats["AP50"], stats["AP75"] = _mean_defined(precision[0]), _mean_defined(precision[5])
            stats["AR50"], stats["AR75"] = _mean_defined(recall[:1]), _mean_defined(recall[5:6])
        stats[f"AR{suffix}"] = _mean_defined(recall)
    return {key: stats[key] for key in ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")}


def clean_pose_ap_ar(
    ground_truth: Sequence[Sequence[dict]], detections: Sequence[Sequence[dict]], keep: int = SALIENT_PEOPLE, **options
) -> dict[str, float]:
    """HyperHuman's "clean" pose AP/AR: :func:`pose_ap_ar` counting only the ``keep`` (3) most
    salient ground-truth people of each image — the largest by area, ties to the first listed.
    The other GT people are marked ignored, as COCO does for crowds and unlabelled people: a
    detection that matches one of them is neither a true nor a false positive (removing them
    instead would count finding them as errors). Detections are not filtered."""
    return pose_ap_ar(ground_truth, detections, keep_largest=keep, **options)


def _or_none(value: float) -> float | None:
    return None if value < 0 else value


def pose_metrics(
    ground_truth: Sequence[dict], detections: Sequence[dict], min_score: float | None = SCORE_THRESHOLD
) -> dict[str, float | None]:
    """Pose accuracy of generated images: our pose dicts (the conditioning poses, and the pose
    annotator's output on the generations, one per image, in the same pixels) → ``pose_ap``,
    ``pose_ap50``, ``pose_ap75``, ``pose_ar``, ``pose_ap_clean``, ``pose_ar_clean`` (``None`` where
    COCO's value is undefined, i.e. no labelled conditioning person at all). Ground-truth joints
    are those scored ``>= min_score``: by default the ones the conditioning render drew."""
    truth = [coco_people(pose, min_score) for pose in ground_truth]
    found = [coco_people(pose) for pose in detections]
    full, clean = pose_ap_ar(truth, found), clean_pose_ap_ar(truth, found)
    return {
        "pose_ap": _or_none(full["AP"]),
        "pose_ap50": _or_none(full["AP50"]),
        "pose_ap75": _or_none(full["AP75"]),
        "pose_ar": _or_none(full["AR"]),
        "pose_ap_clean": _or_none(clean["AP"]),
        "pose_ar_clean": _or_none(clean["AR"]),
    }


def pose_sample_score(truth: dict, found: dict, min_score: float | None = SCORE_THRESHOLD) -> dict | None:
    """Per image: for each conditioning person, the OKS of the best-matching detected person
    (0 if none; ``None`` for a person with no labelled keypoint) and their mean; ``None`` when the
    image has no labelled conditioning person. OKS as :func:`oks_matrix` (bbox area as scale);
    labelled joints as in :func:`pose_metrics`."""
    truth_people, found_people = coco_people(truth, min_score), coco_people(found)
    labelled = [(person["keypoints"][:, 2] > 0).any() for person in truth_people]
    if not any(labelled):
        return None
    oks = oks_matrix(truth_people, found_people)
    best = oks.max(axis=0) if len(found_people) else np.zeros(len(truth_people))
    per_person = [float(value) if ok else None for value, ok in zip(best, labelled, strict=True)]
    values = [value for value in per_person if value is not None]
    return {"oks": per_person, "mean_oks": float(np.mean(values)), "detected": len(found_people)}
