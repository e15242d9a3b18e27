"""hyperhuman eval at toy size: conditions from shards, generation at the eval resolution, resumed
by key only under the same fingerprint, same numbers on a rerun, feature metrics batch by batch."""

import json
import re
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

from hyperhuman.eval import scores
from hyperhuman.eval.evaluate import check_eval_config, eval_conditions, run_eval
from hyperhuman.lsdm.pipeline import HyperHumanPipeline
from hyperhuman.lsdm.testing import dummy_components
from shards.testing import make_sample
from shards.writer import ShardWriter

SETTINGS = {"num": 3, "num_inference_steps": 2, "batch_size": 2, "pose_resolution": 64}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval-model") / "run" / "pipeline"
    HyperHumanPipeline(**dummy_components()).save_pretrained(path)
    return path.parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-shards")
    with ShardWriter(str(root), 0) as writer:
        for index in range(4):
            writer.write(make_sample(f"s{index}", height=48, width=64, seed=index))
    return root


def test_conditions_are_centre_crops_with_the_pose_mapped_into_them(shards):
    conditions = eval_conditions(str(shards), 2, 16)
    assert [condition["key"] for condition in conditions] == ["s0", "s1"]
    original = make_sample("s0", height=48, width=64, seed=0)
    person = original.pose["people"][0]
    mapped = conditions[0]["pose"]["people"][0]
    # the 48×64 image's centred square crop starts at x = 8 and is 48 wide: 16 / 48 = 1 / 3
    expected = np.asarray(person["keypoints"], dtype=np.float64)
    inside = (expected[:, 0] >= 8) & (expected[:, 0] <= 56)
    np.testing.assert_allclose(np.asarray(mapped["keypoints"])[inside, 0], (expected[inside, 0] - 8) / 3, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(mapped["keypoints"])[inside, 1], expected[inside, 1] / 3, rtol=1e-5)
    assert all(score == 0 for score in np.asarray(mapped["keypoints"])[~inside, 2])
    assert conditions[0]["reference"].shape == (16, 16, 3) and conditions[0]["reference"].dtype == np.uint8
    assert conditions[0]["caption"] == original.caption


def test_eval_writes_samples_metrics_and_gallery_and_a_rerun_resumes_identically(model, shards, tmp_path):
    output = tmp_path / "eval"
    first = run_eval(str(model), str(shards), str(output), dict(SETTINGS))
    assert first["info"]["generated_now"] == 3 and first["info"]["samples"] == 3
    records = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    assert [record["key"] for record in records] == ["s0", "s1", "s2"]
    assert [record["seed"] for record in records] == [0, 1, 2]
    for record in records:
        for path in record["images"].values():
            assert (output / path).is_file(), path
    metrics = json.loads((output / "metrics.json").read_text())
    for name in ("pose_ap", "pose_ar", "pose_ap_clean", "pose_ar_clean"):
        assert 0 <= metrics["metrics"][name] <= 1, name
    assert metrics["metrics"]["fid"] is None and "--set inception=PATH" in metrics["skipped"]["fid"]
    assert metrics["metrics"]["clip_score"] is None and "--set clip=PATH" in metrics["skipped"]["clip_score"]
    assert (output / "gallery" / "index.html").is_file()

    # a rerun (another batch size) generates nothing and scores the same
    again = run_eval(str(model), str(shards), str(output), {**SETTINGS, "batch_size": 3})
    assert again["info"]["generated_now"] == 0 and again["metrics"] == first["metrics"]
    # a sample lost mid-way is generated again from its own seed (eval seed + index): the same image,
    # up to float rounding, since it is now computed in a batch of one instead of two
    rgb = output / "samples" / "s1" / "rgb.png"
    before = np.asarray(PIL.Image.open(rgb), dtype=np.int16)
    (output / "samples" / "s1" / "reference.png").unlink()
    third = run_eval(str(model), str(shards), str(output), {**SETTINGS, "batch_size": 1})
    assert third["info"]["generated_now"] == 1
    assert np.abs(np.asarray(PIL.Image.open(rgb), dtype=np.int16) - before).max() <= 1


def test_bad_inputs_name_the_problem(model, shards, tmp_path):
    with pytest.raises(ValueError, match=r"no pipeline at .*hyperhuman train-lsdm"):
        run_eval(str(tmp_path / "nothing"), str(shards), str(tmp_path / "out"), dict(SETTINGS))
    with pytest.raises(ValueError, match=r"--shards .*hyperhuman annotate"):
        run_eval(str(model), str(tmp_path), str(tmp_path / "out"), dict(SETTINGS))
    with pytest.raises(ValueError, match=r"unknown eval keys \['steps'\]"):
        check_eval_config({"steps": 3})
    with pytest.raises(ValueError, match=r"eval.inception='/no/such.pth' does not exist"):
        check_eval_config({"inception": "/no/such.pth"})
    with pytest.raises(ValueError, match="eval.num must be a positive integer"):
        check_eval_config({"num": 0})
    with pytest.raises(ValueError, match="eval.resolution must be a positive integer, got '256'"):
        check_eval_config({"resolution": "256"})
    assert not (tmp_path / "out").exists()


def test_the_lsdm_generates_at_the_eval_resolution(model, shards, tmp_path):
    # the toy LSDM's own resolution is 16: at eval resolution 32 every image shares the condition's frame
    report = run_eval(str(model), str(shards), str(tmp_path / "eval"), {**SETTINGS, "resolution": 32})
    assert report["info"]["resolution"] == 32
    record = json.loads((tmp_path / "eval" / "samples.jsonl").read_text().splitlines()[0])
    for name in ("pose", "rgb", "depth", "normal", "reference"):
        assert PIL.Image.open(tmp_path / "eval" / record["images"][name]).size == (32, 32), name


def test_a_changed_fingerprint_is_refused_and_overwrite_regenerates(model, shards, tmp_path):
    output = tmp_path / "eval"
    first = run_eval(str(model), str(shards), str(output), dict(SETTINGS))
    rgb = output / "samples" / "s0" / "rgb.png"
    before = rgb.read_bytes()
    for change, named in (
        ({"num_inference_steps": 3}, "num_inference_steps: 2 → 3"),
        ({"seed": 1}, "seed: 0 → 1"),
        ({"guidance_scale": 1.5}, "guidance_scale: 3.0 → 1.5"),
        ({"resolution": 32}, "resolution: 16 → 32"),
    ):
        with pytest.raises(ValueError, match=rf"{re.escape(named)}.*--overwrite"):
            run_eval(str(model), str(shards), str(output), {**SETTINGS, **change})
    # other weights of the same architecture, and another scheduler config
    other = tmp_path / "other" / "pipeline"
    pipe = HyperHumanPipeline.from_pretrained(model / "pipeline")
    with torch.no_grad():
        next(pipe.unet.parameters()).add_(0.01)
    pipe.save_pretrained(other)
    with pytest.raises(ValueError, match=r"model\.sha256: [0-9a-f]{12}… → [0-9a-f]{12}….*--overwrite"):
        run_eval(str(other.parent), str(shards), str(output), dict(SETTINGS))
    respaced = tmp_path / "respaced"
    shutil.copytree(model, respaced)
    config_path = respaced / "pipeline" / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "timestep_spacing": "leading"}))
    with pytest.raises(ValueError, match=r"model\.scheduler\.timestep_spacing: \"trailing\" → \"leading\""):
        run_eval(str(respaced), str(shards), str(output), dict(SETTINGS))
    assert rgb.read_bytes() == before and json.loads((output / "metrics.json").read_text())["info"] == first["info"]

    # a moved copy of the same model, or another batch size, is the same fingerprint: resumed
    moved = tmp_path / "moved-run"
    shutil.copytree(model, moved)
    assert run_eval(str(moved), str(shards), str(output), {**SETTINGS, "batch_size": 3})["info"]["generated_now"] == 0

    again = run_eval(str(model), str(shards), str(output), {**SETTINGS, "num_inference_steps": 3}, overwrite=True)
    assert again["info"]["generated_now"] == 3 and rgb.read_bytes() != before
    assert again["info"]["fingerprint"] != first["info"]["fingerprint"]
    # the folder is now the new settings': a plain rerun of them resumes
    rerun = run_eval(str(model), str(shards), str(output), {**SETTINGS, "num_inference_steps": 3})
    assert rerun["info"]["generated_now"] == 0


def test_generations_without_a_fingerprint_are_refused(model, shards, tmp_path):
    output = tmp_path / "eval"
    run_eval(str(model), str(shards), str(output), dict(SETTINGS))
    (output / "fingerprint.json").unlink()  # as an eval folder written before fingerprints
    with pytest.raises(ValueError, match=r"no fingerprint\.json.*--overwrite"):
        run_eval(str(model), str(shards), str(output), dict(SETTINGS))
    assert run_eval(str(model), str(shards), str(output), dict(SETTINGS), overwrite=True)["info"]["generated_now"] == 3


def test_the_eval_command_passes_overwrite(monkeypatch, capsys):
    from hyperhuman import cli
    from hyperhuman.eval import evaluate

    calls = []
    report = {"metrics": {"fid": 1.5}, "skipped": {}, "warnings": {"fid": "few samples"}, "info": {"samples": 2}}

    def fake_run_eval(*args, **kwargs):
        calls.append(kwargs)
        return {**report, "gallery": "g/index.html"}

    monkeypatch.setattr(evaluate, "run_eval", fake_run_eval)
    assert cli.main(["eval", "--model", "m", "--shards", "s", "--overwrite"]) == 0
    assert cli.main(["eval", "--model", "m", "--shards", "s"]) == 0
    assert [call["overwrite"] for call in calls] == [True, False]
    assert "[eval] warning (fid): few samples" in capsys.readouterr().out


def test_with_inception_and_clip_weights_every_metric_is_computed_batch_by_batch(
    model, shards, inception_weights, clip_path, tmp_path, monkeypatch
):
    loaded, load_images = [], scores.load_images

    def counting_load_images(conditions, *args):
        loaded.append(len(conditions))
        return load_images(conditions, *args)

    monkeypatch.setattr(scores, "load_images", counting_load_images)
    # real architectures with random weights, given by path as users give theirs
    settings = {**SETTINGS, "inception": str(inception_weights), "clip": str(clip_path), "kid_subset_size": 3}
    with pytest.warns(UserWarning, match=r"FID from 3 samples of 2048-d features"):
        report = run_eval(str(model), str(shards), str(tmp_path / "eval"), {**settings, "feature_batch_size": 2})
    assert loaded == [2, 2, 1, 1]  # (reference, generated) per batch: never every image at once
    assert report["skipped"] == {}
    for name in ("fid", "kid_x1000", "fid_clip", "clip_score"):
        assert np.isfinite(report["metrics"][name]), name
    assert report["metrics"]["fid"] > 0 and 0 <= report["metrics"]["clip_score"] <= 100
    # 3 samples: far below 2048 Inception and 8 toy-CLIP dimensions
    assert set(report["warnings"]) == {"fid", "fid_clip"} and "--num" in report["warnings"]["fid"]
    assert "FID from 3 samples" in (tmp_path / "eval" / "gallery" / "index.html").read_text()
    # the batch size changes no number: all at once gives the same, up to float rounding
    monkeypatch.setattr(scores, "load_images", load_images)
    with pytest.warns(UserWarning):
        at_once = run_eval(str(model), str(shards), str(tmp_path / "eval"), {**settings, "feature_batch_size": 8})
    for name in ("fid", "kid_x1000", "fid_clip", "clip_score"):
        assert at_once["metrics"][name] == pytest.approx(report["metrics"][name], rel=1e-5), name


def test_with_a_refiner_the_refined_images_are_written_and_scored(model, shards, tmp_path):
    from diffusers import UNet2DConditionModel

    from hyperhuman.lsdm.pipeline import make_scheduler
    from hyperhuman.lsdm.testing import tiny_text_encoder, tiny_vae
    from hyperhuman.sgr.model import StructureGuidedRefiner
    from hyperhuman.sgr.pipeline import StructureGuidedRefinerPipeline
    from hyperhuman.sgr.testing import TINY_SD_UNET, perturb

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_SD_UNET)
    refiner = StructureGuidedRefiner.from_unet(unet, embedder_channels=(8, 8, 16, 16), embedder_strides=(1, 1, 2, 1))
    perturb(refiner, zero_init_only=True)
    tokenizer, text_encoder = tiny_text_encoder()
    StructureGuidedRefinerPipeline(
        vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, refiner=refiner,
        scheduler=make_scheduler(),
    ).save_pretrained(tmp_path / "sgr" / "pipeline")  # fmt: skip

    output = tmp_path / "eval"
    report = run_eval(str(model), str(shards), str(output), {**SETTINGS, "refiner": str(tmp_path / "sgr")})
    assert report["info"]["scored_image"] == "refined" and report["info"]["resolution"] == 32
    record = json.loads((output / "samples.jsonl").read_text().splitlines()[0])
    assert PIL.Image.open(output / record["images"]["refined"]).size == (32, 32)  # the refiner base's own size
    assert PIL.Image.open(output / record["images"]["rgb"]).size == (16, 16)  # stage 1 at the LSDM's
    assert PIL.Image.open(output / record["images"]["reference"]).size == (32, 32)
    assert "refined" in (output / "gallery" / "index.html").read_text()
