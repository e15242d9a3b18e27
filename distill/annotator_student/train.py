"""``hyperhuman distill annotator``: an EfficientFormerV2 pose student trained on the pseudo-labels
the annotation job wrote into shards (its pose teacher's COCO-17 keypoints).

Per step, a batch of augmented top-down crops (:mod:`distill.annotator_student.data`) and, per
joint, on the student's heatmap logits ``z`` (one map per joint):

    where:    − Σ_cells target / Σ target · log softmax(z)      for the joints the teacher saw
    whether:  BCE(logsumexp(z) − log(cells), seen)               for every joint

averaged over the seen joints and over all joints, and summed. A spatial softmax with
cross-entropy (the "where" term) keeps its gradient until the peak sits on the joint, where a
heatmap MSE first collapses to the all-zero map (most cells are background) and localises only much
later: on this project's photos, 20 steps of it agreed better with the teacher than 80 of MSE (mean
OKS 0.23 vs 0.10). Being blind to a constant shift of ``z``, it leaves the map's total mass to the
"whether" term: the annotator's keypoint score (:func:`annotators.efficientformer_pose.presence`).
The student is built from config with random weights (:mod:`distill.annotator_student.model`; no
pretrained EfficientFormerV2 weights exist offline).

Same recipe qualities as the other distill stages (:mod:`hyperhuman.training`): accelerate
(multi-process; each process reads its own shards), EMA, checkpoints with exact ``--resume``,
TensorBoard, and SpFDE's ``train.efficiency`` (:mod:`hyperhuman.efficiency`: sparse masks, freezing
of the backbone's stem and stages from the input side, sieving of whole photos by their crops'
recent loss). Held-out measure: the mean COCO OKS between the student's keypoints and the teacher's
on plain crops of ``validation.heldout`` shards (agreement with the teacher, not accuracy: the
shards hold no ground truth; ``bench/student_annotator.py`` measures COCO AP against ground
truth), every ``validation.every`` steps and at the end. Output: ``OUTPUT/student/`` (safetensors +
config.json; :func:`~distill.annotator_student.model.load_student`), ``OUTPUT/student.onnx`` (what
the ``efficientformer-pose`` annotator loads, checked against torch), ``OUTPUT/train_report.json``.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from hyperhuman.config import ConfigError, check_known_keys
from hyperhuman.training import (
    EFFICIENCY_KEYS,
    TRAIN_KEYS,
    check_efficiency,
    check_processes_agree,
    check_shards,
    check_train_counts,
    data_stream,
    make_accelerator,
    make_efficiency,
    optimizer_step,
    prepare_for_training,
    restore,
    save_checkpoint,
    trained_copy,
)

REFERENCE = "configs/distill/pose-student.yaml"
MODEL_KEYS = ["backbone", "backbone_overrides", "input_size", "heatmap_stride", "head_channels"]
AUGMENT_KEYS = ["crops_per_person", "min_keypoints", "min_keypoint_score", "crop_padding", "scale_range", "shift",
                "rotation_deg", "rotation_prob", "flip_prob", "color_jitter", "sigma"]  # fmt: skip
KNOWN_KEYS = {
    "output": None,
    "seed": None,
    "model": dict.fromkeys(MODEL_KEYS),
    "data": dict.fromkeys(["train", "shuffle_buffer", "num_workers", *AUGMENT_KEYS]),
    "train": {**TRAIN_KEYS, "efficiency": EFFICIENCY_KEYS},  # SpFDE (hyperhuman.efficiency)
    "validation": dict.fromkeys(["every", "heldout", "num_crops"]),
    "export": dict.fromkeys(["onnx", "opset"]),
}
# COCO's per-joint OKS constants (pycocotools' sigmas): how far a joint may stray, per body part
COCO17_SIGMAS = np.array([0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87,
                          0.89, 0.89], dtype=np.float64) / 10.0  # fmt: skip
ONNX_TOLERANCE = 1e-3  # heatmap values are O(1); onnxruntime and torch agree to ~1e-6


# --- configuration ---------------------------------------------------------------------------------
def check_config(config: dict, check_paths: bool = True) -> None:
    """Everything that would fail an hour in fails here, naming the key to fix."""
    from distill.annotator_student.data import check_data_config
    from distill.annotator_student.model import check_model_config

    for section in ("output", "model", "data", "train"):
        if config.get(section) is None:
            raise ConfigError(f"pose-student config lacks {section!r} (e.g. --set {section}=...); see {REFERENCE}")
    check_known_keys(config, KNOWN_KEYS, REFERENCE)
    check_model_config(config["model"])
    check_data_config(config["data"])
    train = config["train"]
    check_train_counts(train)
    check_efficiency(train)
    if train.get("gradient_checkpointing"):
        raise ConfigError("train.gradient_checkpointing: not supported by the pose student (too small to need it)")
    validation = config.get("validation") or {}
    for key, least in (("every", 0), ("num_crops", 1)):
        value = validation.get(key, least)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"validation.{key} must be an integer ≥ {least}, got {value!r}")
    export = config.get("export") or {}
    if not isinstance(export.get("onnx", True), bool):
        raise ConfigError(f"export.onnx must be true or false, got {export.get('onnx')!r}")
    if check_paths:
        data = config["data"]
        for key, value in (("data.train", data.get("train")), ("validation.heldout", validation.get("heldout"))):
            if value or key == "data.train":
                check_shards(value, key, "make pseudo-labelled shards with `hyperhuman annotate`")


def model_config(config: dict) -> dict:
    """The student's constructor arguments, defaults filled in."""
    from distill.annotator_student.model import PoseStudent

    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(PoseStudent.__init__).parameters.items()
        if name != "self"
    }
    return {**defaults, **config["model"]}


def teacher_of(source) -> dict:
    """The pose provenance (annotator, version, weights) of the first sample of ``source``."""
    from shards.reader import expand_urls, read_shard

    for url in expand_urls(source):
        for raw in read_shard(url, decode=False):
            return json.loads(raw["json"]).get("annotations", {}).get("pose", {})
    return {}


# --- measures --------------------------------------------------------------------------------------
def keypoint_loss(logits: torch.Tensor, target: torch.Tensor, seen: torch.Tensor) -> dict:
    """The "where" and "whether" terms (see the module's docstring), their ``sum`` and each crop's
    own sum (``per_sample``: data sieving's scores)."""
    logits = logits.float().flatten(2)
    where_to = target.flatten(2) / target.flatten(2).sum(dim=2, keepdim=True).clamp_min(1e-12)
    where = -(where_to * torch.log_softmax(logits, dim=2)).sum(dim=2) * seen
    mass = torch.logsumexp(logits, dim=2) - math.log(logits.shape[2])
    whether = torch.nn.functional.binary_cross_entropy_with_logits(mass, seen, reduction="none")
    per_sample = where.sum(dim=1) / seen.sum(dim=1).clamp_min(1.0) + whether.mean(dim=1)
    where, whether = where.sum() / seen.sum().clamp_min(1.0), whether.mean()
    return {"where": where, "whether": whether, "sum": where + whether, "per_sample": per_sample.detach()}


def keypoint_similarity(predicted: np.ndarray, teacher: np.ndarray, area: float, min_score: float) -> float | None:
    """COCO OKS of ``predicted`` against ``teacher`` keypoints (17, 3) over the joints the teacher
    scored ≥ ``min_score``, for a person of ``area`` pixels² (None when the teacher saw none)."""
    seen = teacher[:, 2] >= min_score
    if not seen.any():
        return None
    distance2 = ((predicted[:, :2] - teacher[:, :2]) ** 2).sum(axis=1)
    similarity = np.exp(-distance2 / (2 * max(area, 1.0) * (2 * COCO17_SIGMAS) ** 2))
    return float(similarity[seen].mean())


@torch.no_grad()
def predict_keypoints(model, crops: list[dict], batch_size: int = 16) -> list[np.ndarray]:
    """The model's keypoints (17, 3) in image pixels for each crop (its ``matrix`` maps back)."""
    from annotators.efficientformer_pose import decode_heatmaps, invert_matrix, transform_points

    device = next(model.parameters()).device
    stride = model.config.heatmap_stride
    found = []
    for start in range(0, len(crops), batch_size):
        chunk = crops[start : start + batch_size]
        heatmaps = model(torch.stack([crop["pixels"] for crop in chunk]).to(device)).float().cpu().numpy()
        for points, crop in zip(decode_heatmaps(heatmaps, stride), chunk, strict=True):
            found.append(transform_points(points, invert_matrix(crop["matrix"].numpy().astype(np.float64))))
    return found


def agreement(model, crops: list[dict], min_score: float) -> dict:
    """Mean OKS of the model's keypoints against the teacher's on held-out crops."""
    similarities = []
    for predicted, crop in zip(predict_keypoints(model, crops), crops, strict=True):
        value = keypoint_similarity(predicted, crop["keypoints"].numpy(), float(crop["area"]), min_score)
        if value is not None:
            similarities.append(value)
    return {"oks_vs_teacher": float(np.mean(similarities)) if similarities else None, "people": len(similarities)}


# --- the recipe ------------------------------------------------------------------------------------
def train_pose_student(config: dict, resume: str | None = None) -> dict:
    from distill.annotator_student.data import CropBatches, heldout_crops, settings
    from distill.annotator_student.export import check_onnx, export_onnx
    from distill.annotator_student.model import PoseStudent, count_parameters

    check_config(config)
    output, seed = Path(config["output"]), config.get("seed", 0)
    data, train = config["data"], config["train"]
    validation, export = config.get("validation") or {}, config.get("export") or {}
    architecture = model_config(config)
    accelerator = make_accelerator(train, output)
    torch.manual_seed(seed)  # the initial weights
    student = PoseStudent(**architecture)
    teacher = teacher_of(data["train"])
    report = {"teacher": teacher, "params": count_parameters(student), "model": dict(student.config), "heldout": []}

    efficiency = make_efficiency(train, student, seed)  # None unless train.efficiency turns a part on
    model, optimizer, lr_scheduler, ema = prepare_for_training(accelerator, student, train, efficiency=efficiency)
    state = restore(accelerator, output, resume, "distill annotator")
    global_step, micro_step = state["global_step"], state["micro_step"]
    batches = data_stream(
        lambda position: CropBatches(data, architecture, train["batch_size"], seed, **position), state, efficiency
    )
    min_score = settings(data)["min_keypoint_score"]
    heldout = []
    if accelerator.is_main_process:
        accelerator.init_trackers("distill-annotator", config={"max_train_steps": train["max_train_steps"]})
        source = validation.get("heldout") or data["train"]
        heldout = heldout_crops(source, data, architecture, validation.get("num_crops", 64))
        if not heldout:
            raise ConfigError(
                f"{source!r} holds no pseudo-labelled people for the held-out measure: set validation.heldout"
            )
        report["agreement_on"] = (
            "validation.heldout" if validation.get("heldout") else "data.train (no held-out shards)"
        )

    losses, terms, started = [], {"where": [], "whether": []}, time.perf_counter()
    model.train()
    while global_step < train["max_train_steps"]:
        batch = next(batches)
        micro_step += 1
        with accelerator.accumulate(model):
            with accelerator.autocast():
                logits = model(batch["pixels"].to(accelerator.device))
            seen = batch["weight"].to(accelerator.device)
            parts = keypoint_loss(logits, batch["target"].to(accelerator.device), seen)
            if efficiency is not None:  # a photo's crops share its key: the sieve keeps or holds back the photo
                efficiency.record_losses(batch["key"], parts["per_sample"])
            optimizer_step(
                accelerator, model, optimizer, lr_scheduler, parts["sum"], train.get("max_grad_norm"), efficiency
            )
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        if ema is not None:
            ema.step(model.parameters())
        losses.append(parts["sum"].item())
        for name, values in terms.items():
            values.append(parts[name].item())
        logs = {"loss": losses[-1], "lr": lr_scheduler.get_last_lr()[0]}
        accelerator.log({**logs, **{f"loss_{name}": values[-1] for name, values in terms.items()}}, step=global_step)
        if global_step % train.get("log_every", 10) == 0 or global_step == 1:
            accelerator.print(
                f"[distill annotator] step {global_step}/{train['max_train_steps']} loss {losses[-1]:.4f} "
                f"(where {terms['where'][-1]:.4f}, whether {terms['whether'][-1]:.4f})"
            )
        if global_step % train["checkpointing_steps"] == 0:
            save_checkpoint(accelerator, output, global_step, micro_step, batches, train.get("checkpoints_total_limit"))
        if accelerator.is_main_process and validation.get("every") and global_step % validation["every"] == 0:
            measured = agreement(trained_copy(accelerator, model, ema, efficiency), heldout, min_score)
            report["heldout"].append({"step": global_step, **measured})
            accelerator.log({"heldout_oks_vs_teacher": measured["oks_vs_teacher"]}, step=global_step)

    accelerator.wait_for_everyone()
    report.update(steps=global_step, wall_s=round(time.perf_counter() - started, 2), losses=losses, terms=terms)
    if losses:
        report.update(first_loss=losses[0], last_loss=losses[-1])
    report["weights_sha256_per_process"] = check_processes_agree(
        accelerator, accelerator.unwrap_model(model), "distill annotator"
    )
    if efficiency is not None:
        report["efficiency"] = efficiency.report(accelerator.num_processes)
    if accelerator.is_main_process:
        final = trained_copy(accelerator, model, ema, efficiency)
        report.update(agreement(final, heldout, min_score))
        final.save_pretrained(output / "student", safe_serialization=True)
        report["output"] = {"student": str(output / "student")}
        if export.get("onnx", True):
            metadata = {"crop_padding": settings(data)["crop_padding"], "teacher": teacher.get("annotator", "?"),
                        "teacher_weights": teacher.get("weights", "?")}  # fmt: skip
            path = export_onnx(final.cpu(), output / "student.onnx", metadata, export.get("opset", 18))
            difference = check_onnx(final, path)
            if difference > ONNX_TOLERANCE:
                raise RuntimeError(f"{path}: onnxruntime differs from torch by {difference:.2e} (> {ONNX_TOLERANCE})")
            report.update(onnx_max_abs_difference=difference)
            report["output"]["onnx"] = str(path)
        (output / "train_report.json").write_text(json.dumps(report, indent=1))
    accelerator.end_training()
    return report
