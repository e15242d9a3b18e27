"""The WDSR-style SR network, its metrics and train-sr at toy size (offline, seconds)."""

import math

import numpy as np
import PIL.Image
import pytest
import torch

from hyperhuman.config import ConfigError
from hyperhuman.sr.data import bicubic_upscale, crop_to_multiple, downscale, to_tensor
from hyperhuman.sr.metrics import evaluate, luma, psnr, ssim
from hyperhuman.sr.model import SuperResolutionNet
from hyperhuman.sr.train import check_config, train_sr
from tests.hyperhuman.conftest import write_toy_shards

TINY = {"scale": 2, "channels": 8, "num_blocks": 3, "inner_channels": 16}


def test_the_network_upscales_by_its_scale_and_images_round_trip():
    torch.manual_seed(0)
    net = SuperResolutionNet(**TINY).eval()
    with torch.no_grad():
        assert net(torch.rand(2, 3, 10, 14)).shape == (2, 3, 20, 28)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (9, 11, 3), dtype=np.uint8))
    (upscaled,) = net.upscale([image])
    assert upscaled.size == (22, 18) and upscaled.mode == "RGB"


def test_pruned_widths_and_skipped_blocks_save_and_load(tmp_path):
    torch.manual_seed(0)
    net = SuperResolutionNet(**TINY, widths=[16, 5, 3], skipped_blocks=[1]).eval()
    assert net.block_widths() == {0: 16, 2: 3}
    assert "blocks.2.conv1.weight" in net.state_dict() and "blocks.1.conv1.weight" not in net.state_dict()
    net.save_pretrained(tmp_path / "sr")
    loaded = SuperResolutionNet.from_pretrained(tmp_path / "sr").eval()
    low = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(low), net(low))
    assert loaded.config.skipped_blocks == [1] and list(loaded.config.widths) == [16, 5, 3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"widths": [16, 16]}, "one inner width per block"),
        ({"widths": [16, 0, 16]}, "each in 1..16"),
        ({"skipped_blocks": [3]}, "not block indices"),
    ],
)
def test_bad_widths_are_refused_with_what_to_give(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SuperResolutionNet(**TINY, **kwargs)


def test_psnr_and_ssim_follow_the_sr_convention():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 32, 32)
    assert psnr(image, image) == math.inf and ssim(image, image) == pytest.approx(1.0)
    # Y of white is 235 and of black 16 (BT.601 studio range): a black-for-white error is 219 levels
    assert luma(torch.ones(1, 3, 1, 1)).item() == pytest.approx(235.0, abs=1e-3)
    assert psnr(torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)) == pytest.approx(10 * math.log10(255**2 / 219**2))
    noisy = (image + 0.05 * torch.randn_like(image)).clamp(0, 1)
    assert 0 < ssim(noisy, image) < 1 and psnr(noisy, image, border=2) < 40
    # the border is shaved: an error only in the outer 2 pixels is invisible at border=2
    framed = image.clone()
    framed[..., :2, :] = 0
    assert psnr(framed, image, border=2) == math.inf


def test_bicubic_degradation_and_baseline():
    photo = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 255, (37, 50, 3), dtype=np.uint8))
    cropped = crop_to_multiple(photo, 2, max_side=30)
    assert cropped.size == (30, 30)
    high = to_tensor(cropped)
    low = downscale(high, 2)
    assert low.shape == (1, 3, 15, 15) and bicubic_upscale(low, 2).shape == high.shape
    with pytest.raises(ValueError, match="not divisible by the scale 2"):
        downscale(torch.rand(1, 3, 5, 6), 2)


@pytest.fixture(scope="module")
def sr_shards(tmp_path_factory):
    return write_toy_shards(tmp_path_factory.mktemp("sr-shards"), count=4, per_shard=2)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    # smooth images an SR network can learn a little of in a few steps
    y, x = np.mgrid[0:40, 0:48]
    for index in range(2):
        array = np.stack([np.sin(x / (4 + index)), np.cos(y / 5), np.sin((x + y) / 7)], axis=-1)
        PIL.Image.fromarray(((array + 1) * 127.5).astype(np.uint8)).save(folder / f"p{index}.png")
    return folder


def sr_config(output, shards, photos, **train):
    return {
        "output": str(output),
        "seed": 0,
        "data": {"train": str(shards), "resolution": 16, "shuffle_buffer": 4, "num_workers": 0},
        "model": TINY,
        "train": {
            "batch_size": 2,
            "max_train_steps": 6,
            "checkpointing_steps": 2,
            "checkpoints_total_limit": 2,
            "learning_rate": 1e-3,
            "ema": {"use": True, "decay": 0.9},
            "log_every": 100,
            **train,
        },
        "validation": {"every": 3, "photos": str(photos), "max_side": 32, "num_samples": 2},
    }


def test_train_sr_saves_the_network_scores_it_and_resumes_exactly(sr_shards, photos, tmp_path):
    output = tmp_path / "run"
    report = train_sr(sr_config(output, sr_shards, photos))
    assert report["steps"] == 6 and sorted(p.name for p in (output / "checkpoints").iterdir()) == [
        "checkpoint-4",
        "checkpoint-6",
    ]
    assert {p.name for p in (output / "validation").iterdir()} == {"step-3.png", "step-6.png"}
    net = SuperResolutionNet.from_pretrained(output / "sr")
    scores = evaluate(net, sorted(photos.iterdir()), max_side=32)
    assert scores == pytest.approx(report["heldout"])
    assert {"psnr", "ssim", "bicubic_psnr", "bicubic_ssim", "psnr_over_bicubic_db"} <= set(scores)

    # interrupted after step 4, resumed: the same weights as the uninterrupted run
    resumed = tmp_path / "resumed"
    train_sr(sr_config(resumed, sr_shards, photos, max_train_steps=4))
    train_sr(sr_config(resumed, sr_shards, photos), resume="latest")
    again = SuperResolutionNet.from_pretrained(resumed / "sr")
    for (name, first), (_, second) in zip(net.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(first, second), name


def test_config_errors_name_the_key(sr_shards, photos, tmp_path):
    config = sr_config(tmp_path, sr_shards, photos)
    config["data"]["resolution"] = 15
    with pytest.raises(ConfigError, match="data.resolution=15"):
        check_config(config)
    config = sr_config(tmp_path, sr_shards, tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="validation.photos"):
        check_config(config)
    config = sr_config(tmp_path, sr_shards, photos)
    config["model"] = {**TINY, "scale": 1}
    with pytest.raises(ConfigError, match="model.scale=1"):
        check_config(config)
