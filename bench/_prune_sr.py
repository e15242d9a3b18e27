"""The SR network's width and depth search at a latency target (the helper of ``bench/prune.py``).

    section = run(_teacher.teacher(), work_dir, teacher_steps=800, search_steps=200, finetune_steps=400)
    print_table(section)

1. The unpruned network: ``hyperhuman train-sr`` of :data:`SR_MODEL` (WDSR-A at 24 channels, 8
   blocks, inner width 72) on the bench teacher's train shards (random crops of the photos).
2. ``hyperhuman prune`` with ``network: sr`` at ``fraction`` of its latency on ``runtime``
   (compiled by default) for a 1280 × 720 output (360 × 640 input): speed model, search, fine-tune.
3. Rows: unpruned, searched, bicubic: PSNR / SSIM (Y, SR convention) on the held-out photos,
   measured ms and fps at 720p output, predicted ms and its error; the speed model's error on
   random pruned networks it was not fitted on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TEACHER_SETTINGS = "bench_settings.json"
SR_MODEL = {"scale": 2, "channels": 24, "num_blocks": 8, "inner_channels": 72}
OUTPUT_SIZE = (720, 1280)


def sr_data(teacher_paths: dict) -> list[str]:
    return [f"data.train={teacher_paths['train_shards']}", "data.resolution=96", "data.min_crop_scale=0.3",
            "data.shuffle_buffer=24", "train.batch_size=8"]  # fmt: skip


def unpruned(teacher_paths: dict, work_dir: Path, teacher_steps: int) -> Path:
    """The unpruned network's run folder (``work_dir / "teacher"``; its model in ``sr/``): trained
    once and kept, like the bench teacher, while its recipe stays the same."""
    from hyperhuman.config import load_config
    from hyperhuman.sr.train import train_sr

    photos = str(Path(teacher_paths["root"]) / "photos" / "heldout")
    teacher_run = Path(work_dir) / "teacher"
    teacher_overrides = [
        f"output={teacher_run}", *sr_data(teacher_paths), *(f"model.{k}={v}" for k, v in SR_MODEL.items()),
        f"train.max_train_steps={teacher_steps}", f"train.checkpointing_steps={teacher_steps}",
        "train.lr_scheduler=cosine", "train.log_every=100", "validation.every=0", f"validation.photos={photos}",
        "validation.max_side=null",
    ]  # fmt: skip
    marker = teacher_run / TEACHER_SETTINGS
    finished = (teacher_run / "train_report.json").is_file() and marker.is_file()
    if not finished or json.loads(marker.read_text()) != teacher_overrides:
        shutil.rmtree(teacher_run, ignore_errors=True)
        train_sr(load_config("sr/tiny", teacher_overrides))
        marker.write_text(json.dumps(teacher_overrides, indent=1))
    return teacher_run


def run(teacher_paths: dict, work_dir: Path, teacher_steps: int, search_steps: int, finetune_steps: int,
        fraction: float = 0.33, runtime: str = "compiled", repeats: int = 3) -> dict:  # fmt: skip
    from distill.prune import prune
    from hyperhuman.config import load_config

    work_dir = Path(work_dir)
    photos = str(Path(teacher_paths["root"]) / "photos" / "heldout")
    teacher_run = unpruned(teacher_paths, work_dir, teacher_steps)
    pruned_run = work_dir / "pruned"
    if not (pruned_run / "prune_report.json").is_file():
        prune(load_config("prune/sr-tiny", [
            f"output={pruned_run}", f"teacher={teacher_run}", *sr_data(teacher_paths),
            f"target.cost={runtime}", f"target.fraction={fraction}",
            f"timing.height={OUTPUT_SIZE[0] // 2}", f"timing.width={OUTPUT_SIZE[1] // 2}", f"timing.repeats={repeats}",
            f"search.steps={search_steps}", f"train.max_train_steps={finetune_steps}",
            f"train.checkpointing_steps={finetune_steps}", "train.lr_scheduler=cosine", "train.log_every=100",
            f"validation.photos={photos}", "validation.max_side=null",
        ]))  # fmt: skip
    report = json.loads((pruned_run / "prune_report.json").read_text())
    quality = report["quality"]
    rows = [
        {"model": "unpruned", "psnr": quality["teacher"]["psnr"], "ssim": quality["teacher"]["ssim"],
         "measured_ms": report["measured_ms"]["teacher"], "predicted_ms": report["predicted_ms"]["teacher"],
         "latency_error": report["latency_error"]["teacher"], "params": report["params"]["teacher"],
         "blocks": report["architecture"]["teacher"]},
        {"model": "searched", "psnr": quality["pruned"]["psnr"], "ssim": quality["pruned"]["ssim"],
         "measured_ms": report["measured_ms"]["pruned"], "predicted_ms": report["predicted_ms"]["pruned"],
         "latency_error": report["latency_error"]["pruned"], "params": report["params"]["pruned"],
         "blocks": report["architecture"]["pruned"]},
        {"model": "bicubic", "psnr": quality["teacher"]["bicubic_psnr"], "ssim": quality["teacher"]["bicubic_ssim"]},
    ]  # fmt: skip
    for row in rows:
        if "measured_ms" in row:
            row["fps_720p"] = 1000 / row["measured_ms"]
    held_out = report["speed_model"]["held_out"]
    summary = {
        "sr_speedup": report["speedup"],
        "sr_psnr_drop_db": rows[0]["psnr"] - rows[1]["psnr"],
        "sr_psnr_over_bicubic_db": rows[1]["psnr"] - rows[2]["psnr"],
        "sr_latency_error_max": max(
            abs(rows[0]["latency_error"]), abs(rows[1]["latency_error"]), *(abs(row["error"]) for row in held_out)
        ),  # fmt: skip
        "sr_target_met": report["target_met"],
    }
    budgets = {"teacher_steps": teacher_steps, "search_steps": search_steps, "finetune_steps": finetune_steps,
               "fraction": fraction, "runtime": runtime, "repeats": repeats, "model": SR_MODEL,
               "output_size": OUTPUT_SIZE, "heldout_photos": quality["teacher"]["photos"]}  # fmt: skip
    return {"rows": rows, "held_out_networks": held_out, "summary": summary, "budgets": budgets,
            "wall_s": report["wall_s"]}  # fmt: skip


def print_table(section: dict) -> None:
    budgets = section["budgets"]
    height, width = budgets["output_size"]
    print(f"\nSR ×2 at {width}×{height} output, {budgets['runtime']}; target {budgets['fraction']:.0%} of the "
          f"unpruned latency; held-out photos: {budgets['heldout_photos']}")  # fmt: skip
    header = ("model", "PSNR", "SSIM", "meas ms", "fps", "pred ms", "error", "params")
    print(f"{header[0]:9} " + " ".join(f"{name:>8}" for name in header[1:]) + "  blocks")
    for row in section["rows"]:
        quality = f"{row['model']:9} {row['psnr']:8.2f} {row['ssim']:8.4f}"
        if "measured_ms" not in row:
            print(quality)
            continue
        print(f"{quality} {row['measured_ms']:8.1f} {row['fps_720p']:8.2f} {row['predicted_ms']:8.1f} "
              f"{row['latency_error']:+8.1%} {row['params']:8d}  {row['blocks']}")  # fmt: skip
    for row in section["held_out_networks"]:
        print(f"  speed model, held-out network {row['architecture']}: predicted {row['predicted']:.1f} ms, "
              f"measured {row['measured']:.1f} ms ({row['error']:+.1%})")  # fmt: skip
    print(f"summary: {json.dumps(section['summary'])}")
