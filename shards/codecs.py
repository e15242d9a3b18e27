"""Encoders and decoders for every member of a HumanVerse sample.

Conventions (stable; readers depend on them):

- Image (``.jpg``): RGB uint8, JPEG. Decoding refuses images above ``MAX_IMAGE_PIXELS``
  (decompression bombs) before any pixel is decoded.
- Depth (``.depth.png``): float depth quantised to a 16-bit grayscale PNG over ``[min, max]``:
  ``q = round((d - min) / (max - min) * 65535)``; round-trip error ≤ 0.5/65535 of the range.
  ``kind`` (e.g. ``relative_inverse``, ``metric_m``), ``min`` and ``max`` are written both into
  the sample's ``.json`` (``annotations.depth``) and into a ``hyperhuman`` text chunk of the PNG,
  so the PNG alone decodes back to the same floats.
- Normal (``.normal.png``): unit normals in camera space, **x right, y up, z toward the
  viewer** (OpenGL convention: a surface facing the camera is (0, 0, 1), light blue).
  ``rgb = round((n + 1) / 2 * 255)``. Decoding returns renormalised float32 ``(H, W, 3)``.
  A horizontal flip of the image negates x.
- Mask (``.mask.png``): 8-bit grayscale, 0 = background, 255 = person (values in between are
  soft masks). Boolean masks are stored as 0/255.
- Pose (``.pose.json``): ``{"width", "height", "people": [{"bbox": [x0, y0, x1, y1],
  "score", "keypoints": 17×[x, y, s], "wholebody": 133×[x, y, s] (optional)}]}`` in pixels of
  the stored image (see :mod:`shards.keypoints`).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, PngImagePlugin

from shards.keypoints import NUM_COCO17, NUM_WHOLEBODY, as_keypoints

MAX_IMAGE_PIXELS = 64 * 1024 * 1024
"""Largest image (width × height) any decoder here accepts; larger ones are refused."""

DEPTH_LEVELS = 65535
DEPTH_PNG_TEXT_KEY = "hyperhuman"


class DecodeError(ValueError):
    """A member's bytes do not decode to what its extension promises."""


class ImageTooLargeError(DecodeError):
    """An image declares more pixels than ``MAX_IMAGE_PIXELS`` (possible decompression bomb)."""


# ---------------------------------------------------------------------------------------------
# PIL helpers


def open_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image lazily and refuse it before decoding if it declares too many pixels."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"refusing to decode: {exc}") from exc
    except Exception as exc:  # PIL raises several unrelated types for corrupt data
        raise DecodeError(f"not a readable image ({type(exc).__name__}: {exc})") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image declares {width}x{height} = {width * height} pixels, more than the limit of "
            f"{max_pixels} (shards.codecs.MAX_IMAGE_PIXELS): refusing to decode it"
        )
    return image


def _load(image: Image.Image) -> Image.Image:
    try:
        image.load()
    except Exception as exc:
        raise DecodeError(f"image data is corrupt or truncated ({type(exc).__name__}: {exc})") from exc
    return image


def _png_bytes(image: Image.Image, pnginfo=None) -> bytes:
    buffer = io.BytesIO()
    # compress_level 1: masks/normals/depth compress well even at the fastest level, and
    # writing is on the annotation job's hot path.
    image.save(buffer, format="PNG", compress_level=1, pnginfo=pnginfo)
    return buffer.getvalue()


def image_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` of an encoded image, read from its header only."""
    return open_image(data).size


# ---------------------------------------------------------------------------------------------
# RGB image


def encode_image(rgb: np.ndarray, quality: int = 95) -> bytes:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"image must be an RGB uint8 (H, W, 3) array, got {rgb.dtype} {rgb.shape}")
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Any PIL-readable image → RGB uint8 ``(H, W, 3)``; grayscale, palette, RGBA and 16-bit
    inputs are converted (alpha is dropped)."""
    image = _load(open_image(data, max_pixels))
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: scale to 8 bits instead of letting PIL clip.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max() > 255 else 255.0
        gray = np.clip(np.round(array / top * 255), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


# ---------------------------------------------------------------------------------------------
# Depth


@dataclass(frozen=True)
class DepthEncoding:
    """How a depth PNG maps back to floats; recorded in the sample metadata."""

    kind: str
    min: float
    max: float

    def to_json(self) -> dict:
        return {"kind": self.kind, "min": self.min, "max": self.max, "levels": DEPTH_LEVELS}


def encode_depth(depth: np.ndarray, kind: str) -> tuple[bytes, DepthEncoding]:
    """Float depth ``(H, W)`` → 16-bit PNG bytes and the encoding needed to decode it."""
    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim != 2:
        raise ValueError(f"depth must be a 2-D (H, W) array, got shape {depth.shape}")
    if not np.isfinite(depth).all():
        raise ValueError("depth contains NaN or inf; fill invalid pixels before encoding")
    if not kind or not isinstance(kind, str):
        raise ValueError(f"depth kind must be a non-empty string such as 'metric_m', got {kind!r}")
    low, high = float(depth.min()), float(depth.max())
    span = high - low
    quantised = (
        np.zeros(depth.shape, np.uint16)
        if span == 0
        else np.round((depth - low) / span * DEPTH_LEVELS).astype(np.uint16)
    )
    encoding = DepthEncoding(kind=kind, min=low, max=high)
    info = PngImagePlugin.PngInfo()
    info.add_text(DEPTH_PNG_TEXT_KEY, json.dumps(encoding.to_json()))
    return _png_bytes(Image.fromarray(quantised), info), encoding


def decode_depth_levels(data: bytes) -> tuple[np.ndarray, DepthEncoding | None]:
    """16-bit PNG → raw uint16 levels and the encoding from its text chunk (None if absent)."""
    image = _load(open_image(data))
    if image.mode not in ("I;16", "I;16B", "I;16L", "I"):
        raise DecodeError(f"depth PNG must be 16-bit grayscale, got PIL mode {image.mode!r}")
    levels = np.asarray(image).astype(np.uint16)
    text = image.info.get(DEPTH_PNG_TEXT_KEY)
    if text is None:
        return levels, None
    fields = json.loads(text)
    return levels, DepthEncoding(kind=fields["kind"], min=float(fields["min"]), max=float(fields["max"]))


def decode_depth(data: bytes, encoding: DepthEncoding | dict | None = None) -> np.ndarray:
    """16-bit PNG → float32 depth in the units of its ``kind``.

    ``encoding`` (from the sample's ``annotations.depth``) overrides the PNG's own text chunk.
    """
    levels, embedded = decode_depth_levels(data)
    if isinstance(encoding, dict):
        encoding = DepthEncoding(kind=encoding["kind"], min=float(encoding["min"]), max=float(encoding["max"]))
    encoding = encoding or embedded
    if encoding is None:
        raise DecodeError("depth PNG has no 'hyperhuman' text chunk and no encoding was given")
    span = encoding.max - encoding.min
    return (levels.astype(np.float64) / DEPTH_LEVELS * span + encoding.min).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Surface normals


def encode_normal(normal: np.ndarray) -> bytes:
    """Unit normals ``(H, W, 3)`` (x right, y up, z toward the viewer) → 8-bit RGB PNG."""
    normal = np.asarray(normal, dtype=np.float32)
    if normal.ndim != 3 or normal.shape[2] != 3:
        raise ValueError(f"normals must be an (H, W, 3) array, got shape {normal.shape}")
    if not np.isfinite(normal).all():
        raise ValueError("normals contain NaN or inf")
    rgb = np.clip(np.round((normal + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return _png_bytes(Image.fromarray(rgb))


def decode_normal(data: bytes) -> np.ndarray:
    image = _load(open_image(data))
    if image.mode != "RGB":
        raise DecodeError(f"normal PNG must be 8-bit RGB, got PIL mode {image.mode!r}")
    normal = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    x, y, z = normal[..., 0], normal[..., 1], normal[..., 2]
    norm = np.sqrt(x * x + y * y + z * z)[..., None]  # 8x faster than np.linalg.norm here
    return normal / np.maximum(norm, 1e-6)


# ---------------------------------------------------------------------------------------------
# Person mask


def encode_mask(mask: np.ndarray) -> bytes:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be a 2-D (H, W) array, got shape {mask.shape}")
    if mask.dtype == bool:
        mask = mask.astype(np.uint8) * 255
    elif mask.dtype != np.uint8:
        raise ValueError(f"mask must be bool or uint8 (0 background, 255 person), got {mask.dtype}")
    return _png_bytes(Image.fromarray(mask))


def decode_mask(data: bytes) -> np.ndarray:
    image = _load(open_image(data))
    if image.mode != "L":
        raise DecodeError(f"mask PNG must be 8-bit grayscale, got PIL mode {image.mode!r}")
    return np.asarray(image)


# ---------------------------------------------------------------------------------------------
# Pose


def _finite_list(values, what: str) -> list[float]:
    values = [float(v) for v in values]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what} contains NaN or inf: {values}")
    return values


def normalize_pose(pose: dict) -> dict:
    """Check a pose annotation and return it in the stored JSON layout (plain lists)."""
    for field_name in ("width", "height", "people"):
        if field_name not in pose:
            raise ValueError(f"pose annotation is missing {field_name!r}; see shards.codecs for the layout")
    people = []
    for index, person in enumerate(pose["people"]):
        bbox = _finite_list(person["bbox"], f"people[{index}].bbox")
        if len(bbox) != 4:
            raise ValueError(f"people[{index}].bbox must be [x0, y0, x1, y1], got {bbox}")
        score = float(person.get("score", 1.0))
        if not math.isfinite(score):
            raise ValueError(f"people[{index}].score must be a finite number, got {score}")
        entry = {
            "bbox": bbox,
            "score": score,
            "keypoints": as_keypoints(person["keypoints"], NUM_COCO17).tolist(),
        }
        if person.get("wholebody") is not None:
            entry["wholebody"] = as_keypoints(person["wholebody"], NUM_WHOLEBODY).tolist()
        people.append(entry)
    return {"width": int(pose["width"]), "height": int(pose["height"]), "people": people}


def encode_pose(pose: dict) -> bytes:
    return json.dumps(normalize_pose(pose), separators=(",", ":")).encode()


def decode_pose(data: bytes) -> dict:
    """Pose JSON → dict with keypoints as float32 ``(K, 3)`` arrays."""
    try:
        pose = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DecodeError(f"pose member is not valid JSON: {exc}") from exc
    try:
        pose = normalize_pose(pose)
    except (KeyError, TypeError, ValueError) as exc:
        raise DecodeError(f"pose JSON does not follow the schema: {exc}") from exc
    for person in pose["people"]:
        person["keypoints"] = np.asarray(person["keypoints"], dtype=np.float32)
        if "wholebody" in person:
            person["wholebody"] = np.asarray(person["wholebody"], dtype=np.float32)
    return pose
