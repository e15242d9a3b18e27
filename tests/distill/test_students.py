"""Students made from a teacher: BK-SDM block removal and SnapFusion edits, for a plain UNet and the
LSDM. Every kept module computes exactly what its teacher module computes; a student with parts
removed computes exactly what the teacher computes with those parts bypassed."""

import pytest
import torch

from distill.latency import capture
from distill.students import (
    BK_VARIANTS,
    EditedUNet2DConditionModel,
    feature_pairs,
    kept_modules,
    make_student,
)
from hyperhuman.lsdm.model import LatentStructuralUNet
from hyperhuman.unet_parts import removable_parts, skipping

from .conftest import TEACHER_UNET, teacher_lsdm, teacher_unet

TEACHERS = {"unet": teacher_unet, "lsdm": teacher_lsdm}


def inputs_for(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    channels = 12 if isinstance(model, LatentStructuralUNet) else 4
    inputs = {
        "sample": torch.randn(2, channels, 8, 8, generator=generator),
        "timestep": torch.tensor([10, 700]),
        "encoder_hidden_states": torch.randn(2, 5, TEACHER_UNET["cross_attention_dim"], generator=generator),
    }
    if isinstance(model, LatentStructuralUNet):
        inputs["pose_latent"] = torch.randn(2, 4, 8, 8, generator=generator)
    return inputs


def output(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def first_tensor(value):
    return value if isinstance(value, torch.Tensor) else first_tensor(value[0])


@pytest.mark.parametrize("variant", BK_VARIANTS)
@pytest.mark.parametrize("kind", TEACHERS)
def test_every_kept_module_of_a_bk_student_computes_what_its_teacher_module_does(kind, variant):
    teacher = TEACHERS[kind](0).eval()
    student = make_student(teacher, variant).eval()
    pairs = kept_modules(student, teacher)
    assert len(pairs) > 10
    calls = capture(teacher, inputs_for(teacher), sorted({origin for _, origin in pairs}))
    by_name = {call.name: call for call in calls}
    with torch.no_grad():
        for name, origin in pairs:
            call = by_name[origin]
            expected = first_tensor(call.module(*call.args, **call.kwargs))
            actual = first_tensor(student.get_submodule(name)(*call.args, **call.kwargs))
            assert torch.equal(actual, expected), f"{name} ≠ teacher {origin}"


@pytest.mark.parametrize("kind", TEACHERS)
def test_bk_base_and_small_are_the_teacher_with_the_middle_layers_bypassed(kind):
    """BK-SDM's block removal is exactly a removal: bk-base = the teacher with every down stage's
    second layer and every up stage's middle layer bypassed; bk-small also bypasses the mid block."""
    teacher = TEACHERS[kind](0).eval()
    middle = [
        name
        for name in removable_parts(teacher)
        if (".down_blocks." in f".{name}" or ".up_blocks." in f".{name}") and name.endswith(".1")
    ]
    mid_block = [name for name in removable_parts(teacher) if "mid_block." in name]
    inputs = inputs_for(teacher)
    for variant, bypassed in (("bk-base", middle), ("bk-small", middle + mid_block)):
        student = make_student(teacher, variant).eval()
        with skipping(teacher, bypassed):
            expected = output(teacher, inputs)
        assert torch.equal(output(student, inputs), expected), variant
    assert not torch.equal(output(teacher, inputs), expected)  # and the teacher is whole again


@pytest.mark.parametrize("kind", TEACHERS)
def test_an_edited_student_is_the_teacher_with_those_parts_bypassed_and_round_trips(kind, tmp_path):
    teacher = TEACHERS[kind](0).eval()
    parts = removable_parts(teacher)
    removed = [parts[0], parts[len(parts) // 2], parts[-1]]  # an outer attention, something inner, the mid block
    student = make_student(teacher, {"remove": removed}).eval()
    assert student.config.removed_parts == removed
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    inputs = inputs_for(teacher)
    with skipping(teacher, removed):
        expected = output(teacher, inputs)
    assert torch.equal(output(student, inputs), expected)

    student.save_pretrained(tmp_path / "student")
    loaded = type(student).from_pretrained(tmp_path / "student").eval()
    assert loaded.config.removed_parts == removed
    assert torch.equal(output(loaded, inputs), expected)
    # editing the edited student again keeps what was removed before
    again = make_student(loaded, {"remove": [removable_parts(loaded)[0]]})
    assert again.config.removed_parts[:3] == removed


def test_a_plain_edited_unet_is_a_unet2dconditionmodel_with_every_stock_config_key():
    teacher = teacher_unet(0)
    student = make_student(teacher, {"remove": ["down_blocks.0.attentions.1"]})
    assert isinstance(student, EditedUNet2DConditionModel) and isinstance(student, type(teacher))
    assert {key for key in teacher.config if not key.startswith("_")} <= set(student.config)
    assert type(make_student(teacher, "bk-base")) is type(teacher)  # BK students are stock configs


def test_what_cannot_be_removed_is_refused_with_the_reason():
    teacher = teacher_unet(0)
    assert "up_blocks.1.resnets.0" not in removable_parts(teacher)
    with pytest.raises(ValueError, match=r"up_blocks\.1\.resnets\.0.*first ResNet of an up block"):
        make_student(teacher, {"remove": ["up_blocks.1.resnets.0"]})
    with pytest.raises(ValueError, match=r"down_blocks\.1\.resnets\.0.*16 → 32"):
        make_student(teacher, {"remove": ["down_blocks.1.resnets.0"]})
    with pytest.raises(ValueError, match="no such module"):
        make_student(teacher, {"remove": ["down_blocks.7.attentions.0"]})
    with pytest.raises(ValueError, match="bk-base"):
        make_student(teacher, "bk-huge")
    edited = make_student(teacher, {"remove": ["down_blocks.0.attentions.1"]})
    with pytest.raises(ValueError, match="removed already"):
        make_student(edited, {"remove": ["down_blocks.0.attentions.1"]})
    with pytest.raises(ValueError, match="unedited teacher"):
        make_student(edited, "bk-base")


@pytest.mark.parametrize("kind", TEACHERS)
def test_feature_pairs_compare_outputs_of_the_same_shape(kind):
    teacher = TEACHERS[kind](0).eval()
    inputs = inputs_for(teacher)
    for variant in BK_VARIANTS:
        student = make_student(teacher, variant).eval()
        pairs = feature_pairs(student, teacher)
        student_calls = {c.name: c for c in capture(student, inputs, [s for s, _ in pairs])}
        teacher_calls = {c.name: c for c in capture(teacher, inputs, [t for _, t in pairs])}
        with torch.no_grad():
            for name, origin in pairs:
                s, t = student_calls[name], teacher_calls[origin]
                assert (
                    first_tensor(s.module(*s.args, **s.kwargs)).shape
                    == first_tensor(t.module(*t.args, **t.kwargs)).shape
                ), (variant, name, origin)
        dropped = {"bk-base": 0, "bk-small": 1, "bk-tiny": 3}[variant]  # the mid block, the innermost stage
        expected_blocks = 2 * len(TEACHER_UNET["down_block_types"]) + 1 - dropped
        if kind == "lsdm":  # each branch's outer down and up block count once per branch
            expected_blocks += 2 * 2
        assert len(pairs) == expected_blocks, (variant, pairs)
