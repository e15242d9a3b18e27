"""Quantization-aware training and PIM on the mobile student (the helper of ``bench/quantize.py``).

    section = qat_section(student_run, teacher_paths, work_dir, args)
    pim = pim_section(student_run, section, teacher_paths, work_dir, args)

QAT: ``hyperhuman quantize qat`` (``configs/quantize/qat-tiny.yaml`` at the bench's data) for each
of :data:`SCHEMES`, the same steps each, KD from the fp32 student; the held-out v-loss of fp32,
of the fake-quantized model before training (ranges from the first batches: quantizing without
training) and after.

PIM: the conventionally trained W8A8 model evaluated under PIM quantization (crossbar tiles of
``--pim-tile`` rows, ``--pim-scheme``, an ADC of 4–6 bits, with and without thermal noise; the
chip set up for it by :func:`distill.quant.qat.calibrate_chip` on ``--pim-calibration-batches``
training batches: rescaling gains, and ADC ranges where they are calibrated), against PIM-QAT:
QAT with the ADC in the loop, continued from the W8A8 model's weights for ``--pim-steps`` (one
model per ADC range and resolution, trained with the noise injected, PIM-QAT's rescaling on),
under the same PIM. Each of ``--pim-adc-ranges``: ``full`` (the ADC spans the partial sums'
theoretical range) and ``calibrated`` (per layer, fitted to the partial sums). The loss gap PIM
opens is the conventional model's v-loss under PIM minus fp32's; PIM-QAT's share of it recovered
is ``(conventional − PIM-QAT) / (conventional − fp32)``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

A8 = {"scheme": "fixed", "bits": 8}
SCHEMES = {
    "W8A8": {"weight": {"scheme": "fixed", "bits": 8, "per_channel": True}, "activation": A8},
    "W4A8": {"weight": {"scheme": "fixed", "bits": 4, "per_channel": True}, "activation": A8},
    "PoT W4A8": {"weight": {"scheme": "pot", "bits": 4}, "activation": A8},
    "mixed W4A8": {"weight": {"scheme": "mixed", "bits": 4, "pot_ratio": 0.5}, "activation": A8},
}


def qat_config(
    output: Path,
    run: Path,
    teacher_paths: dict,
    scheme: dict,
    steps: int,
    args,
    pim=None,
    heldout: bool = True,
    learning_rate: float | None = None,
) -> dict:
    from hyperhuman.config import load_config

    config = load_config("quantize/qat-tiny", [
        # the mobile student's own data recipe (bench/mobile_unet.py's kd_config): fine-tuning it on
        # random crops and flips it never saw raised its held-out loss by 8% even at W8A8
        "data.resolution=64", "data.random_crop=false", "data.flip_prob=0.0", "data.cache_latents=true",
        "data.num_workers=0", f"train.batch_size={args.qat_batch}",
        f"train.max_train_steps={steps}", f"train.checkpointing_steps={steps}",
        f"train.learning_rate={learning_rate or args.qat_lr}", "train.log_every=50",
        f"validation.heldout_num={args.heldout_num}",
    ])  # fmt: skip
    config.update(output=str(output), model=str(run), pim=pim)
    config["scheme"].update(weight=scheme["weight"], activation=scheme["activation"])
    config["data"]["train"] = str(teacher_paths["train_shards"])
    config["validation"]["heldout"] = str(teacher_paths["heldout_shards"]) if heldout else None
    return config


def qat_section(run: Path, teacher_paths: dict, work_dir: Path, args) -> dict:
    from distill.quant.qat import quantize_qat

    rows = []
    for name, scheme in SCHEMES.items():
        started = time.perf_counter()
        output = work_dir / name.replace(" ", "-")
        report = quantize_qat(qat_config(output, run, teacher_paths, scheme, args.qat_steps, args))
        heldout = report["heldout"]
        rows.append({
            "scheme": name, "run": str(output), "fp32": heldout["fp32"], "before": heldout["before"],
            "after": heldout["after"], "loss_ratio": heldout["after"] / heldout["fp32"],
            "int8_representable": report["int8_representable"], "wall_s": round(time.perf_counter() - started, 1),
        })  # fmt: skip
        print(f"[bench quantize] QAT {name}: held-out v-loss {heldout['after']:.4f} (fp32 {heldout['fp32']:.4f})")
    return {"rows": rows, "steps": args.qat_steps, "batch": args.qat_batch, "learning_rate": args.qat_lr}


def set_pim(model: torch.nn.Module, **changes) -> None:
    """Every PIM module of ``model`` at a changed config (e.g. the chip's noise)."""
    from distill.quant.pim import PIM

    for module in model.modules():
        if isinstance(module, PIM):
            module.config = dataclasses.replace(module.config, **changes)


def pim_loss(pipeline, heldout, noise: float) -> float:
    from distill.measure import v_loss

    set_pim(pipeline.unet, noise=noise)
    torch.manual_seed(0)  # the thermal noise's draws: the same for every model
    return v_loss(pipeline, heldout)["v_loss"]


def pim_section(run: Path, qat: dict, teacher_paths: dict, work_dir: Path, args) -> dict:
    from distill.measure import HeldOut
    from distill.quant.pim import PIMConfig, enable_pim
    from distill.quant.qat import calibrate_chip, load_qat_model, quantize_qat

    conventional_row = next(row for row in qat["rows"] if row["scheme"] == "W8A8")
    conventional = load_qat_model(conventional_row["run"])
    conventional.set_progress_bar_config(disable=True)
    heldout = HeldOut.from_shards(teacher_paths["heldout_shards"], conventional, num=args.pim_heldout_num)
    fp32 = conventional_row["fp32"] if args.pim_heldout_num == args.heldout_num else None
    if fp32 is None:
        from distill.measure import load_pipeline, v_loss

        fp32 = v_loss(load_pipeline(run), heldout)["v_loss"]
    noises = (0.0, args.pim_noise)
    init = Path(conventional_row["run"]) / "pipeline"
    data = qat_config(work_dir, init, teacher_paths, SCHEMES["W8A8"], 1, args)["data"]
    rows = []
    for adc_range in args.pim_adc_ranges:
        for bits in args.adc_bits:
            started = time.perf_counter()
            chip = {"tile": args.pim_tile, "adc_bits": bits, "scheme": args.pim_scheme, "adc_range": adc_range}
            # the conventional model on the same chip, set up for it as it is (ADC ranges, gains)
            enable_pim(conventional.unet, PIMConfig(**chip))
            calibrate_chip(conventional.unet, init, data, args.pim_calibration_batches, args.qat_batch)
            conventional_losses = {noise: pim_loss(conventional, heldout, noise) for noise in noises}
            output = work_dir / f"pim-qat-{adc_range}-adc{bits}"
            pim = {**chip, "noise": 0.0, "train_noise": args.pim_noise, "rescale": True}
            if args.pim_train_adc_offset:  # PIM-QAT's adjusted precision: train at another ADC resolution
                pim["train_adc_bits"] = bits + args.pim_train_adc_offset
            # from the conventional model's weights (a PIM simulation step costs tens of digital ones);
            # the bench scores it below, so the run itself skips its held-out passes
            quantize_qat(qat_config(output, init, teacher_paths, SCHEMES["W8A8"], args.pim_steps, args, pim=pim,
                                    heldout=False, learning_rate=args.pim_lr))  # fmt: skip
            trained = load_qat_model(output)
            trained.set_progress_bar_config(disable=True)
            for noise in noises:
                ours = pim_loss(trained, heldout, noise)
                theirs = conventional_losses[noise]
                rows.append({
                    "adc_range": adc_range, "adc_bits": bits, "noise_lsb": noise, "conventional": theirs,
                    "pim_qat": ours, "gap_recovered": (theirs - ours) / (theirs - fp32) if theirs > fp32 else None,
                })  # fmt: skip
            print(f"[bench quantize] PIM {adc_range} {bits}-bit ADC: {rows[-2:]} "
                  f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
    digital = pim_digital_loss(conventional, heldout)
    result = {
        "rows": rows, "fp32": fp32, "w8a8_digital": digital, "tile": args.pim_tile, "scheme": args.pim_scheme,
        "noise_lsb": args.pim_noise, "steps": args.pim_steps, "learning_rate": args.pim_lr,
        "train_adc_offset": args.pim_train_adc_offset,
        "heldout_num": args.pim_heldout_num, "calibration_batches": args.pim_calibration_batches,
    }  # fmt: skip
    for adc_range in args.pim_adc_ranges:
        recovered = [row["gap_recovered"] for row in rows if row["adc_range"] == adc_range]
        recovered = [value for value in recovered if value is not None]
        result[f"gap_recovered_mean_{adc_range}"] = sum(recovered) / len(recovered) if recovered else None
        result[f"gap_recovered_min_{adc_range}"] = min(recovered) if recovered else None
    best = args.pim_adc_ranges[-1]  # the chip the goal is judged on: the last range named (calibrated by default)
    result.update(goal_adc_range=best, gap_recovered_mean=result[f"gap_recovered_mean_{best}"],
                  gap_recovered_min=result[f"gap_recovered_min_{best}"])  # fmt: skip
    return result


def pim_digital_loss(pipeline, heldout) -> float:
    """The conventional model's v-loss on digital hardware (PIM off) on the PIM rows' triples."""
    from distill.measure import v_loss
    from distill.quant.pim import disable_pim

    disable_pim(pipeline.unet)
    return v_loss(pipeline, heldout)["v_loss"]


def print_sections(qat: dict, pim: dict | None) -> None:
    print(f"\nQAT on the mobile student ({qat['steps']} steps, batch {qat['batch']}, KD from fp32):")
    print(f"{'scheme':12} {'fp32':>8} {'before':>8} {'after':>8} {'× fp32':>8}  int8 runtime")
    for row in qat["rows"]:
        print(f"{row['scheme']:12} {row['fp32']:8.4f} {row['before']:8.4f} {row['after']:8.4f} "
              f"{row['loss_ratio']:8.3f}  {'yes' if row['int8_representable'] else 'simulated'}")  # fmt: skip
    if not pim:
        return
    print(f"\nPIM ({pim['scheme']}, tiles of {pim['tile']} rows; fp32 {pim['fp32']:.4f}, W8A8 digital "
          f"{pim['w8a8_digital']:.4f}; PIM-QAT {pim['steps']} steps with {pim['noise_lsb']} LSB noise):")  # fmt: skip
    print(f"{'ADC range':>10} {'ADC bits':>8} {'noise':>6} {'conventional':>13} {'PIM-QAT':>8} {'gap recovered':>14}")
    for row in pim["rows"]:
        gap = "–" if row["gap_recovered"] is None else f"{row['gap_recovered']:.0%}"
        losses = f"{row['conventional']:13.4f} {row['pim_qat']:8.4f}"
        print(f"{row.get('adc_range', 'full'):>10} {row['adc_bits']:8d} {row['noise_lsb']:6.2f} {losses} {gap:>14}")


if __name__ == "__main__":  # pragma: no cover - a quick look at one saved section
    import sys

    saved = json.loads(Path(sys.argv[1]).read_text())
    print_sections(saved["qat"], saved.get("pim"))
