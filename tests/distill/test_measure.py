"""The shared quality measure: deterministic, independent of batch size and of how many samples are
held out, in the training latent space, PSNR clamped for identical outputs, JSON-ready."""

import json
import math
import tarfile

import pytest
import torch

from distill.measure import HeldOut, load_pipeline, measure, reference_samples, sample_psnr, v_loss
from hyperhuman.lsdm.data import encode_batch
from hyperhuman.lsdm.model import BRANCHES
from hyperhuman.lsdm.train import first_samples

FAST = {"steps": 2, "num": 2}


@pytest.fixture(scope="module")
def teacher(teacher_run):
    return load_pipeline(teacher_run)


@pytest.fixture(scope="module")
def student_run(teacher_run, tmp_path_factory):
    """The teacher with every UNet weight nudged: a stand-in for a distilled student."""
    pipeline = load_pipeline(teacher_run)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in pipeline.unet.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    run = tmp_path_factory.mktemp("student-run")
    pipeline.save_pretrained(run / "pipeline")
    return run


@pytest.fixture(scope="module")
def heldout(distill_shards, teacher):
    return HeldOut.from_shards(distill_shards, teacher, num=4)


def test_load_pipeline_takes_a_run_or_a_pipeline_folder_and_names_a_wrong_path(teacher_run, tmp_path):
    from_run, from_folder = load_pipeline(teacher_run), load_pipeline(teacher_run / "pipeline")
    assert not from_run.unet.training and not from_folder.unet.training
    assert torch.equal(from_run.unet.branch.rgb.conv_in.weight, from_folder.unet.branch.rgb.conv_in.weight)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*run folder with pipeline/.*model_index.json"):
        load_pipeline(tmp_path)


def test_heldout_is_the_first_samples_at_the_models_resolution_in_the_training_latent_space(
    distill_shards, teacher, heldout
):
    assert len(heldout) == 4 and heldout.resolution == 16  # sample_size 8 × VAE factor 2
    assert heldout.timesteps.shape == (4,) and set(heldout.noise) == set(BRANCHES)
    batch = first_samples({"train": str(distill_shards), "resolution": 16}, 4, seed=0)
    assert heldout.keys == list(batch["key"]) and heldout.captions == list(batch["caption"])
    trained_on = encode_batch(teacher.vae, teacher.unet, batch, list(BRANCHES), generator=None)
    for name, latent in trained_on.items():
        torch.testing.assert_close(teacher.unet.normalize(name, heldout.latents[name]), latent)
    assert heldout.poses[0]["width"] == 16 and len(heldout.poses[0]["people"]) == int(batch["num_people"][0])


def test_heldout_triples_do_not_depend_on_num_and_fewer_samples_are_used_as_they_are(distill_shards, teacher, heldout):
    two = HeldOut.from_shards(distill_shards, teacher, num=2)
    assert two.keys == heldout.keys[:2] and two.poses == heldout.poses[:2]
    assert torch.equal(two.timesteps, heldout.timesteps[:2])
    for name in BRANCHES:
        assert torch.equal(two.noise[name], heldout.noise[name][:2])
        assert torch.equal(two.latents[name], heldout.latents[name][:2])
    assert len(HeldOut.from_shards(distill_shards, teacher, num=100)) == 6  # all the toy shards hold


def test_shards_without_samples_are_refused_by_name(teacher, tmp_path):
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    with pytest.raises(ValueError, match=f"{empty}.*no samples"):
        HeldOut.from_shards(str(empty), teacher, num=2)


def test_v_loss_is_deterministic_and_does_not_depend_on_the_batch_size(teacher, heldout):
    one, four = v_loss(teacher, heldout, batch_size=1), v_loss(teacher, heldout, batch_size=4)
    assert v_loss(teacher, heldout, batch_size=4) == four
    assert set(four["branch_v_loss"]) == set(BRANCHES)
    assert four["v_loss"] == pytest.approx(sum(four["branch_v_loss"].values()))
    assert one["v_loss"] == pytest.approx(four["v_loss"], rel=1e-5)
    for name in BRANCHES:
        assert one["branch_v_loss"][name] == pytest.approx(four["branch_v_loss"][name], rel=1e-5)


def test_psnr_against_itself_is_clamped_and_a_perturbed_copy_scores_lower(teacher, student_run, heldout):
    assert sample_psnr(teacher, teacher, heldout, **FAST) == dict.fromkeys(BRANCHES, 100.0)
    student = load_pipeline(student_run)
    agreement = sample_psnr(student, teacher, heldout, **FAST)
    assert set(agreement) == set(BRANCHES)
    assert all(math.isfinite(value) and value < 100.0 for value in agreement.values()), agreement
    assert v_loss(student, heldout)["v_loss"] != v_loss(teacher, heldout)["v_loss"]
    cached = reference_samples(teacher, heldout, **FAST)  # sampled once, scored against many times
    assert sample_psnr(student, teacher, heldout, **FAST, reference_outputs=cached) == agreement


def test_measure_is_deterministic_and_round_trips_through_json(teacher_run, student_run, distill_shards):
    first = measure(student_run, distill_shards, reference=teacher_run, num=2, steps=1)
    again = measure(student_run, distill_shards, reference=teacher_run, num=2, steps=1)
    assert set(first) == {
        "model", "reference", "num", "seed", "resolution", "v_loss", "branch_v_loss", "psnr", "steps", "step_ms",
    }  # fmt: skip
    assert first["step_ms"] > 0
    assert {k: v for k, v in first.items() if k != "step_ms"} == {k: v for k, v in again.items() if k != "step_ms"}
    assert json.loads(json.dumps(first)) == first
    assert first["model"] == str(student_run) and first["reference"] == str(teacher_run) and first["num"] == 2
    assert "psnr" not in measure(teacher_run, distill_shards, num=1, steps=1)
