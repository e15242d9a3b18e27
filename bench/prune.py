"""Pruning-as-Search on this CPU, side by side with uniform width scaling and L1 magnitude pruning.

    .venv/bin/python bench/prune.py [--search-steps 100] [--finetune-steps 150] [--fraction 0.75]

The bench teacher (``bench/_teacher.py``: an SD-layout LSDM trained on the real photos of
``../shared/data/humans``, cached) is taken to ``--fraction`` of its eager latency (one guided step,
batch 2) by PaS, and uniform width scaling and L1 magnitude pruning are narrowed to the PaS model's
measured step; all three get the same training budget (``bench/_prune_unet.py`` says why the
comparison is fair): measured and predicted latency, the prediction's error, params, held-out
v-loss and PSNR of samples against the unpruned teacher's.

The SR network (``bench/_prune_sr.py``): WDSR-A trained on the same shards (once: it is kept, like
the bench teacher, while its recipe stays), searched to ``--sr-fraction`` of its compiled latency
at 720p output; PSNR / SSIM on the held-out photos against the unpruned network and bicubic, fps,
the speed model's error.

Writes ``bench/results/prune.json`` whose ``summary`` holds ``pas_loss``, ``uniform_loss``,
``l1_loss`` (held-out v-loss), ``sr_speedup``, ``sr_psnr_drop_db``, ``sr_psnr_over_bicubic_db``
and ``latency_error_max`` (the largest |predicted / measured − 1| of the pruned UNets and of the
SR networks, held-out ones included). Skips (exit 0) without ``../shared``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import _prune_sr  # noqa: E402
import _prune_unet  # noqa: E402
import _teacher  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--search-steps", type=int, default=100, help="PaS mask-search steps")
    parser.add_argument("--finetune-steps", type=int, default=150, help="PaS fine-tune steps (baselines: both)")
    # 0.5 is out of reach on eager for the bench teacher: what no block width changes is 65% of its step
    parser.add_argument("--fraction", type=float, default=0.75, help="the latency target, × the teacher's")
    parser.add_argument("--runtime", default="eager", help="the runtime the latency target is on")
    parser.add_argument("--repeats", type=int, default=5, help="alternating timing rounds per model")
    parser.add_argument("--sr-teacher-steps", type=int, default=800, help="train-sr steps of the unpruned SR network")
    parser.add_argument("--sr-search-steps", type=int, default=200)
    parser.add_argument("--sr-finetune-steps", type=int, default=400)
    parser.add_argument("--sr-fraction", type=float, default=0.33, help="the SR latency target, × the unpruned")
    parser.add_argument("--sr-runtime", default="compiled")
    parser.add_argument("--reuse-runs", action="store_true", help="keep finished runs whose settings match")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "prune.json"))
    args = parser.parse_args()
    if not (_teacher.PHOTOS / "keypoints_coco.json").is_file():
        print(f"prune: skipped, no photo set at {_teacher.PHOTOS} (../shared beside the repository)")
        return

    import shutil

    started = time.perf_counter()
    teacher = _teacher.teacher()
    teacher_s = time.perf_counter() - started
    runs = teacher["root"] / "prune"
    if not args.reuse_runs:  # every run but the unpruned SR network (a teacher: kept while its recipe is)
        shutil.rmtree(runs / "unet", ignore_errors=True)
        shutil.rmtree(runs / "sr" / "pruned", ignore_errors=True)
    unet = _prune_unet.run(teacher, runs / "unet", args.search_steps, args.finetune_steps, args.fraction,
                           args.runtime, args.repeats)  # fmt: skip
    _prune_unet.print_table(unet)
    sr = _prune_sr.run(teacher, runs / "sr", args.sr_teacher_steps, args.sr_search_steps, args.sr_finetune_steps,
                       args.sr_fraction, args.sr_runtime)  # fmt: skip
    _prune_sr.print_table(sr)
    summary = {key: unet["summary"][key] for key in ("pas_loss", "uniform_loss", "l1_loss")}
    summary.update({key: sr["summary"][key] for key in ("sr_speedup", "sr_psnr_drop_db", "sr_psnr_over_bicubic_db")})
    # the largest |predicted / measured − 1| of both speed models (the pruned UNets; the SR networks)
    summary["latency_error_max"] = max(unet["summary"]["latency_error_max"], sr["summary"]["sr_latency_error_max"])
    summary.update({f"unet_{key}": value for key, value in unet["summary"].items() if key not in summary})
    summary.update({key: value for key, value in sr["summary"].items() if key not in summary})
    summary["goals"] = {
        "pas_loss < uniform_loss": summary["pas_loss"] < summary["uniform_loss"],
        "pas_loss < l1_loss": summary["pas_loss"] < summary["l1_loss"],
        "sr_speedup >= 3": summary["sr_speedup"] >= 3,
        "sr_psnr_drop_db <= 0.2": summary["sr_psnr_drop_db"] <= 0.2,
        "sr_psnr_over_bicubic_db > 0": summary["sr_psnr_over_bicubic_db"] > 0,
        "latency_error_max <= 0.10": summary["latency_error_max"] <= 0.10,
    }
    result = {
        "summary": summary,
        "unet": unet,
        "sr": sr,
        "teacher": {**teacher["report"], "root": str(teacher["root"])},
        "settings": vars(args),
        "times_s": {
            "teacher_s": round(teacher_s, 1),
            **unet["times_s"],
            "total_s": round(time.perf_counter() - started, 1),
        },
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1, default=str))
    print(f"times: {json.dumps(result['times_s'])}")
    print(f"summary: {json.dumps(summary)}\nwrote {output}")


if __name__ == "__main__":
    main()
