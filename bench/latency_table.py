"""How well the per-block latency table predicts a whole denoiser step (distill/latency.py).

    .venv/bin/python bench/latency_table.py [--runtimes eager bf16 compiled] [--size 32] [--batch 2]

For an SD-layout UNet of mid size (attention in the three high-resolution stages, as SD has) and
the LSDM built from it (three branches, shared trunk), at a latent of ``--size``: the step
predicted from the table (the sum of its blocks, each timed at its real input shapes) next to
the measured step, per runtime, and the relative error. The table is the machine's cache
(~/.cache/hyperhuman/latency), so a rerun only measures the steps. Prints a table and writes
bench/results/latency_table.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distill.latency import LatencyTable, machine, measure_step, predict  # noqa: E402

MID_UNET = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (64, 128, 256, 256),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 256,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}


def models(size: int, batch: int) -> dict:
    from diffusers import UNet2DConditionModel

    from hyperhuman.lsdm.model import LatentStructuralUNet

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**MID_UNET).eval()
    lsdm = LatentStructuralUNet.from_unet(unet).eval()
    context = torch.randn(batch, 16, MID_UNET["cross_attention_dim"])
    unet_inputs = {"sample": torch.randn(batch, 4, size, size), "timestep": torch.tensor(500),
                   "encoder_hidden_states": context}  # fmt: skip
    lsdm_inputs = {**unet_inputs, "sample": torch.randn(batch, 12, size, size),
                   "pose_latent": torch.randn(batch, 4, size, size)}  # fmt: skip
    return {"unet (SD layout, mid size)": (unet, unet_inputs), "lsdm (3 branches)": (lsdm, lsdm_inputs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtimes", nargs="+", default=["eager", "bf16"], choices=["eager", "compiled", "bf16"])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "latency_table.json"))
    args = parser.parse_args()

    table = LatencyTable.load()
    rows = []
    for name, (model, inputs) in models(args.size, args.batch).items():
        params = sum(p.numel() for p in model.parameters())
        for runtime in args.runtimes:
            print(f"latency_table: {name} on {runtime} ...", flush=True)
            predicted = predict(model, inputs, runtime, table, warmup=3, repeats=args.repeats)
            table.save()
            measured = measure_step(model, inputs, runtime, warmup=3, repeats=args.repeats)
            rows.append({"model": name, "params_m": params / 1e6, "runtime": runtime,
                         "predicted_ms": predicted.total_ms, "measured_ms": measured,
                         "error": predicted.total_ms / measured - 1, "blocks": predicted.blocks})  # fmt: skip
    print(f"latent {args.size}x{args.size}, batch {args.batch}; table {table.path} ({len(table.entries)} entries)")
    print(f"{'model':28} {'params M':>9} {'runtime':>9} {'predicted ms':>13} {'measured ms':>12} {'error':>7}")
    for row in rows:
        print(f"{row['model']:28} {row['params_m']:9.1f} {row['runtime']:>9} {row['predicted_ms']:13.1f} "
              f"{row['measured_ms']:12.1f} {row['error']:+7.1%}")  # fmt: skip
    result = {
        "summary": {"latency_error_max": max(abs(row["error"]) for row in rows)},
        "settings": {"unet": MID_UNET, "size": args.size, "batch": args.batch, "repeats": args.repeats},
        "runs": rows,
        "machine": {**machine(), "platform": platform.platform()},
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2, default=str))
    print(f"summary: {json.dumps(result['summary'])}\nwrote {output}")


if __name__ == "__main__":
    main()
