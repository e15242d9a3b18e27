"""The paper's metrics against references: torchmetrics (FID, KID, CLIP score), pycocotools (pose AP/AR)."""

import contextlib
import io

import numpy as np
import pytest
import torch

from hyperhuman import metrics
from shards.testing import make_sample

COCO_STATS = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


class Projection(torch.nn.Module):
    """Deterministic features for reference checks: a fixed random projection of 4×4-pooled uint8 images."""

    def __init__(self, dim: int = 12, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(3 * 4 * 4, dim, generator=generator, dtype=torch.float64))
        self.num_features = dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.double() / 255, 4).flatten(1)
        return torch.tanh(pooled @ self.weight)


def image_sets(count: int = 40, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    real = torch.randint(0, 256, (count, 3, 24, 24), generator=generator, dtype=torch.uint8)
    brightness = torch.randint(0, 128, (count, 1, 1, 1), generator=generator)  # per-image: another covariance
    fake = (torch.randint(0, 128, (count, 3, 24, 24), generator=generator) + brightness).to(torch.uint8)
    return real, fake


# ------------------------------------------------------------------------------------------- FID / KID


def test_fid_matches_torchmetrics_on_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    module, (real, fake) = Projection(), image_sets()
    reference = FrechetInceptionDistance(feature=module)
    reference.update(real, real=True)
    reference.update(fake, real=False)
    expected = float(reference.compute())
    ours = metrics.fid(module, real, fake, batch_size=16)
    assert expected > 0.05
    assert ours == pytest.approx(expected, rel=1e-6)
    assert metrics.fid_from_features(module(real), module(fake)) == pytest.approx(ours, rel=1e-12)


def test_fid_closed_forms():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    assert abs(metrics.fid_from_features(features, features)) < 1e-8
    # same covariance, shifted mean: FID = ||Δμ||²
    shift = rng.normal(size=6)
    assert metrics.fid_from_features(features, features + shift) == pytest.approx(shift @ shift, rel=1e-9)
    # isotropic Gaussians: d (σ1 - σ2)² + ||Δμ||²
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = 5 * (1.5 - 0.5) ** 2 + (mu1 - mu2) @ (mu1 - mu2)
    assert metrics.frechet_distance(mu1, 1.5**2 * np.eye(5), mu2, 0.5**2 * np.eye(5)) == pytest.approx(expected)
    # symmetric in its arguments, also for rank-deficient covariances
    few = rng.normal(size=(4, 6))
    assert metrics.fid_from_features(few, features) == pytest.approx(metrics.fid_from_features(features, few))


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all extracted features")
def test_kid_matches_torchmetrics_with_the_same_subsets():
    from torchmetrics.image.kid import KernelInceptionDistance

    module, (real, fake) = Projection(), image_sets()
    for subsets, subset_size, seed in ((25, 10, 3), (4, 40, 0)):
        reference = KernelInceptionDistance(feature=module, subsets=subsets, subset_size=subset_size)
        reference.update(real, real=True)
        reference.update(fake, real=False)
        torch.manual_seed(seed)  # torchmetrics draws its subsets from the global generator
        expected_mean, expected_std = (float(value) for value in reference.compute())
        mean, std = metrics.kid(module, real, fake, subsets=subsets, subset_size=subset_size, seed=seed)
        assert mean == pytest.approx(expected_mean, rel=1e-9) and std == pytest.approx(expected_std, abs=1e-12)
    assert std == pytest.approx(0, abs=1e-12)  # subset_size == N: every subset is the whole set
    # subset_size is clipped to the number of samples
    features_real, features_fake = module(real), module(fake)
    clipped = metrics.kid_from_features(features_real, features_fake, subsets=2, subset_size=1000)
    assert clipped == pytest.approx(metrics.kid_from_features(features_real, features_fake, subsets=2, subset_size=40))
    assert metrics.kid_from_features(features_real, features_fake, seed=5) == metrics.kid_from_features(
        features_real, features_fake, seed=5
    )


def test_feature_statistics_errors_name_the_problem():
    with pytest.raises(ValueError, match="at least 2 samples.*got 1"):
        metrics.fid_from_features(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="real features have 4 dims, generated 3"):
        metrics.kid_from_features(np.zeros((5, 4)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="subsets must be a positive integer, got 0"):
        metrics.kid_from_features(np.ones((5, 4)), np.ones((5, 4)), subsets=0)
    with pytest.raises(ValueError, match=r"must be uint8 \(N, 3, H, W\).*torch.float32"):
        metrics.fid(Projection(), torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))


# ------------------------------------------------------------------------------------------- Inception


def test_inception_features_are_torchmetrics_fid_features(inception_weights):
    from torchmetrics.image.fid import FrechetInceptionDistance

    images = image_sets(3)[0]
    features = metrics.InceptionFeatures(inception_weights, batch_size=2, device="cpu")(images)
    assert features.shape == (3, 2048) and features.dtype == torch.float32
    reference = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(inception_weights))
    with torch.no_grad():
        expected = reference.inception(images)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)


def test_missing_or_bad_weights_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"nothing\.pth.*not found.*weights-inception-2015-12-05-6726825d\.pth"):
        metrics.InceptionFeatures(tmp_path / "nothing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match=r"junk\.pth.*not a plain PyTorch state dict"):
        metrics.InceptionFeatures(tmp_path / "junk.pth")
    with pytest.raises(ValueError, match=r"no CLIP model at .*no-clip.*clip-vit-large-patch14"):
        metrics.ClipFeatures(tmp_path / "no-clip")


# ------------------------------------------------------------------------------------------- CLIP


PROMPTS = ["a photo of a person", "two people dancing", "a man to the left", "the runner", "an old photo", "sitting"]


def test_clip_score_matches_torchmetrics(clip_path):
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    class TensorFeatures(CLIPModel):
        """torchmetrics 1.9 expects tensors from get_*_features; transformers 5 returns ModelOutputs."""

        def get_image_features(self, *args, **kwargs):
            return super().get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return super().get_text_features(*args, **kwargs).pooler_output

    def load():
        return TensorFeatures.from_pretrained(clip_path).eval(), CLIPProcessor.from_pretrained(clip_path)

    clip = metrics.ClipFeatures(clip_path, batch_size=4, device="cpu")
    images = torch.randint(0, 256, (len(PROMPTS), 3, 40, 48), generator=torch.Generator().manual_seed(1)).byte()
    similarities = metrics.clip_similarities(clip, images, PROMPTS)
    # torchmetrics' per-pair 100 · cos, before any clamp
    with torch.no_grad():
        raw, count = _clip_score_update(list(images), PROMPTS, *load())
    assert count == len(PROMPTS)
    np.testing.assert_allclose(similarities, raw.double().numpy(), rtol=1e-4, atol=1e-4)
    # CLIPScore clamps the mean of what it has seen: one pair per batch gives the per-pair score
    reference = CLIPScore(model_name_or_path=load)
    with torch.no_grad():
        per_pair = [float(reference(images[i : i + 1], PROMPTS[i])) for i in range(len(PROMPTS))]
    np.testing.assert_allclose(np.maximum(similarities, 0), per_pair, rtol=1e-4, atol=1e-4)
    assert metrics.clip_score(clip, images, PROMPTS) == pytest.approx(np.mean(per_pair), rel=1e-4, abs=1e-4)


def test_clip_score_clamps_each_pair():
    class Stub:
        """Unit embeddings at chosen angles: cosines +0.5 and -0.5."""

        def image_embeddings(self, images):
            return torch.tensor([[1.0, 0.0], [1.0, 0.0]])

        def text_embeddings(self, prompts):
            return torch.tensor([[0.5, 0.75**0.5], [-0.5, 0.75**0.5]])

    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    np.testing.assert_allclose(metrics.clip_similarities(Stub(), images, ["a", "b"]), [50.0, -50.0])
    assert metrics.clip_score(Stub(), images, ["a", "b"]) == pytest.approx(25.0)  # torchmetrics' clamped mean: 0


def test_fid_clip_is_fid_on_clip_image_embeddings(clip_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    clip = metrics.ClipFeatures(clip_path, device="cpu")
    real, fake = image_sets(12)
    embeddings = clip.image_embeddings(real)
    assert embeddings.shape == (12, 8)
    torch.testing.assert_close(clip(real), embeddings)
    text = clip.text_embeddings(["a very long caption " * 40, "short"])  # truncated to the 77-token context
    assert text.shape == (2, 8)
    reference = FrechetInceptionDistance(feature=clip)
    reference.update(real, real=True)
    reference.update(fake, real=False)
    assert metrics.fid_clip(clip, real, fake) == pytest.approx(float(reference.compute()), rel=1e-4)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        metrics.clip_score(clip, real[:2], ["one"])


# ------------------------------------------------------------------------------------------- pose AP / AR


def synthetic_poses(seed: int = 0, images: int = 10):
    """COCO-style GT and detections: 0-5 people per image at many sizes, unlabelled keypoints, people
    with none labelled, jitter from tiny to large, misses, duplicates, false positives, tied scores,
    more than 20 detections in one image and an image with detections but no GT."""
    rng = np.random.default_rng(seed)
    truth, found = [], []
    for image in range(images):
        people = []
        for _ in range(int(rng.integers(1, 6)) if image != 1 else 0):
            w, h = rng.uniform(8, 220), rng.uniform(16, 320)
            x, y = rng.uniform(0, 400, 2)
            keypoints = np.column_stack([x + rng.uniform(0, w, 17), y + rng.uniform(0, h, 17)])
            visibility = rng.choice([0, 1, 2], 17, p=[0.25, 0.15, 0.6])
            if rng.random() < 0.12:
                visibility[:] = 0
            keypoints[visibility == 0] = 0
            area = w * h * rng.uniform(0.4, 0.9)
            people.append({"keypoints": np.column_stack([keypoints, visibility]), "bbox": [x, y, w, h], "area": area})
        detections = []
        for person in people:
            if rng.random() < 0.2:
                continue  # missed
            for _ in range(2 if rng.random() < 0.15 else 1):  # sometimes a duplicate
                x, y, w, h = person["bbox"]
                guess = np.column_stack([x + rng.uniform(0, w, 17), y + rng.uniform(0, h, 17)])
                labelled = person["keypoints"][:, 2] > 0
                guess[labelled] = person["keypoints"][labelled, :2]
                noise = rng.choice([0.005, 0.02, 0.05, 0.1, 0.3]) * np.sqrt(person["area"])
                guess += rng.normal(0, noise, guess.shape)
                score = round(float(rng.uniform(0.05, 1)), 1)  # ties across and within images
                detections.append({"keypoints": np.column_stack([guess, rng.uniform(0, 1, 17)]), "score": score})
        for _ in range(int(rng.integers(0, 3)) + {1: 2, 3: 22}.get(image, 0)):  # false positives
            x, y, w, h = *rng.uniform(0, 400, 2), *rng.uniform(10, 200, 2)
            guess = np.column_stack([x + rng.uniform(0, w, 17), y + rng.uniform(0, h, 17), np.ones(17)])
            detections.append({"keypoints": guess, "score": round(float(rng.uniform(0, 1)), 2)})
        order = rng.permutation(len(detections))
        truth.append(people)
        found.append([detections[i] for i in order])
    return truth, found


def pycocotools_stats(truth, found) -> dict:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    annotations, results = [], []
    for image, (people, detections) in enumerate(zip(truth, found, strict=True), start=1):
        for person in people:
            keypoints = np.asarray(person["keypoints"], dtype=float)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image,
                    "category_id": 1,
                    "keypoints": keypoints.ravel().tolist(),
                    "num_keypoints": int((keypoints[:, 2] > 0).sum()),
                    "area": float(person["area"]),
                    "bbox": [float(value) for value in person["bbox"]],
                    "iscrowd": 0,
                }
            )
        for detection in detections:
            keypoints = np.asarray(detection["keypoints"], dtype=float).ravel().tolist()
            results.append({"image_id": image, "category_id": 1, "keypoints": keypoints, "score": detection["score"]})
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO()
        ground_truth.dataset = {
            "images": [{"id": image} for image in range(1, len(truth) + 1)],
            "annotations": annotations,
            "categories": [{"id": 1, "name": "person"}],
        }
        ground_truth.createIndex()
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(results), "keypoints")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return dict(zip(COCO_STATS, evaluation.stats.tolist(), strict=True))


def largest_three(truth):
    kept = []
    for people in truth:
        order = sorted(range(len(people)), key=lambda j: -people[j]["area"])[:3]
        kept.append([people[j] for j in sorted(order)])
    return kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pose_ap_ar_equals_pycocotools(seed):
    truth, found = synthetic_poses(seed)
    ours, expected = metrics.pose_ap_ar(truth, found), pycocotools_stats(truth, found)
    assert set(ours) == set(COCO_STATS)
    for name in COCO_STATS:
        assert ours[name] == pytest.approx(expected[name], abs=1e-6), name
    assert 0 < ours["AP"] < ours["AP50"] < 1  # a discriminating case, not all-or-nothing
    clean, expected_clean = metrics.clean_pose_ap_ar(truth, found), pycocotools_stats(largest_three(truth), found)
    for name in COCO_STATS:
        assert clean[name] == pytest.approx(expected_clean[name], abs=1e-6), name
    assert clean != ours


def test_perfect_and_empty_pose_detections():
    truth, _ = synthetic_poses(4)
    # one exact detection per labelled person (a detection of a person with nothing labelled is a false positive)
    perfect = [
        [{"keypoints": p["keypoints"], "score": 1.0} for p in people if p["keypoints"][:, 2].any()] for people in truth
    ]
    assert metrics.pose_ap_ar(truth, perfect)["AP"] == pytest.approx(1.0)
    assert metrics.pose_ap_ar(truth, perfect)["AR"] == pytest.approx(1.0)
    nothing = metrics.pose_ap_ar(truth, [[] for _ in truth])
    assert nothing["AP"] == 0 and nothing["AR"] == 0
    assert metrics.pose_ap_ar([[]], [[]])["AP"] == -1  # undefined, as COCO
    with pytest.raises(ValueError, match="2 images of ground truth but 1 of detections"):
        metrics.pose_ap_ar([[], []], [[]])


def jittered(pose: dict, seed: int, noise: float) -> dict:
    rng = np.random.default_rng(seed)
    people = []
    for person in pose["people"]:
        keypoints = np.asarray(person["keypoints"], dtype=float).copy()
        keypoints[:, :2] += rng.normal(0, noise, (17, 2))
        people.append({"bbox": person["bbox"], "score": float(rng.uniform(0.3, 1)), "keypoints": keypoints.tolist()})
    return {"width": pose["width"], "height": pose["height"], "people": people}


def test_our_pose_dicts_are_scored_as_coco_would():
    truth = [make_sample(f"s{i}", height=96, width=128, seed=i, people=1 + i % 4).pose for i in range(6)]
    truth[0]["people"][0]["keypoints"][:5, 2] = 0  # unlabelled keypoints (score 0)
    found = [jittered(pose, seed, noise=1.0 + 2 * seed) for seed, pose in enumerate(truth)]
    found[2]["people"] = found[2]["people"][:1]  # a missed person
    people = metrics.coco_people(truth[0])[0]
    x0, y0, x1, y1 = truth[0]["people"][0]["bbox"]
    assert people["bbox"] == [x0, y0, x1 - x0, y1 - y0] and people["area"] == (x1 - x0) * (y1 - y0)
    assert (people["keypoints"][:5, 2] == 0).all() and (people["keypoints"][5:, 2] == 2).all()
    no_box = metrics.coco_people({"people": [{"keypoints": [[1, 2, 0.5], [4, 8, 0.9]] + [[9, 9, 0]] * 15}]})[0]
    assert no_box["bbox"] == [1, 2, 3, 6] and no_box["area"] == 18 and no_box["score"] == 1.0

    scores = metrics.pose_metrics(truth, found)
    coco_truth = [metrics.coco_people(pose) for pose in truth]
    coco_found = [metrics.coco_people(pose) for pose in found]
    expected, expected_clean = (
        pycocotools_stats(coco_truth, coco_found),
        pycocotools_stats(largest_three(coco_truth), coco_found),
    )
    assert scores["pose_ap"] == pytest.approx(expected["AP"], abs=1e-6)
    assert scores["pose_ap50"] == pytest.approx(expected["AP50"], abs=1e-6)
    assert scores["pose_ap75"] == pytest.approx(expected["AP75"], abs=1e-6)
    assert scores["pose_ar"] == pytest.approx(expected["AR"], abs=1e-6)
    assert scores["pose_ap_clean"] == pytest.approx(expected_clean["AP"], abs=1e-6)
    assert scores["pose_ar_clean"] == pytest.approx(expected_clean["AR"], abs=1e-6)
    assert all(0 <= value <= 1 for value in scores.values())

    exact = metrics.pose_sample_score(truth[1], truth[1])
    assert exact["oks"] == pytest.approx([1.0, 1.0]) and exact["mean_oks"] == pytest.approx(1.0)
    missed = metrics.pose_sample_score(truth[2], found[2])
    assert missed["oks"][1] < 0.5 and missed["detected"] == 1
    unlabelled = {**truth[1], "people": [{**p, "keypoints": np.zeros((17, 3))} for p in truth[1]["people"]]}
    assert metrics.pose_sample_score(unlabelled, found[1]) is None
    assert metrics.pose_metrics([unlabelled], [found[1]])["pose_ap"] is None
