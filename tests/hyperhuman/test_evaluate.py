"""hyperhuman eval at toy size: conditions from shards, generation resumed by key, same numbers on a rerun."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from hyperhuman.evaluate import check_eval_config, eval_conditions, run_eval
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
    assert not (tmp_path / "out").exists()


def test_with_inception_and_clip_weights_every_metric_is_computed(
    model, shards, inception_weights, clip_path, tmp_path
):
    # real architectures with random weights, given by path as users give theirs
    settings = {**SETTINGS, "inception": str(inception_weights), "clip": str(clip_path), "kid_subset_size": 3}
    report = run_eval(str(model), str(shards), str(tmp_path / "eval"), settings)
    assert report["skipped"] == {}
    for name in ("fid", "kid_x1000", "fid_clip", "clip_score"):
        assert np.isfinite(report["metrics"][name]), name
    assert report["metrics"]["fid"] > 0 and 0 <= report["metrics"]["clip_score"] <= 100


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
