"""The paper's metrics against references: torchmetrics (FID, KID, CLIP score), pycocotools (pose AP/AR)."""

import contextlib
import io

import numpy as np
import pytest
import torch

from hyperhuman.eval.clip import ClipFeatures, clip_score, clip_similarities, fid_clip
from hyperhuman.eval.fid import (
    FeatureStatistics,
    InceptionFeatures,
    fid,
    fid_from_features,
    fid_from_statistics,
    frechet_distance,
    kid,
    kid_from_features,
    sample_size_warning,
)
from hyperhuman.eval.pose import clean_pose_ap_ar, coco_people, pose_ap_ar, pose_metrics, pose_sample_score
from hyperhuman.skeleton import SCORE_THRESHOLD
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
    ours = fid(module, real, fake, batch_size=16)
    assert expected > 0.05
    assert ours == pytest.approx(expected, rel=1e-6)
    assert fid_from_features(module(real), module(fake)) == pytest.approx(ours, rel=1e-12)


def test_fid_closed_forms():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    assert abs(fid_from_features(features, features)) < 1e-8
    # same covariance, shifted mean: FID = ||Δμ||²
    shift = rng.normal(size=6)
    assert fid_from_features(features, features + shift) == pytest.approx(shift @ shift, rel=1e-9)
    # isotropic Gaussians: d (σ1 - σ2)² + ||Δμ||²
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = 5 * (1.5 - 0.5) ** 2 + (mu1 - mu2) @ (mu1 - mu2)
    assert frechet_distance(mu1, 1.5**2 * np.eye(5), mu2, 0.5**2 * np.eye(5)) == pytest.approx(expected)
    # symmetric in its arguments, also for rank-deficient covariances
    few = rng.normal(size=(4, 6))
    assert fid_from_features(few, features) == pytest.approx(fid_from_features(features, few))


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
        mean, std = kid(module, real, fake, subsets=subsets, subset_size=subset_size, seed=seed)
        assert mean == pytest.approx(expected_mean, rel=1e-9) and std == pytest.approx(expected_std, abs=1e-12)
    assert std == pytest.approx(0, abs=1e-12)  # subset_size == N: every subset is the whole set
    # subset_size is clipped to the number of samples
    features_real, features_fake = module(real), module(fake)
    clipped = kid_from_features(features_real, features_fake, subsets=2, subset_size=1000)
    assert clipped == pytest.approx(kid_from_features(features_real, features_fake, subsets=2, subset_size=40))
    assert kid_from_features(features_real, features_fake, seed=5) == kid_from_features(
        features_real, features_fake, seed=5
    )


def test_feature_statistics_batch_by_batch_equal_the_all_at_once_ones():
    rng = np.random.default_rng(0)
    # far from the origin: the naive one-pass covariance would lose digits here
    real = 1e4 + rng.normal(size=(203, 9)) @ rng.normal(size=(9, 9))
    fake = 1e4 + rng.normal(size=(150, 9)) @ rng.normal(size=(9, 9)) + 0.3
    accumulated = {"real": FeatureStatistics(), "fake": FeatureStatistics()}
    for name, features in (("real", real), ("fake", fake)):
        for start, size in ((0, 1), (1, 64), (65, 0), (65, 7), (72, 1000)):  # a batch of 1, an empty one
            accumulated[name].update(torch.from_numpy(features[start : start + size]))
    assert accumulated["real"].count == 203 and accumulated["real"].dim == 9
    np.testing.assert_allclose(accumulated["real"].mean, real.mean(0), rtol=1e-13)
    np.testing.assert_allclose(accumulated["real"].covariance(), np.cov(real, rowvar=False), rtol=1e-9, atol=1e-9)
    expected = fid_from_features(real, fake)
    assert fid_from_statistics(accumulated["real"], accumulated["fake"]) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="a batch of 3-d features after 9-d ones"):
        accumulated["real"].update(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="need at least 2 samples for a covariance, got 1"):
        single = FeatureStatistics()
        single.update(np.ones((1, 4)))
        fid_from_statistics(single, accumulated["fake"])


def test_few_samples_for_the_feature_dimension_are_warned_about():
    message = sample_size_warning("FID", 16, 2048)
    assert "FID from 16 samples of 2048-d features" in message and "rank at most 15" in message
    assert "--num" in message
    assert sample_size_warning("FID", 2048, 2048) is not None and sample_size_warning("FID", 2049, 2048) is None


def test_feature_statistics_errors_name_the_problem():
    with pytest.raises(ValueError, match="at least 2 samples.*got 1"):
        fid_from_features(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="real features have 4 dims, generated 3"):
        kid_from_features(np.zeros((5, 4)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="subsets must be a positive integer, got 0"):
        kid_from_features(np.ones((5, 4)), np.ones((5, 4)), subsets=0)
    with pytest.raises(ValueError, match=r"must be uint8 \(N, 3, H, W\).*torch.float32"):
        fid(Projection(), torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))


# ------------------------------------------------------------------------------------------- Inception


def test_inception_features_are_torchmetrics_fid_features(inception_weights):
    from torchmetrics.image.fid import FrechetInceptionDistance

    images = image_sets(3)[0]
    features = InceptionFeatures(inception_weights, batch_size=2, device="cpu")(images)
    assert features.shape == (3, 2048) and features.dtype == torch.float32
    reference = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(inception_weights))
    with torch.no_grad():
        expected = reference.inception(images)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)


def test_missing_or_bad_weights_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"nothing\.pth.*not found.*weights-inception-2015-12-05-6726825d\.pth"):
        InceptionFeatures(tmp_path / "nothing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match=r"junk\.pth.*not a plain PyTorch state dict"):
        InceptionFeatures(tmp_path / "junk.pth")
    with pytest.raises(ValueError, match=r"no CLIP model at .*no-clip.*clip-vit-large-patch14"):
        ClipFeatures(tmp_path / "no-clip")


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

    clip = ClipFeatures(clip_path, batch_size=4, device="cpu")
    images = torch.randint(0, 256, (len(PROMPTS), 3, 40, 48), generator=torch.Generator().manual_seed(1)).byte()
    similarities = clip_similarities(clip, images, PROMPTS)
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
    assert clip_score(clip, images, PROMPTS) == pytest.approx(np.mean(per_pair), rel=1e-4, abs=1e-4)


def test_clip_score_clamps_each_pair():
    class Stub:
        """Unit embeddings at chosen angles: cosines +0.5 and -0.5."""

        def image_embeddings(self, images):
            return torch.tensor([[1.0, 0.0], [1.0, 0.0]])

        def text_embeddings(self, prompts):
            return torch.tensor([[0.5, 0.75**0.5], [-0.5, 0.75**0.5]])

    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    np.testing.assert_allclose(clip_similarities(Stub(), images, ["a", "b"]), [50.0, -50.0])
    assert clip_score(Stub(), images, ["a", "b"]) == pytest.approx(25.0)  # torchmetrics' clamped mean: 0


def test_fid_clip_is_fid_on_clip_image_embeddings(clip_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    clip = ClipFeatures(clip_path, device="cpu")
    real, fake = image_sets(12)
    embeddings = clip.image_embeddings(real)
    assert embeddings.shape == (12, 8)
    torch.testing.assert_close(clip(real), embeddings)
    text = clip.text_embeddings(["a very long caption " * 40, "short"])  # truncated to the 77-token context
    assert text.shape == (2, 8)
    reference = FrechetInceptionDistance(feature=clip)
    reference.update(real, real=True)
    reference.update(fake, real=False)
    assert fid_clip(clip, real, fake) == pytest.approx(float(reference.compute()), rel=1e-4)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        clip_score(clip, real[:2], ["one"])


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


def pycocotools_stats(truth, found, ignored=None) -> dict:
    """COCOeval's ten numbers; ``ignored[image][j]`` flags a GT person ignored (``num_keypoints = 0``
    is how COCOeval's ``_prepare`` sets a keypoint GT's ignore flag; its OKS still uses its keypoints)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    annotations, results = [], []
    for image, (people, detections) in enumerate(zip(truth, found, strict=True), start=1):
        for j, person in enumerate(people):
            keypoints = np.asarray(person["keypoints"], dtype=float)
            flagged = ignored is not None and ignored[image - 1][j]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image,
                    "category_id": 1,
                    "keypoints": keypoints.ravel().tolist(),
                    "num_keypoints": 0 if flagged else int((keypoints[:, 2] > 0).sum()),
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


def beyond_largest_three(truth):
    """Per image, which GT people are not among the 3 largest (ties: first listed)."""
    flags = []
    for people in truth:
        largest = sorted(range(len(people)), key=lambda j: -people[j]["area"])[:3]
        flags.append([j not in largest for j in range(len(people))])
    return flags


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pose_ap_ar_equals_pycocotools(seed):
    truth, found = synthetic_poses(seed)
    ours, expected = pose_ap_ar(truth, found), pycocotools_stats(truth, found)
    assert set(ours) == set(COCO_STATS)
    for name in COCO_STATS:
        assert ours[name] == pytest.approx(expected[name], abs=1e-6), name
    assert 0 < ours["AP"] < ours["AP50"] < 1  # a discriminating case, not all-or-nothing
    # clean: the people beyond the 3 largest are ignored, not removed
    clean, expected_clean = clean_pose_ap_ar(truth, found), pycocotools_stats(truth, found, beyond_largest_three(truth))
    for name in COCO_STATS:
        assert clean[name] == pytest.approx(expected_clean[name], abs=1e-6), name
    assert clean != ours


def square_person(x0: float, y0: float, side: float) -> dict:
    grid = np.linspace(0.1, 0.9, 17)
    keypoints = np.column_stack([x0 + side * grid, y0 + side * grid[::-1], np.full(17, 2.0)])
    return {"keypoints": keypoints, "bbox": [x0, y0, side, side], "area": side * side}


def test_clean_pose_ap_ignores_people_beyond_the_three_most_salient():
    # four people, each found exactly; the smallest one's detection has the best score
    truth = [
        [square_person(0, 0, 100), square_person(120, 0, 90), square_person(0, 120, 80), square_person(200, 200, 20)]
    ]
    found = [[{"keypoints": p["keypoints"], "score": 0.9 if j == 3 else 0.5} for j, p in enumerate(truth[0])]]
    clean = clean_pose_ap_ar(truth, found)
    # ignored, the fourth person's detection is neither a hit nor a miss; removed, it would be a
    # false positive ranked first and cost precision
    assert clean["AP"] == pytest.approx(1.0) and clean["AR"] == pytest.approx(1.0)
    assert clean == pytest.approx(pycocotools_stats(truth, found, [[False, False, False, True]]), abs=1e-6)
    # a missed fourth person costs nothing either, a missed third one does
    assert clean_pose_ap_ar(truth, [found[0][:3]])["AR"] == pytest.approx(1.0)
    assert clean_pose_ap_ar(truth, [[found[0][0], found[0][1], found[0][3]]])["AR"] == pytest.approx(2 / 3)


def test_ground_truth_joints_are_the_joints_the_condition_render_drew():
    from hyperhuman.skeleton import render_pose

    # the renderer draws a joint from SCORE_THRESHOLD up, and nothing below it
    nose_only = np.zeros((17, 3))
    nose_only[0] = [20, 20, SCORE_THRESHOLD]
    drawn = {"width": 40, "height": 40, "people": [{"keypoints": nose_only}]}
    assert render_pose(drawn).any()
    nose_only[0, 2] = SCORE_THRESHOLD - 1e-3
    assert not render_pose(drawn).any()

    rng = np.random.default_rng(0)
    keypoints = np.column_stack([rng.uniform(10, 50, 17), rng.uniform(10, 50, 17), np.full(17, 0.9)])
    keypoints[:5, 2] = [0.05, 0.1, 0.2, 0.25, SCORE_THRESHOLD - 1e-3]  # scored, but not drawn
    keypoints[5, 2] = SCORE_THRESHOLD  # drawn
    truth = {"width": 64, "height": 64, "people": [{"bbox": [5, 5, 55, 55], "score": 1.0, "keypoints": keypoints}]}
    guess = keypoints.copy()
    guess[:5, :2] += 30  # wrong only where the condition showed nothing
    found = {"width": 64, "height": 64, "people": [{"bbox": [5, 5, 55, 55], "score": 0.8, "keypoints": guess}]}
    assert pose_metrics([truth], [found])["pose_ap"] == pytest.approx(1.0)
    assert pose_sample_score(truth, found)["mean_oks"] == pytest.approx(1.0)
    guess[5, :2] += 30  # a drawn joint wrong: scored
    assert pose_sample_score(truth, found)["mean_oks"] < 1
    # every joint with a score > 0 counts when asked (COCO's v > 0)
    assert pose_metrics([truth], [found], min_score=None)["pose_ap"] < 1


def test_perfect_and_empty_pose_detections():
    truth, _ = synthetic_poses(4)
    # one exact detection per labelled person (a detection of a person with nothing labelled is a false positive)
    perfect = [
        [{"keypoints": p["keypoints"], "score": 1.0} for p in people if p["keypoints"][:, 2].any()] for people in truth
    ]
    assert pose_ap_ar(truth, perfect)["AP"] == pytest.approx(1.0)
    assert pose_ap_ar(truth, perfect)["AR"] == pytest.approx(1.0)
    nothing = pose_ap_ar(truth, [[] for _ in truth])
    assert nothing["AP"] == 0 and nothing["AR"] == 0
    assert pose_ap_ar([[]], [[]])["AP"] == -1  # undefined, as COCO
    with pytest.raises(ValueError, match="2 images of ground truth but 1 of detections"):
        pose_ap_ar([[], []], [[]])


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
    people = coco_people(truth[0])[0]
    x0, y0, x1, y1 = truth[0]["people"][0]["bbox"]
    assert people["bbox"] == [x0, y0, x1 - x0, y1 - y0] and people["area"] == (x1 - x0) * (y1 - y0)
    assert (people["keypoints"][:5, 2] == 0).all() and (people["keypoints"][5:, 2] == 2).all()
    no_box = coco_people({"people": [{"keypoints": [[1, 2, 0.5], [4, 8, 0.9]] + [[9, 9, 0]] * 15}]})[0]
    assert no_box["bbox"] == [1, 2, 3, 6] and no_box["area"] == 18 and no_box["score"] == 1.0

    scores = pose_metrics(truth, found)
    # ground truth: the joints the conditioning render draws (scores from SCORE_THRESHOLD)
    coco_truth = [coco_people(pose, min_score=SCORE_THRESHOLD) for pose in truth]
    assert sum((person["keypoints"][:, 2] == 0).sum() for people in coco_truth for person in people) > 5
    coco_found = [coco_people(pose) for pose in found]
    expected, expected_clean = (
        pycocotools_stats(coco_truth, coco_found),
        pycocotools_stats(coco_truth, coco_found, beyond_largest_three(coco_truth)),
    )
    assert scores["pose_ap"] == pytest.approx(expected["AP"], abs=1e-6)
    assert scores["pose_ap50"] == pytest.approx(expected["AP50"], abs=1e-6)
    assert scores["pose_ap75"] == pytest.approx(expected["AP75"], abs=1e-6)
    assert scores["pose_ar"] == pytest.approx(expected["AR"], abs=1e-6)
    assert scores["pose_ap_clean"] == pytest.approx(expected_clean["AP"], abs=1e-6)
    assert scores["pose_ar_clean"] == pytest.approx(expected_clean["AR"], abs=1e-6)
    assert all(0 <= value <= 1 for value in scores.values())

    exact = pose_sample_score(truth[1], truth[1])
    assert exact["oks"] == pytest.approx([1.0, 1.0]) and exact["mean_oks"] == pytest.approx(1.0)
    missed = pose_sample_score(truth[2], found[2])
    assert missed["oks"][1] < 0.5 and missed["detected"] == 1
    unlabelled = {**truth[1], "people": [{**p, "keypoints": np.zeros((17, 3))} for p in truth[1]["people"]]}
    assert pose_sample_score(unlabelled, found[1]) is None
    assert pose_metrics([unlabelled], [found[1]])["pose_ap"] is None
