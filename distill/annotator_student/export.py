"""The pose student as an ONNX file the ``efficientformer-pose`` annotator runs.

``torch.onnx.export(..., dynamo=True)`` (the project's exporter, as :mod:`distill.quant.onnx_runtime`)
with a dynamic batch: the annotator runs all the people of an image in one call. Input
``pixels`` float32 ``[N, 3, H, W]`` RGB 0..255, output ``heatmaps`` ``[N, 17, H/s, W/s]``. What
the annotator needs besides the graph (input size, heatmap stride, crop padding, the teacher) is
stored in the file's metadata under :data:`annotators.efficientformer_pose.METADATA_KEY`, so the
one file is the whole annotator. :func:`check_onnx` compares onnxruntime with torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from annotators.efficientformer_pose import METADATA_KEY

INPUT_NAME, OUTPUT_NAME = "pixels", "heatmaps"
MAX_BATCH = 64  # people per call the exported graph accepts


def export_onnx(model, path: str | Path, metadata: dict, opset: int = 18) -> Path:
    """``model`` (a :class:`~distill.annotator_student.model.PoseStudent`) to ``path`` with
    ``metadata`` (JSON) merged over the model's own geometry."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = model.config
    height, width = config.input_size
    example = torch.zeros(2, 3, height, width, device=model.device)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    was_training = model.training
    model.eval()
    with torch.no_grad():  # fills timm's attention-bias cache, which the export would otherwise see assigned
        model(example)
    try:
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, verbose=False)  # fmt: skip
    finally:
        model.train(was_training)
    described = {
        "input_size": [height, width],
        "heatmap_stride": config.heatmap_stride,
        "num_keypoints": config.num_keypoints,
        "backbone": config.backbone,
        **metadata,
    }
    graph = onnx.load(str(path))
    entry = graph.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(described)
    onnx.save(graph, str(path))
    return path


def check_onnx(model, path: str | Path, batch: int = 3, seed: int = 0) -> float:
    """The largest absolute difference between onnxruntime's heatmaps and the model's, on
    ``batch`` random crops (another batch size than the export's, to check that it is dynamic)."""
    import onnxruntime

    height, width = model.config.input_size
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(batch, 3, height, width, generator=generator) * 255
    was_training = model.training
    model.eval()
    with torch.no_grad():
        expected = model(pixels.to(model.device)).float().cpu().numpy()
    model.train(was_training)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    found = session.run([OUTPUT_NAME], {INPUT_NAME: pixels.numpy()})[0]
    if found.shape != expected.shape:
        raise ValueError(f"{path}: onnxruntime gave heatmaps of shape {found.shape}, torch {expected.shape}")
    return float(np.abs(found - expected).max())
