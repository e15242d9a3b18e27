"""Pose accuracy on real photos: COCO keypoint AP/AR (OKS) of every available pose annotator.

    .venv/bin/python bench/pose_accuracy.py [--data ../shared/data/humans] [--variants NAME ...]

Runs each annotator on the photos in ``--data`` that have COCO-17 ground truth
(``keypoints_coco.json``), scores them with pycocotools' COCOeval, and reports all annotations
and the native-COCO subset (images whose every annotation has ``kpt_source_format == coco17``;
the others are remapped from other skeletons and may leave people unlabeled). Also reports
per-image latency (the MoveNet rows run onnxruntime on one thread). Variants whose weights are
not installed (the MoveNet models before ``make setup``) are listed as skipped. Prints a table
and writes bench/results/pose_accuracy.json. The default ``--data``, ``../shared/data/humans``,
is the development checkout's photo set beside the repository, not part of it: without ground
truth the benchmark says it is skipped and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
# name → (registry name, options): variants of the offline default are compared side by side.
VARIANTS = {
    "mediapipe-pose (default: 3 erase rounds)": ("mediapipe-pose", {}),
    "mediapipe-pose (one call, no erase)": ("mediapipe-pose", {"erase_rounds": 0}),
    "mediapipe-pose (+ face regions)": ("mediapipe-pose", {"face_regions": True}),
    "mediapipe-pose (+ strips)": ("mediapipe-pose", {"strips": True}),
    # MoveNet ONNX models (make setup; skipped when not installed), one onnxruntime thread
    "movenet MultiPose alone (long side 256)": ("movenet-pose", {"thunder": False}),
    "movenet MultiPose -> Thunder (default/offline)": ("movenet-pose", {}),  # = configs/annotate/offline.yaml
    "movenet NanoDet -> Thunder": ("movenet-pose", {"detector": "nanodet"}),
    "movenet + BlazePose world (option world)": ("movenet-pose", {"world": True}),
}


def coco_eval(ground_truth: dict, detections: list[dict], image_ids: list[int]) -> dict:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(ground_truth)
        gt.createIndex()
        if not detections:
            return {name: 0.0 for name in ("AP", "AP50", "AP75", "AR")}
        dt = gt.loadRes(copy.deepcopy(detections))
        evaluator = COCOeval(gt, dt, "keypoints")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {"AP": stats[0], "AP50": stats[1], "AP75": stats[2], "AR": stats[5]}


def run_annotator(annotator, images: list[dict], data: Path) -> tuple[list[dict], list[float]]:
    detections, latencies = [], []
    for image in images:
        rgb = np.asarray(Image.open(data / "images" / image["file_name"]).convert("RGB"))
        start = time.perf_counter()
        pose = annotator([rgb])[0]
        latencies.append(time.perf_counter() - start)
        for person in pose["people"]:
            keypoints = np.asarray(person["keypoints"], dtype=np.float64)
            detections.append(
                {
                    "image_id": image["id"],
                    "category_id": 1,
                    "keypoints": keypoints.reshape(-1).tolist(),
                    "score": float(person["score"]),
                }
            )
    return detections, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "humans"))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="names from VARIANTS")
    parser.add_argument(
        "--annotator",
        action="append",
        default=[],
        metavar="LABEL=JSON",
        help='also evaluate an annotator config, e.g. rtmpose=\'{"name": "mmpose", "weights": "/ckpt.pth", '
        '"options": {"config": "body_2d_keypoint/rtmpose/coco/rtmpose-m_8xb256-420e_coco-256x192.py"}}\'',
    )
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "pose_accuracy.json"))
    args = parser.parse_args()

    from annotators.base import WeightsNotFoundError
    from annotators.registry import build_annotator

    data = Path(args.data)
    if not (data / "keypoints_coco.json").is_file():
        print(f"pose_accuracy: skipped, no keypoints_coco.json under {data} (pass --data)")
        return
    ground_truth = json.loads((data / "keypoints_coco.json").read_text())
    images = ground_truth["images"]
    all_ids = [image["id"] for image in images]
    formats: dict[int, set] = {}
    for annotation in ground_truth["annotations"]:
        formats.setdefault(annotation["image_id"], set()).add(annotation["kpt_source_format"])
    native_ids = [image_id for image_id in all_ids if formats.get(image_id) == {"coco17"}]

    configs = {variant: {"name": VARIANTS[variant][0], "options": VARIANTS[variant][1]} for variant in args.variants}
    for entry in args.annotator:
        label, _, config = entry.partition("=")
        configs[label] = json.loads(config)
    results, skipped = {}, {}
    for variant, config in configs.items():
        try:
            annotator = build_annotator(config)
        except WeightsNotFoundError as error:  # e.g. the MoveNet models when make setup could not fetch them
            skipped[variant] = str(error).split(";")[0]
            continue
        detections, latencies = run_annotator(annotator, images, data)
        results[variant] = {
            "all": coco_eval(ground_truth, detections, all_ids),
            "native_coco": coco_eval(ground_truth, detections, native_ids),
            "latency_ms_median": 1000 * statistics.median(latencies),
            "latency_ms_mean": 1000 * statistics.mean(latencies),
            "people_found": len(detections),
        }

    gt_people = sum(1 for a in ground_truth["annotations"] if a["num_keypoints"] > 0)
    print(f"pose accuracy on {len(all_ids)} photos ({len(native_ids)} native COCO), {gt_people} labeled people")
    header = (
        f"{'annotator':46} {'AP':>6} {'AP50':>6} {'AP75':>6} {'AR':>6} | {'AP coco':>7} {'AR coco':>7} | {'ms/img':>7}"
    )
    print(header)
    for variant, row in results.items():
        a, n = row["all"], row["native_coco"]
        print(
            f"{variant:46} {a['AP']:6.3f} {a['AP50']:6.3f} {a['AP75']:6.3f} {a['AR']:6.3f} | "
            f"{n['AP']:7.3f} {n['AR']:7.3f} | {row['latency_ms_median']:7.0f}"
        )
    for variant, reason in skipped.items():
        print(f"{variant:46} skipped: {reason}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    summary = {"images": len(all_ids), "native_images": len(native_ids), "results": results, "skipped": skipped}
    Path(args.output).write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
