"""`hyperhuman distill vae-decoder` at toy size: the student's widths and its teacher's encoder, the
folder round trip, the measures the benchmark calls, data distillation with exact resume, the
saved VAE and pipeline, config errors."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from distill.vae_decoder import (
    AutoencoderKLSlimDecoder,
    check_config,
    decode_ms,
    decoder_psnr,
    distill_vae_decoder,
    make_student_vae,
    student_widths,
)
from hyperhuman.config import ConfigError
from hyperhuman.lsdm.pipeline import HyperHumanPipeline
from hyperhuman.lsdm.testing import tiny_vae
from hyperhuman.vae import load_vae


@pytest.fixture(autouse=True)
def one_thread():
    """These toy convolutions take microseconds: on a busy 2-core machine two intra-op threads spin on
    each other and made this file 20× slower (91 s against 5 s, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def latents(count=3, seed=0):
    return torch.randn((count, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


def config_for(output, shards, teacher_run=None, vae=None, **train):
    return {
        "output": str(output),
        "seed": 0,
        "vae": None if vae is None else str(vae),
        "teacher": None if teacher_run is None else str(teacher_run),
        "student": {"width": 0.5, "init": "slice"},
        "data": {
            "train": str(shards),
            "resolution": 16,
            "shuffle_buffer": 4,
            "num_workers": 0,
            "sampled_fraction": 0.5,
        },
        "sampling": {"num_samples": 2, "num_inference_steps": 1, "guidance_scale": 1.0},
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
        "validation": {"every": 3, "num_samples": 2},
    }


def test_widths_scale_channels_and_groups_and_bad_widths_are_named():
    assert student_widths([8, 16], 8, 1.0) == ([8, 16], 8)
    assert student_widths([8, 16], 8, 0.5) == ([4, 8], 4)  # a group keeps the teacher's channels
    assert student_widths([128, 256, 512, 512], 32, 0.25) == ([32, 64, 128, 128], 8)
    assert student_widths([128, 256, 512, 512], 32, 0.3) == ([40, 80, 150, 150], 10)  # rounded, each ÷ groups
    assert student_widths([8, 16], 8, 0.01) == ([1, 1], 1)  # at least one group of one channel
    for bad in (0, -0.5, 1.5, "half", True, None):
        with pytest.raises(ConfigError, match=rf"student.width={bad!r}: .* in \(0, 1\]"):
            student_widths([8, 16], 8, bad)
    student = make_student_vae(tiny_vae(0), 0.5)
    assert list(student.config.decoder_block_out_channels) == [4, 8] and student.config.decoder_norm_num_groups == 4
    assert student.decoder.conv_in.out_channels == 8 and student.decoder.conv_out.in_channels == 4
    with pytest.raises(ConfigError, match="student.init='magnitude': one of"):
        make_student_vae(tiny_vae(0), 0.5, init="magnitude")


def test_the_student_encodes_as_the_teacher_bit_for_bit_and_at_width_1_is_the_teacher():
    teacher = tiny_vae(0).eval()
    images = torch.rand((2, 3, 16, 16), generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = teacher.encode(images).latent_dist
        for init in ("slice", "random"):
            encoded = make_student_vae(teacher, 0.5, init).eval().encode(images).latent_dist
            assert torch.equal(encoded.mean, expected.mean) and torch.equal(encoded.std, expected.std)
    copy = make_student_vae(teacher, 1.0).eval()
    assert all(torch.equal(value, teacher.state_dict()[name]) for name, value in copy.state_dict().items())
    probe = {"rgb": latents(), "depth": latents(seed=1)}
    assert decoder_psnr(copy, teacher, probe) == {"rgb": 100.0, "depth": 100.0}  # identical: clamped at 100
    torch.manual_seed(0)
    half = make_student_vae(teacher, 0.5, "random").eval()
    assert 0 < decoder_psnr(half, teacher, latents())["all"] < 100


def test_the_student_folder_round_trips_and_plain_vae_folders_still_load(tmp_path):
    student = make_student_vae(tiny_vae(0), 0.5)
    student.save_pretrained(tmp_path / "run" / "vae")
    loaded = load_vae(tmp_path / "run")  # a run folder holding vae/, or the folder itself
    assert type(loaded) is AutoencoderKLSlimDecoder and loaded.config.decoder_block_out_channels == [4, 8]
    assert all(torch.equal(value, loaded.state_dict()[name]) for name, value in student.state_dict().items())
    tiny_vae(0).save_pretrained(tmp_path / "plain")
    assert type(load_vae(tmp_path / "plain")) is AutoencoderKL
    with pytest.raises(ConfigError, match="no VAE at"):
        load_vae(tmp_path / "nothing")


def test_decode_ms_times_the_decode_and_refuses_unknown_runtimes():
    vae = tiny_vae(0).eval()
    assert decode_ms(vae, latents(1), repeats=2) > 0
    with pytest.raises(ValueError, match="runtime 'tensorrt' is not one of"):
        decode_ms(vae, latents(1), runtime="tensorrt")


@pytest.mark.slow
def test_data_distillation_checkpoints_resumes_exactly_and_writes_vae_and_pipeline(
    teacher_run, distill_shards, tmp_path
):
    output = tmp_path / "run"
    report = distill_vae_decoder(config_for(output, distill_shards, teacher_run))
    assert report["steps"] == 6 and len(report["losses"]) == 6 and len(report["terms"]["mse"]) == 6
    assert report["sampled"] == {"pool": 6, "per_step": 8, "shard_per_step": 8}  # 2 samples × 3 branches
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert {p.name for p in (output / "validation").iterdir()} == {"step-3.png", "step-6.png"}
    assert list((output / "logs").rglob("events.out.tfevents.*"))
    written = json.loads((output / "vae_decoder_report.json").read_text())
    assert set(written["psnr_db"]) == {"rgb", "depth", "normal", "pose"}
    assert set(written["psnr_db_sampled"]) == {"rgb", "depth", "normal"}
    assert [entry["step"] for entry in written["heldout"]] == [3, 6] and written["heldout"][-1]["shards"]
    assert written["decode_ms"]["teacher"] > 0 and written["decode_ms"]["student"] > 0
    assert written["params"]["student_decoder"] < written["params"]["teacher_decoder"]
    assert written["decoder_block_out_channels"] == [4, 8] and written["psnr_on"].startswith("data.train")

    teacher = HyperHumanPipeline.from_pretrained(teacher_run / "pipeline")
    student = load_vae(output / "vae")
    assert all(torch.equal(v, teacher.vae.state_dict()[k]) for k, v in student.state_dict().items() if "encoder" in k)
    pipeline = HyperHumanPipeline.from_pretrained(output / "pipeline")  # the teacher's, with the student VAE
    assert type(pipeline.vae) is AutoencoderKLSlimDecoder
    unet = teacher.unet.state_dict()
    assert all(torch.equal(value, unet[name]) for name, value in pipeline.unet.state_dict().items())
    pose = {"width": 16, "height": 16, "people": []}
    result = pipeline("a person", pose=pose, height=16, width=16, num_inference_steps=1, output_type="np")
    assert result.rgb.shape == (1, 16, 16, 3) and result.normal.shape == (1, 16, 16, 3)
    # and in a fresh process, where nothing of distill/ has been imported (hyperhuman eval's case)
    fresh = subprocess.run(
        [sys.executable, "-c", "import sys; from hyperhuman.lsdm.pipeline import HyperHumanPipeline; "
         "print(type(HyperHumanPipeline.from_pretrained(sys.argv[1]).vae).__name__)", str(output / "pipeline")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert fresh.stdout.split()[-1] == "AutoencoderKLSlimDecoder"

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(output / "checkpoints" / "checkpoint-4", resumed / "checkpoints" / "checkpoint-4")
    shutil.copy(output / "sampled_latents.pt", resumed)  # the cache a resumed run finds in its folder
    again = distill_vae_decoder(config_for(resumed, distill_shards, teacher_run), resume="latest")
    assert again["losses"] == report["losses"][4:]
    checkpoint, replayed = (
        load_file(r / "checkpoints" / "checkpoint-6" / "model.safetensors") for r in (output, resumed)
    )
    assert all(torch.equal(value, replayed[name]) for name, value in checkpoint.items())
    original, replayed = (load_file(r / "vae" / "diffusion_pytorch_model.safetensors") for r in (output, resumed))
    assert all(torch.equal(value, replayed[name]) for name, value in original.items())  # the EMA weights


@pytest.mark.slow
def test_without_a_teacher_every_latent_comes_from_the_shards(distill_shards, tmp_path):
    tiny_vae(0).save_pretrained(tmp_path / "vae")
    config = config_for(tmp_path / "run", distill_shards, vae=tmp_path / "vae", max_train_steps=2)
    config["validation"] = {"every": 0, "num_samples": 1}
    report = distill_vae_decoder(config)
    assert report["sampled"]["pool"] == 0 and report["psnr_db_sampled"] is None
    assert len(report["losses"]) == 2 and set(report["psnr_db"]) == {"rgb", "depth", "normal", "pose"}
    assert (tmp_path / "run" / "vae" / "config.json").is_file() and not (tmp_path / "run" / "pipeline").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(teacher=None, vae=None), "set vae .* or teacher"),
        (lambda c: c.update(teacher="/nonexistent/run"), "not a run folder with pipeline/"),
        (lambda c: c.update(vae="/nonexistent/vae"), "holds no VAE"),
        (lambda c: c["student"].update(width=2), r"student.width=2: .* in \(0, 1\]"),
        (lambda c: c["student"].update(init="magnitude"), "student.init='magnitude': one of"),
        (lambda c: c["data"].update(sampled_fraction=1.0), r"data.sampled_fraction must be in \[0, 1\)"),
        (lambda c: c["data"].update(resolution=15), "data.resolution=15 is not a multiple of the VAE factor 2"),
        (lambda c: c.update(loss={"l1_wieght": 1.0}), "unknown config key 'loss.l1_wieght'"),
        (lambda c: c["sampling"].update(num_inference_steps=0), "sampling.num_inference_steps must be a positive"),
        (lambda c: c["data"].update(train=None), "data.train is not set"),
        (lambda c: c["validation"].update(decode_runtime="onnx"), "validation.decode_runtime must be one of"),
    ],
)
def test_bad_configs_fail_at_start_naming_the_key(change, message, teacher_run, distill_shards, tmp_path):
    config = config_for(tmp_path / "run", distill_shards, teacher_run)
    change(config)
    with pytest.raises(ConfigError, match=message):
        check_config(config)
    assert not (tmp_path / "run").exists()
