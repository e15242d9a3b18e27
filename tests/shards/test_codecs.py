import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from shards import codecs


def test_depth_round_trip_within_one_level_of_range():
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.3, 80.0, (37, 53)).astype(np.float32)
    data, encoding = codecs.encode_depth(depth, "metric_m")
    decoded = codecs.decode_depth(data)
    span = float(depth.max() - depth.min())
    assert np.abs(decoded - depth).max() <= span / 65535
    assert (encoding.kind, encoding.min, encoding.max) == ("metric_m", float(depth.min()), float(depth.max()))
    # The PNG is genuinely 16-bit: far more than 256 distinct levels survive.
    levels, embedded = codecs.decode_depth_levels(data)
    assert levels.dtype == np.uint16 and len(np.unique(levels)) > 1000
    assert embedded == encoding
    # The encoding from the sample metadata decodes the same.
    np.testing.assert_array_equal(codecs.decode_depth(data, encoding.to_json()), decoded)


def test_depth_constant_and_invalid_inputs():
    data, _ = codecs.encode_depth(np.full((4, 5), 2.5), "metric_m")
    np.testing.assert_allclose(codecs.decode_depth(data), 2.5)
    with pytest.raises(ValueError, match="NaN"):
        codecs.encode_depth(np.array([[1.0, np.nan]]), "metric_m")
    with pytest.raises(ValueError, match="kind"):
        codecs.encode_depth(np.ones((2, 2)), "")
    with pytest.raises(codecs.DecodeError, match="16-bit"):
        codecs.decode_depth(codecs.encode_mask(np.zeros((2, 2), bool)))


def test_normal_round_trip_and_axis_convention():
    rng = np.random.default_rng(1)
    normal = rng.normal(size=(20, 30, 3)).astype(np.float32)
    normal[..., 2] = np.abs(normal[..., 2])
    normal /= np.linalg.norm(normal, axis=2, keepdims=True)
    decoded = codecs.decode_normal(codecs.encode_normal(normal))
    angle = np.degrees(np.arccos(np.clip((decoded * normal).sum(axis=2), -1, 1)))
    assert angle.max() < 1.0
    # A surface facing the camera (+z toward the viewer) is stored as light blue.
    facing = np.zeros((1, 1, 3), np.float32)
    facing[..., 2] = 1
    assert np.asarray(Image.open(io.BytesIO(codecs.encode_normal(facing)))).tolist() == [[[128, 128, 255]]]


def test_mask_round_trip():
    mask = np.random.default_rng(2).random((9, 7)) > 0.5
    decoded = codecs.decode_mask(codecs.encode_mask(mask))
    np.testing.assert_array_equal(decoded, mask.astype(np.uint8) * 255)
    soft = np.arange(63, dtype=np.uint8).reshape(9, 7)
    np.testing.assert_array_equal(codecs.decode_mask(codecs.encode_mask(soft)), soft)


def test_pose_round_trip_with_wholebody():
    rng = np.random.default_rng(3)
    pose = {
        "width": 64,
        "height": 48,
        "people": [
            {"bbox": [1, 2, 30, 40], "score": 0.8, "keypoints": rng.random((17, 3)), "wholebody": rng.random((133, 3))},
            {"bbox": [5, 5, 9, 9], "score": 0.5, "keypoints": rng.random((17, 3)).tolist()},
        ],
    }
    decoded = codecs.decode_pose(codecs.encode_pose(pose))
    assert (decoded["width"], decoded["height"]) == (64, 48)
    np.testing.assert_allclose(decoded["people"][0]["keypoints"], pose["people"][0]["keypoints"], rtol=1e-6)
    np.testing.assert_allclose(decoded["people"][0]["wholebody"], pose["people"][0]["wholebody"], rtol=1e-6)
    assert "wholebody" not in decoded["people"][1]
    with pytest.raises(ValueError, match="expected 17 keypoints"):
        codecs.encode_pose(
            {"width": 1, "height": 1, "people": [{"bbox": [0, 0, 1, 1], "keypoints": np.zeros((18, 3))}]}
        )
    with pytest.raises(codecs.DecodeError, match="schema"):
        codecs.decode_pose(b'{"width": 3}')


def _encoded(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (5, 4), 200),
        Image.new("RGBA", (5, 4), (10, 20, 30, 0)),
        Image.new("P", (5, 4)),
        Image.fromarray(np.full((4, 5), 65535, np.uint16)),
        Image.new("CMYK", (5, 4)),
    ],
    ids=["gray", "rgba", "palette", "16bit", "cmyk"],
)
def test_decode_image_converts_any_mode_to_rgb(image):
    format = "JPEG" if image.mode == "CMYK" else "PNG"
    rgb = codecs.decode_image(_encoded(image, format))
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 5, 3)
    if image.mode == "I;16":
        assert rgb.max() == 255  # scaled, not clipped from 65535 to garbage


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding():
    # Above our own limit (64 MP) but below PIL's: our check names the declared size.
    with pytest.raises(codecs.ImageTooLargeError, match="10000x8000"):
        codecs.decode_image(_png_header_only(10_000, 8_000))
    # Far above PIL's own limit: PIL refuses at open, reported as the same error type.
    with pytest.raises(codecs.ImageTooLargeError, match="refusing to decode"):
        codecs.decode_image(_png_header_only(100_000, 100_000))


def test_corrupt_and_truncated_images_raise_decode_error():
    with pytest.raises(codecs.DecodeError):
        codecs.decode_image(b"definitely not an image")
    jpeg = _encoded(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(codecs.DecodeError):
        codecs.decode_image(jpeg[: len(jpeg) // 2])
