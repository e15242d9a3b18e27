"""The best mobile student of ``bench/mobile_unet.py`` (the evolved one), for benchmarks that take it
as their model: found in the bench teacher's ``mobile_unet/evolved`` when that run left it there,
built with the same recipe and defaults otherwise (robust training, architecture evolving to 40%
of the teacher's eager step, KD), in the same folders, so either benchmark reuses the other's.

``bench/mobile_unet.py`` without ``--reuse-runs`` retrains its students, and with them this one.
``python bench/_mobile_student.py`` builds it (about 18 min on a quiet 2-core machine).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import _teacher  # noqa: E402
import mobile_unet  # noqa: E402

ROBUST_STEPS, SKIP_PROB, BUDGET, KD_STEPS = 300, 0.15, 0.4, 200  # bench/mobile_unet.py's defaults
HELDOUT_NUM, SEARCH_RUNTIME = 16, "eager"


def evolved_student(teacher: dict, log=print) -> dict:
    """The evolved student's run folder (``run``) and the seconds spent building what was missing."""
    from distill.evolve import evolve, write
    from distill.kd import distill_unet
    from distill.latency import LatencyTable
    from distill.measure import HeldOut, load_pipeline

    runs = teacher["root"] / "mobile_unet"
    times = {}
    if not mobile_unet.done(runs / "robust"):
        log(f"[mobile student] robust training ({ROBUST_STEPS} steps) ...")
        started = time.perf_counter()
        config = mobile_unet.kd_config(runs / "robust", teacher["lsdm"], teacher, "teacher", ROBUST_STEPS, SKIP_PROB)
        distill_unet(config)
        times["robust_s"] = time.perf_counter() - started
    evolve_path = runs / "evolve" / "evolve.json"
    if not evolve_path.is_file():
        log(f"[mobile student] architecture evolving to {BUDGET:.0%} of the teacher's {SEARCH_RUNTIME} step ...")
        started = time.perf_counter()
        robust = load_pipeline(runs / "robust")
        heldout = HeldOut.from_shards(teacher["heldout_shards"], robust, num=HELDOUT_NUM)
        table = LatencyTable.load(runs / "latency_table.json")
        write(evolve(robust, heldout, table, runtime=SEARCH_RUNTIME, budget=BUDGET), evolve_path.parent)
        times["evolve_s"] = time.perf_counter() - started
    if not mobile_unet.done(runs / "evolved"):
        log(f"[mobile student] KD of the evolved student ({KD_STEPS} steps) ...")
        started = time.perf_counter()
        config = mobile_unet.kd_config(runs / "evolved", teacher["lsdm"], teacher, str(evolve_path), KD_STEPS, 0.0)
        config["student_init"] = str(runs / "robust")
        distill_unet(config)
        times["kd_s"] = time.perf_counter() - started
    return {"run": runs / "evolved", "built_s": {key: round(value, 1) for key, value in times.items()}}


if __name__ == "__main__":
    built = evolved_student(_teacher.teacher())
    print(json.dumps({"run": str(built["run"]), "built_s": built["built_s"]}, indent=1))
