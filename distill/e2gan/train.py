"""``hyperhuman distill gan``: the E2GAN base model, trained on the pairs of several concepts.

pix2pix's conditional GAN recipe with a text-conditioned generator (:mod:`distill.e2gan.generator`)
and a PatchGAN (:mod:`distill.e2gan.discriminator`). Per step, on a batch of pairs of mixed concepts:

- discriminator: ``adversarial_weight · L_D`` on (input, teacher edit) as real and (input, G(input))
  as fake, in one forward of the concatenated batch (InstanceNorm keeps samples apart);
- generator: ``l1_weight · L1 + l2_weight · MSE`` against the teacher's edit
  ``+ adversarial_weight · L_G`` (the discriminator frozen, called unwrapped so data-parallel
  training does not wait for its gradients) ``+ perceptual_weight · VGG-16 L1`` (relu3_3 features).

``loss.adversarial``: ``lsgan`` (least squares, pix2pix/CycleGAN's default: D → 1 on real, 0 on
fake; G → 1; L_D halved as pix2pix does) or ``hinge`` (``relu(1 - D(real)) + relu(1 + D(fake))``,
``-D(fake)``). The perceptual term needs VGG-16 weights from a file (``loss.perceptual_weights``, a
torchvision ``vgg16`` state dict); none exist offline, so the shipped config has it off and the
report says so. The text (each pair's prompt) goes through a frozen encoder (``text_encoder``: the
packaged MiniLM, or a CLIP text model folder), encoded once per distinct prompt.

Same recipe qualities as the other distill stages (:mod:`hyperhuman.training`): accelerate
(multi-process), EMA of the generator, checkpoints with exact ``--resume``, TensorBoard, held-out
PSNR against the teacher's edits (per concept, with the input-as-output PSNR for scale) every
``validation.every`` steps and at the end, ``validation/step-STEP.png`` (rows: input, teacher,
generator; a held-out pair per concept). Output: ``OUTPUT/generator/`` (safetensors + config.json,
and ``concepts.json``: the prompt of each concept; :func:`distill.e2gan.generator.load_generator`),
``OUTPUT/train_report.json``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hyperhuman.config import ConfigError, check_known_keys
from hyperhuman.training import (
    DATA_KEYS,
    TRAIN_KEYS,
    check_processes_agree,
    check_shards,
    check_train_counts,
    image_grid,
    make_accelerator,
    optimizer_step,
    prepare_for_training,
    restore,
    save_checkpoint,
    trained_copy,
)

REFERENCE = "configs/distill/gan-tiny.yaml"
GENERATOR_KEYS = ["base_channels", "num_downsamples", "num_res_blocks", "attention_after", "attention_heads",
                  "mlp_ratio", "input_skip"]  # fmt: skip
LOSS_KEYS = ["l1_weight", "l2_weight", "adversarial", "adversarial_weight", "perceptual_weight", "perceptual_weights"]
KNOWN_KEYS = {
    "output": None,
    "seed": None,
    "text_encoder": None,
    "init": None,
    "generator": dict.fromkeys(GENERATOR_KEYS),
    "discriminator": dict.fromkeys(["base_channels", "num_layers"]),
    "data": {**DATA_KEYS, "concepts": None},
    "loss": dict.fromkeys(LOSS_KEYS),
    "train": {**TRAIN_KEYS, "discriminator_learning_rate": None},
    "validation": dict.fromkeys(["every", "heldout", "num_per_concept"]),
}
ADVERSARIAL = ("lsgan", "hinge")
PSNR_CLAMP_DB = 100.0  # identical images: infinite PSNR, which JSON cannot hold
BATCH = 8
GAN_TERMS = ("l1", "l2", "adversarial", "perceptual", "discriminator")  # what gan_step returns beside the total


# --- configuration ---------------------------------------------------------------------------------
def check_config(config: dict, check_paths: bool = True) -> None:
    """Everything that would fail an hour in fails here, naming the key to fix."""
    from distill.e2gan.generator import E2GANGenerator, check_generator_config

    for section in ("output", "text_encoder", "generator", "data", "train"):
        if config.get(section) is None:
            raise ConfigError(f"gan config lacks {section!r} (e.g. --set {section}=...); see {REFERENCE}")
    check_known_keys(config, KNOWN_KEYS, REFERENCE)
    defaults = {name: param.default for name, param in _signature(E2GANGenerator).items()}
    generator = {**defaults, **config["generator"]}
    check_generator_config(generator)
    concepts = config["data"].get("concepts")
    if concepts is not None and (not isinstance(concepts, list) or not all(isinstance(c, str) for c in concepts)):
        raise ConfigError(f"data.concepts must be a list of concept names (null: all), got {concepts!r}")
    check_training_sections(config, 2 ** (generator["num_downsamples"] + 1), check_paths)


def check_training_sections(config: dict, factor: int | None, check_paths: bool = True) -> None:
    """The sections every GAN recipe shares (``discriminator``, ``loss``, ``train``, ``data``,
    ``validation``), each error naming its key; ``factor``: what ``data.resolution`` must be a multiple of
    (None: not known yet, a positive integer is enough)."""
    for key, value in (config.get("discriminator") or {}).items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"discriminator.{key} must be a positive integer, got {value!r}")
    loss = config.get("loss") or {}
    for key in ("l1_weight", "l2_weight", "adversarial_weight", "perceptual_weight"):
        value = loss.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"loss.{key} must be a number ≥ 0, got {value!r}")
    if loss.get("adversarial", "lsgan") not in ADVERSARIAL:
        raise ConfigError(f"loss.adversarial must be one of {ADVERSARIAL}, got {loss.get('adversarial')!r}")
    if loss.get("perceptual_weight", 0.0) and not loss.get("perceptual_weights"):
        raise ConfigError(
            f"loss.perceptual_weight={loss['perceptual_weight']} needs loss.perceptual_weights (a torchvision vgg16 "
            "state dict file); none exist offline: set loss.perceptual_weight=0"
        )
    data, train = config["data"], config["train"]
    check_train_counts(train)
    if train.get("gradient_checkpointing"):
        raise ConfigError("train.gradient_checkpointing: not supported by the E2GAN generator (too small to need it)")
    resolution = data.get("resolution")
    least = factor or 1
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < least or resolution % least:
        raise ConfigError(
            f"data.resolution={resolution!r} must be a positive multiple of {least} "
            "(2**(generator.num_downsamples + 1))"
        )
    validation = config.get("validation") or {}
    for key, least in (("every", 0), ("num_per_concept", 1)):
        value = validation.get(key, least)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"validation.{key} must be an integer ≥ {least}, got {value!r}")
    if check_paths:
        for key, value in (("data.train", data.get("train")), ("validation.heldout", validation.get("heldout"))):
            if value or key == "data.train":
                check_pair_shards(value, key)
        weights = loss.get("perceptual_weights")
        if loss.get("perceptual_weight", 0.0) and not Path(weights).is_file():
            raise ConfigError(f"loss.perceptual_weights={weights!r} is not a file")


def check_pair_shards(value, key: str) -> None:
    check_shards(value, key, "make edit pairs with `hyperhuman distill edit-pairs`")


def _signature(cls) -> dict:
    import inspect

    return {k: v for k, v in inspect.signature(cls.__init__).parameters.items() if k != "self"}


# --- losses ----------------------------------------------------------------------------------------
def discriminator_loss(real: torch.Tensor, fake: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "lsgan":
        return 0.5 * (F.mse_loss(real, torch.ones_like(real)) + F.mse_loss(fake, torch.zeros_like(fake)))
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def generator_adversarial_loss(fake: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "lsgan":
        return F.mse_loss(fake, torch.ones_like(fake))
    return -fake.mean()


class VGGPerceptual(torch.nn.Module):
    """L1 between VGG-16 features up to relu3_3 (torchvision's layout), of images in [-1, 1]; the
    weights from a torchvision ``vgg16`` state dict file (``features.*`` keys). Frozen."""

    LAYERS = 16  # features[:16] ends with relu3_3

    def __init__(self, path: str):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        self.features = make_layers(cfgs["D"])[: self.LAYERS]
        state = torch.load(path, map_location="cpu", weights_only=True)
        kept = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        kept = {k: v for k, v in kept.items() if int(k.split(".")[0]) < self.LAYERS}
        try:
            self.features.load_state_dict(kept)
        except RuntimeError as exc:
            raise ConfigError(f"loss.perceptual_weights={path!r} is not a torchvision vgg16 state dict: {exc}") from exc
        self.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        def features(x):
            return self.features(((x + 1) / 2 - self.mean) / self.std)

        return F.l1_loss(features(prediction), features(target))


class PromptStates:
    """Text states of prompts from a frozen encoder, each prompt encoded once (padding to a fixed
    length makes one prompt's states the same alone or in a batch)."""

    def __init__(self, tokenizer, encoder, device):
        self.tokenizer, self.encoder, self.device = tokenizer, encoder, device
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from hyperhuman.text import encode_prompts

        for prompt in prompts:
            if prompt not in self.cache:
                states, mask = encode_prompts(self.tokenizer, self.encoder, [prompt], self.device)
                self.cache[prompt] = (states[0], mask[0])
        return (torch.stack([self.cache[p][0] for p in prompts]), torch.stack([self.cache[p][1] for p in prompts]))


def gan_objective(loss_config: dict, device) -> dict:
    """The ``loss:`` section as :func:`gan_step` uses it: the ``adversarial`` kind, the terms'
    ``weights``, the ``perceptual`` network (None: off) and a ``perceptual_note`` for the report."""
    defaults = {"l1_weight": 10.0, "l2_weight": 0.0, "adversarial_weight": 1.0, "perceptual_weight": 0.0}
    weights = {key: float(loss_config.get(key, default)) for key, default in defaults.items()}
    perceptual = None
    if weights["perceptual_weight"]:
        perceptual = VGGPerceptual(loss_config["perceptual_weights"]).to(device)
    note = (f"VGG-16 relu3_3 L1 from {loss_config['perceptual_weights']}" if perceptual else
            "off: no VGG/LPIPS weights given (loss.perceptual_weights null, loss.perceptual_weight 0)")  # fmt: skip
    return {"adversarial": loss_config.get("adversarial", "lsgan"), "weights": weights, "perceptual": perceptual,
            "perceptual_note": note}  # fmt: skip


def gan_step(accelerator, generator, discriminator, batch: dict, text, objective: dict, max_grad_norm) -> dict:
    """One micro-step of both players on a batch of pairs; call it inside
    ``accelerator.accumulate(model, critic)``. ``generator`` and ``discriminator`` are each
    ``(prepared model, optimizer, lr_scheduler)``; only the generator's trainable parameters move (a
    LoRA-injected generator trains its adapters alone). Returns the loss terms (tensors): ``loss`` (the
    generator's total), ``l1``, ``l2``, ``adversarial``, ``perceptual``, ``discriminator``."""
    model, g_optimizer, g_scheduler = generator
    critic, d_optimizer, d_scheduler = discriminator
    weights, kind, perceptual = objective["weights"], objective["adversarial"], objective["perceptual"]
    inputs, targets = batch["input"].to(accelerator.device), batch["target"].to(accelerator.device)
    states, mask = text(batch["prompt"])
    fake = model(inputs, states, mask)
    # discriminator: real and fake pairs in one forward
    logits = critic(torch.cat([inputs, inputs]), torch.cat([targets, fake.detach()]))
    real_logits, fake_logits = logits.chunk(2)
    d_loss = weights["adversarial_weight"] * discriminator_loss(real_logits, fake_logits, kind)
    optimizer_step(accelerator, critic, d_optimizer, d_scheduler, d_loss, max_grad_norm)
    # generator: the discriminator frozen and unwrapped (no data-parallel hooks to wait for)
    frozen = accelerator.unwrap_model(critic).requires_grad_(False)
    with accelerator.autocast():
        adversarial = generator_adversarial_loss(frozen(inputs, fake), kind)
    frozen.requires_grad_(True)
    fake32, targets32 = fake.float(), targets.float()
    l1, l2 = F.l1_loss(fake32, targets32), F.mse_loss(fake32, targets32)
    seen = perceptual(fake32, targets32) if perceptual is not None else torch.zeros((), device=l1.device)
    g_loss = weights["l1_weight"] * l1 + weights["l2_weight"] * l2
    g_loss = g_loss + weights["adversarial_weight"] * adversarial + weights["perceptual_weight"] * seen
    optimizer_step(accelerator, model, g_optimizer, g_scheduler, g_loss, max_grad_norm)
    return {"loss": g_loss, "l1": l1, "l2": l2, "adversarial": adversarial, "perceptual": seen, "discriminator": d_loss}


# --- measures --------------------------------------------------------------------------------------
def psnr(mse: float) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), clamped at 100."""
    return PSNR_CLAMP_DB if mse == 0 else min(PSNR_CLAMP_DB, 10 * math.log10(4.0 / mse))


@torch.no_grad()
def edit(generator, pairs: list[dict], text: PromptStates) -> torch.Tensor:
    """The generator's edits of the pairs' inputs, (N, 3, R, R) in [-1, 1], float32 on the CPU."""
    device = next(generator.parameters()).device
    out = []
    for start in range(0, len(pairs), BATCH):
        chunk = pairs[start : start + BATCH]
        states, mask = text([pair["prompt"] for pair in chunk])
        images = torch.stack([pair["input"] for pair in chunk]).to(device)
        out.append(generator(images, states.to(device), mask.to(device)).float().cpu())
    return torch.cat(out)


def heldout_psnr(generator, pairs: list[dict], text: PromptStates) -> dict:
    """PSNR of the generator's edits against the teacher's per concept (MSE pooled over its pairs)
    and over all pairs, and the same for the input itself as the edit (the do-nothing baseline)."""
    edited = edit(generator, pairs, text)
    targets = torch.stack([pair["target"] for pair in pairs])
    inputs = torch.stack([pair["input"] for pair in pairs])
    concepts = sorted({pair["concept"] for pair in pairs})
    result = {"psnr_db": {}, "identity_psnr_db": {}, "pairs": {}}
    for concept in [*concepts, "all"]:
        index = [i for i, pair in enumerate(pairs) if concept in ("all", pair["concept"])]
        result["psnr_db"][concept] = psnr(F.mse_loss(edited[index].double(), targets[index].double()).item())
        result["identity_psnr_db"][concept] = psnr(F.mse_loss(inputs[index].double(), targets[index].double()).item())
        result["pairs"][concept] = len(index)
    return result


def validation_grid(generator, pairs: list[dict], text: PromptStates, path: Path):
    """Columns of the first held-out pair of each concept (up to 8); rows: input, teacher's edit,
    generator's edit."""
    import PIL.Image

    firsts = {}
    for pair in pairs:
        firsts.setdefault(pair["concept"], pair)
    chosen = list(firsts.values())[:8]
    edited = edit(generator, chosen, text)

    def image(tensor):
        array = ((tensor.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        return PIL.Image.fromarray(array)

    rows = [[image(p["input"]) for p in chosen], [image(p["target"]) for p in chosen], [image(e) for e in edited]]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows).save(path)
    return path


# --- the recipe ------------------------------------------------------------------------------------
def train_gan(config: dict, resume: str | None = None) -> dict:
    from distill.e2gan.data import PairBatches, read_pairs
    from distill.e2gan.discriminator import PatchDiscriminator
    from distill.e2gan.generator import E2GANGenerator
    from hyperhuman.text import hidden_size, load_text_encoder

    check_config(config)
    output, seed = Path(config["output"]), config.get("seed", 0)
    data, train, loss_config = config["data"], config["train"], config.get("loss") or {}
    validation = config.get("validation") or {}
    accelerator = make_accelerator(train, output)
    tokenizer, text_encoder = load_text_encoder(config["text_encoder"])
    text_encoder.to(accelerator.device)
    text = PromptStates(tokenizer, text_encoder, accelerator.device)
    torch.manual_seed(seed)  # the initial weights
    if config.get("init"):  # a fine-tune: every weight of an earlier generator trained on these pairs
        generator = init_generator(config["init"], config["text_encoder"]).requires_grad_(True)
    else:
        generator = E2GANGenerator(**config["generator"], text_dim=hidden_size(text_encoder),
                                   text_encoder=config["text_encoder"])  # fmt: skip
    discriminator = PatchDiscriminator(**(config.get("discriminator") or {}))
    objective = gan_objective(loss_config, accelerator.device)
    report = {
        "adversarial": objective["adversarial"], "weights": objective["weights"],
        "text_encoder": config["text_encoder"], "perceptual": objective["perceptual_note"],
        "params": {"generator": _count(generator), "discriminator": _count(discriminator)}, "heldout": [],
    }  # fmt: skip

    model, g_optimizer, g_scheduler, ema = prepare_for_training(accelerator, generator, train)
    d_rate = train.get("discriminator_learning_rate", train.get("learning_rate", 1e-5))
    d_train = {**train, "ema": {"use": False}, "learning_rate": d_rate}
    critic, d_optimizer, d_scheduler, _ = prepare_for_training(accelerator, discriminator, d_train)
    state = restore(accelerator, output, resume, "distill gan")
    global_step, micro_step = state["global_step"], state["micro_step"]
    batches = PairBatches(data, train["batch_size"], seed, **state["data"])
    heldout = []
    if accelerator.is_main_process:
        accelerator.init_trackers("distill-gan", config={"max_train_steps": train["max_train_steps"]})
        source = validation.get("heldout") or data["train"]
        heldout = read_pairs(
            str(source), data["resolution"], validation.get("num_per_concept", 4), data.get("concepts")
        )
        if not heldout:
            raise ConfigError(f"{source!r} holds no edit pairs for the held-out PSNR: set validation.heldout")
        report["psnr_on"] = "validation.heldout" if validation.get("heldout") else "data.train (no held-out pairs)"

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
        logs = {"loss": losses[-1], "lr": g_scheduler.get_last_lr()[0]}
        logs.update({f"loss_{name}": values[-1] for name, values in terms.items()})
        accelerator.log(logs, step=global_step)
        if global_step % train.get("log_every", 10) == 0 or global_step == 1:
            accelerator.print(f"[distill gan] step {global_step}/{train['max_train_steps']} G {losses[-1]:.4f} "
                              f"(l1 {terms['l1'][-1]:.4f}, adv {terms['adversarial'][-1]:.4f}) "
                              f"D {terms['discriminator'][-1]:.4f}")  # fmt: skip
        if global_step % train["checkpointing_steps"] == 0:
            save_checkpoint(accelerator, output, global_step, micro_step, batches, train.get("checkpoints_total_limit"))
        if accelerator.is_main_process and validation.get("every") and global_step % validation["every"] == 0:
            final = trained_copy(accelerator, model, ema)
            measured = heldout_psnr(final, heldout, text)
            report["heldout"].append({"step": global_step, **measured["psnr_db"]})
            accelerator.log({f"heldout_psnr/{c}": v for c, v in measured["psnr_db"].items()}, step=global_step)
            validation_grid(final, heldout, text, output / "validation" / f"step-{global_step}.png")

    accelerator.wait_for_everyone()
    report.update(steps=global_step, wall_s=round(time.perf_counter() - started, 2), losses=losses, terms=terms)
    if losses:
        report.update(first_loss=losses[0], last_loss=losses[-1])
    report["weights_sha256_per_process"] = check_processes_agree(
        accelerator, accelerator.unwrap_model(model), "distill gan"
    )
    if accelerator.is_main_process:
        final = trained_copy(accelerator, model, ema)
        report.update(heldout_psnr(final, heldout, text))
        concepts = {pair["concept"]: pair["prompt"] for pair in heldout}
        final.save_pretrained(output / "generator", safe_serialization=True)
        (output / "generator" / "concepts.json").write_text(json.dumps(concepts, indent=1))
        report.update(concepts=concepts, output={"generator": str(output / "generator")})
        (output / "train_report.json").write_text(json.dumps(report, indent=1))
    accelerator.end_training()
    return report


def init_generator(path: str, text_encoder: str):
    """The generator ``init`` names (its architecture replaces the ``generator`` section), refused when
    it was trained with another text encoder than the one this run conditions on."""
    from distill.e2gan.generator import load_generator

    generator = load_generator(path)
    if generator.config.text_encoder != text_encoder:
        raise ConfigError(
            f"init={path!r} was trained with text_encoder={generator.config.text_encoder!r}, this run uses "
            f"{text_encoder!r}: set text_encoder to the generator's"
        )
    return generator


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
