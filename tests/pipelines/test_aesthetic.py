"""The LAION aesthetic scorer at toy size (random weights of the real architectures, saved to disk)
and its filter rule: the score is CLIP's normalised image embedding through the published head,
it lands in the sample's metadata, and ``filters.min_aesthetic`` rejects below it."""

import numpy as np
import pytest
import torch

from annotators.base import WeightsNotFoundError
from annotators.registry import build_annotator
from hyperhuman.config import ConfigError, load_config
from hyperhuman.demo import packaged_photos
from pipelines.annotate import AnnotateStage, Rejection
from pipelines.filters import aesthetic_rule, check_filters
from shards import ShardWriter, write_manifest
from shards.reader import complete_shard_urls, read_shard
from shards.validate import validate

from .curation_models import register_curation, save_aesthetic_head, save_tiny_clip

# sac+logos+ava1-l14-linearMSE.pth as published: every tensor and its shape.
PUBLISHED_HEAD = {
    "layers.0.weight": (1024, 768),
    "layers.0.bias": (1024,),
    "layers.2.weight": (128, 1024),
    "layers.2.bias": (128,),
    "layers.4.weight": (64, 128),
    "layers.4.bias": (64,),
    "layers.6.weight": (16, 64),
    "layers.6.bias": (16,),
    "layers.7.weight": (1, 16),
    "layers.7.bias": (1,),
}


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    register_curation(monkeypatch)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("aesthetic")
    return {
        "clip": str(save_tiny_clip(root / "clip-vision")),
        "clip_full": str(save_tiny_clip(root / "clip-full", full=True)),
        "head": str(save_aesthetic_head(root / "sac+logos+ava1-l14-linearMSE.pth")),
    }


def scorer(weights, clip="clip", **config):
    return build_annotator(
        {"name": "laion-aesthetic", "weights": weights[clip], "options": {"head": weights["head"]}, **config}
    )


def photos():
    astronaut = packaged_photos()["astronaut"]
    return [astronaut, astronaut[:, ::-1].copy(), astronaut[50:400, 100:420].copy()]


def test_the_head_is_the_published_one(weights):
    from torch import nn

    from annotators.aesthetic import aesthetic_mlp

    head = aesthetic_mlp()
    assert {name: tuple(value.shape) for name, value in head.state_dict().items()} == PUBLISHED_HEAD
    assert [type(layer) for layer in head.layers] == [nn.Linear, nn.Dropout] * 3 + [nn.Linear, nn.Linear]
    assert set(torch.load(weights["head"], weights_only=True)) == set(PUBLISHED_HEAD)


@pytest.mark.parametrize("clip", ["clip", "clip_full"])
def test_the_score_is_the_normalised_clip_embedding_through_the_head(weights, clip):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPVisionModelWithProjection

    from annotators.aesthetic import aesthetic_mlp

    annotator = scorer(weights, clip, batch_size=2)
    images = photos()
    scores = annotator(images)
    # The reference: upstream's recipe (encode_image, L2-normalise, head) on the transformers classes.
    model_class = CLIPModel if clip == "clip_full" else CLIPVisionModelWithProjection
    model = model_class.from_pretrained(weights[clip]).eval()
    pixels = CLIPImageProcessor.from_pretrained(weights[clip])(images=images, return_tensors="pt")["pixel_values"]
    head = aesthetic_mlp()
    head.load_state_dict(torch.load(weights["head"], weights_only=True))
    with torch.no_grad():
        if clip == "clip_full":
            embeddings = model.get_image_features(pixel_values=pixels)
            embeddings = embeddings if torch.is_tensor(embeddings) else embeddings.pooler_output
        else:
            embeddings = model(pixel_values=pixels).image_embeds
        expected = head.eval().layers(embeddings / embeddings.norm(dim=-1, keepdim=True))[:, 0]
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert [annotator([image])[0] for image in images] == pytest.approx(scores, abs=1e-6)  # batch = one by one
    assert annotator.provenance()["weights"] == f"{weights[clip]} + {weights['head']}"
    assert len(annotator.provenance()["head_sha256"]) == 64


def test_a_missing_head_names_the_option(weights):
    with pytest.raises(WeightsNotFoundError, match=r"options.head=None: set annotators.aesthetic.options.head"):
        build_annotator({"name": "laion-aesthetic", "weights": weights["clip"]})


def test_a_head_for_another_embedding_size_is_refused(weights, tmp_path):
    head = save_aesthetic_head(tmp_path / "vit-b-32-head.pth", embedding_dim=512)
    with pytest.raises(ValueError, match=r"is not an improved-aesthetic-predictor head for 768-d CLIP embeddings"):
        build_annotator({"name": "laion-aesthetic", "weights": weights["clip"], "options": {"head": str(head)}})


def test_the_rule_rejects_below_the_threshold_and_is_off_when_unset():
    assert aesthetic_rule(4.4, {"min_aesthetic": 4.5}) == ("min_aesthetic", "aesthetic score 4.400 below 4.5")
    assert aesthetic_rule(4.5, {"min_aesthetic": 4.5}) is None
    assert aesthetic_rule(1.0, check_filters({})) is None
    assert "min_aesthetic" not in check_filters({})  # off: absent from the job's settings and fingerprint
    with pytest.raises(ConfigError, match="unknown filters \\['min_aesthetics'\\]"):
        check_filters({"min_aesthetics": 4.5})


def test_the_stage_records_the_score_and_screens_before_the_people_stages(weights, tmp_path):
    images = photos()[:2]
    scores = scorer(weights)(images)
    assert scores[0] != scores[1]
    threshold = (scores[0] + scores[1]) / 2
    config = load_config("annotate/offline")["annotators"]
    config["aesthetic"] = {"name": "laion-aesthetic", "weights": weights["clip"], "options": {"head": weights["head"]}}
    stage = AnnotateStage(config)
    seen = []

    def screen(index, score):
        seen.append(index)
        rule = aesthetic_rule(score, {"min_aesthetic": threshold})
        return None if rule is None else Rejection(*rule)

    def select(index, pose, mask):
        assert scores[index] >= threshold, "a screened-out image reached the people filter"

    results = stage(["a0", "a1"], images, ["one", "two"], ["s0", "s1"], select=select, screen=screen)
    low, high = sorted(range(2), key=lambda index: scores[index])
    assert seen == [0, 1]
    assert isinstance(results[low], Rejection) and results[low].rule == "min_aesthetic"
    sample = results[high]
    assert sample.meta["aesthetic"]["score"] == pytest.approx(scores[high], abs=1e-6)
    assert sample.meta["aesthetic"]["annotator"] == "laion-aesthetic" and sample.meta["aesthetic"]["version"] == "1"
    with ShardWriter(str(tmp_path), 0) as writer:
        writer.write(sample)
    write_manifest(str(tmp_path))
    assert validate(str(tmp_path)) == []
    stored = next(read_shard(complete_shard_urls(str(tmp_path))[0]))
    assert stored["json"]["aesthetic"]["score"] == pytest.approx(scores[high], abs=1e-6)
    assert stored["json"]["aesthetic"]["weights"].endswith("sac+logos+ava1-l14-linearMSE.pth")


def test_a_curation_step_must_name_an_annotator_of_its_kind(weights):
    config = load_config("annotate/offline")["annotators"]
    config["aesthetic"] = {"name": "source-caption"}
    expected = "annotators.aesthetic.name 'source-caption' is an annotator of kind 'caption'; annotators.aesthetic"
    with pytest.raises(ConfigError, match=expected):
        AnnotateStage(config)
