"""The LSDM denoiser at toy size: shapes, gradients, the exact UNet copy, save/load, the schedule."""

import pytest
import torch

from hyperhuman.lsdm import LatentStructuralUNet
from hyperhuman.lsdm.pipeline import make_scheduler
from hyperhuman.lsdm.testing import IDENTITY_NORM, TINY_UNET, tiny_unet


@pytest.fixture
def unet():
    return tiny_unet(seed=0).eval()


def _inputs(batch=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, 4, 8, 8, generator=generator)
    states = torch.randn(batch, 5, TINY_UNET["cross_attention_dim"], generator=generator)
    return latent, states


def test_forward_gives_one_prediction_per_branch(unet):
    model = LatentStructuralUNet.from_unet(unet)
    latent, states = _inputs(batch=3)
    sample = torch.cat([latent, latent.flip(0), latent * 2], dim=1)
    out = model(sample, torch.tensor([1, 500, 999]), states, pose_latent=torch.randn(3, 4, 8, 8)).sample
    assert out.shape == (3, 12, 8, 8)
    assert model.config.branches == ["rgb", "depth", "normal"]


def test_built_from_a_unet_each_branch_returns_exactly_the_unet_output(unet):
    model = LatentStructuralUNet.from_unet(unet).eval()
    latent, states = _inputs()
    with torch.no_grad():
        expected = unet(latent, 321, states).sample
        out = model(torch.cat([latent] * 3, dim=1), 321, states, pose_latent=torch.zeros(2, 4, 8, 8)).sample
    for branch in out.chunk(3, dim=1):
        assert torch.equal(branch, expected)


def test_pose_channels_start_at_zero_so_a_fresh_model_ignores_the_pose(unet):
    model = LatentStructuralUNet.from_unet(unet).eval()
    latent, states = _inputs()
    sample = torch.cat([latent] * 3, dim=1)
    with torch.no_grad():
        a = model(sample, 10, states, pose_latent=torch.zeros(2, 4, 8, 8)).sample
        b = model(sample, 10, states, pose_latent=torch.randn(2, 4, 8, 8)).sample
    assert torch.equal(a, b)
    for branch in model.branch.values():
        assert torch.count_nonzero(branch.conv_in.weight[:, 4:]) == 0


def test_gradients_reach_every_branch_and_the_trunk(unet):
    model = LatentStructuralUNet.from_unet(unet, merge="weighted")
    for branch in model.branch.values():  # let the pose path carry gradient to every parameter
        torch.nn.init.normal_(branch.conv_in.weight, std=0.02)
    latent, states = _inputs()
    out = model(torch.cat([latent, -latent, latent + 1], dim=1), 100, states, pose_latent=torch.randn(2, 4, 8, 8))
    out.sample.square().mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert {name.split(".")[1] for name, _ in model.named_parameters() if name.startswith("branch.")} == {
        "rgb",
        "depth",
        "normal",
    }


def test_more_replicated_blocks_and_parameter_names_follow_the_unet():
    unet = tiny_unet(
        block_out_channels=(16, 16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    ).eval()
    model = LatentStructuralUNet.from_unet(unet, replicated_blocks=2).eval()
    names = set(model.state_dict())
    assert "branch.depth.down_blocks.1.attentions.0.proj_in.weight" in names
    assert "branch.depth.up_blocks.1.attentions.0.proj_in.weight" in names
    assert "trunk.down_blocks.2.resnets.0.conv1.weight" in names and "trunk.conv_in.weight" not in names
    latent, states = _inputs()
    with torch.no_grad():
        expected = unet(latent, 7, states).sample
        out = model(torch.cat([latent] * 3, dim=1), 7, states).sample
    assert torch.equal(out[:, 8:], expected)


def test_save_and_load_give_identical_outputs(unet, tmp_path):
    model = LatentStructuralUNet.from_unet(unet, latent_norm=dict(IDENTITY_NORM), merge="weighted").eval()
    model.save_pretrained(tmp_path / "lsdm")
    loaded = LatentStructuralUNet.from_pretrained(tmp_path / "lsdm").eval()
    assert torch.equal(LatentStructuralUNet.from_config(model.config).merge_weights, model.merge_weights)
    latent, states = _inputs()
    sample = torch.cat([latent, latent * 0.5, -latent], dim=1)
    pose = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(sample, 5, states, pose).sample, loaded(sample, 5, states, pose).sample)
    assert loaded.config.latent_norm == IDENTITY_NORM and loaded.config.merge == "weighted"


def test_schedule_has_zero_terminal_snr_v_prediction_and_trailing_steps():
    scheduler = make_scheduler()
    alphas = scheduler.alphas_cumprod
    assert alphas[-1] == 0  # SNR = ᾱ / (1 - ᾱ) = 0 at the last training step
    assert scheduler.config.prediction_type == "v_prediction"
    scheduler.set_timesteps(10)
    assert scheduler.timesteps[0] == 999  # trailing spacing starts at the terminal step


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"branches": ["rgb", "rgb"]}, "distinct"),
        ({"replicated_blocks": 2}, "replicated_blocks"),
        ({"merge": "max"}, "merge"),
        ({"pose_channels": 3}, "in_channels"),
    ],
)
def test_bad_model_configs_are_refused_with_the_key_to_fix(change, message):
    config = {"unet": {**TINY_UNET, "in_channels": 8}, **change}
    with pytest.raises(ValueError, match=message):
        LatentStructuralUNet(**config)


def test_wrong_channel_count_names_the_expected_layout(unet):
    model = LatentStructuralUNet.from_unet(unet)
    latent, states = _inputs()
    with pytest.raises(ValueError, match="rgb | depth | normal"):
        model(torch.cat([latent] * 2, dim=1), 1, states)
