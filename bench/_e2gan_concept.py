"""A new editing concept four ways, each scored the same way (the helper of ``bench/e2gan.py``).

    rows = concept_rows(runs, base_run, pairs, budgets, args, text, times)

(a) ``scratch``: ``hyperhuman distill gan`` on the new concept alone; (b) ``finetune``: every weight
of the base generator trained on it with the same GAN step; (c) ``lora``: ``hyperhuman distill
gan-concept`` on all its pairs, with the layer-importance and rank searches; (d) ``lora-minimal``:
(c)'s crucial groups and rank on a k-means subset of the pairs. A run whose report exists in
``runs/METHOD`` is kept (``--reuse-runs``). Each row: PSNR and SSIM against the teacher's edits of
the held-out photos, steps, training time (the training loop's wall time; (c)'s searches apart, (d)'s
subset choice included), trainable parameters, bytes stored for the concept, pairs trained on, and
the training L1 by fifth of the steps (flat at the end: the run had converged).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from hyperhuman.config import apply_overrides, load_config

METHODS = {
    "scratch": "(a) GAN from scratch",
    "finetune": "(b) base, full fine-tune",
    "lora": "(c) LoRA, crucial layers",
    "lora-minimal": "(d) LoRA, minimal data",
}


def concept_rows(runs: Path, base: Path, pairs: dict, budgets: dict, args, text, times: dict) -> list[dict]:
    """Two reference rows (nothing trained), then (a)–(d); each method's wall time into ``times``."""
    from distill.e2gan.data import read_pairs

    heldout = read_pairs(str(pairs["heldout"]), args.resolution, None, [args.new_concept])
    rows = [reference_row("input as the edit (identity)", None, heldout, text),
            reference_row("base GAN, no adaptation", load_generator(base), heldout, text)]  # fmt: skip

    def run(method: str, train):
        print(f"e2gan: {METHODS[method]} on {args.new_concept} ...", flush=True)
        started = time.perf_counter()
        rows.append(train())
        times[f"{method}_s"] = time.perf_counter() - started
        return rows[-1]

    run("scratch", lambda: train_scratch(runs / "scratch", pairs, budgets["scratch"], args, heldout, text))
    run("finetune", lambda: train_finetune(runs / "finetune", base, pairs, budgets["finetune"], args, heldout, text))
    lora = run("lora", lambda: train_lora(runs / "lora", base, pairs, budgets, args, heldout, text))
    run("lora-minimal", lambda: train_lora_minimal(runs / "lora-minimal", base, pairs, budgets["lora_minimal"], lora,
                                                   args, heldout, text))  # fmt: skip
    return rows


def gan_config(pairs: dict, concepts: list[str], steps: int, args) -> dict:
    """``distill gan``'s tiny config on the bench's pairs: ``concepts`` only, ``steps`` steps of batch 4."""
    config = apply_overrides(load_config("distill/gan-tiny"), [
        f"data.resolution={args.resolution}", f"train.max_train_steps={steps}",
        f"train.checkpointing_steps={steps}", f"train.log_every={max(1, steps // 6)}", "validation.every=0",
        f"validation.num_per_concept={pairs['heldout_photos']}",
    ])  # fmt: skip
    config["data"].update(train=str(pairs["train"]), concepts=list(concepts))
    config["validation"]["heldout"] = str(pairs["heldout"])
    return config


def load_generator(run: Path):
    from distill.e2gan.generator import load_generator

    return load_generator(str(run))


# --- quality ---------------------------------------------------------------------------------------
def scores(edited: torch.Tensor, targets: torch.Tensor) -> dict:
    """PSNR (MSE pooled over the images, as the recipes report it) and mean SSIM (skimage, Gaussian
    window σ 1.5 as Wang et al.) of edits against the teacher's, both (N, 3, H, W) in [-1, 1]."""
    from skimage.metrics import structural_similarity

    from distill.e2gan.train import psnr

    mse = torch.nn.functional.mse_loss(edited.double(), targets.double()).item()
    ssim = [
        structural_similarity(((a + 1) / 2).permute(1, 2, 0).numpy(), ((b + 1) / 2).permute(1, 2, 0).numpy(),
                              channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False)
        for a, b in zip(edited.clamp(-1, 1).float(), targets.float(), strict=True)
    ]  # fmt: skip
    return {"psnr_db": psnr(mse), "ssim": float(sum(ssim) / len(ssim))}


def generator_scores(generator, pairs: list[dict], text) -> dict:
    from distill.e2gan.train import edit

    return scores(edit(generator, pairs, text), torch.stack([pair["target"] for pair in pairs]))


def reference_row(name: str, generator, heldout: list[dict], text) -> dict:
    """A row trained on nothing, for scale: the input itself, or the base GAN given the new prompt."""
    targets = torch.stack([pair["target"] for pair in heldout])
    if generator is None:
        measured = scores(torch.stack([pair["input"] for pair in heldout]), targets)
    else:
        measured = generator_scores(generator, heldout, text)
    return {"method": name, "reference": True, **measured}


def l1_fifths(result: dict) -> list[float]:
    """The training L1 averaged over each fifth of the steps."""
    values = result["terms"]["l1"]
    cuts = [round(len(values) * i / 5) for i in range(6)]
    return [sum(values[a:b]) / (b - a) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def folder_bytes(folder: Path) -> int:
    """What a whole-generator concept stores: its weights and config (``concepts.json`` aside)."""
    return sum(path.stat().st_size for path in folder.iterdir() if path.name != "concepts.json")


def generator_row(method: str, output: Path, pairs: dict, heldout: list[dict], text) -> dict:
    """(a) or (b): a whole generator per concept."""
    result = json.loads((output / "train_report.json").read_text())
    generator = load_generator(output)
    return {"method": METHODS[method], **generator_scores(generator, heldout, text), "steps": result["steps"],
            "train_s": result["wall_s"], "search_s": 0.0, "pairs": pairs["train_photos"],
            "trainable_params": sum(parameter.numel() for parameter in generator.parameters()),
            "stored_bytes": folder_bytes(output / "generator"), "stored": "generator (safetensors + config)",
            "train_l1_fifths": l1_fifths(result)}  # fmt: skip


# --- (a), (b): whole generators --------------------------------------------------------------------
def train_scratch(output: Path, pairs: dict, steps: int, args, heldout, text) -> dict:
    from distill.e2gan.train import train_gan

    if not (output / "train_report.json").is_file():
        config = gan_config(pairs, [args.new_concept], steps, args)
        config["output"] = str(output)
        train_gan(config)
    return generator_row("scratch", output, pairs, heldout, text)


def train_finetune(output: Path, base: Path, pairs: dict, steps: int, args, heldout, text) -> dict:
    """(b): every weight of the base generator trained on the new concept by ``distill gan`` from it
    (``init``; a fresh PatchGAN: the base run keeps none), the base recipe's learning rates, EMA, batch."""
    from distill.e2gan.train import train_gan

    if not (output / "train_report.json").is_file():
        config = gan_config(pairs, [args.new_concept], steps, args)
        config.update(output=str(output), init=str(base))
        train_gan(config)
    return generator_row("finetune", output, pairs, heldout, text)


# --- (c), (d): LoRA adapters -----------------------------------------------------------------------
def concept_config(output: Path, base: Path, pairs: dict, steps: int, args) -> dict:
    """``distill gan-concept``'s tiny config on the bench's pairs. Its searches score their probes on
    the dev photos' pairs (``search.heldout``'s default), so the held-out photos that score (c) and (d)
    choose neither the crucial layers nor the rank."""
    config = apply_overrides(load_config("distill/gan-concept-tiny"), [
        f"data.resolution={args.resolution}", f"train.max_train_steps={steps}",
        f"train.checkpointing_steps={steps}", f"train.log_every={max(1, steps // 6)}", "validation.every=0",
        f"validation.num_per_concept={pairs['heldout_photos']}", f"search.heldout_num={pairs['train_photos']}",
    ])  # fmt: skip
    config.update(output=str(output), base=str(base), concept=args.new_concept)
    config["data"]["train"] = str(pairs["train"])
    config["validation"]["heldout"] = str(pairs["heldout"])
    return config


def lora_row(method: str, output: Path, base: Path, heldout, text, pairs_used: int) -> dict:
    from distill.e2gan.lora import load_concept

    result = json.loads((output / "train_report.json").read_text())
    generator = load_concept(str(base), result["output"]["adapter"])
    return {"method": METHODS[method], **generator_scores(generator, heldout, text), "steps": result["steps"],
            "train_s": result["wall_s"], "search_s": result["search_s"], "pairs": pairs_used,
            "trainable_params": result["params"]["adapter"], "stored_bytes": result["output"]["bytes"],
            "stored": "adapter (safetensors)", "crucial": result["crucial"], "rank": result["rank"],
            "train_l1_fifths": l1_fifths(result)}  # fmt: skip


def train_lora(output: Path, base: Path, pairs: dict, budgets: dict, args, heldout, text) -> dict:
    """(c): the layer-importance and rank searches on all the concept's pairs, then LoRA; the
    searches' time is reported apart (``search_s``): E2GAN finds the crucial layers once per base."""
    from distill.e2gan.concept import train_concept

    if not (output / "train_report.json").is_file():
        config = concept_config(output, base, pairs, budgets["lora"], args)
        config["subset"]["size"] = None  # every pair of the concept
        config["search"]["steps"] = budgets["probe"]
        train_concept(config)
    return lora_row("lora", output, base, heldout, text, pairs["train_photos"])


def train_lora_minimal(output: Path, base: Path, pairs: dict, steps: int, lora: dict, args, heldout, text) -> dict:
    """(d): ``lora``'s crucial groups and rank on ``--subset`` pairs; its time includes choosing them."""
    from distill.e2gan.concept import train_concept

    if not (output / "train_report.json").is_file():
        config = concept_config(output, base, pairs, steps, args)
        config["subset"]["size"] = args.subset
        config["importance"]["crucial"] = lora["crucial"]
        config["rank_search"]["rank"] = lora["rank"]
        train_concept(config)
    subset = json.loads((output / "search" / "subset.json").read_text())
    row = lora_row("lora-minimal", output, base, heldout, text, subset["size"])
    return {**row, "train_s": row["train_s"] + row["search_s"], "subset_s": row["search_s"], "search_s": 0.0}
