"""transformers depth (DPT) at real architecture with random weights saved to disk."""

import numpy as np
import pytest
import torch

from annotators.registry import build_annotator
from pipelines.annotate import AnnotateStage


@pytest.fixture(scope="module")
def tiny_dpt(tmp_path_factory):
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(0)
    config = DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, image_size=32,
        patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 16, 16],
        fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5],
    )  # fmt: skip
    path = tmp_path_factory.mktemp("dpt")
    DPTForDepthEstimation(config).save_pretrained(path)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(path)
    return str(path)


def test_depth_at_image_size_and_batch_equals_one_by_one(tiny_dpt):
    annotator = build_annotator({"name": "transformers-depth", "weights": tiny_dpt, "batch_size": 4})
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(50, 70, 3), (30, 20, 3), (50, 70, 3)]]
    images.append(rng.integers(0, 65536, (30, 20), dtype=np.uint16))  # 16-bit grayscale
    together = annotator(images)
    for image, result in zip(images, together, strict=True):
        assert result["kind"] == "relative_inverse"
        assert result["depth"].shape == image.shape[:2] and result["depth"].dtype == np.float32
        np.testing.assert_allclose(result["depth"], annotator([image])[0]["depth"], rtol=1e-4, atol=1e-5)


def test_model_depth_feeds_the_annotate_stage(tiny_dpt, tmp_path):
    from hyperhuman.config import load_config

    config = load_config("annotate/offline")["annotators"]
    config["depth"] = {"name": "transformers-depth", "weights": tiny_dpt}
    samples = AnnotateStage(config)(["k"], [np.full((40, 60, 3), 90, np.uint8)], [None], ["test"])
    assert samples[0].annotations["depth"]["kind"] == "relative_inverse"
    assert samples[0].annotations["depth"]["weights"] == tiny_dpt
    assert samples[0].normal.shape == (40, 60, 3)


def test_zoedepth_metric_depth_at_image_size(tmp_path):
    from transformers import BeitConfig, ZoeDepthConfig, ZoeDepthForDepthEstimation, ZoeDepthImageProcessor

    backbone = BeitConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, image_size=32,
        patch_size=8, out_indices=[1, 2, 3, 4], use_relative_position_bias=True, reshape_hidden_states=False,
    )  # fmt: skip
    config = ZoeDepthConfig(
        backbone_config=backbone, backbone_hidden_size=32, neck_hidden_sizes=[8, 16, 16, 16],
        fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5], bottleneck_features=16,
        num_attractors=[4, 4, 4, 4], bin_embedding_dim=16, num_relative_features=8,
    )  # fmt: skip
    torch.manual_seed(0)
    ZoeDepthForDepthEstimation(config).save_pretrained(tmp_path)
    ZoeDepthImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(tmp_path)
    annotator = build_annotator(
        {"name": "transformers-depth", "weights": str(tmp_path), "options": {"kind": "metric_m"}}
    )
    result = annotator([np.full((50, 70, 3), 100, np.uint8)])[0]
    assert result["kind"] == "metric_m" and result["depth"].shape == (50, 70)
    assert np.isfinite(result["depth"]).all() and (result["depth"] > 0).all()
