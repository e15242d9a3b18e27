"""Fixtures shared by the model tests: the toy shards and VAE the training recipes read, and
feature extractors of the real architectures with random weights, saved the way users' real
weights are (nothing is downloaded)."""

import pytest
import torch


def write_toy_shards(root, count: int, per_shard: int):
    """``count`` synthetic samples (24×32, one or two people) in shards of ``per_shard``."""
    from shards.testing import make_sample
    from shards.writer import ShardWriter

    with ShardWriter(str(root), 0, max_samples=per_shard) as writer:
        for index in range(count):
            writer.write(make_sample(f"s{index}", height=24, width=32, seed=index, people=1 + index % 2))
    return root


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory):
    """The toy VAE (``hyperhuman.lsdm.testing.tiny_vae``) saved as a ``vae/`` folder."""
    from hyperhuman.lsdm.testing import tiny_vae

    path = tmp_path_factory.mktemp("vae") / "vae"
    tiny_vae().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A randomly initialised state dict of the real FID Inception architecture (no download)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *args, **kwargs: None)
        torch.manual_seed(0)
        network = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(network.state_dict(), path)
    return path


def tiny_clip_tokenizer():
    """A CLIP BPE tokenizer whose vocabulary is the 256 byte symbols (+ end-of-word forms) and a few merges."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges = [("p", "h"), ("ph", "o"), ("t", "o</w>"), ("a", "n"), ("e", "r</w>")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


@pytest.fixture(scope="session")
def clip_path(tmp_path_factory):
    """A toy random CLIPModel + processor saved like a hub folder ("openai" in the name: torchmetrics loads it)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = tiny_clip_tokenizer()
    special = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            **special,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=8,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "openai-clip-toy"
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path
