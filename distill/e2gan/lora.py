"""LoRA adapters on the E2GAN generator: one small file per concept over one shared base model.

peft injects LoRA into the generator's plain named layers (:mod:`distill.e2gan.generator`):
``inject_adapter_in_model`` adds an adapter named after the concept to ``target_modules`` given as
full module names (``res_blocks.1.conv1``, ``transformer.attn2.to_k``, ...). peft wraps an
``nn.Conv2d`` with a k×k conv down to ``rank`` channels and a 1×1 conv back up, an ``nn.Linear`` with
two linears, and freezes every base weight. Several concepts live in one generator side by side;
:func:`use_concept` picks the one that runs (peft's ``set_adapter``; ``None``: the base alone) and
:func:`merge_concept` folds one into a plain generator (for export: ONNX, int8).

An adapter file ``CONCEPT.safetensors`` holds the concept's LoRA weights (peft's state-dict names,
without the adapter name) and, in its metadata, the description that makes it usable on its own:
the base run and its weights' digest, the concept and its prompt, the target modules and their
groups, rank, alpha and the data subset. ``CONCEPT.json`` beside it is a readable copy.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from hyperhuman.config import ConfigError

FORMAT = "e2gan-lora/1"
METADATA_KEY = "e2gan_concept"
CONCEPT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # a peft adapter name and a file name


# --- which layers ----------------------------------------------------------------------------------
def group_of(name: str) -> str:
    """The part of the generator a conv/linear layer sits in: ``down`` (``conv_in`` and the
    down-sampling convs), ``res_blocks.I``, the transformer block split in ``transformer.resample``
    (its down/up convs), ``transformer.attn1`` (self-attention), ``transformer.attn2`` (text
    cross-attention) and ``transformer.ff``, and ``up`` (the up-sampling convs and ``conv_out``)."""
    parts = name.split(".")
    if parts[0] in ("conv_in", "down_blocks"):
        return "down"
    if parts[0] in ("up_blocks", "conv_out"):
        return "up"
    if parts[0] == "res_blocks":
        return ".".join(parts[:2])
    if parts[0] == "transformer":
        return "transformer.resample" if parts[1] in ("conv_down", "conv_up") else ".".join(parts[:2])
    raise ValueError(f"{name!r} is no layer of the E2GAN generator")


def layer_groups(generator: nn.Module) -> dict[str, list[str]]:
    """``{group: [module name, ...]}`` of the base generator's conv and linear layers (what LoRA can
    target), groups in the order of their first layer."""
    groups: dict[str, list[str]] = {}
    for name, module in generator.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear) and "lora_" not in name and "base_layer" not in name:
            groups.setdefault(group_of(name), []).append(name)
    return groups


def count_weights(generator: nn.Module) -> int:
    """The base generator's parameters (LoRA's own excluded)."""
    return sum(p.numel() for name, p in generator.named_parameters() if "lora_" not in name)


# --- adapters in a model ---------------------------------------------------------------------------
def add_adapter(model: nn.Module, name: str, targets: list[str], rank: int, alpha: float) -> nn.Module:
    """Inject a LoRA adapter ``name`` (rank ``rank``, scale ``alpha / rank``) into ``targets`` of
    ``model`` in place, and make it the active one (trainable; every base weight frozen). peft starts
    ``lora_B`` at zero, so the model's output is unchanged until it trains; ``lora_A`` draws from
    torch's global generator (seed it for a reproducible start)."""
    from peft import LoraConfig
    from peft.functional import inject_adapter_in_model, set_adapter

    if not CONCEPT_NAME.match(name):
        raise ConfigError(f"concept={name!r}: a name of letters, digits, '-' and '_' (it names the adapter file)")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")
    with warnings.catch_warnings():  # "multiple adapters in the model": what several concepts are
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=name)
    set_adapter(model, name)
    return model


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    return [p for key, p in model.named_parameters() if "lora_" in key and f".{name}." in key]


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter's weights by peft's names (no adapter name in them), contiguous CPU copies."""
    from peft.functional import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=name)
    return {key: value.detach().cpu().contiguous().clone() for key, value in state.items()}


def use_concept(generator: nn.Module, concept: str | None) -> nn.Module:
    """Make ``concept`` the adapter that runs (``None``: none, the base generator alone); frozen."""
    from peft.functional import set_adapter

    if concept is not None and concept not in loaded_concepts(generator):
        raise KeyError(f"concept {concept!r} is not loaded; loaded: {sorted(loaded_concepts(generator))}")
    set_adapter(generator, [] if concept is None else concept, inference_mode=True)
    return generator


def loaded_concepts(generator: nn.Module) -> dict[str, dict]:
    """``{concept: its description}`` of the adapters :func:`load_concept` added."""
    return getattr(generator, "e2gan_concepts", {})


def base_digest(generator: nn.Module) -> str:
    """:func:`hyperhuman.training.weights_digest` of the base weights under any adapters."""
    from hyperhuman.training import weights_digest

    return weights_digest(_plain_copy(generator, generator.state_dict()))


def merge_concept(generator: nn.Module, concept: str) -> nn.Module:
    """A plain generator (no peft layers) whose weights are the base's with ``concept``'s LoRA
    folded in: the same edits as the generator with that adapter active, one conv per layer."""
    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(generator)
    for module in merged.modules():
        if isinstance(module, LoraLayer) and concept in module.lora_A:
            module.merge(safe_merge=True, adapter_names=[concept])
    return _plain_copy(generator, merged.state_dict()).eval()


def _plain_copy(generator: nn.Module, state: dict) -> nn.Module:
    """A plain generator of ``generator``'s config holding ``state``'s base weights."""
    plain = type(generator).from_config(generator.config)
    plain.load_state_dict({k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k})
    reference = next(generator.parameters())
    plain = plain.to(reference.device)
    return plain if reference.dtype == torch.float32 else plain.to(reference.dtype)


# --- adapter files ---------------------------------------------------------------------------------
def save_adapter(model: nn.Module, concept: str, path: Path, description: dict) -> Path:
    """Write ``concept``'s adapter to ``path`` (``.safetensors``, the description in its metadata)
    and ``path.with_suffix('.json')``; returns ``path``."""
    from safetensors.torch import save_file

    description = {"format": FORMAT, "concept": concept, **description}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    save_file(adapter_state(model, concept), str(temporary), metadata={METADATA_KEY: json.dumps(description)})
    temporary.replace(path)  # a reader never sees half a file
    path.with_suffix(".json").write_text(json.dumps(description, indent=1))
    return path


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(weights, description)`` of an adapter file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"no adapter file at {str(path)!r}: train one with `hyperhuman distill gan-concept`")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if METADATA_KEY not in metadata:
        raise ConfigError(f"{str(path)!r} is not an E2GAN concept adapter (no {METADATA_KEY!r} in its metadata)")
    description = json.loads(metadata[METADATA_KEY])
    if description.get("format") != FORMAT:
        raise ConfigError(f"{str(path)!r} has adapter format {description.get('format')!r}; this code reads {FORMAT}")
    return load_file(str(path)), description


def load_concept(base_run: str | Path, adapter_path: str | Path, generator: nn.Module | None = None,
                 device: str | torch.device = "cpu") -> nn.Module:  # fmt: skip
    """The base generator of ``base_run`` (a ``distill gan`` run folder or its ``generator/``) with
    the adapter file's concept added and active, in eval mode. Pass ``generator`` (from an earlier
    call) to add a further concept to the same base instead of loading it again; then switch
    between them with :func:`use_concept`. Refuses an adapter trained on other base weights."""
    from peft.functional import set_peft_model_state_dict

    from distill.e2gan.generator import load_generator

    state, description = read_adapter(adapter_path)
    concept = description["concept"]
    if generator is None:
        generator = load_generator(str(base_run), device)
        generator.e2gan_concepts = {}
    digest = base_digest(generator)
    if digest != description["base"]["generator_sha256"]:
        raise ConfigError(
            f"{str(adapter_path)!r} was trained on the base generator of {description['base']['run']!r} "
            f"(weights {description['base']['generator_sha256'][:12]}), not on these ({digest[:12]}, from "
            f"{str(base_run)!r}): load it on the base it names"
        )
    if concept in loaded_concepts(generator):
        raise ConfigError(f"concept {concept!r} is loaded already (from {loaded_concepts(generator)[concept]['file']})")
    add_adapter(generator, concept, description["target_modules"], description["rank"], description["alpha"])
    result = set_peft_model_state_dict(generator, state, adapter_name=concept)
    missing = [key for key in result.missing_keys if f".{concept}." in key]
    if missing or result.unexpected_keys:
        raise ConfigError(f"{str(adapter_path)!r} does not fit its target modules: missing {missing}, "
                          f"unexpected {result.unexpected_keys}")  # fmt: skip
    generator.e2gan_concepts = {**loaded_concepts(generator), concept: {**description, "file": str(adapter_path)}}
    return use_concept(generator.to(device), concept).eval()
