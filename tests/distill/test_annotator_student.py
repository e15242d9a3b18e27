"""The EfficientFormerV2 pose student: crops whose keypoints follow their pixels through every
augmentation, the flip's joint swap, the heatmap label round trip, the model at S0 and toy size,
`hyperhuman distill annotator` end to end with checkpoints, exact resume and an ONNX export that
matches torch; config errors naming the key."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from annotators.efficientformer_pose import decode_heatmaps, invert_matrix, presence, transform_points
from distill.annotator_student.data import DEFAULTS, heatmap_targets, person_crop
from distill.annotator_student.model import PoseStudent, count_parameters, load_student
from distill.annotator_student.train import KNOWN_KEYS, check_config, keypoint_loss, train_pose_student
from hyperhuman.config import ConfigError, documented_keys, load_config
from shards.keypoints import COCO17_NAMES, flip_permutation

TOY_BACKBONE = {"depths": [1, 1, 1, 1], "embed_dims": [8, 8, 16, 16], "mlp_ratios": 2}
INPUT = (64, 48)  # crop height, width of the geometry tests (the model needs multiples of 32)
PLAIN = {**DEFAULTS, "color_jitter": 0.0}


def person(height=240, width=200, seed=0):
    """A person box and 17 keypoints inside it (all seen by the teacher)."""
    rng = np.random.default_rng(seed)
    box = [40.0, 30.0, 40.0 + width * 0.5, 30.0 + height * 0.7]
    points = np.stack([rng.uniform(box[0] + 5, box[2] - 5, 17), rng.uniform(box[1] + 5, box[3] - 5, 17),
                       np.ones(17)], axis=1).astype(np.float32)  # fmt: skip
    return {"bbox": box, "score": 0.9, "keypoints": points}


def ideal_logits(target: np.ndarray, seen: np.ndarray, score: float = 0.9) -> np.ndarray:
    """The logits ``(..., K, h, w)`` a perfect student gives: the log of each seen joint's target,
    shifted so that its presence is ``score``; a flat map of presence ``1 − score`` for the others."""
    cells = target.shape[-2] * target.shape[-1]
    logits = np.log(np.maximum(target, 1e-12))
    total = np.log(np.exp(logits).sum(axis=(-2, -1), keepdims=True))
    logits = logits - total + np.log(cells) + np.log(score / (1 - score))
    logits[~seen] = np.log((1 - score) / score)  # a flat map: logsumexp − log(cells) = this
    return logits.astype(np.float32)


def decode_targets(result: dict) -> np.ndarray:
    """A crop's targets as the perfect student's logits, decoded: (K, 3) in input pixels."""
    seen = result["weight"].numpy() > 0
    return decode_heatmaps(ideal_logits(result["target"].numpy(), seen)[None], 4)[0]


def crop(image, who, seed, **values):
    heatmap = (INPUT[0] // 4, INPUT[1] // 4)
    return person_crop(image, who, {**PLAIN, **values}, INPUT, heatmap, 4, np.random.default_rng(seed))


def flipped(result) -> bool:
    return float(np.linalg.det(result["matrix"].numpy()[:, :2])) < 0


def test_the_flip_mirrors_the_crop_and_swaps_left_and_right_joints():
    image = np.random.default_rng(0).integers(0, 256, (240, 200, 3), dtype=np.uint8)
    who = person()
    still = {"scale_range": [1.0, 1.0], "shift": 0.0, "rotation_prob": 0.0}
    plain, mirrored = crop(image, who, 0, flip_prob=0.0, **still), crop(image, who, 0, flip_prob=1.0, **still)
    assert not flipped(plain) and flipped(mirrored)
    assert (mirrored["pixels"] - plain["pixels"].flip(-1)).abs().max() <= 1  # cv2 rounds to whole levels
    permutation = flip_permutation(17)
    assert COCO17_NAMES[permutation[COCO17_NAMES.index("left_wrist")]] == "right_wrist"
    assert torch.equal(mirrored["keypoints"], plain["keypoints"][permutation])  # the labels swap names
    # the mirrored left wrist's target sits where the plain right wrist's, mirrored, does
    decoded_plain, decoded_mirrored = decode_targets(plain), decode_targets(mirrored)
    left, right = COCO17_NAMES.index("left_wrist"), COCO17_NAMES.index("right_wrist")
    assert decoded_mirrored[left, 0] == pytest.approx(INPUT[1] - decoded_plain[right, 0], abs=0.05)
    assert decoded_mirrored[left, 1] == pytest.approx(decoded_plain[right, 1], abs=0.05)


def planted_dot(height, width, x, y, radius=3.0) -> np.ndarray:
    """A black image with a bright Gaussian dot centred at continuous pixel (x, y)."""
    rows, cols = np.mgrid[0:height, 0:width] + 0.5  # pixel centres
    dot = np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * radius**2))
    return np.repeat((255 * dot)[..., None], 3, axis=2).round().astype(np.uint8)


def centroid(pixels: torch.Tensor) -> np.ndarray:
    """Intensity-weighted centre (x, y), continuous pixels, of a (3, H, W) crop."""
    weight = pixels.numpy().mean(axis=0)
    weight = np.where(weight > 0.2 * weight.max(), weight, 0.0)
    rows, cols = np.mgrid[0 : weight.shape[0], 0 : weight.shape[1]] + 0.5
    return np.array([(weight * cols).sum(), (weight * rows).sum()]) / weight.sum()


@pytest.mark.parametrize("seed", range(6))
def test_augmented_keypoints_land_on_the_planted_dot_in_the_crop(seed):
    """Scale, shift, rotation and flip move the pixels and the labels alike: the target of the joint
    planted on a dot peaks at the dot in the augmented crop (shrunk images included: seed 0's
    photo is twice as large, so its crop is cut from an area-averaged copy)."""
    who = person(seed=seed)
    joint = COCO17_NAMES.index("left_knee")
    size = 2 if seed == 0 else 1
    who = {**who, "bbox": [v * size for v in who["bbox"]], "keypoints": who["keypoints"] * [size, size, 1]}
    x, y = who["keypoints"][joint, :2]
    image = planted_dot(240 * size, 200 * size, x, y, radius=3.0 * size)
    result = crop(image, who, seed, flip_prob=0.5, rotation_prob=1.0, rotation_deg=40.0, shift=0.05)
    label = flip_permutation(17)[joint] if flipped(result) else joint  # a mirrored left knee reads as a right one
    expected = transform_points(who["keypoints"][joint : joint + 1], result["matrix"].numpy().astype(np.float64))[0]
    assert np.allclose(centroid(result["pixels"]), expected[:2], atol=0.35)
    decoded = decode_targets(result)[label]
    assert np.allclose(decoded[:2], expected[:2], atol=0.05) and decoded[2] == pytest.approx(0.9)


def test_labels_round_trip_from_image_to_heatmaps_and_back():
    """Teacher keypoints → augmented crop targets → decoded → mapped back: the image keypoints, to a
    small fraction of a pixel (the annotator maps its heatmaps back the same way)."""
    who = person(seed=3)
    image = np.zeros((240, 200, 3), np.uint8)
    for seed in range(4):
        result = crop(image, who, seed, flip_prob=0.5, rotation_prob=1.0)
        back = transform_points(decode_targets(result), invert_matrix(result["matrix"].numpy().astype(np.float64)))
        seen = result["weight"].numpy() > 0  # inside the crop
        assert seen.sum() >= 10
        assert np.allclose(back[seen, :2], result["keypoints"].numpy()[seen, :2], atol=0.2)


def test_heatmap_targets_decode_to_their_centres_and_absent_joints_to_a_low_score():
    points = np.array([[10.3, 20.7, 1.0], [3.0, 3.0, 1.0], [30.0, 30.0, 0.0]], dtype=np.float32)
    seen = np.array([True, True, False])
    targets = heatmap_targets(points, seen, (16, 12), 4, 1.5)
    assert targets[2].max() == 0.0
    decoded = decode_heatmaps(ideal_logits(targets, seen)[None], 4)[0]
    assert np.allclose(decoded[:2, :2], points[:2, :2], atol=1e-3)  # a Gaussian's log is a parabola: exact
    assert decoded[:, 2] == pytest.approx([0.9, 0.9, 0.1])
    assert presence(np.zeros((17, 8, 6)))[0] == pytest.approx(0.5)  # an untrained flat map: undecided


def test_the_loss_is_least_for_the_ideal_logits_and_the_where_term_ignores_unseen_joints():
    points = np.array([[10.3, 20.7, 1.0], [30.0, 30.0, 0.0]], dtype=np.float32)
    seen = np.array([True, False])
    target = torch.from_numpy(heatmap_targets(points, seen, (16, 12), 4, 1.5))[None]
    weight = torch.from_numpy(seen.astype(np.float32))[None]
    ideal = torch.from_numpy(ideal_logits(target.numpy(), seen[None], score=0.99))
    flat = torch.zeros_like(ideal)
    assert keypoint_loss(ideal, target, weight)["sum"] < keypoint_loss(flat, target, weight)["sum"]
    shifted = ideal.clone()
    shifted[0, 0] += 3.0  # the seen joint's mass: "whether" changes, "where" does not
    shifted[0, 1] = torch.randn(16, 12)  # the unseen joint's map: "where" does not look at it
    assert keypoint_loss(shifted, target, weight)["where"] == pytest.approx(
        keypoint_loss(ideal, target, weight)["where"]
    )


def test_the_s0_student_and_a_toy_one_give_heatmaps_at_the_stride():
    torch.manual_seed(0)
    s0 = PoseStudent()  # EfficientFormerV2-S0 + head: 3.2M parameters (S0 with its classifier: 3.5M)
    assert 3.0e6 < count_parameters(s0) < 3.6e6
    toy = PoseStudent(input_size=(64, 32), heatmap_stride=8, head_channels=8, backbone_overrides=TOY_BACKBONE)
    with torch.no_grad():
        assert toy(torch.rand(2, 3, 64, 32) * 255).shape == (2, 17, 8, 4)
    with pytest.raises(RuntimeError):
        toy(torch.rand(1, 3, 64, 64))  # built for one input size: its attention biases are sized for it


@pytest.fixture
def config(distill_shards, tmp_path):
    config = load_config("distill/pose-student")
    config.update(output=str(tmp_path / "run"))
    config["model"].update(input_size=[64, 32], head_channels=8, backbone_overrides=dict(TOY_BACKBONE))
    config["data"].update(train=str(distill_shards), crops_per_person=2, shuffle_buffer=8)
    config["train"].update(batch_size=4, max_train_steps=6, checkpointing_steps=2, checkpoints_total_limit=2,
                           lr_warmup_steps=1, log_every=100)  # fmt: skip
    config["validation"].update(every=3, num_crops=8)
    return config


def test_training_checkpoints_exports_and_resumes_exactly(config, tmp_path):
    output = tmp_path / "run"
    report = train_pose_student(config)
    assert report["steps"] == 6 and len(report["losses"]) == 6
    assert all(len(values) == 6 for values in report["terms"].values())
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert [entry["step"] for entry in report["heldout"]] == [3, 6] and report["people"] == 8
    assert report["teacher"]["annotator"] == "test-pose" and report["agreement_on"].startswith("data.train")
    assert report["onnx_max_abs_difference"] < 1e-4 and (output / "student.onnx").is_file()
    assert json.loads((output / "train_report.json").read_text())["oks_vs_teacher"] == report["oks_vs_teacher"]
    assert list((output / "logs").rglob("events.out.tfevents.*"))
    student = load_student(str(output))
    assert student.config.input_size == [64, 32] and not student.training

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(output / "checkpoints" / "checkpoint-4", resumed / "checkpoints" / "checkpoint-4")
    config.update(output=str(resumed), export={"onnx": False})  # the export changes no weight
    again = train_pose_student(config, resume="latest")
    assert again["losses"] == report["losses"][4:]
    assert all(again["terms"][name] == values[4:] for name, values in report["terms"].items())
    original = load_file(output / "checkpoints" / "checkpoint-6" / "model.safetensors")
    replayed = load_file(resumed / "checkpoints" / "checkpoint-6" / "model.safetensors")
    assert all(torch.equal(value, replayed[name]) for name, value in original.items())
    final = load_file(output / "student" / "diffusion_pytorch_model.safetensors")
    final_resumed = load_file(resumed / "student" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(value, final_resumed[name]) for name, value in final.items())  # the EMA weights
    assert again["weights_sha256_per_process"] == report["weights_sha256_per_process"]  # the trained (non-EMA) weights
    assert again["oks_vs_teacher"] == report["oks_vs_teacher"]


def test_spfde_trains_the_student_freezes_its_backbone_from_the_stem_and_resumes_exactly(config, tmp_path):
    efficiency = config["train"]["efficiency"]
    efficiency["sparsity"].update(use=True, density=0.5, update_every=2)
    efficiency["freezing"].update(use=True, schedule=[[2, 1], [4, 3]])
    efficiency["sieving"].update(use=True, fraction=0.6, swap_every=2)
    config.update(export={"onnx": False}, validation={"every": 0, "num_crops": 4})
    output = tmp_path / "run"
    report = train_pose_student(config)
    spent = report["efficiency"]
    assert spent["options"] == ["sparsity", "freezing", "sieving"] and spent["steps"] == 6
    assert spent["freezing"]["frozen_units"][0] == "encoder.stem_conv1.conv … encoder.stem_conv2.bn"
    assert spent["freezing"]["frozen_at_step"] == [2, 4, 4]
    assert spent["sparsity"]["density"] == pytest.approx(0.5, abs=0.01)
    assert spent["sieving"]["samples_not_seen"] > 0
    flops = spent["flops"]
    assert 0 < flops["counted"] < flops["dense"] and flops["freezing_backward_skipped"] > 0

    checkpoint = load_file(output / "checkpoints" / "checkpoint-4" / "model.safetensors")
    final = load_file(output / "checkpoints" / "checkpoint-6" / "model.safetensors")
    weights = {name for name, _ in load_student(str(output)).named_parameters()}  # BatchNorm statistics still move
    frozen = [name for name in weights if name.startswith(("encoder.stem", "encoder.stages_0.", "encoder.stages_1."))]
    assert frozen and all(torch.equal(final[name], checkpoint[name]) for name in frozen)  # frozen at step 4
    assert not torch.equal(final["final.weight"], checkpoint["final.weight"])

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(output / "checkpoints" / "checkpoint-4", resumed / "checkpoints" / "checkpoint-4")
    config.update(output=str(resumed))
    again = train_pose_student(config, resume="latest")
    assert again["losses"] == report["losses"][4:]
    replayed = load_file(resumed / "checkpoints" / "checkpoint-6" / "model.safetensors")
    assert all(torch.equal(value, replayed[name]) for name, value in final.items())
    assert again["efficiency"]["flops"] == flops and again["efficiency"]["sieving"] == spent["sieving"]


def test_the_per_sample_loss_scores_each_crop_on_its_own():
    target = torch.zeros(2, 17, 8, 6)
    target[:, :, 4, 3] = 1.0
    seen = torch.ones(2, 17)
    logits = torch.zeros(2, 17, 8, 6)
    logits[0, :, 4, 3] = 8.0  # the first crop's peaks sit on the joints, the second's are flat
    parts = keypoint_loss(logits, target, seen)
    assert parts["per_sample"].shape == (2,) and parts["per_sample"][0] < parts["per_sample"][1]
    assert parts["per_sample"].mean() == pytest.approx(float(parts["sum"]), rel=1e-5)


def test_the_command_line_trains_a_student(config, tmp_path, capsys):
    from hyperhuman.cli import main

    path = tmp_path / "student.yaml"
    config["train"].update(max_train_steps=1, checkpointing_steps=1)
    config.update(export={"onnx": False}, validation={"every": 0, "num_crops": 4})
    path.write_text(yaml.safe_dump(config))
    assert main(["distill", "annotator", "--config", str(path), "--set", "seed=1"]) == 0
    assert "[distill annotator] 1 steps" in capsys.readouterr().out
    assert (tmp_path / "run" / "student" / "config.json").is_file()


def test_the_shipped_config_passes_the_checks_and_documents_every_key():
    config = load_config("distill/pose-student")
    check_config(config, check_paths=False)
    missing = []
    for dotted in documented_keys(KNOWN_KEYS):
        node = config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(dotted)
                break
            node = node[part]
    assert not missing, f"configs/distill/pose-student.yaml lacks {missing}"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("model", "input_size", [100, 64]), "model.input_size"),
        (("model", "heatmap_stride", 2), "model.heatmap_stride"),
        (("model", "backbone", "resnet50"), "model.backbone"),
        (("model", "backbone_overrides", {"img_size": 64}), "model.backbone_overrides"),
        (("data", "scale_range", [1.3, 0.7]), "data.scale_range"),
        (("data", "flip_prob", 2), "data.flip_prob"),
        (("data", "crops_per_person", 0), "data.crops_per_person"),
        (("data", "colour_jitter", 0.2), "data.colour_jitter"),
        (("train", "gradient_checkpointing", True), "train.gradient_checkpointing"),
        (("validation", "num_crops", 0), "validation.num_crops"),
    ],
)
def test_bad_configs_fail_at_start_naming_the_key(change, message):
    config = load_config("distill/pose-student")
    section, key, value = change
    config[section][key] = value
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        check_config(config, check_paths=False)


def test_missing_training_shards_name_the_command(tmp_path):
    config = load_config("distill/pose-student", [f"data.train={tmp_path}"])
    with pytest.raises(ConfigError, match="hyperhuman annotate"):
        check_config(config)
