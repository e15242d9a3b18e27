"""Bad image inputs become reasons, good ones become upright RGB — never an exception."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipelines.fetch import decode


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


RGB = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
JPEG = encode(RGB, "JPEG")

BAD = {
    "zero bytes": b"",
    "truncated jpeg": JPEG[: len(JPEG) // 2],
    "jpeg header only": JPEG[:20],
    "html named .jpg": b"<!doctype html><html><body>404</body></html>",
    "json": b'{"error": "not found"}',
    "random bytes": bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8)),
    "decompression bomb (header)": png_header_only(100_000, 100_000),
    "bomb below PIL's limit": png_header_only(10_000, 8_000),
    "gzip bytes": zlib.compress(JPEG),
}


@pytest.mark.parametrize("data", list(BAD.values()), ids=list(BAD))
def test_bad_inputs_become_reasons(data):
    decoded, reason = decode(data)
    assert decoded is None and isinstance(reason, str) and reason


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    return encode(RGB, "JPEG", exif=exif)


def animated_gif() -> bytes:
    frames = [Image.new("P", (30, 20), color) for color in (1, 2, 3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


GOOD = {
    "rgb jpeg (kept byte-exact)": (JPEG, (40, 60)),
    "exif rotated jpeg": (exif_rotated(), (60, 40)),
    "cmyk jpeg": (encode(RGB.convert("CMYK"), "JPEG"), (40, 60)),
    "grayscale png": (encode(RGB.convert("L"), "PNG"), (40, 60)),
    "16-bit png": (encode(Image.fromarray(np.full((40, 60), 40000, np.uint16)), "PNG"), (40, 60)),
    "palette png with transparency": (encode(RGB.convert("P"), "PNG", transparency=0), (40, 60)),
    "rgba png": (encode(RGB.convert("RGBA"), "PNG"), (40, 60)),
    "animated gif (first frame)": (animated_gif(), (20, 30)),
    "webp": (encode(RGB, "WEBP"), (40, 60)),
    "bmp": (encode(RGB, "BMP"), (40, 60)),
    "tiff": (encode(RGB, "TIFF"), (40, 60)),
    "1x1": (encode(Image.new("RGB", (1, 1)), "PNG"), (1, 1)),
    "10000x1": (encode(Image.new("RGB", (10000, 1)), "PNG"), (1, 10000)),
}


@pytest.mark.parametrize("data, shape", list(GOOD.values()), ids=list(GOOD))
def test_decodable_inputs_become_upright_rgb(data, shape):
    decoded, reason = decode(data)
    assert reason is None
    assert decoded["rgb"].dtype == np.uint8 and decoded["rgb"].shape == (*shape, 3)
    assert len(decoded["sha256"]) == 64


def test_plain_jpeg_bytes_are_kept_and_rotated_ones_are_not():
    assert decode(JPEG)[0]["image_bytes"] == JPEG
    assert decode(exif_rotated())[0]["image_bytes"] is None


def test_min_side():
    decoded, reason = decode(encode(Image.new("RGB", (10000, 1)), "PNG"), min_side=2)
    assert decoded is None and "10000x1" in reason
