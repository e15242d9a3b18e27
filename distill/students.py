"""Student architectures made from a teacher, and the weight remap that initialises them.

Two ways to make a UNet smaller, for a plain ``UNet2DConditionModel`` and for our
``LatentStructuralUNet`` (whose branch blocks ``branch.<name>.*`` and trunk ``trunk.*`` map the
same way):

- **BK-SDM block removal** (Kim et al. 2023, Nota-NetsPresso/BK-SDM), a stock config change:
  ``bk-base`` keeps one ResNet/attention pair per down stage (up stages keep two of three: the
  first and the last, so the skip-concat widths still line up); ``bk-small`` also drops the mid
  block; ``bk-tiny`` also drops the innermost stage.
- **SnapFusion edits** (Li et al. 2023): any removable ResNet or attention taken out, one at a
  time (:mod:`hyperhuman.unet_parts`); the model records them in its config (``removed_parts``):
  the LSDM itself, or :class:`EditedUNet2DConditionModel` for a plain UNet.

Either way the kept modules' weights are copied from the teacher under :func:`teacher_name`, a
map of dotted names (parameter keys and module names alike), and each kept module computes exactly
what its teacher module computes (tested). :func:`feature_pairs` lists the (student, teacher)
block outputs that feature distillation compares.

    student = make_student(teacher, "bk-small")
    student = make_student(teacher, {"remove": ["down_blocks.0.attentions.1", "up_blocks.3.resnets.2"]})
"""

from __future__ import annotations

import inspect
import re

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 (see below)
from torch import nn

from hyperhuman.unet_parts import PART, remove_parts, removed_parts
from hyperhuman.unet_widths import shrink_to_widths

BK_VARIANTS = ("bk-base", "bk-small", "bk-tiny")
# UNet2DConditionModel arguments that may hold one value per stage (down-block order).
PER_STAGE_KEYS = (
    "layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "transformer_layers_per_block",
    "only_cross_attention",
    "cross_attention_dim",
)
_BLOCK = re.compile(r"(?P<kind>down_blocks|up_blocks)\.(?P<index>\d+)(?P<rest>(?:\..*)?)$")


# -- a plain UNet that records its removed parts -------------------------------------------------


def _edited_init(self, *args, removed_parts: list[str] | None = None, widths: dict | None = None, **kwargs):
    UNet2DConditionModel.__init__.__wrapped__(self, *args, **kwargs)  # the config is registered once, here
    remove_parts(self, removed_parts or [])
    shrink_to_widths(self, widths or {})


_UNET_SIGNATURE = inspect.signature(UNet2DConditionModel.__init__)
_edited_init.__signature__ = _UNET_SIGNATURE.replace(
    parameters=[
        *_UNET_SIGNATURE.parameters.values(),
        inspect.Parameter("removed_parts", inspect.Parameter.KEYWORD_ONLY, default=None),
        inspect.Parameter("widths", inspect.Parameter.KEYWORD_ONLY, default=None),
    ]
)


# A pipeline's model_index.json names this class by its module, and diffusers' loader decides how
# to load a component by looking `ModelMixin` up in that same module: the import above is what
# makes `StableDiffusionPipeline.from_pretrained` load a pipeline holding an edited UNet.
class EditedUNet2DConditionModel(UNet2DConditionModel):
    """A ``UNet2DConditionModel`` with some ResNets and attentions removed (``removed_parts``) or
    some inner widths pruned (``widths``, :mod:`hyperhuman.unet_widths`), both recorded in its
    config next to every stock argument, so it round-trips ``save_pretrained``/``from_pretrained``
    and drops in wherever a ``UNet2DConditionModel`` goes."""

    __init__ = register_to_config(_edited_init)


# -- configs -------------------------------------------------------------------------------------


def unet_config(model: nn.Module) -> dict:
    """The ``UNet2DConditionModel`` arguments of a plain UNet or of an LSDM's branch view."""
    config = model.config.unet if is_lsdm(model) else model.config
    edits = ("removed_parts", "widths")
    return {key: value for key, value in dict(config).items() if not key.startswith("_") and key not in edits}


def is_lsdm(model: nn.Module) -> bool:
    return hasattr(model, "trunk") and hasattr(model, "branch")


def bk_config(config: dict, variant: str) -> dict:
    """BK-SDM's student of a UNet config: one layer per down stage; ``bk-small`` without the mid
    block; ``bk-tiny`` also without the innermost stage."""
    if variant not in BK_VARIANTS:
        raise ValueError(f"student {variant!r} is not one of {BK_VARIANTS}")
    stages = len(config["down_block_types"])
    student = {**config, "layers_per_block": 1}
    if variant in ("bk-small", "bk-tiny"):
        student["mid_block_type"] = None
    if variant == "bk-tiny":
        if stages < 2:
            raise ValueError(f"bk-tiny drops the innermost stage; the teacher has only {stages}")
        student["down_block_types"] = list(config["down_block_types"][:-1])
        student["up_block_types"] = list(config["up_block_types"][1:])
        student["block_out_channels"] = list(config["block_out_channels"][:-1])
        for key in PER_STAGE_KEYS:
            value = student.get(key)
            if isinstance(value, list | tuple) and len(value) == stages:
                student[key] = list(value[:-1])
        for key in ("reverse_transformer_layers_per_block",):
            if isinstance(student.get(key), list | tuple):
                student[key] = list(student[key][1:])
    return student


def _layers(config: dict) -> list[int]:
    stages = len(config["down_block_types"])
    layers = config.get("layers_per_block", 2)
    return list(layers) if isinstance(layers, list | tuple) else [layers] * stages


# -- building a student ---------------------------------------------------------------------------


def make_student(teacher: nn.Module, spec: str | dict) -> nn.Module:
    """A student of ``teacher`` (a UNet or an LSDM) with the kept weights copied: ``spec`` is a BK-SDM
    variant (:data:`BK_VARIANTS`) or ``{"remove": [part, ...]}`` (SnapFusion edits)."""
    if getattr(teacher.config, "widths", None):
        raise ValueError(
            "this teacher's widths are pruned (its config records widths); make students from the unpruned "
            "model — pruning comes after block removal, not before"
        )
    if isinstance(spec, str):
        if removed_parts(teacher):
            raise ValueError(
                f"{spec} is built from a teacher with every block; this one has parts removed "
                f"({removed_parts(teacher)[:3]}...): start from the unedited teacher"
            )
        student = _build(teacher, bk_config(unet_config(teacher), spec), [])
    elif isinstance(spec, dict) and set(spec) == {"remove"}:
        student = _build(teacher, unet_config(teacher), [*removed_parts(teacher), *spec["remove"]])
    else:
        raise ValueError(f"student spec {spec!r}: one of {BK_VARIANTS} or {{'remove': [part names]}}")
    copy_teacher_weights(student, teacher)
    dtype = next(teacher.parameters()).dtype
    return student if dtype == torch.float32 else student.to(dtype)


def _build(teacher: nn.Module, config: dict, removed: list[str]) -> nn.Module:
    if is_lsdm(teacher):
        options = {key: value for key, value in dict(teacher.config).items() if not key.startswith("_")}
        return type(teacher)(**{**options, "unet": config, "removed_parts": removed})
    return EditedUNet2DConditionModel(**config, removed_parts=removed) if removed else UNet2DConditionModel(**config)


def copy_teacher_weights(student: nn.Module, teacher: nn.Module) -> None:
    """Load every student parameter from the teacher parameter :func:`teacher_name` names."""
    source = teacher.state_dict()
    state, problems = {}, []
    for key, value in student.state_dict().items():
        origin = teacher_name(key, student, teacher)
        if origin not in source:
            problems.append(f"{key} ← {origin} (not in the teacher)")
        elif source[origin].shape != value.shape:
            problems.append(f"{key} ← {origin} (shape {list(source[origin].shape)} ≠ {list(value.shape)})")
        else:
            state[key] = source[origin]
    if problems:
        raise RuntimeError(f"student weights cannot come from the teacher: {problems[:5]}")
    student.load_state_dict(state, strict=True)


def teacher_name(name: str, student: nn.Module, teacher: nn.Module) -> str:
    """The teacher module or parameter a student's ``name`` comes from. Down stages keep their
    first layers; up stages keep their first layers and their last (which reads the skip from the
    stage below, so widths still line up); when the student has fewer stages (``bk-tiny``) its up
    blocks are the teacher's outer ones."""
    found = _BLOCK.search(name)
    if found is None:
        return name
    prefix = name[: found.start()]
    student_config, teacher_config = unet_config(student), unet_config(teacher)
    shift = len(teacher_config["down_block_types"]) - len(student_config["down_block_types"])
    index = int(found["index"])
    if found["kind"] == "down_blocks":
        teacher_index = index
    else:
        teacher_index = index + shift
    rest = found["rest"]
    layer = re.match(r"\.(resnets|attentions)\.(\d+)(.*)$", rest)
    if layer is not None:
        kind, position, tail = layer[1], int(layer[2]), layer[3]
        if found["kind"] == "up_blocks":
            student_count = _layers(student_config)[::-1][index] + 1
            teacher_count = _layers(teacher_config)[::-1][teacher_index] + 1
            if position == student_count - 1:
                position = teacher_count - 1
        rest = f".{kind}.{position}{tail}"
    return f"{prefix}{found['kind']}.{teacher_index}{rest}"


# -- what feature distillation compares -----------------------------------------------------------


def feature_pairs(student: nn.Module, teacher: nn.Module) -> list[tuple[str, str]]:
    """(student module, teacher module) whose outputs feature KD compares: every down, mid and up
    block of the student against its teacher block. A student down block that lost its downsampler
    (``bk-tiny``'s innermost kept stage) is compared with the teacher block's last layer before the
    downsampler, where the widths and the resolution agree."""
    from distill.latency import blocks

    teacher_blocks = set(blocks(teacher))
    pairs = []
    for name in blocks(student):
        if not re.search(r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)$", name):
            continue
        origin = teacher_name(name, student, teacher)
        if origin not in teacher_blocks:
            continue
        student_block, teacher_block = student.get_submodule(name), teacher.get_submodule(origin)
        lost_downsampler = getattr(teacher_block, "downsamplers", None) and not getattr(
            student_block, "downsamplers", None
        )
        if lost_downsampler:
            origin = _last_layer(teacher, origin)
        pairs.append((name, origin))
    return pairs


def _last_layer(model: nn.Module, block: str) -> str:
    module = model.get_submodule(block)
    kind = "attentions" if getattr(module, "attentions", None) else "resnets"
    return f"{block}.{kind}.{len(getattr(module, kind)) - 1}"


def feature(output) -> torch.Tensor:
    """The hidden states in a block's output (down blocks return ``(hidden, skips)``, attentions a
    one-tuple or a ``Transformer2DModelOutput``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list):
        return feature(output[0])
    return output.sample


def kept_modules(student: nn.Module, teacher: nn.Module) -> list[tuple[str, str]]:
    """(student, teacher) pairs of every kept part and every other leaf-level module the copy maps
    (conv_in, samplers, heads, time embedding): what the exactness test runs side by side."""
    removed = set(removed_parts(student))
    names = [name for name, _ in student.named_modules() if PART.match(name) and name not in removed]
    names += [
        name
        for name, _ in student.named_modules()
        if re.search(r"(conv_in|conv_out|conv_norm_out|time_embedding|downsamplers\.\d+|upsamplers\.\d+)$", name)
    ]
    return [(name, teacher_name(name, student, teacher)) for name in names]
