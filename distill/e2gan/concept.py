"""``hyperhuman distill gan-concept``: a new editing concept on the E2GAN base model, cheaply.

From a base run (``hyperhuman distill gan``) and pair shards holding the new concept
(``hyperhuman distill edit-pairs``), E2GAN's three economies in order:

1. minimal data (``subset.size``): the concept's pairs clustered, one per cluster kept
   (:mod:`distill.e2gan.subset`) → ``OUTPUT/search/subset.json``;
2. crucial layers: each layer group probed with a short LoRA fine-tune alone, ranked by held-out PSNR
   gain per parameter, the top groups within ``importance.budget`` kept (:mod:`distill.e2gan.importance`)
   → ``OUTPUT/search/importance.json`` (``importance.crucial`` names them instead);
3. rank: LoRA on those layers at each of ``rank_search.ranks``, the smallest within
   ``rank_search.tolerance_db`` of the best → ``OUTPUT/search/ranks.json`` (``rank_search.rank`` fixes it).

Then the final LoRA training, on the subset (or all the concept's pairs), with the base recipe's
GAN step (:func:`distill.e2gan.train.gan_step`: L1/L2 + adversarial against a fresh PatchGAN) on the
shared machinery (accelerate, checkpoints with exact ``--resume``, TensorBoard, held-out PSNR and
grids every ``validation.every`` steps). Only the adapter trains; the base model stays where it is.
Output: ``OUTPUT/adapters/CONCEPT.safetensors`` (+ ``.json``), loaded on the base with
:func:`distill.e2gan.lora.load_concept`, and ``OUTPUT/train_report.json``.

The searches run on the main process before training (other processes wait and read their files);
``--resume`` reuses the files of the run it resumes, so the resumed training is the same one.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from distill.e2gan.train import (
    GAN_TERMS,
    LOSS_KEYS,
    PromptStates,
    check_training_sections,
    gan_objective,
    gan_step,
    heldout_psnr,
    validation_grid,
)
from hyperhuman.config import ConfigError, check_known_keys
from hyperhuman.training import (
    DATA_KEYS,
    TRAIN_KEYS,
    check_processes_agree,
    make_accelerator,
    prepare_for_training,
    restore,
    save_checkpoint,
)

REFERENCE = "configs/distill/gan-concept-tiny.yaml"
KNOWN_KEYS = {
    "output": None,
    "seed": None,
    "base": None,
    "concept": None,
    "text_encoder": None,
    "data": DATA_KEYS,
    "subset": dict.fromkeys(["size", "features"]),
    "lora": dict.fromkeys(["alpha_ratio"]),
    "search": dict.fromkeys(["steps", "learning_rate", "batch_size", "max_pairs", "heldout", "heldout_num"]),
    "importance": dict.fromkeys(["groups", "rank", "budget", "min_gain_db", "crucial"]),
    "rank_search": dict.fromkeys(["ranks", "tolerance_db", "rank"]),
    "discriminator": dict.fromkeys(["base_channels", "num_layers"]),
    "loss": dict.fromkeys(LOSS_KEYS),
    "train": {**TRAIN_KEYS, "discriminator_learning_rate": None},
    "validation": dict.fromkeys(["every", "heldout", "num_per_concept"]),
}


# --- configuration ---------------------------------------------------------------------------------
def check_config(config: dict, check_paths: bool = True) -> None:
    """Everything that would fail after the searches fails here, naming the key to fix; with
    ``check_paths`` the base run and the pair shards too (and group names against the base)."""
    from distill.e2gan.lora import CONCEPT_NAME
    from distill.e2gan.subset import FEATURES

    for section in ("output", "base", "concept", "data", "train"):
        if config.get(section) is None:
            raise ConfigError(f"gan-concept config lacks {section!r} (e.g. --set {section}=...); see {REFERENCE}")
    check_known_keys(config, KNOWN_KEYS, REFERENCE)
    if not isinstance(config["concept"], str) or not CONCEPT_NAME.match(config["concept"]):
        raise ConfigError(f"concept={config['concept']!r}: the concept's name in the pair shards (letters, digits, "
                          "'-', '_'), e.g. --set concept=sketch")  # fmt: skip
    subset = config.get("subset") or {}
    _check_number(subset, "subset.size", "size", least=1, integer=True, optional=True)
    if subset.get("features", "encoder") not in FEATURES:
        raise ConfigError(f"subset.features must be one of {FEATURES}, got {subset['features']!r}")
    _check_number(config.get("lora") or {}, "lora.alpha_ratio", "alpha_ratio", above=0)
    search = config.get("search") or {}
    for key in ("steps", "batch_size", "max_pairs"):
        _check_number(search, f"search.{key}", key, least=1, integer=True)
    _check_number(search, "search.learning_rate", "learning_rate", above=0)
    importance = config.get("importance") or {}
    _check_number(importance, "importance.rank", "rank", least=1, integer=True)
    _check_number(importance, "importance.budget", "budget", above=0)
    if importance.get("budget", 0.01) > 1:
        raise ConfigError(f"importance.budget={importance['budget']!r} is a fraction of the weights, in (0, 1]")
    _check_number(importance, "importance.min_gain_db", "min_gain_db")
    ranks = config.get("rank_search") or {}
    listed = ranks.get("ranks", [1])
    if not isinstance(listed, list) or not listed or not all(type(r) is int and r >= 1 for r in listed):
        raise ConfigError(f"rank_search.ranks must be a list of positive integers, got {listed!r}")
    _check_number(ranks, "rank_search.tolerance_db", "tolerance_db", least=0)
    _check_number(ranks, "rank_search.rank", "rank", least=1, integer=True, optional=True)
    factor = None
    if check_paths:
        factor = _check_base(config)
    check_training_sections(config, factor, check_paths)


def _check_number(section: dict, name: str, key: str, least=None, above=None, integer=False, optional=False):
    if key not in section or (optional and section[key] is None):
        return
    value = section[key]
    kinds = int if integer else int | float
    if (
        isinstance(value, bool)
        or not isinstance(value, kinds)
        or (least is not None and value < least)
        or (above is not None and value <= above)
    ):
        bound = f" ≥ {least}" if least is not None else f" > {above}" if above is not None else ""
        raise ConfigError(f"{name} must be {'an integer' if integer else 'a number'}{bound}, got {value!r}")


def _check_base(config: dict) -> int:
    """The base run holds a generator whose groups include every group the config names; returns
    what ``data.resolution`` must be a multiple of."""
    from distill.e2gan.generator import E2GANGenerator
    from distill.e2gan.lora import layer_groups

    folder = Path(config["base"])
    folder = folder / "generator" if (folder / "generator" / "config.json").is_file() else folder
    if not (folder / "config.json").is_file():
        raise ConfigError(f"base={config['base']!r} holds no E2GAN generator: train one with `hyperhuman distill gan`")
    with torch.device("meta"):  # the layers' names, no weights
        generator = E2GANGenerator.from_config(E2GANGenerator.load_config(str(folder)))
    known = list(layer_groups(generator))
    importance = config.get("importance") or {}
    for key in ("groups", "crucial"):
        named = importance.get(key)
        if named is not None and (not isinstance(named, list) or not named or not set(named) <= set(known)):
            raise ConfigError(f"importance.{key}={named!r} must be a list of layer groups of the base, from {known}")
    return generator.factor


# --- the searches ----------------------------------------------------------------------------------
def run_searches(config: dict, base, text: PromptStates, folder: Path, log) -> None:
    """The subset, the layer-importance ranking and the rank search, each written to ``folder``. The
    probes are scored on ``search.heldout`` (default: the concept's training pairs), never on the
    report's ``validation.heldout`` unless named: what chooses the layers and the rank must not be
    what judges them."""
    from distill.e2gan.data import PairTransform, read_pairs
    from distill.e2gan.importance import generator_probe, pick_crucial, rank_groups, search_ranks
    from distill.e2gan.lora import count_weights, layer_groups
    from distill.e2gan.subset import choose_subset, concept_samples

    data, concept = config["data"], config["concept"]
    importance, ranks = config.get("importance") or {}, config.get("rank_search") or {}
    folder.mkdir(parents=True, exist_ok=True)
    subset = None
    if (config.get("subset") or {}).get("size"):
        subset = choose_subset(config, base, log)
        transform = PairTransform(data["resolution"], random_crop=False, flip_prob=0.0)
        wanted = {entry["key"] for entry in subset["chosen"]}
        pairs = [transform(sample) for sample in concept_samples(data["train"], concept, wanted)]
    else:
        pairs = read_pairs(data["train"], data["resolution"], (config.get("search") or {}).get("max_pairs", 32),
                           [concept])  # fmt: skip
    (folder / "subset.json").write_text(json.dumps(subset, indent=1))
    search = config.get("search") or {}
    scored_on = search.get("heldout") or data["train"]
    scoring = read_pairs(str(scored_on), data["resolution"], search.get("heldout_num", 16), [concept])
    if not scoring:
        raise ConfigError(f"search.heldout={scored_on!r} holds no pairs of concept={concept!r}: name pair shards of it")
    probe = generator_probe(config, base, text, pairs, scoring)

    groups = layer_groups(base)
    if importance.get("crucial"):
        ranking = {"given": importance["crucial"], "note": "importance.crucial names the groups: no search"}
        crucial = importance["crucial"]
    else:
        probed = {name: groups[name] for name in importance.get("groups") or groups}
        ranking = rank_groups(probe, probed, importance.get("rank", 4), log)
        budget = int(importance.get("budget", 0.01) * count_weights(base))
        crucial = pick_crucial(ranking["groups"], budget, importance.get("min_gain_db", 0.0))
        ranking.update(budget_params=budget, generator_params=count_weights(base), probe_pairs=len(pairs))
    ranking.update(crucial=crucial, scored_on=str(scored_on))
    (folder / "importance.json").write_text(json.dumps(ranking, indent=1))
    targets = [module for name in crucial for module in groups[name]]
    if ranks.get("rank"):
        searched = {"chosen": ranks["rank"], "note": "rank_search.rank fixes the rank: no search"}
    else:
        searched = search_ranks(probe, targets, ranks.get("ranks", [1, 2, 4, 8, 16]), ranks.get("tolerance_db", 0.1),
                                log)  # fmt: skip
    (folder / "ranks.json").write_text(json.dumps({**searched, "target_modules": targets}, indent=1))
    log(f"[distill gan-concept] crucial groups {crucial}; rank {searched['chosen']}")


def read_searches(folder: Path) -> dict:
    """What the searches decided: ``subset`` (or None), ``crucial`` groups, ``target_modules``, ``rank``."""
    subset = json.loads((folder / "subset.json").read_text())
    ranks = json.loads((folder / "ranks.json").read_text())
    crucial = json.loads((folder / "importance.json").read_text())["crucial"]
    return {"subset": subset, "crucial": crucial, "target_modules": ranks["target_modules"], "rank": ranks["chosen"]}


# --- the recipe ------------------------------------------------------------------------------------
def train_concept(config: dict, resume: str | None = None) -> dict:
    from distill.e2gan.data import PairBatches, read_pairs
    from distill.e2gan.discriminator import PatchDiscriminator
    from distill.e2gan.generator import load_generator
    from distill.e2gan.lora import adapter_parameters, add_adapter, base_digest, count_weights, save_adapter
    from distill.e2gan.subset import SubsetBatches, concept_samples
    from hyperhuman.text import load_text_encoder

    check_config(config)
    output, seed, concept = Path(config["output"]), config.get("seed", 0), config["concept"]
    data, train, validation = config["data"], config["train"], config.get("validation") or {}
    accelerator = make_accelerator(train, output)
    base = load_generator(config["base"], accelerator.device).requires_grad_(False)
    text_encoder_name = config.get("text_encoder") or base.config.text_encoder
    tokenizer, text_encoder = load_text_encoder(text_encoder_name)
    text = PromptStates(tokenizer, text_encoder.to(accelerator.device), accelerator.device)
    heldout_source = validation.get("heldout") or data["train"]
    heldout = read_pairs(str(heldout_source), data["resolution"], validation.get("num_per_concept", 4), [concept])
    if not heldout:
        raise ConfigError(f"{heldout_source!r} holds no pairs of concept={concept!r} for the held-out PSNR: set "
                          "validation.heldout (or data.train) to pair shards of it")  # fmt: skip

    folder, started = output / "search", time.perf_counter()
    reuse = bool(resume) and all((folder / name).is_file() for name in ("subset.json", "importance.json", "ranks.json"))
    if reuse:
        accelerator.print(f"[distill gan-concept] resuming: the subset, crucial groups and rank of {folder}")
    elif accelerator.is_main_process:
        run_searches(config, base, text, folder, accelerator.print)
    accelerator.wait_for_everyone()
    searched = read_searches(folder)
    search_s = round(time.perf_counter() - started, 2)

    rank, targets = searched["rank"], searched["target_modules"]
    alpha = float((config.get("lora") or {}).get("alpha_ratio", 1.0)) * rank
    torch.manual_seed(seed)  # LoRA's lora_A and the discriminator's initial weights
    generator = add_adapter(copy.deepcopy(base), concept, targets, rank, alpha).train()
    discriminator = PatchDiscriminator(**(config.get("discriminator") or {}))
    trainable = adapter_parameters(generator, concept)
    objective = gan_objective(config.get("loss") or {}, accelerator.device)
    model, g_optimizer, g_scheduler, ema = prepare_for_training(accelerator, generator, train, [{"params": trainable}])
    d_train = {**train, "ema": {"use": False},
               "learning_rate": train.get("discriminator_learning_rate", train.get("learning_rate", 1e-5))}  # fmt: skip
    critic, d_optimizer, d_scheduler, _ = prepare_for_training(accelerator, discriminator, d_train)
    state = restore(accelerator, output, resume, "distill gan-concept")
    global_step, micro_step = state["global_step"], state["micro_step"]
    if searched["subset"]:
        keys = {entry["key"] for entry in searched["subset"]["chosen"]}
        samples = list(concept_samples(data["train"], concept, keys))
        batches = SubsetBatches(samples, data, train["batch_size"], seed, **state["data"])
    else:
        batches = PairBatches({**data, "concepts": [concept]}, train["batch_size"], seed, **state["data"])

    base_params, adapter_params = count_weights(base), sum(p.numel() for p in trainable)
    report = {
        "concept": concept, "base": str(config["base"]), "crucial": searched["crucial"], "rank": rank, "alpha": alpha,
        "target_modules": targets, "params": {"adapter": adapter_params, "base": base_params,
        "fraction": adapter_params / base_params}, "search_s": search_s, "adversarial": objective["adversarial"],
        "weights": objective["weights"], "perceptual": objective["perceptual_note"], "heldout": [],
        "psnr_on": "validation.heldout" if validation.get("heldout") else "data.train (no held-out pairs)",
    }  # fmt: skip
    if accelerator.is_main_process:
        accelerator.init_trackers("distill-gan-concept", config={"max_train_steps": train["max_train_steps"]})
        report["base_psnr_db"] = heldout_psnr(base, heldout, text)["psnr_db"][concept]

    losses, terms, started = [], {name: [] for name in GAN_TERMS}, time.perf_counter()
    model.train()
    critic.train()
    while global_step < train["max_train_steps"]:
        batch = next(batches)
        micro_step += 1
        with accelerator.accumulate(model, critic):
            step = gan_step(accelerator, (model, g_optimizer, g_scheduler), (critic, d_optimizer, d_scheduler), batch,
                            text, objective, train.get("max_grad_norm"))  # fmt: skip
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        if ema is not None:
            ema.step(model.parameters())
        losses.append(step["loss"].item())
        for name in GAN_TERMS:
            terms[name].append(step[name].item())
        accelerator.log({"loss": losses[-1], **{f"loss_{n}": terms[n][-1] for n in GAN_TERMS}}, step=global_step)
        if global_step % train.get("log_every", 10) == 0 or global_step == 1:
            accelerator.print(f"[distill gan-concept] step {global_step}/{train['max_train_steps']} G {losses[-1]:.4f} "
                              f"(l1 {terms['l1'][-1]:.4f}) D {terms['discriminator'][-1]:.4f}")  # fmt: skip
        if global_step % train["checkpointing_steps"] == 0:
            save_checkpoint(accelerator, output, global_step, micro_step, batches, train.get("checkpoints_total_limit"))
        if accelerator.is_main_process and validation.get("every") and global_step % validation["every"] == 0:
            final = trained_adapter(accelerator, model, ema)
            measured = heldout_psnr(final, heldout, text)["psnr_db"][concept]
            report["heldout"].append({"step": global_step, concept: measured})
            accelerator.log({f"heldout_psnr/{concept}": measured}, step=global_step)
            validation_grid(final, heldout, text, output / "validation" / f"step-{global_step}.png")

    accelerator.wait_for_everyone()
    report.update(steps=global_step, wall_s=round(time.perf_counter() - started, 2), losses=losses, terms=terms)
    if losses:
        report.update(first_loss=losses[0], last_loss=losses[-1])
    report["weights_sha256_per_process"] = check_processes_agree(
        accelerator, accelerator.unwrap_model(model), "distill gan-concept"
    )
    if accelerator.is_main_process:
        final = trained_adapter(accelerator, model, ema)
        report.update(heldout_psnr(final, heldout, text))
        path = output / "adapters" / f"{concept}.safetensors"
        subset = searched["subset"]
        save_adapter(final, concept, path, {
            "prompt": heldout[0]["prompt"], "text_encoder": text_encoder_name,
            "base": {"run": str(config["base"]), "generator_sha256": base_digest(base), "params": base_params},
            "target_modules": targets, "groups": searched["crucial"], "rank": rank, "alpha": alpha,
            "params": adapter_params, "steps": global_step,
            "data": {"train": str(data["train"]), "subset": [e["key"] for e in subset["chosen"]] if subset else None,
                     "pairs": subset["pairs"] if subset else None, "features": subset["features"] if subset else None},
        })  # fmt: skip
        report["output"] = {"adapter": str(path), "bytes": path.stat().st_size}
        (output / "train_report.json").write_text(json.dumps(report, indent=1))
    accelerator.end_training()
    return report


def trained_adapter(accelerator, model, ema):
    """A copy of the prepared LoRA generator as trained (its EMA weights when EMA is on), in eval mode."""
    final = copy.deepcopy(accelerator.unwrap_model(model))
    if ema is not None:
        ema.copy_to(final.parameters())
    return final.eval()
