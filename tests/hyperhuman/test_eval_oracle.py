"""An oracle for ``hyperhuman eval``'s pose accuracy: a stand-in pipeline that "generates" each
sample's reference photo must score what the pose annotator itself scores on those photos.

Everything between the shards and the number is exercised: the conditioning pose mapped into the
centre crop at the eval resolution, generation at that resolution, the generated image resized
for the pose annotator and its detections mapped back. A frame off by any factor gives an AP near
0; the expected AP is computed here by hand (crop, resize, annotate, score), not by eval's code.
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from annotators.registry import build_annotator
from hyperhuman.eval.evaluate import DEFAULTS, eval_conditions, run_eval
from hyperhuman.eval.pose import pose_metrics
from hyperhuman.lsdm.pipeline import HyperHumanPipeline, render_pose_condition
from hyperhuman.lsdm.testing import dummy_components
from shards.sample import Sample
from shards.writer import ShardWriter

RESOLUTION = 256  # the eval resolution; the stand-in's own size is another one
STAND_IN_SIZE = 64
# COCO-17-native photos of ../shared/data/humans whose labelled people lie inside the centre
# square crop, so the crop keeps every labelled joint and no box is clipped
SHARED_PHOTOS = (
    "cocomini_train2017_000000030752.jpg",
    "cocomini_train2017_000000084533.jpg",
    "mmpose_coco_000000000785.jpg",
    "mmpose_ochuman_003799.jpg",
)


class ReferencePipeline:
    """Returns each prompt's reference image as the generated RGB, at the requested size (at its
    own ``STAND_IN_SIZE`` when none is requested, as a model trained at another size would)."""

    def __init__(self, references: dict[str, np.ndarray]):
        self.references = references

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompt, pose, height=None, width=None, **kwargs):
        width, height = width or STAND_IN_SIZE, height or STAND_IN_SIZE
        rgb = [Image.fromarray(self.references[text]).resize((width, height), Image.BICUBIC) for text in prompt]
        return SimpleNamespace(
            rgb=rgb,
            pose=[Image.fromarray(render_pose_condition(p, height, width)) for p in pose],
            depth=[Image.new("L", (width, height)) for _ in prompt],
            normal=[Image.new("RGB", (width, height), (128, 128, 255)) for _ in prompt],
        )


@pytest.fixture(scope="module")
def annotator():
    return build_annotator(DEFAULTS["pose_annotator"])


def packaged_photo_set(annotator) -> list[dict]:
    """The demo's photos with the pose annotator's own annotation as the conditioning pose (what
    the annotation job writes into shards)."""
    from hyperhuman.demo import packaged_photos

    photos = []
    for name, rgb in packaged_photos().items():
        pose = annotator([rgb])[0]
        photos.append({"key": name, "rgb": rgb, "pose": {**pose, "width": rgb.shape[1], "height": rgb.shape[0]}})
    return photos


def shared_photo_set(humans) -> list[dict]:
    """Real photos with their human COCO-17 labels as the conditioning pose (labelled = drawn)."""
    truth = json.loads((humans / "keypoints_coco.json").read_text())
    photos = []
    for image in (image for name in SHARED_PHOTOS for image in truth["images"] if image["file_name"] == name):
        people = []
        for annotation in (a for a in truth["annotations"] if a["image_id"] == image["id"]):
            keypoints = np.asarray(annotation["keypoints"], dtype=np.float64).reshape(17, 3)
            keypoints[:, 2] = keypoints[:, 2] > 0
            x, y, w, h = annotation["bbox"]
            people.append({"bbox": [x, y, x + w, y + h], "score": 1.0, "keypoints": keypoints.tolist()})
        rgb = np.asarray(Image.open(humans / "images" / image["file_name"]).convert("RGB"))
        pose = {"width": rgb.shape[1], "height": rgb.shape[0], "people": people}
        photos.append({"key": f"h{image['id']}", "rgb": rgb, "pose": pose})
    assert len(photos) == len(SHARED_PHOTOS), "the shared photo set changed: pick other photos"
    return photos


def write_shards(root, photos: list[dict]) -> None:
    with ShardWriter(str(root), 0) as writer:
        for photo in photos:
            writer.write(
                Sample(
                    key=photo["key"],
                    image=photo["rgb"],
                    caption=f"a photo of {photo['key']}",
                    source=f"test://{photo['key']}",
                    pose=photo["pose"],
                    annotations={"pose": {"annotator": "test-oracle", "version": "0", "weights": "none"}},
                )
            )


def annotator_accuracy_by_hand(photos: list[dict], annotator, root) -> dict:
    """The pose annotator on each photo's centre crop at RESOLUTION vs the conditioning pose mapped
    into that crop: plain arithmetic on the decoded shard JPEG, none of eval's code (PIL's
    antialiased bilinear resize is what eval's torch resize computes, up to rounding)."""
    from shards.reader import complete_shard_urls, read_shard

    decoded = {sample["__key__"]: sample["jpg"] for sample in read_shard(complete_shard_urls(str(root))[0])}
    truth, found = [], []
    for photo in photos:
        rgb = decoded[photo["key"]]
        height, width = rgb.shape[:2]
        side = min(width, height)
        x0, y0, scale = (width - side) // 2, (height - side) // 2, RESOLUTION / side
        crop = Image.fromarray(rgb[y0 : y0 + side, x0 : x0 + side]).resize((RESOLUTION, RESOLUTION), Image.BILINEAR)
        people = []
        for person in photo["pose"]["people"]:
            keypoints = np.asarray(person["keypoints"], dtype=np.float64).copy()
            keypoints[:, :2] = (keypoints[:, :2] - [x0, y0]) * scale
            corners = (np.asarray(person["bbox"], dtype=np.float64).reshape(2, 2) - [x0, y0]) * scale
            people.append({"bbox": np.clip(corners, 0, RESOLUTION).ravel().tolist(), "keypoints": keypoints.tolist()})
        truth.append({"width": RESOLUTION, "height": RESOLUTION, "people": people})
        found.append({"width": RESOLUTION, "height": RESOLUTION, **annotator([np.asarray(crop)])[0]})
    return pose_metrics(truth, found)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("oracle-model") / "pipeline"
    HyperHumanPipeline(**dummy_components()).save_pretrained(path)
    return path


@pytest.mark.parametrize("photo_set", ["packaged", pytest.param("shared", marks=pytest.mark.shared_data)])
def test_an_oracle_generator_scores_the_pose_annotators_own_accuracy(
    photo_set, annotator, model, tmp_path, monkeypatch, request
):
    if photo_set == "shared":
        photos = shared_photo_set(request.getfixturevalue("shared_humans"))
    else:
        photos = packaged_photo_set(annotator)
    write_shards(tmp_path / "shards", photos)
    settings = {"num": len(photos), "resolution": RESOLUTION, "pose_resolution": RESOLUTION, "batch_size": 2}
    conditions = eval_conditions(str(tmp_path / "shards"), len(photos), RESOLUTION)
    oracle = ReferencePipeline({condition["caption"]: condition["reference"] for condition in conditions})
    monkeypatch.setattr(HyperHumanPipeline, "from_pretrained", classmethod(lambda cls, path, **kwargs: oracle))

    report = run_eval(str(model), str(tmp_path / "shards"), str(tmp_path / "eval"), settings)
    expected = annotator_accuracy_by_hand(photos, annotator, tmp_path / "shards")
    assert expected["pose_ap"] > 0.5, expected  # the annotator finds these people: a real signal, not noise
    for name in ("pose_ap", "pose_ap50", "pose_ar", "pose_ap_clean"):
        assert report["metrics"][name] == pytest.approx(expected[name], abs=0.1), (name, report["metrics"], expected)
