"""`hyperhuman distill edit-pairs` at toy size: the offline stand-in teachers are deterministic and
named as stand-ins in every record; real diffusers editors (InstructPix2Pix, img2img) load from a
folder of random weights of their real architecture; pair shards are valid and reruns keep them."""

import hashlib

import fsspec
import numpy as np
import pytest

from distill.e2gan.pairs import check_config, edit_pairs, split_pair
from distill.e2gan.teachers import STAND_INS, DiffusionTeacher, StandInTeacher
from hyperhuman.config import ConfigError
from shards.reader import expand_urls, read_shard
from shards.validate import validate


def pairs_config(output, source, **changes):
    config = {
        "source": str(source),
        "output": str(output),
        "seed": 0,
        "resolution": 16,
        "max_images": None,
        "heldout_images": 1,
        "teacher": {"kind": "stand-in", "batch_size": 2},
        "concepts": {
            "sketch": {"prompt": "turn the photo into a pencil sketch", "stand_in": "pencil-sketch"},
            "cartoon": {"prompt": "turn the person into a cartoon", "stand_in": "cartoon"},
        },
        "writer": {"max_samples": 100, "jpeg_quality": 95},
    }
    config.update(changes)
    return config


def samples(root):
    return [sample for url in expand_urls(str(root)) for sample in read_shard(url)]


def tar_digests(root):
    """``{tar name: sha256}`` of a dataset's complete shards."""
    return {url.rsplit("/", 1)[-1]: hashlib.sha256(fsspec.open(url, "rb").open().read()).hexdigest()
            for url in expand_urls(str(root))}  # fmt: skip


@pytest.mark.parametrize("edit", sorted(STAND_INS))
def test_each_stand_in_is_deterministic_and_edits(edit):
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    teacher = StandInTeacher(edit)
    first, second = teacher.edit([image], "ignored", [0])[0], teacher.edit([image.copy()], "other", [1])[0]
    assert first.dtype == np.uint8 and first.shape == image.shape
    assert first.tobytes() == second.tobytes()  # same input, same bytes (prompt and seed play no part)
    assert not np.array_equal(first, image)
    record = teacher.record()
    assert record["stand_in"] is True and record["name"] == f"opencv-{edit} (offline stand-in)"
    assert record["settings"]["edit"] == edit and "opencv" in record["version"]


def test_pairs_are_valid_shards_recording_concept_and_teacher_and_a_rerun_keeps_them(distill_shards, tmp_path):
    output = tmp_path / "pairs"
    report = edit_pairs(pairs_config(output, distill_shards))
    assert report["photos"] == 6 and report["train_photos"] == 5 and report["heldout_photos"] == 1
    for split, count in (("train", 10), ("heldout", 2)):
        assert validate(str(output / split)) == []
        found = samples(output / split)
        assert len(found) == count
        for sample in found:
            edit = sample["json"]["edit"]
            assert sample["jpg"].shape == (16, 32, 3)  # input | edited
            assert sample["txt"] == edit["prompt"] and sample["__key__"].endswith(f"-{edit['concept']}")
            assert edit["teacher"]["stand_in"] is True and "(offline stand-in)" in edit["teacher"]["name"]
            assert edit["split"] == split and edit["layout"].startswith("side-by-side")
    heldout_inputs = {s["json"]["edit"]["input_key"] for s in samples(output / "heldout")}
    train_inputs = {s["json"]["edit"]["input_key"] for s in samples(output / "train")}
    assert len(heldout_inputs) == 1 and not heldout_inputs & train_inputs  # the same photo held out per concept

    sketch = next(s for s in samples(output / "train") if s["json"]["edit"]["concept"] == "sketch")
    image, edited = split_pair(sketch["jpg"])
    gray = edited.astype(int)
    assert np.abs(gray[..., 0] - gray[..., 1]).max() <= 3  # a grey sketch, up to JPEG's noise (4:4:4: no bleed)
    assert not np.array_equal(image, edited)

    digests = tar_digests(output / "train")
    again = edit_pairs(pairs_config(output, distill_shards))
    assert sorted(again["kept"]) == ["heldout/cartoon", "heldout/sketch", "train/cartoon", "train/sketch"]
    assert tar_digests(output / "train") == digests
    fewer = pairs_config(output, distill_shards)
    del fewer["concepts"]["cartoon"]
    assert edit_pairs(fewer)["dropped"] == ["train/partition-1", "heldout/partition-1"]
    assert validate(str(output / "train")) == [] and len(samples(output / "train")) == 5  # sketch only
    elsewhere = edit_pairs(pairs_config(tmp_path / "elsewhere", distill_shards))
    assert not elsewhere["kept"]
    assert tar_digests(tmp_path / "elsewhere" / "train") == digests  # same names, same bytes


def tiny_editor(kind, folder):
    """A diffusers editor of the real architecture at toy size, random weights (seeded), saved."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInstructPix2PixPipeline

    from hyperhuman.lsdm.pipeline import make_scheduler
    from hyperhuman.lsdm.testing import tiny_text_encoder, tiny_unet, tiny_vae

    tokenizer, text_encoder = tiny_text_encoder(0)
    tokenizer.model_max_length = 16  # the prompts' token count in SD's encode_prompt
    # InstructPix2Pix's UNet reads the noisy latent and the input image's latent: 8 channels
    unet = tiny_unet(0, in_channels=8 if kind == "instruct-pix2pix" else 4)
    cls = StableDiffusionInstructPix2PixPipeline if kind == "instruct-pix2pix" else StableDiffusionImg2ImgPipeline
    pipeline = cls(vae=tiny_vae(0), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                   scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
                   requires_safety_checker=False)  # fmt: skip
    pipeline.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["instruct-pix2pix", "img2img"])
def test_a_real_diffusers_editor_loads_from_a_folder_and_edits_reproducibly(kind, distill_shards, tmp_path):
    folder = tiny_editor(kind, tmp_path / kind)
    settings = {"num_inference_steps": 2, "guidance_scale": 2.0, "image_guidance_scale": 1.5, "strength": 0.8}
    teacher = DiffusionTeacher(kind, str(folder), settings, device="cpu")
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    first = teacher.edit([image, image], "make it blue", [1, 2])
    assert teacher.edit([image], "make it blue", [1])[0].tobytes() == first[0].tobytes()
    assert first[0].shape == image.shape and not np.array_equal(first[0], first[1])  # seeds differ
    record = teacher.record()
    assert record["name"] == f"diffusers-{kind}" and record["stand_in"] is False
    assert (
        set(record["settings"]) == {*teacher.setting_names(), "dtype"}
        and record["settings"]["num_inference_steps"] == 2
    )

    config = pairs_config(tmp_path / "pairs", distill_shards, max_images=3, teacher={"kind": kind, "path": str(folder),
                          **settings, "batch_size": 2})  # fmt: skip
    config["concepts"] = {"blue": {"prompt": "make it blue"}}
    edit_pairs(config)
    assert validate(str(tmp_path / "pairs" / "train")) == []
    edits = [s["json"]["edit"] for s in samples(tmp_path / "pairs" / "train")]
    assert len(edits) == 2 and all(e["teacher"]["name"] == f"diffusers-{kind}" for e in edits)
    assert all(isinstance(e["seed"], int) for e in edits) and edits[0]["seed"] != edits[1]["seed"]


def test_a_missing_editor_folder_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"teacher.path=.*stand-in"):
        DiffusionTeacher("img2img", str(tmp_path / "none"), {})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(resolution=20), "resolution must be a positive multiple of 8"),
        (lambda c: c["concepts"]["sketch"].update(stand_in="oil"), r"concepts.sketch.stand_in='oil'"),
        (lambda c: c["concepts"]["sketch"].pop("prompt"), r"concepts.sketch.prompt must be a non-empty string"),
        (lambda c: c["concepts"]["sketch"].update(promt="x"), "unknown config key 'concepts.sketch.promt'"),
        (lambda c: c["teacher"].update(kind="controlnet"), "teacher.kind='controlnet'"),
        (lambda c: c["teacher"].update(kind="img2img"), "teacher.kind=img2img needs teacher.path"),
        (lambda c: c.update(heldout_images=-1), "heldout_images must be an integer ≥ 0"),
        (lambda c: c["teacher"].update(dtype="fp16"), "teacher.dtype='fp16': one of"),
        (lambda c: c.update(source="/nonexistent/shards"), "source='/nonexistent/shards': no complete shards"),
        (lambda c: c.update(resoluton=16), "unknown config key 'resoluton'"),
    ],
)
def test_bad_configs_fail_at_start_naming_the_key(change, message, distill_shards, tmp_path):
    config = pairs_config(tmp_path / "pairs", distill_shards)
    change(config)
    with pytest.raises(ConfigError, match=message):
        check_config(config)
    assert not (tmp_path / "pairs").exists()


def test_more_held_out_photos_than_photos_is_refused(distill_shards, tmp_path):
    with pytest.raises(ConfigError, match="heldout_images=6"):
        edit_pairs(pairs_config(tmp_path / "pairs", distill_shards, heldout_images=6))
