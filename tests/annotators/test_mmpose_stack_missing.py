"""Without the MMPose stack (the core set-up leaves it out), configuring an MMPose-backed annotator
fails when it is built, with a message naming the set-up command; importing annotators/ does not."""

import sys

import pytest

from annotators.mmpose_stack import SETUP_COMMAND, MMPoseStackMissingError
from annotators.registry import build_annotator

STACK = ("mmcv", "mmengine", "mmdet", "mmpose", "xtcocotools")


@pytest.fixture
def without_mmpose_stack(monkeypatch):
    """Every import of the stack fails as if it were not installed (None in sys.modules)."""
    for name in [*STACK, *(name for name in sys.modules if name.partition(".")[0] in STACK)]:
        monkeypatch.setitem(sys.modules, name, None)
    for name in ("annotators.mmpose_topdown", "annotators.mmdet_detection"):  # imported afresh, without the stack
        monkeypatch.delitem(sys.modules, name, raising=False)


@pytest.mark.parametrize(
    "config",
    [
        {"name": "mmpose", "weights": "/ckpt/rtmpose-m.pth", "options": {"config": "rtmpose-m.py"}},
        {"name": "dwpose", "weights": "/ckpt/dw-ll_ucoco_384.pth"},
        {"name": "mmdet-detector", "weights": "/ckpt/yolox_l.pth", "options": {"config": "yolox_l.py"}},
    ],
    ids=lambda config: config["name"],
)
def test_mmpose_annotator_without_the_stack_names_the_setup_command(without_mmpose_stack, config):
    with pytest.raises(MMPoseStackMissingError) as error:
        build_annotator(config)
    assert SETUP_COMMAND == "make setup-mmpose"
    message = str(error.value)
    assert f"annotator {config['name']!r} needs the MMPose stack" in message
    assert "make setup-mmpose" in message and "scripts/setup_mmpose.sh" in message
    assert isinstance(error.value, ImportError)
