"""Structure-Guided Refiner step cost vs the frozen base UNet alone, side by side in one run.

    .venv/bin/python bench/sgr_step.py [--repeats 10] [--threads 2]

For each configuration four things are timed alternately, on the same batch and latent size:

- ``base fwd``: the frozen base ``UNet2DConditionModel`` forward, no grad (one sampling step of
  the plain base);
- ``SGR step``: one refiner training step: ``refiner_forward`` with all three conditions (pose,
  depth, normal at 8× the latent size, the paper's embedders 16 / 32 / 96 / 256), v-MSE, backward
  into the refiner only (the base is frozen: ``requires_grad_(False)``), AdamW on the refiner;
- ``base step``: a training step of the base UNet itself (forward, v-MSE, backward, AdamW on all of
  it), i.e. what fine-tuning the base instead would cost;
- ``SGR inf``: refiner + base forward, no grad (one sampling step of stage 2).

FLOPs of all four (forward, plus backward for the steps; not the optimizer) are counted with
``torch.utils.flop_counter``. SD-2-base at 512² (latent 64², conditions 512², batch 1) is counted on
the meta device, not timed. Prints a table, writes bench/results/sgr_step.json; the last line reads
``refiner step ratio X (vs base forward), inference ratio Y (FLOPs ratio Z)`` for the mid-size
configuration, Z being the FLOPs ratio of ``SGR inf`` to ``base fwd``.

What to expect: the control branch is a copy of the base's encoder (its down blocks and mid block,
roughly half the UNet's FLOPs) plus three condition embedders, so inference costs about 1.5× the
base. The training step's backward reaches the refiner fully but the frozen base only through its
decoder (activation gradients, no weight gradients): the base's encoder and mid block get no
gradient because the residuals enter after them. FLOPs are not time: on a CPU the high-resolution,
few-channel layers (the embedders' first convolutions at the condition resolution, the outer
attention blocks) run at a lower FLOP rate than the trunk, so small configurations cost more than
their FLOP share.

On a CPU shared with other work, more threads than free cores make some variants many times slower
(OpenMP waits on descheduled threads) and distort the ratios despite the interleaving: pass
``--threads 1`` there, and compare runs.
"""

from __future__ import annotations

import argparse
import copy
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
from hyperhuman.sgr import CONDITIONS, StructureGuidedRefiner, refiner_forward
from hyperhuman.sgr.testing import VAE_FACTOR

SGR_TINY = load_config("sgr/tiny")["model"]
TINY = SGR_TINY["unet"]
EMBEDDERS = {key: tuple(SGR_TINY[key]) for key in ("embedder_channels", "embedder_strides")}  # the paper's
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
    "tiny (64² px)": (TINY, 4, 8),
    "mid (256² px)": (MID, 4, 32),
}
VARIANTS = ("base_fwd", "sgr_step", "base_step", "sgr_inf")


def build(unet_config: dict, seed: int = 0) -> tuple:
    """The frozen base, a refiner copied from it, and a trainable copy of the base (for ``base step``)."""
    torch.manual_seed(seed)
    base = UNet2DConditionModel(**unet_config)
    refiner = StructureGuidedRefiner.from_unet(base, conditions=CONDITIONS, **EMBEDDERS).train()
    trainable_base = copy.deepcopy(base).train()
    return base.eval().requires_grad_(False), refiner, trainable_base


def inputs(batch: int, side: int, text_dim: int, device="cpu") -> dict:
    generator = torch.Generator().manual_seed(0)
    size = side * VAE_FACTOR
    return {
        "sample": torch.randn(batch, 4, side, side, generator=generator).to(device),
        "timestep": torch.randint(0, 1000, (batch,), generator=generator).to(device),
        "encoder_hidden_states": torch.randn(batch, 77, text_dim, generator=generator).to(device),
        "conditions": {
            name: (torch.rand(batch, 3, size, size, generator=generator) * 2 - 1).to(device) for name in CONDITIONS
        },
        # all present, kept on the CPU: the refiner reads the masks with bool(), which the meta device cannot
        "condition_masks": {name: torch.ones(batch, dtype=torch.bool) for name in CONDITIONS},
    }


def base_forward(base, data) -> torch.Tensor:
    return base(data["sample"], data["timestep"], data["encoder_hidden_states"], return_dict=False)[0]


def sgr_forward(base, refiner, data) -> torch.Tensor:
    return refiner_forward(
        base,
        refiner,
        data["sample"],
        data["timestep"],
        data["encoder_hidden_states"],
        data["conditions"],
        condition_masks=data["condition_masks"],
    )


def step(prediction: torch.Tensor, target: torch.Tensor, optimizer) -> None:
    F.mse_loss(prediction, target).backward()  # the target's value does not change the cost
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def runners(base, refiner, trainable_base, optimizers, data) -> dict:
    """One callable per variant."""

    def base_fwd():
        with torch.no_grad():
            base_forward(base, data)

    def sgr_step():
        step(sgr_forward(base, refiner, data), data["sample"], optimizers["refiner"])

    def base_step():
        step(base_forward(trainable_base, data), data["sample"], optimizers["base"])

    def sgr_inf():
        with torch.no_grad():
            sgr_forward(base, refiner, data)

    return {"base_fwd": base_fwd, "sgr_step": sgr_step, "base_step": base_step, "sgr_inf": sgr_inf}


def count_flops(base, refiner, trainable_base, data) -> dict:
    """FLOPs of each variant: forward, plus backward for the two training steps (no optimizer)."""

    def counted(fn, grad: bool = True) -> int:
        with torch.set_grad_enabled(grad), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    def backward(prediction):
        prediction.float().square().mean().backward()

    flops = {
        "base_fwd": counted(lambda: base_forward(base, data), grad=False),
        "sgr_step": counted(lambda: backward(sgr_forward(base, refiner, data))),
        "base_step": counted(lambda: backward(base_forward(trainable_base, data))),
        "sgr_inf": counted(lambda: sgr_forward(base, refiner, data), grad=False),
    }
    refiner.zero_grad(set_to_none=True)
    trainable_base.zero_grad(set_to_none=True)
    return flops


def parameters(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def ratios(values: dict, prefix: str) -> dict:
    return {
        f"{prefix}step_ratio": values["sgr_step"] / values["base_fwd"],
        f"{prefix}inference_ratio": values["sgr_inf"] / values["base_fwd"],
        f"{prefix}step_vs_base_step": values["sgr_step"] / values["base_step"],
    }


def summary(base, refiner, flops: dict) -> dict:
    return {
        **{f"{name}_gflops": value / 1e9 for name, value in flops.items()},
        **ratios(flops, "flops_"),
        "base_params": parameters(base),
        "refiner_params": parameters(refiner, trainable_only=True),
        "embedder_params": parameters(refiner.embedders, trainable_only=True),
    }


def bench_case(unet_config: dict, batch: int, side: int, repeats: int) -> dict:
    base, refiner, trainable_base = build(unet_config)
    data = inputs(batch, side, unet_config["cross_attention_dim"])
    optimizers = {
        "refiner": torch.optim.AdamW([p for p in refiner.parameters() if p.requires_grad], lr=1e-5),
        "base": torch.optim.AdamW(trainable_base.parameters(), lr=1e-5),
    }
    flops = count_flops(base, refiner, trainable_base, data)
    run = runners(base, refiner, trainable_base, optimizers, data)
    times = {name: [] for name in VARIANTS}
    for name in VARIANTS:  # warm-up
        run[name]()
    for _ in range(repeats):  # alternate so drift on a noisy machine hits all alike
        for name in VARIANTS:
            start = time.perf_counter()
            run[name]()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "batch": batch,
        "latent": side,
        "condition_px": side * VAE_FACTOR,
        **{f"{name}_s": value for name, value in median.items()},
        **ratios(median, ""),
        **summary(base, refiner, flops),
    }


def sd2_flops() -> dict:
    """SD-2-base at 512² (latent 64², conditions 512², batch 1): FLOPs counted on the meta device."""
    with torch.device("meta"):
        base = UNet2DConditionModel(**SD2).eval().requires_grad_(False)
        refiner = StructureGuidedRefiner(unet=SD2, conditions=list(CONDITIONS), **EMBEDDERS).train()
        trainable_base = UNet2DConditionModel(**SD2).train()
    data = inputs(1, 64, SD2["cross_attention_dim"], device="meta")
    return summary(base, refiner, count_flops(base, refiner, trainable_base, data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", default="bench/results/sgr_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = {name: bench_case(config, batch, side, args.repeats) for name, (config, batch, side) in CASES.items()}
    results["sd2-base-512 (counted)"] = sd2_flops()
    header = (
        f"{'config':<24}{'base fwd':>10}{'SGR step':>10}{'base step':>11}{'SGR inf':>10}"
        f"{'step/fwd':>10}{'inf/fwd':>9}{'step/bstep':>12}{'FLOPs inf/fwd':>15}{'FLOPs step/fwd':>16}"
        f"{'base params':>13}{'SGR params':>12}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        timed = "base_fwd_s" in r

        def ms(key, r=r, timed=timed):
            return f"{r[key] * 1e3:.0f} ms" if timed else "-"

        def x(key, r=r, timed=timed):
            return f"{r[key]:.3f}" if timed else "-"

        print(
            f"{name:<24}{ms('base_fwd_s'):>10}{ms('sgr_step_s'):>10}{ms('base_step_s'):>11}{ms('sgr_inf_s'):>10}"
            f"{x('step_ratio'):>10}{x('inference_ratio'):>9}{x('step_vs_base_step'):>12}"
            f"{r['flops_inference_ratio']:>15.3f}{r['flops_step_ratio']:>16.3f}"
            f"{r['base_params'] / 1e6:>12.1f}M{r['refiner_params'] / 1e6:>11.1f}M"
        )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {out}")
    mid = results["mid (256² px)"]
    print(
        f"refiner step ratio {mid['step_ratio']:.3f} (vs base forward), inference ratio "
        f"{mid['inference_ratio']:.3f} (FLOPs ratio {mid['flops_inference_ratio']:.3f})"
    )


if __name__ == "__main__":
    main()
