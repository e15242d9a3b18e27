import numpy as np
import pytest
import torch
import webdataset as wds

import shards
from shards import ShardWriter, write_manifest
from shards.codecs import decode_depth
from shards.dataset import SampleTransform, hflip_sample, humanverse_dataset
from shards.reader import decode_sample, read_shard
from shards.sample import encode_sample


@pytest.fixture
def dataset_root(tmp_path, sample_factory):
    with ShardWriter(str(tmp_path), 0, max_samples=3) as writer:
        for index in range(5):
            writer.write(sample_factory(f"s{index}", seed=index))
    write_manifest(str(tmp_path))
    return tmp_path


def test_plain_webdataset_with_our_handler_keeps_16_bit_depth(dataset_root, sample_factory):
    urls = shards.complete_shard_urls(str(dataset_root))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode(shards.wds_handler))
    assert [s["__key__"] for s in samples] == [f"s{i}" for i in range(5)]
    first, original = samples[0], sample_factory("s0", seed=0)
    depth_range = original.depth.max() - original.depth.min()
    assert np.abs(first["depth.png"] - original.depth).max() <= depth_range / 65535 + 1e-6
    assert first["jpg"].dtype == np.uint8 and first["jpg"].shape == (48, 64, 3)
    assert first["mask.png"].dtype == np.uint8
    np.testing.assert_allclose(
        first["pose.json"]["people"][0]["keypoints"], original.pose["people"][0]["keypoints"], rtol=1e-6
    )
    assert first["txt"] == "a photo s0" and first["json"]["key"] == "s0"


def test_webdataset_default_decoder_would_truncate_depth(dataset_root):
    """Why the handler exists: webdataset's own PNG decoding loses the 16-bit depth."""
    url = shards.complete_shard_urls(str(dataset_root))[0]
    raw = next(iter(wds.WebDataset(url, shardshuffle=False)))
    ours = decode_depth(raw["depth.png"])
    default = next(iter(wds.WebDataset(url, shardshuffle=False).decode("rgb8")))["depth.png"]
    assert len(np.unique(ours)) > 256 >= len(np.unique(default))


def test_training_dataset_reads_only_complete_shards(dataset_root, sample_factory):
    (dataset_root / "000009-0000.tar").write_bytes((dataset_root / "000000-0000.tar").read_bytes())  # no marker
    samples = list(humanverse_dataset(str(dataset_root), SampleTransform(32, seed=0)))
    assert sorted(s["key"] for s in samples) == [f"s{i}" for i in range(5)]
    batch = next(
        iter(torch.utils.data.DataLoader(humanverse_dataset(str(dataset_root), SampleTransform(32)), batch_size=2))
    )
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["keypoints"].shape == (2, 3, 17, 3)
    assert batch["depth"].shape == (2, 1, 32, 32) and batch["normal"].shape == (2, 3, 32, 32)
    assert -1 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1


def decoded(sample):
    """A sample as the readers hand it over: encoded to members, then decoded."""
    return decode_sample({"__key__": sample.key, **encode_sample(sample)})


def test_flip_twice_is_identity_and_mirrors_every_modality(sample_factory):
    out = SampleTransform((24, 32), random_crop=False, flip_prob=0.0)(decoded(sample_factory("one", seed=3)))
    once = hflip_sample(out)
    twice = hflip_sample(once)
    for name in ("pixel_values", "depth", "normal", "mask", "keypoints"):
        torch.testing.assert_close(twice[name], out[name])
    torch.testing.assert_close(once["pixel_values"], torch.flip(out["pixel_values"], dims=[-1]))
    torch.testing.assert_close(once["normal"][0], -torch.flip(out["normal"][0], dims=[-1]))
    torch.testing.assert_close(once["normal"][1:], torch.flip(out["normal"][1:], dims=[-1]))
    # left wrist (9) ↔ right wrist (10), mirrored about the output width
    width = out["pixel_values"].shape[-1]
    assert once["keypoints"][0, 10, 0].item() == pytest.approx(width - out["keypoints"][0, 9, 0].item())
    assert once["keypoints"][0, 10, 2].item() == pytest.approx(out["keypoints"][0, 9, 2].item())


def test_crop_resize_flip_keeps_modalities_and_keypoints_aligned(sample_factory):
    """Plant a marker at a keypoint in image, depth and mask; after random crops, resizes and
    flips the keypoint must still point at the marker in every modality."""
    sample = sample_factory("m", height=96, width=128, seed=5, people=1)
    x, y = 70, 40
    sample.image[:] = 0
    sample.image[y - 3 : y + 4, x - 3 : x + 4] = 255
    sample.depth[:] = 1.0
    sample.depth[y - 3 : y + 4, x - 3 : x + 4] = 5.0
    sample.mask[:] = False
    sample.mask[y - 3 : y + 4, x - 3 : x + 4] = True
    sample.pose["people"][0]["keypoints"][:] = 0
    sample.pose["people"][0]["keypoints"][9] = [x + 0.5, y + 0.5, 1.0]  # left wrist on the marker's centre pixel
    transform = SampleTransform(64, min_crop_scale=0.6, flip_prob=0.5, seed=11)
    flipped_seen = set()
    for _ in range(12):
        out = transform(decoded(sample))
        visible = out["keypoints"][0, :, 2] > 0
        joint = int(torch.nonzero(visible)[0])
        flipped_seen.add(joint)
        px, py = out["keypoints"][0, joint, :2]
        col, row = int(px), int(py)
        assert out["pixel_values"][0, row, col] > 0.5
        assert out["depth"][0, row, col] > 3.0
        assert out["mask"][0, row, col] > 0.5
    assert flipped_seen == {9, 10}  # both the unflipped (left) and flipped (right) cases ran


def test_ray_read_webdataset_with_our_decoder(dataset_root, ray_session):
    import json

    import ray

    dataset = ray.data.read_webdataset(shards.complete_shard_urls(str(dataset_root)), decoder=shards.ray_decoder)
    rows = sorted(dataset.take_all(), key=lambda row: row["__key__"])
    assert [row["__key__"] for row in rows] == [f"s{i}" for i in range(5)]
    reference = list(read_shard(shards.complete_shard_urls(str(dataset_root))[0]))[0]
    np.testing.assert_array_equal(rows[0]["depth.png"], reference["depth.png"])
    assert rows[0]["depth.png"].dtype == np.float32
    assert len(json.loads(rows[0]["pose.json"])["people"]) == 2
