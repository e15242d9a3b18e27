"""LSDM training-step cost vs a plain diffusers UNet with the same trunk, side by side in one run.

    .venv/bin/python bench/lsdm_step.py [--repeats 10] [--threads 2]

For each configuration, one training step (forward, v-MSE, backward, AdamW) of
``LatentStructuralUNet`` (3 branches) and of ``UNet2DConditionModel`` (one output) on the same
batch and latent size is timed alternately; FLOPs of forward + backward are counted with
``torch.utils.flop_counter``. The branches replicate ``conv_in``, the outer down/up blocks and the
head, so the step should cost what those FLOPs cost and no more: the goal is a step-time ratio
within 10% of the FLOPs ratio. SD-2-base at 512² (latent 64², batch 1) is counted on the meta
device, not timed. Prints a table, writes bench/results/lsdm_step.json; the last line reads
``step ratio X (FLOPs ratio Y)`` for the mid-size configuration.

FLOPs are not time: on a CPU the outer, high-resolution blocks (few channels, many attention
tokens) run at a lower FLOP rate than the trunk, so replicating them costs more than their FLOP
share. The ``blocks ×`` column is the ratio predicted from time instead: the UNet's step plus the
measured forward + backward time of the extra branches' own modules run alone. A step ratio
close to it means the LSDM adds nothing beyond the replicated blocks themselves.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from hyperhuman.config import load_config
from hyperhuman.lsdm import LatentStructuralUNet

TINY = load_config("lsdm/tiny")["model"]["unet"]
MID = {
    **TINY,
    "sample_size": 32,
    "layers_per_block": 2,
    "block_out_channels": [64, 128, 256, 256],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "norm_num_groups": 32,
    "attention_head_dim": [1, 2, 4, 4],  # heads per block: 64-d heads, as in SD
}
SD2 = load_config("lsdm/sd2-base-512")["model"]["unet"]
CASES = {  # name: (unet config, batch, latent side)
    "tiny (64² px)": (TINY, 8, 8),
    "mid (256² px)": (MID, 4, 32),
}


def build(unet_config: dict, seed: int = 0) -> tuple[UNet2DConditionModel, LatentStructuralUNet]:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config)
    return unet, LatentStructuralUNet.from_unet(unet)


def inputs(model, batch: int, side: int, text_dim: int, device="cpu") -> tuple:
    generator = torch.Generator().manual_seed(0)
    lsdm = isinstance(model, LatentStructuralUNet)
    channels = 12 if lsdm else 4
    sample = torch.randn(batch, channels, side, side, generator=generator).to(device)
    states = torch.randn(batch, 77, text_dim, generator=generator).to(device)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    kwargs = {"pose_latent": torch.randn(batch, 4, side, side, generator=generator).to(device)} if lsdm else {}
    return sample, timesteps, states, kwargs


def train_step(model, optimizer, batch_inputs) -> None:
    sample, timesteps, states, kwargs = batch_inputs
    prediction = model(sample, timesteps, states, **kwargs).sample
    F.mse_loss(prediction, sample).backward()  # the target's value does not change the cost
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def count_flops(model, batch_inputs) -> int:
    sample, timesteps, states, kwargs = batch_inputs
    with FlopCounterMode(display=False) as counter:
        prediction = model(sample, timesteps, states, **kwargs).sample
        prediction.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def branch_step_time(lsdm: LatentStructuralUNet, batch_inputs, repeats: int) -> float:
    """Forward + backward time of one branch's own modules alone, on the inputs they get in a real
    step (captured with hooks; gradients flow to their inputs as they would to the trunk)."""
    branch = lsdm.branch[lsdm.config.branches[0]]
    modules = [branch.conv_in, *branch.down_blocks, *branch.up_blocks.values(), branch.conv_norm_out, branch.conv_out]
    captured = {}

    def capture(module, args, kwargs):
        captured.setdefault(module, (args, kwargs))

    handles = [m.register_forward_pre_hook(capture, with_kwargs=True) for m in modules]
    with torch.no_grad():
        sample, timesteps, states, kwargs = batch_inputs
        lsdm(sample, timesteps, states, **kwargs)
    for handle in handles:
        handle.remove()

    def leaf(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.detach().requires_grad_(True)
        if isinstance(value, tuple):
            return tuple(leaf(v) for v in value)
        return value

    def run():
        total = 0
        for module in modules:
            args, kwargs = captured[module]
            out = module(*[leaf(a) for a in args], **{k: leaf(v) for k, v in kwargs.items()})
            out = out[0] if isinstance(out, tuple) else out
            total = total + out.float().square().mean()
        total.backward()
        lsdm.zero_grad(set_to_none=True)

    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def bench_case(unet_config: dict, batch: int, side: int, repeats: int) -> dict:
    unet, lsdm = build(unet_config)
    text_dim = unet_config["cross_attention_dim"]
    data = {name: inputs(model, batch, side, text_dim) for name, model in (("unet", unet), ("lsdm", lsdm))}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-5) for name, m in (("unet", unet), ("lsdm", lsdm))}
    models = {"unet": unet, "lsdm": lsdm}
    flops = {name: count_flops(models[name], data[name]) for name in models}
    times = {name: [] for name in models}
    for name in models:  # warm-up
        train_step(models[name], optimizers[name], data[name])
    for _ in range(repeats):  # alternate so drift on a noisy machine hits both alike
        for name in models:
            start = time.perf_counter()
            train_step(models[name], optimizers[name], data[name])
            times[name].append(time.perf_counter() - start)
    step = {name: statistics.median(values) for name, values in times.items()}
    extra_branches = len(lsdm.config.branches) - 1
    branch_s = branch_step_time(lsdm, data["lsdm"], repeats)
    return {
        "branch_step_s": branch_s,
        "predicted_step_ratio": (step["unet"] + extra_branches * branch_s) / step["unet"],
        "batch": batch,
        "latent": side,
        "unet_step_s": step["unet"],
        "lsdm_step_s": step["lsdm"],
        "step_ratio": step["lsdm"] / step["unet"],
        "unet_gflops": flops["unet"] / 1e9,
        "lsdm_gflops": flops["lsdm"] / 1e9,
        "flops_ratio": flops["lsdm"] / flops["unet"],
        "unet_params": parameters(unet),
        "lsdm_params": parameters(lsdm),
        "added_params": parameters(lsdm) - parameters(unet),
    }


def sd2_flops() -> dict:
    """SD-2-base at 512² (latent 64², batch 1): FLOPs of forward + backward, counted on the meta device."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD2)
        lsdm = LatentStructuralUNet(unet={**SD2, "in_channels": 8})
    flops = {}
    for name, model in (("unet", unet), ("lsdm", lsdm)):
        sample, timesteps, states, kwargs = inputs(model, 1, 64, SD2["cross_attention_dim"], device="meta")
        flops[name] = count_flops(model, (sample, timesteps, states, kwargs))
    return {
        "unet_gflops": flops["unet"] / 1e9,
        "lsdm_gflops": flops["lsdm"] / 1e9,
        "flops_ratio": flops["lsdm"] / flops["unet"],
        "unet_params": parameters(unet),
        "lsdm_params": parameters(lsdm),
        "added_params": parameters(lsdm) - parameters(unet),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", default="bench/results/lsdm_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = {name: bench_case(config, batch, side, args.repeats) for name, (config, batch, side) in CASES.items()}
    results["sd2-base-512 (counted)"] = sd2_flops()
    header = (
        f"{'config':<24}{'UNet step':>11}{'LSDM step':>11}{'step ×':>8}{'FLOPs ×':>9}{'blocks ×':>10}"
        f"{'UNet params':>13}{'added':>12}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        timed = "unet_step_s" in r
        unet_s = f"{r['unet_step_s'] * 1e3:.0f} ms" if timed else "-"
        lsdm_s = f"{r['lsdm_step_s'] * 1e3:.0f} ms" if timed else "-"
        ratio = f"{r['step_ratio']:.3f}" if timed else "-"
        predicted = f"{r['predicted_step_ratio']:.3f}" if timed else "-"
        print(
            f"{name:<24}{unet_s:>11}{lsdm_s:>11}{ratio:>8}{r['flops_ratio']:>9.3f}{predicted:>10}"
            f"{r['unet_params'] / 1e6:>12.1f}M{r['added_params'] / 1e6:>11.1f}M"
        )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {out}")
    mid = results["mid (256² px)"]
    print(f"step ratio {mid['step_ratio']:.3f} (FLOPs ratio {mid['flops_ratio']:.3f})")


if __name__ == "__main__":
    main()
