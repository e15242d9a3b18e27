"""The E2GAN base model at toy size: generator and discriminator shapes, text conditioning, stable
layer names, save/load; `hyperhuman distill gan` end to end with checkpoints and exact resume; config
errors naming the key."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from distill.e2gan.discriminator import PatchDiscriminator
from distill.e2gan.generator import E2GANGenerator, load_generator
from distill.e2gan.train import check_config, discriminator_loss, generator_adversarial_loss, train_gan
from hyperhuman.config import ConfigError

TINY = {"base_channels": 8, "num_downsamples": 1, "attention_heads": 2, "mlp_ratio": 2}


def tiny_generator(seed=0, text_dim=32, **overrides):
    torch.manual_seed(seed)
    return E2GANGenerator(**{**TINY, **overrides}, text_dim=text_dim, text_encoder="test").eval()


def inputs(batch=2, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    text = torch.randn(batch, 5, 32, generator=generator)
    mask = torch.ones(batch, 5, dtype=torch.long)
    mask[1, 3:] = 0  # padding the cross-attention must ignore
    return image, text, mask


def test_generator_edits_at_the_input_size_and_the_text_changes_the_edit():
    model = tiny_generator()
    image, text, mask = inputs()
    with torch.no_grad():
        out = model(image, text, mask)
        other = model(image, text.flip(0), mask)
        padded = text.clone()
        padded[1, 3:] = 100.0  # masked tokens: no effect
        assert torch.equal(model(image, padded, mask), out)
    assert out.shape == image.shape and out.abs().max() <= 1
    assert (out - other).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # each sample's edit follows its text
    with torch.no_grad():
        assert model(inputs(size=32)[0][:1], text[:1], mask[:1]).shape == (1, 3, 32, 32)


def test_with_the_input_skip_a_zero_output_conv_is_the_identity_edit():
    model = tiny_generator()
    torch.nn.init.zeros_(model.conv_out.weight)
    torch.nn.init.zeros_(model.conv_out.bias)
    image, text, mask = inputs()
    with torch.no_grad():
        assert torch.allclose(model(image, text, mask), image.clamp(-0.999, 0.999), atol=1e-5)
        plain = tiny_generator(input_skip=False)
        plain.load_state_dict(model.state_dict())
        assert torch.equal(plain(image, text, mask), torch.zeros_like(image))  # tanh(0): pix2pix's output


def test_every_weight_sits_in_a_plain_conv_linear_or_norm_with_a_stable_name():
    model = tiny_generator()
    kinds = {type(module) for module in model.modules() if list(module.parameters(recurse=False))}
    assert kinds <= {torch.nn.Conv2d, torch.nn.Linear, torch.nn.InstanceNorm2d, torch.nn.LayerNorm}
    names = dict(model.named_modules())
    for name in ("conv_in", "down_blocks.0.conv", "res_blocks.1.conv2", "transformer.conv_down",
                 "transformer.attn1.to_q", "transformer.attn2.to_k", "transformer.attn2.to_out", "transformer.ff.fc1",
                 "transformer.conv_up", "up_blocks.0.conv", "conv_out"):  # fmt: skip
        assert isinstance(names[name], torch.nn.Conv2d | torch.nn.Linear), name
    assert names["transformer.attn2.to_k"].in_features == 32  # keys and values from the text


def test_the_transformer_runs_after_the_second_resnet_block():
    model = tiny_generator()
    order = []
    for name in ("res_blocks.0", "res_blocks.1", "transformer", "res_blocks.2"):
        model.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: order.append(name))
    with torch.no_grad():
        model(*inputs())
    assert order == ["res_blocks.0", "res_blocks.1", "transformer", "res_blocks.2"]


def test_the_generator_round_trips_through_save_pretrained(tmp_path):
    model = tiny_generator()
    model.save_pretrained(tmp_path / "run" / "generator", safe_serialization=True)
    assert (tmp_path / "run" / "generator" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_generator(str(tmp_path / "run"))  # the run folder or its generator/
    assert loaded.config.text_encoder == "test" and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(*inputs()), model(*inputs()))
    with pytest.raises(FileNotFoundError, match="no E2GAN generator"):
        load_generator(str(tmp_path / "none"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attention_heads": 3}, "generator.attention_heads=3 does not divide"),
        ({"attention_after": 4}, "generator.attention_after=4 is past the last"),
        ({"base_channels": 0}, "generator.base_channels must be an integer ≥ 1"),
    ],
)
def test_a_bad_generator_config_names_the_key(change, message):
    with pytest.raises(ConfigError, match=message):
        tiny_generator(**change)


def test_the_patch_discriminator_scores_patches_of_the_pair():
    torch.manual_seed(0)
    critic = PatchDiscriminator(base_channels=8, num_layers=2)
    image, _, _ = inputs(size=32)
    logits = critic(image, image.flip(0))
    assert logits.shape == (2, 1, 6, 6)  # 32 → 16 → 8 → 7 → 6: one logit per overlapping patch


def test_adversarial_losses():
    real, fake = torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)
    assert discriminator_loss(real, fake, "lsgan") == 0 and generator_adversarial_loss(real, "lsgan") == 0
    assert discriminator_loss(real, -fake - 1, "hinge") == 0 and generator_adversarial_loss(real, "hinge") == -1


# --- the recipe ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pairs(distill_shards, tmp_path_factory):
    """Pair shards of two stand-in concepts from the toy shards (16 px): 5 training photos, 1 held out."""
    from distill.e2gan.pairs import edit_pairs
    from tests.distill.test_edit_pairs import pairs_config

    output = tmp_path_factory.mktemp("e2gan-pairs")
    edit_pairs(pairs_config(output, distill_shards))
    return output


@pytest.fixture(scope="module")
def text_encoder_path(tmp_path_factory):
    """The toy BERT text encoder (hidden 32) with the MiniLM tokenizer, saved as a folder."""
    from hyperhuman.lsdm.testing import tiny_text_encoder

    tokenizer, encoder = tiny_text_encoder(0)
    path = tmp_path_factory.mktemp("text-encoder")
    tokenizer.save_pretrained(path)
    encoder.save_pretrained(path)
    return str(path)


def gan_config(output, pairs, text_encoder_path, **train):
    return {
        "output": str(output),
        "seed": 0,
        "text_encoder": text_encoder_path,
        "generator": dict(TINY),
        "discriminator": {"base_channels": 8, "num_layers": 2},
        "data": {
            "train": str(pairs / "train"),
            "resolution": 16,
            "random_crop": True,
            "min_crop_scale": 0.8,
            "flip_prob": 0.5,
            "shuffle_buffer": 4,
            "num_workers": 0,
        },  # fmt: skip
        "loss": {"l1_weight": 10.0, "l2_weight": 1.0, "adversarial": "lsgan", "adversarial_weight": 1.0},
        "train": {
            "batch_size": 2,
            "max_train_steps": 6,
            "checkpointing_steps": 2,
            "checkpoints_total_limit": 2,
            "learning_rate": 1e-3,
            "discriminator_learning_rate": 5e-4,
            "ema": {"use": True, "decay": 0.9},
            "log_every": 100,
            **train,
        },  # fmt: skip
        "validation": {"every": 3, "heldout": str(pairs / "heldout"), "num_per_concept": 1},
    }


def test_gan_trains_checkpoints_and_resumes_exactly(pairs, text_encoder_path, tmp_path):
    output = tmp_path / "run"
    report = train_gan(gan_config(output, pairs, text_encoder_path))
    assert report["steps"] == 6 and len(report["losses"]) == 6
    assert all(len(values) == 6 for values in report["terms"].values())
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert [entry["step"] for entry in report["heldout"]] == [3, 6]
    assert {p.name for p in (output / "validation").iterdir()} == {"step-3.png", "step-6.png"}
    assert report["pairs"] == {"cartoon": 1, "sketch": 1, "all": 2} and report["psnr_on"] == "validation.heldout"
    assert set(report["psnr_db"]) == set(report["identity_psnr_db"]) == {"cartoon", "sketch", "all"}
    assert report["perceptual"].startswith("off") and report["adversarial"] == "lsgan"
    assert list((output / "logs").rglob("events.out.tfevents.*"))
    saved = json.loads((output / "train_report.json").read_text())
    assert saved["psnr_db"] == report["psnr_db"]
    generator = load_generator(str(output))
    assert generator.config.text_encoder == text_encoder_path and generator.config.text_dim == 32
    concepts = json.loads((output / "generator" / "concepts.json").read_text())
    assert concepts == {"sketch": "turn the photo into a pencil sketch", "cartoon": "turn the person into a cartoon"}

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(output / "checkpoints" / "checkpoint-4", resumed / "checkpoints" / "checkpoint-4")
    again = train_gan(gan_config(resumed, pairs, text_encoder_path), resume="latest")
    assert again["losses"] == report["losses"][4:]
    assert all(again["terms"][name] == values[4:] for name, values in report["terms"].items())
    for file in ("model.safetensors", "model_1.safetensors"):  # the generator and the discriminator
        original = load_file(output / "checkpoints" / "checkpoint-6" / file)
        replayed = load_file(resumed / "checkpoints" / "checkpoint-6" / file)
        assert all(torch.equal(value, replayed[name]) for name, value in original.items()), file
    final = load_file(output / "generator" / "diffusion_pytorch_model.safetensors")
    final_resumed = load_file(resumed / "generator" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(value, final_resumed[name]) for name, value in final.items())  # the EMA weights
    assert again["psnr_db"] == report["psnr_db"]


def test_hinge_loss_one_concept_accumulation_and_the_command_line(pairs, text_encoder_path, tmp_path, capsys):
    from hyperhuman.cli import main

    code = main(["distill", "gan", "--set", f"output={tmp_path / 'run'}", "--set", f"text_encoder={text_encoder_path}",
                 "--set", "generator.base_channels=8", "--set", "generator.num_downsamples=1",
                 "--set", "discriminator.num_layers=2", "--set", f"data.train={pairs / 'train'}",
                 "--set", "data.concepts=[sketch]", "--set", "data.resolution=16", "--set", "loss.adversarial=hinge",
                 "--set", "train.batch_size=1", "--set", "train.gradient_accumulation_steps=2",
                 "--set", "train.max_train_steps=2", "--set", "validation.every=0",
                 "--set", f"validation.heldout={pairs / 'heldout'}"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "[distill gan] 2 steps" in printed and "sketch" in printed and "cartoon" not in printed.split("dB")[0]
    report = json.loads((tmp_path / "run" / "train_report.json").read_text())
    assert report["adversarial"] == "hinge" and set(report["psnr_db"]) == {"sketch", "all"}
    assert report["steps"] == 2 and len(report["losses"]) == 2  # optimizer steps, of two micro-steps each


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(text_encoder=None), r"lacks 'text_encoder'"),
        (lambda c: c["loss"].update(adversarial="wgan"), "loss.adversarial must be one of"),
        (lambda c: c["loss"].update(perceptual_weight=1.0), "loss.perceptual_weight=1.0 needs loss.perceptual_weights"),
        (lambda c: c["loss"].update(l1_weight=-1), "loss.l1_weight must be a number ≥ 0"),
        (lambda c: c["data"].update(resolution=18), r"data.resolution=18 must be a positive multiple of 4"),
        (lambda c: c["generator"].update(attention_heads=3), "generator.attention_heads=3"),
        (lambda c: c["generator"].update(heads=3), "unknown config key 'generator.heads'"),
        (
            lambda c: c["data"].update(train="/nonexistent"),
            r"data.train='/nonexistent': no complete shards.*distill edit-pairs",
        ),
        (lambda c: c["validation"].update(heldout="/nonexistent"), "validation.heldout='/nonexistent': no complete"),
        (lambda c: c["train"].update(max_train_steps=0), "train.max_train_steps must be a positive integer"),
        (lambda c: c["data"].update(concepts="sketch"), "data.concepts must be a list"),
    ],
)
def test_bad_configs_fail_at_start_naming_the_key(change, message, pairs, text_encoder_path, tmp_path):
    config = gan_config(tmp_path / "run", pairs, text_encoder_path)
    change(config)
    with pytest.raises(ConfigError, match=message):
        check_config(config)
    assert not (tmp_path / "run").exists()


def test_a_run_fine_tunes_the_generator_init_names(pairs, text_encoder_path, tmp_path):
    short = {"max_train_steps": 2, "checkpointing_steps": 2}
    train_gan(gan_config(tmp_path / "base", pairs, text_encoder_path, **short))
    config = gan_config(tmp_path / "tuned", pairs, text_encoder_path, learning_rate=0.0, **short)
    config["init"] = str(tmp_path / "base")
    config["generator"] = {**TINY, "base_channels": TINY["base_channels"] * 2}  # init's architecture wins
    train_gan(config)
    base = load_file(tmp_path / "base" / "generator" / "diffusion_pytorch_model.safetensors")
    tuned = load_file(tmp_path / "tuned" / "generator" / "diffusion_pytorch_model.safetensors")
    assert base.keys() == tuned.keys() and all(torch.equal(value, tuned[name]) for name, value in base.items())

    config.update(output=str(tmp_path / "other"), text_encoder="minilm")
    with pytest.raises(ConfigError, match="init=.*text_encoder"):
        train_gan(config)
