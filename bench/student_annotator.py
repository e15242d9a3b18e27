"""The EfficientFormerV2 student pose annotator against its teacher: COCO OKS AP on held-out real
photos, ms/image on this CPU (onnxruntime, one thread), parameters.

    .venv/bin/python bench/student_annotator.py [--data ../shared/data/humans] [--folds 2] [--steps 120]

1. Pseudo-labels: the offline annotation job (``configs/annotate/offline.yaml``; its pose teacher is
   MoveNet MultiPose → Thunder) on all 70 photos of ``--data``, one photo per shard, with the people
   filters opened (``max_people`` 20, ``min_person_area`` 0) so no labelled person is thrown away.
   The job's shards are the only training data: the ground truth is never trained on.
2. Split: ``--folds``-fold cross-validation over the 44 photos with COCO ground truth (sorted by
   name, photo ``i`` in fold ``i mod folds``). The student of fold ``f`` trains on the pseudo-labels
   of the 26 photos without ground truth and of the other folds' photos; it never sees the photos
   of fold ``f`` (neither their pixels nor their pseudo-labels), on which it is scored. Every
   ground-truth photo is thus scored by a student that never saw it, and AP is computed once over
   all 44, as for the teacher (``bench/pose_accuracy.py``'s COCOeval). ``--folds 1`` holds all 44
   out and trains on the 26 others alone.
3. Training: ``hyperhuman distill annotator`` (``configs/distill/pose-student.yaml``: S0 on 128×96
   crops, heatmaps at stride 4) for ``--steps`` steps per fold, then its ONNX export.
4. Accuracy: the student annotator (its default box source, MoveNet MultiPose at a long side of 160
   px) and, to separate the keypoints from the boxes, the student on the teacher's own boxes
   (MultiPose at 256 px), against the teacher (``movenet-pose``, the offline default).
5. Speed: per image, whole annotators (boxes + keypoints), teacher and student in alternating
   rounds on all 44 photos, one onnxruntime thread each; and per person, the pose models alone
   (Thunder on its 256² crop vs the student on its crop), alternating. Ratios are taken per
   round, then their median.

Writes ``bench/results/student_annotator.json`` (``summary``: student_ap, teacher_ap, ap_gap,
speedup, student_ms, teacher_ms, params). Measured with the defaults (2 folds × 120 steps of 16
crops; 25 min on the 2-core CPU, shared with other jobs): the student is 3.9× faster per image
(22 vs 87 ms; the pose model alone 5.0 vs 31 ms per person, 6.3×) but far from the teacher's
accuracy, COCO AP 0.019 vs 0.531 (AP50 0.077 vs 0.663): its held-out mean OKS against the
teacher's pseudo-labels is 0.41, so few people pass OKS 0.5. Its loss was still falling fast;
what closes the gap is more of everything it lacks: ImageNet-pretrained EfficientFormerV2 weights,
thousands of pseudo-labelled people instead of ~100, and thousands of steps (a GPU). Without
``--data``'s ground truth or the MoveNet models (``make setup``) it says why it is skipped and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from pose_accuracy import coco_eval, run_annotator  # noqa: E402

CACHE = Path(os.environ.get("HYPERHUMAN_CACHE", Path.home() / ".cache" / "hyperhuman")) / "bench"
JOB_OVERRIDES = ["partition_size=1", "filters.max_people=20", "filters.min_person_area=0.0"]
TEACHER = {"name": "movenet-pose", "options": {}}  # = configs/annotate/offline.yaml's pose annotator
TEACHER_BOXES = {"name": "movenet-person-boxes", "options": {"thunder": False, "multipose_size": 256}}


def job_folder(data: Path) -> Path:
    """Where the pseudo-labelling job of ``data``'s photos is cached (keyed by its settings and photos)."""
    from hyperhuman.config import json_digest

    settings = {"job": JOB_OVERRIDES, "photos": sorted(p.name for p in (data / "images").iterdir())}
    return CACHE / f"student-annotator-{json_digest(settings)[:12]}"


def pseudo_labels(data: Path, work: Path) -> dict[str, str]:
    """The offline job on every photo of ``data/images``, one per shard → ``{photo name: shard tar}``
    (photos the job rejected, e.g. with nobody found, are absent)."""
    from hyperhuman.config import load_config
    from pipelines.job import run_job
    from shards.reader import expand_urls, read_shard

    config = load_config("annotate/offline", JOB_OVERRIDES)
    output = work / "shards"
    report = run_job(str(data / "images"), str(output), config)
    print(f"[student bench] pseudo-labels: {report['samples']} photos kept, rows {report['counts']}")
    tars = {}
    for url in expand_urls(str(output)):
        for sample in read_shard(url, decode=False):
            source = json.loads(sample["json"])["source"]
            tars[Path(source).name] = url
    return tars


def folds_of(ground_truth: dict, folds: int) -> list[list[dict]]:
    images = sorted(ground_truth["images"], key=lambda image: image["file_name"])
    return [[image for index, image in enumerate(images) if index % folds == fold] for fold in range(folds)]


def train_fold(fold: int, train_tars: list[str], heldout_tars: list[str], args, work: Path) -> dict:
    from distill.annotator_student.train import train_pose_student
    from hyperhuman.config import load_config

    output = work / f"fold-{fold}"
    config = load_config("distill/pose-student")
    config["output"] = str(output)
    config["data"].update(train=train_tars, crops_per_person=args.crops_per_person, shuffle_buffer=256)
    config["train"].update(batch_size=args.batch_size, max_train_steps=args.steps, checkpointing_steps=args.steps,
                           lr_warmup_steps=max(1, args.steps // 20), log_every=max(1, args.steps // 10))  # fmt: skip
    config["validation"].update(every=0, heldout=heldout_tars or None, num_crops=256)
    if (output / "student.onnx").is_file() and (output / "train_report.json").is_file():
        print(f"[student bench] fold {fold}: already trained in {output}")
        return json.loads((output / "train_report.json").read_text())
    return train_pose_student(config, resume="latest")


def detections_of(annotator, images: list[dict], data: Path) -> list[dict]:
    return run_annotator(annotator, images, data)[0]


def time_rounds(annotators: dict, images: list[dict], data: Path, rounds: int) -> dict:
    """Per round, each annotator's median ms/image over ``images``, the annotators alternating."""
    from PIL import Image

    photos = [np.asarray(Image.open(data / "images" / image["file_name"]).convert("RGB")) for image in images]
    for annotator in annotators.values():  # warm-up: sessions, the box source built on first use
        annotator([photos[0]])
    medians = {name: [] for name in annotators}
    for _ in range(rounds):
        for name, annotator in annotators.items():
            latencies = []
            for photo in photos:
                started = time.perf_counter()
                annotator([photo])
                latencies.append(time.perf_counter() - started)
            medians[name].append(1000 * statistics.median(latencies))
    return medians


def time_pose_models(student_onnx: Path, rounds: int, calls: int = 50) -> dict:
    """ms per person of the pose models alone: Thunder on a 256² crop, the student on its crop."""
    import onnxruntime

    from annotators.movenet import MODEL_FILES, default_models_dir

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    sessions = {
        "teacher (Thunder)": onnxruntime.InferenceSession(str(default_models_dir() / MODEL_FILES["thunder"]), options),
        "student": onnxruntime.InferenceSession(str(student_onnx), options),
    }
    rng = np.random.default_rng(0)
    feeds = {
        "teacher (Thunder)": rng.integers(0, 256, (1, 256, 256, 3)).astype(np.int32),
        "student": (rng.random((1, 3, *sessions["student"].get_inputs()[0].shape[2:])) * 255).astype(np.float32),
    }
    medians = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            feed = {session.get_inputs()[0].name: feeds[name]}
            session.run(None, feed)
            latencies = []
            for _ in range(calls):
                started = time.perf_counter()
                session.run(None, feed)
                latencies.append(time.perf_counter() - started)
            medians[name].append(1000 * statistics.median(latencies))
    return medians


def onnx_params(path: Path) -> int:
    import onnx

    return int(sum(np.prod(tensor.dims) for tensor in onnx.load(str(path)).graph.initializer))


def ratio(slow: list[float], fast: list[float]) -> float:
    return statistics.median(s / f for s, f in zip(slow, fast, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "humans"))
    parser.add_argument("--folds", type=int, default=2, help="cross-validation folds over the ground-truth photos")
    parser.add_argument("--steps", type=int, default=120, help="training steps per fold")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--crops-per-person", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    parser.add_argument("--work", default=None, help="where shards and runs go (default: a cache folder)")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "student_annotator.json"))
    args = parser.parse_args()

    from annotators.base import AnnotatorConfig
    from annotators.movenet import MODEL_FILES, MoveNetPose, default_models_dir
    from annotators.registry import build_annotator

    data = Path(args.data)
    if not (data / "keypoints_coco.json").is_file():
        print(f"student_annotator: skipped, no keypoints_coco.json under {data} (pass --data)")
        return
    missing = MoveNetPose.missing_weights(AnnotatorConfig("movenet-pose"))
    if missing:
        print(f"student_annotator: skipped, the teacher cannot run: {missing}")
        return
    started = time.perf_counter()
    ground_truth = json.loads((data / "keypoints_coco.json").read_text())
    work = Path(args.work) if args.work else job_folder(data)
    work = work / f"folds{args.folds}-steps{args.steps}-batch{args.batch_size}-crops{args.crops_per_person}"
    tars = pseudo_labels(data, work.parent)
    labelled_s = time.perf_counter() - started

    folds = folds_of(ground_truth, args.folds)
    all_ids = [image["id"] for image in ground_truth["images"]]
    formats: dict[int, set] = {}
    for annotation in ground_truth["annotations"]:
        formats.setdefault(annotation["image_id"], set()).add(annotation["kpt_source_format"])
    native = [image_id for image_id in all_ids if formats.get(image_id) == {"coco17"}]

    student_detections, on_teacher_boxes, trained = [], [], []
    for fold, heldout in enumerate(folds):
        names = {image["file_name"] for image in heldout}
        train_tars = sorted(url for name, url in tars.items() if name not in names)
        heldout_tars = sorted(url for name, url in tars.items() if name in names)
        print(f"[student bench] fold {fold}: training on {len(train_tars)} photos, {len(names)} held out")
        report = train_fold(fold, train_tars, heldout_tars, args, work)
        trained.append({"fold": fold, "train_photos": len(train_tars), "heldout_photos": sorted(names),
                        "steps": report["steps"], "wall_s": report["wall_s"], "first_loss": report.get("first_loss"),
                        "last_loss": report.get("last_loss"), "oks_vs_teacher_heldout": report.get("oks_vs_teacher"),
                        "heldout_people": report.get("people")})  # fmt: skip
        run = work / f"fold-{fold}"
        student_detections += detections_of(build_annotator({"name": "efficientformer-pose", "weights": str(run)}),
                                            heldout, data)  # fmt: skip
        same_boxes = {"name": "efficientformer-pose", "weights": str(run), "options": {"box_source": TEACHER_BOXES}}
        on_teacher_boxes += detections_of(build_annotator(same_boxes), heldout, data)
    teacher = build_annotator(TEACHER)
    teacher_detections = detections_of(teacher, ground_truth["images"], data)
    found_by = {"teacher": teacher_detections, "student": student_detections,
                "student on the teacher's boxes": on_teacher_boxes}  # fmt: skip
    accuracy = {
        name: {"all": coco_eval(ground_truth, found, all_ids), "native_coco": coco_eval(ground_truth, found, native)}
        for name, found in found_by.items()
    }

    student_run = work / "fold-0"
    annotators = {
        "teacher": teacher,
        "student": build_annotator({"name": "efficientformer-pose", "weights": str(student_run)}),
    }
    per_image = time_rounds(annotators, ground_truth["images"], data, args.rounds)
    per_person = time_pose_models(student_run / "student.onnx", args.rounds)
    student_params = json.loads((student_run / "train_report.json").read_text())["params"]
    models = default_models_dir()
    params = {
        "student pose model": student_params,
        "teacher pose model (Thunder)": onnx_params(models / MODEL_FILES["thunder"]),
        "box source (MultiPose, both)": onnx_params(models / MODEL_FILES["multipose"]),
    }
    teacher_ap, student_ap = accuracy["teacher"]["all"]["AP"], accuracy["student"]["all"]["AP"]
    summary = {
        "student_ap": student_ap,
        "teacher_ap": teacher_ap,
        "ap_gap": teacher_ap - student_ap,
        "relative_ap_gap": (teacher_ap - student_ap) / teacher_ap if teacher_ap else None,
        "student_ap_on_teacher_boxes": accuracy["student on the teacher's boxes"]["all"]["AP"],
        "speedup": ratio(per_image["teacher"], per_image["student"]),
        "student_ms": statistics.median(per_image["student"]),
        "teacher_ms": statistics.median(per_image["teacher"]),
        "pose_model_speedup": ratio(per_person["teacher (Thunder)"], per_person["student"]),
        "student_pose_model_ms": statistics.median(per_person["student"]),
        "teacher_pose_model_ms": statistics.median(per_person["teacher (Thunder)"]),
        "params": student_params,
        "teacher_params": params["teacher pose model (Thunder)"],
    }
    result = {
        "summary": summary,
        "split": f"{args.folds}-fold cross-validation over the {len(all_ids)} ground-truth photos (sorted by name, "
                 f"photo i in fold i mod {args.folds}); each fold's student trained on the pseudo-labels of every "
                 "other photo and scored on its fold's photos only; ground truth never trained on",
        "teacher": "movenet-pose (MultiPose 256 -> Thunder), the offline job's pose annotator",
        "student": "efficientformer-pose: EfficientFormerV2-S0 (random init) + pyramid heatmap head on the config's "
                   "crops; boxes from MultiPose at 160 px",
        "job_overrides": JOB_OVERRIDES, "pseudo_labelled_photos": len(tars), "folds": trained,
        "accuracy": accuracy, "ms_per_image_rounds": per_image, "ms_per_person_rounds": per_person, "params": params,
        "settings": {"steps": args.steps, "batch_size": args.batch_size, "crops_per_person": args.crops_per_person,
                     "rounds": args.rounds, "onnxruntime_threads": 1},
        "times_s": {"pseudo_labels": round(labelled_s, 1), "total": round(time.perf_counter() - started, 1)},
    }  # fmt: skip

    print(f"\nstudent vs teacher on {len(all_ids)} ground-truth photos ({len(native)} native COCO), "
          f"{args.folds}-fold, {args.steps} steps per fold")  # fmt: skip
    print(f"{'annotator':34} {'AP':>6} {'AP50':>6} {'AR':>6} | {'AP coco':>7} | {'ms/img':>7}")
    for name, row in accuracy.items():
        ms = statistics.median(per_image[name]) if name in per_image else float("nan")
        print(f"{name:34} {row['all']['AP']:6.3f} {row['all']['AP50']:6.3f} {row['all']['AR']:6.3f} | "
              f"{row['native_coco']['AP']:7.3f} | {ms:7.1f}")  # fmt: skip
    print(f"speed-up per image {summary['speedup']:.2f}x (goal 3x); pose model alone "
          f"{summary['teacher_pose_model_ms']:.1f} -> {summary['student_pose_model_ms']:.1f} ms/person "
          f"({summary['pose_model_speedup']:.2f}x); params {params}")  # fmt: skip
    print(f"AP gap {summary['ap_gap']:.3f} ({summary['relative_ap_gap']:.0%} of the teacher's AP)")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
