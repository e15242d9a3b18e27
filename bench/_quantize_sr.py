"""int8 of the pruning stage's SR network on both runtimes (the helper of ``bench/quantize.py``).

    section = sr_section(sr_folder, teacher_paths, work_dir, args)   # None when prune left none

The searched (pruned) WDSR ×2 of ``bench/prune.py`` when its cache holds one, else the unpruned
one. PT2E int8 calibrated on low-resolution crops of the training photos (exported with a dynamic
batch and size); ORT fp32 and static QDQ int8 exported at the timing size. One 360 × 640 → 1280 ×
720 frame timed on fp32 eager / compiled / bf16 / int8 compiled / ORT fp32 / ORT int8 in
alternation; PSNR / SSIM of fp32 and int8 (the int8 graph uncompiled: the photos' sizes differ) on
the held-out photos, and the int8 output's PSNR against fp32's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

TIMING_INPUT = (1, 3, 360, 640)
CALIBRATION_SIDE = 192  # high-resolution crops of the training photos, downscaled ×2


def sr_folder(teacher_paths: dict) -> Path | None:
    root = Path(teacher_paths["root"]) / "prune" / "sr"
    for folder in (root / "pruned" / "sr", root / "teacher" / "sr"):
        if (folder / "config.json").is_file():
            return folder
    return None


class _Program(nn.Module):
    """An int8 program in the SR network's place for :func:`hyperhuman.sr.metrics.evaluate`."""

    def __init__(self, program, float_model):
        super().__init__()
        self.program, self.float_model = program, float_model

    config = property(lambda self: self.float_model.config)
    device = property(lambda self: self.float_model.device)
    dtype = property(lambda self: self.float_model.dtype)

    def forward(self, low_resolution):
        return self.program(low_resolution=low_resolution)


@torch.no_grad()
def sr_section(folder: Path, teacher_paths: dict, work_dir: Path, args) -> dict:
    import PIL.Image
    from _quantize_ptq import first_call_s

    from distill.latency import alternating_ms, runner
    from distill.quant.onnx_runtime import OnnxDenoiser, export_onnx, quantize_qdq
    from distill.quant.ptq import compiled, quantize_exported
    from hyperhuman.sr.data import crop_to_multiple, downscale, photo_paths, to_tensor
    from hyperhuman.sr.metrics import evaluate, psnr
    from hyperhuman.sr.model import SuperResolutionNet

    work_dir.mkdir(parents=True, exist_ok=True)
    model = SuperResolutionNet.from_pretrained(folder).eval()
    scale = model.config.scale
    root = Path(teacher_paths["root"]) / "photos"
    calibration = [
        {"low_resolution": downscale(to_tensor(crop_to_multiple(PIL.Image.open(p), scale, CALIBRATION_SIDE)), scale)}
        for p in photo_paths(root / "train")[: args.sr_calibration_photos]
    ]  # fmt: skip
    dims = {"low_resolution": {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}}
    exported = torch.export.export(model, (), dict(calibration[0]), dynamic_shapes=dims)
    program = quantize_exported(exported, calibration)

    frame = {"low_resolution": torch.rand(TIMING_INPUT, generator=torch.Generator().manual_seed(0))}
    onnx_fp32 = export_onnx(model, frame, work_dir / "sr.onnx")
    timing_calls = [
        {"low_resolution": torch.nn.functional.interpolate(call["low_resolution"], size=TIMING_INPUT[2:])}
        for call in calibration
    ]  # QDQ's calibration at the exported size: the same crops, resized
    onnx_int8 = quantize_qdq(onnx_fp32, timing_calls, work_dir / "sr_int8.onnx")
    runtimes = {
        "fp32 eager": runner(model, "eager"), "fp32 compiled": compiled(model),
        "bf16": runner(model, "bf16"), "int8 compiled": compiled(program),
        "ORT fp32": OnnxDenoiser(onnx_fp32), "ORT int8": OnnxDenoiser(onnx_int8),
    }  # fmt: skip
    kwargs = dict.fromkeys(runtimes, frame)
    compile_s = {key: round(first_call_s(runtimes[key], frame), 1) for key in ("fp32 compiled", "int8 compiled")}
    for key in ("fp32 eager", "bf16", "ORT fp32", "ORT int8"):
        first_call_s(runtimes[key], frame)
    ms = alternating_ms(runtimes, kwargs, args.rounds, args.repeats)

    photos = photo_paths(root / "heldout")
    fp32_scores = evaluate(model, photos)
    int8_scores = evaluate(_Program(program, model), photos)
    agreement = []
    for path in photos:
        low = downscale(to_tensor(crop_to_multiple(PIL.Image.open(path), scale)), scale)
        agreement.append(psnr(program(low_resolution=low).clamp(0, 1), model(low).clamp(0, 1)))
    return {
        "model": str(folder), "params": sum(p.numel() for p in model.parameters()),
        "blocks": model.block_widths(), "step_ms": ms, "compile_s": compile_s,
        "quality": {"fp32": fp32_scores, "int8": int8_scores,
                    "int8_psnr_vs_fp32_db": sum(agreement) / len(agreement)},
    }  # fmt: skip


def print_section(section: dict) -> None:
    ms, quality = section["step_ms"], section["quality"]
    base = ms["fp32 compiled"]
    print(f"\nSR ×2 ({section['params']} params, blocks {section['blocks']}), one 360×640 → 720×1280 frame:")
    for key, value in ms.items():
        print(f"  {key:16} {value:8.1f} ms  {base / value:5.2f}× compiled fp32  {1000 / value:6.2f} fps")
    print(f"  held-out PSNR / SSIM: fp32 {quality['fp32']['psnr']:.2f} / {quality['fp32']['ssim']:.4f}, int8 "
          f"{quality['int8']['psnr']:.2f} / {quality['int8']['ssim']:.4f}; int8 vs fp32 output "
          f"{quality['int8_psnr_vs_fp32_db']:.1f} dB; compile s {section['compile_s']}")  # fmt: skip
