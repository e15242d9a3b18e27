"""The outpainting step at toy size (a Stable Diffusion inpainting pipeline of the real
architecture with random weights, saved to disk): the canvas keeps the source pixels, the labels
are kept only inside the source's area, the box is in the metadata, and the job stores the canvas."""

import json

import numpy as np
import pytest

from annotators.registry import build_annotator
from hyperhuman.config import load_config
from hyperhuman.demo import packaged_photos
from pipelines.annotate import AnnotateStage
from pipelines.outpaint import canvas_geometry, keep_inside, work_size
from shards import ShardWriter, write_manifest
from shards.codecs import encode_image
from shards.reader import complete_shard_urls, read_shard
from shards.validate import validate

from .curation_models import register_curation, save_aesthetic_head, save_tiny_clip, save_tiny_inpainting

TOY = {"resolution": 64, "num_inference_steps": 2}  # the toy model's work size: a 64-pixel longer side


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    register_curation(monkeypatch)


@pytest.fixture(scope="module")
def inpainting(tmp_path_factory):
    return str(save_tiny_inpainting(tmp_path_factory.mktemp("outpaint") / "sd-inpainting"))


def outpainter_config(inpainting, **options):
    return {"name": "diffusers-outpaint", "weights": inpainting, "options": {**TOY, **options}}


def test_the_canvas_geometry():
    assert canvas_geometry(64, 48, 0.25) == (96, 72, [16, 12, 80, 60])
    assert canvas_geometry(30, 40, 0.1) == (36, 48, [3, 4, 33, 44])
    assert work_size(96, 72, 64, 8) == (64, 48)
    assert work_size(768, 1024, 512, 64) == (384, 512)  # SD: sides a multiple of 64


def test_labels_are_kept_only_inside_the_source_area():
    box = [10, 20, 50, 60]  # x0, y0, x1, y1
    inside = np.tile(np.float32([30, 40, 0.9]), (17, 1))  # annotators give float32 keypoints
    straddling = inside.copy()
    straddling[:8, :2] = [5.0, 70.0]  # left of and below the box
    painted = np.tile(np.float32([80, 5, 0.9]), (17, 1))  # a person the model put in the padding
    wholebody = np.tile(np.float32([30, 40, 0.8]), (133, 1))
    wholebody[100] = [55.0, 40.0, 0.8]
    pose = {
        "width": 70,
        "height": 80,
        "people": [
            {"bbox": [20, 30, 40, 50], "score": 0.9, "keypoints": inside, "wholebody": wholebody},
            {"bbox": [0, 25, 45, 75], "score": 0.8, "keypoints": straddling},
            {"bbox": [60, 0, 70, 10], "score": 0.7, "keypoints": painted},
        ],
    }
    mask = np.full((80, 70), 255, np.uint8)
    kept, kept_mask = keep_inside(pose, mask, box)
    assert len(kept["people"]) == 2 and (kept["width"], kept["height"]) == (70, 80)
    first, second = kept["people"]
    np.testing.assert_array_equal(first["keypoints"], inside)
    assert first["bbox"] == [20, 30, 40, 50] and first["score"] == 0.9
    assert first["wholebody"][100].tolist() == [50, 40, 0]  # outside: score 0, clamped to the box
    assert second["bbox"] == [10, 25, 45, 60]
    assert (second["keypoints"][:8, 2] == 0).all() and (second["keypoints"][:8, :2] == [10.0, 60.0]).all()
    np.testing.assert_array_equal(second["keypoints"][8:], inside[8:])
    assert kept_mask.dtype == np.uint8 and kept_mask.sum() == 255 * 40 * 40
    assert (kept_mask[20:60, 10:50] == 255).all()
    assert pose["people"][1]["keypoints"][0, 2] == pytest.approx(0.9)  # the input is not modified


def test_the_canvas_keeps_the_source_and_a_batch_equals_the_images_one_by_one(inpainting):
    outpainter = build_annotator({**outpainter_config(inpainting, margin=0.25), "batch_size": 2})
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(40, 32, 3), (40, 32, 3), (24, 48, 3)]]
    results = outpainter(images, captions=["a person", None, "two people"])
    for image, result in zip(images, results, strict=True):
        height, width = image.shape[:2]
        canvas_width, canvas_height, box = canvas_geometry(width, height, 0.25)
        assert result["box"] == box and result["image"].shape == (canvas_height, canvas_width, 3)
        assert result["image"].dtype == np.uint8
        np.testing.assert_array_equal(result["image"][box[1] : box[3], box[0] : box[2]], image)
        assert result["image"][: box[1]].std() > 0  # something was painted above the source
    assert [result["prompt"] for result in results] == ["a person", "", "two people"]
    for image, caption, result in zip(images, ["a person", None, "two people"], results, strict=True):
        alone = outpainter([image], captions=[caption])[0]
        assert np.abs(alone["image"].astype(int) - result["image"]).max() <= 1  # same noise per image
    assert outpainter.provenance() == {
        "annotator": "diffusers-outpaint", "version": "1", "weights": inpainting, "margin": 0.25,
        "resolution": 64, "num_inference_steps": 2, "guidance_scale": 7.5, "seed": 0,
    }  # fmt: skip
    fixed = build_annotator(outpainter_config(inpainting, prompt="a beach"))
    assert fixed(images[:1], captions=["ignored"])[0]["prompt"] == "a beach"


def test_a_model_that_is_not_an_inpainting_model_is_refused(tmp_path):
    path = save_tiny_inpainting(tmp_path / "sd-text-to-image", in_channels=4)
    with pytest.raises(ValueError, match="is not an inpainting model \\(its UNet takes 4 input channels"):
        build_annotator(outpainter_config(str(path)))


def test_the_stage_annotates_the_canvas_and_keeps_the_people_labels_inside(inpainting, tmp_path, monkeypatch):
    from annotators.caption import SourceCaption

    captioned = []
    caption = SourceCaption.__call__
    monkeypatch.setattr(
        SourceCaption,
        "__call__",
        lambda self, images, **inputs: captioned.extend(images) or caption(self, images, **inputs),
    )
    config = load_config("annotate/offline")["annotators"]
    config["outpaint"] = outpainter_config(inpainting)
    stage = AnnotateStage(config)
    photo = packaged_photos()["astronaut"]
    filtered = []
    [sample] = stage(
        ["a0"], [photo], ["an astronaut"], ["package:astronaut"], select=lambda *args: filtered.append(args)
    )
    x0, y0, x1, y1 = box = sample.meta["outpaint"]["box"]
    assert box == [128, 128, 640, 640] and sample.image.shape == (768, 768, 3)
    assert sample.meta["outpaint"]["prompt"] == "an astronaut" and sample.meta["outpaint"]["margin"] == 0.25
    np.testing.assert_array_equal(sample.image[y0:y1, x0:x1], photo)
    # people filter on the source's area; the caption of the source; labels of the canvas, inside the box
    assert filtered[0][2].shape == photo.shape[:2] and [image.shape for image in captioned] == [photo.shape]
    assert sample.meta["num_people"] == len(sample.pose["people"]) >= 1
    for person in sample.pose["people"]:
        seen = np.asarray(person["keypoints"])[np.asarray(person["keypoints"])[:, 2] > 0]
        assert ((seen[:, 0] >= x0) & (seen[:, 0] <= x1) & (seen[:, 1] >= y0) & (seen[:, 1] <= y1)).all()
    outside = np.ones(sample.mask.shape, bool)
    outside[y0:y1, x0:x1] = False
    assert sample.mask.shape == (768, 768) and not sample.mask[outside].any() and sample.mask[~outside].any()
    assert sample.depth.shape == (768, 768) and sample.normal.shape == (768, 768, 3)

    with ShardWriter(str(tmp_path), 0) as writer:
        writer.write(sample)
    write_manifest(str(tmp_path))
    assert validate(str(tmp_path)) == []
    stored = next(read_shard(complete_shard_urls(str(tmp_path))[0]))
    assert (stored["json"]["width"], stored["json"]["height"]) == (768, 768)
    assert stored["json"]["outpaint"]["box"] == box and stored["json"]["outpaint"]["annotator"] == "diffusers-outpaint"
    cropped = stored["jpg"][y0:y1, x0:x1].astype(float)  # a reader crops back to the source
    assert np.abs(cropped - photo).mean() < 3  # JPEG


def straddling_scorer(root, images: list[np.ndarray]) -> tuple[dict, int]:
    """An aesthetic scorer's config whose head scores ``images`` (two) 4.5 and 5.5, so the threshold
    5.0 rejects exactly one; and the index of the one it keeps."""
    clip = str(save_tiny_clip(root / "clip"))
    head = save_aesthetic_head(root / "head.pth")
    config = {"name": "laion-aesthetic", "weights": clip, "options": {"head": str(head)}}
    scores = build_annotator(config)(images)
    scale = 1 / abs(scores[0] - scores[1])  # the head is affine: scale and shift its scores
    save_aesthetic_head(head, scale=scale, shift=5.0 - scale * (scores[0] + scores[1]) / 2)
    return config, int(np.argmax(scores))


def test_the_job_actor_screens_outpaints_and_stores_the_canvas(inpainting, tmp_path):
    from pipelines import fetch as fetching
    from pipelines.filters import check_filters
    from pipelines.job import AnnotatePartition, _pack, _unpack, write_partition

    photos = packaged_photos()
    keys = ["astronaut", "grace_hopper"]
    decoded = [fetching.decode(encode_image(photos[key]))[0] for key in keys]
    assert all(item["image_bytes"] is not None for item in decoded)  # JPEG sources keep their bytes
    aesthetic, kept = straddling_scorer(tmp_path, [item["rgb"] for item in decoded])
    annotators = load_config("annotate/offline")["annotators"]
    annotators.update(aesthetic=aesthetic, outpaint=outpainter_config(inpainting))
    actor = AnnotatePartition(annotators, check_filters({"min_side": 64, "min_aesthetic": 5.0}), batch_size=2)
    items = [
        {"key": key, "source": f"package:{key}", "caption": key, "extra": "{}", "status": None, "decoded": item}
        for key, item in zip(keys, decoded, strict=True)
    ]
    row = actor(_pack(0, {"items": items, "timings": {}}))
    rejected, ok = (_unpack(row)["items"][index] for index in (1 - kept, kept))
    assert (rejected["status"], rejected["rule"]) == ("rejected", "min_aesthetic")
    assert rejected["reason"].startswith("aesthetic score 4.5") and rejected["reason"].endswith("below 5.0")
    sample = ok["sample"]
    assert isinstance(sample.image, np.ndarray)  # the canvas, not the source's JPEG bytes
    assert sample.meta["aesthetic"]["score"] == pytest.approx(5.5, abs=1e-3)
    assert sample.meta["source_sha256"] == decoded[kept]["sha256"]

    output = tmp_path / "out"
    result = write_partition(str(output), {}, row)
    assert result["rules"] == {"min_aesthetic": 1} and result["counts"] == {"rejected": 1, "ok": 1}
    assert set(result["annotators"]) >= {"aesthetic", "outpaint"}
    write_manifest(str(output))
    assert validate(str(output)) == []
    stored = next(read_shard(complete_shard_urls(str(output))[0]))
    height, width = photos[keys[kept]].shape[:2]
    assert (stored["json"]["width"], stored["json"]["height"]) == canvas_geometry(width, height, 0.25)[:2]
    json.dumps(stored["json"])


@pytest.mark.slow
def test_the_job_runs_both_steps_on_ray(inpainting, tmp_path, ray_session):
    from pipelines import fetch as fetching
    from pipelines.job import run_job

    photos = packaged_photos()
    keys = ["astronaut", "grace_hopper"]
    folder = tmp_path / "photos"
    folder.mkdir()
    for key in keys:
        (folder / f"{key}.jpg").write_bytes(encode_image(photos[key]))
    rgb = [fetching.decode((folder / f"{key}.jpg").read_bytes())[0]["rgb"] for key in keys]
    aesthetic, kept = straddling_scorer(tmp_path, rgb)
    config = load_config("annotate/offline")
    config["filters"].update(min_side=64, min_person_area=0.0, min_aesthetic=5.0)
    config["annotators"].update(aesthetic=aesthetic, outpaint=outpainter_config(inpainting))
    output = tmp_path / "out"
    report = run_job(str(folder), str(output), {**config, "partition_size": 2})
    assert report["counts"] == {"ok": 1, "rejected": 1, "failed": 0}
    assert report["rejections_per_rule_this_run"] == {"min_aesthetic": 1}
    assert report["annotators_this_run"]["outpaint"]["annotator"] == "diffusers-outpaint"
    assert validate(str(output)) == []
    stored = next(read_shard(complete_shard_urls(str(output))[0]))
    assert stored["json"]["source"].endswith(f"{keys[kept]}.jpg")
    x0, y0, x1, y1 = stored["json"]["outpaint"]["box"]
    assert np.abs(stored["jpg"][y0:y1, x0:x1].astype(float) - rgb[kept]).mean() < 3  # JPEG
