"""The MMPose stack (mmcv with its C++ ops, mmengine, mmdet, mmpose, xtcocotools) is an optional
part of the environment: the core set-up (``make setup``, all that ``make demo`` needs) leaves it
out because mmcv has to be built from source (~20 minutes once, then cached). The annotators that
run on it check for it when they are built, and say how to install it."""

from __future__ import annotations

import importlib

SETUP_COMMAND = "make setup-mmpose"


class MMPoseStackMissingError(ImportError):
    """An MMPose-backed annotator is configured but the MMPose stack is not installed."""


def require_mmpose_stack(annotator: str, modules: tuple[str, ...]) -> None:
    """Import ``modules`` (e.g. ``("mmcv", "mmpose.apis")``) or fail naming the set-up command."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise MMPoseStackMissingError(
                f"annotator {annotator!r} needs the MMPose stack (mmcv, mmengine, mmdet, mmpose, xtcocotools), "
                f"which is not installed here (import {module}: {exc}); install it with `{SETUP_COMMAND}` "
                "(scripts/setup_mmpose.sh: builds mmcv once, ~20 min on 2 cores, then reuses the cached wheel)"
            ) from exc
