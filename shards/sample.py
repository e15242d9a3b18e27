"""The HumanVerse sample: what one image and its annotations become inside a shard.

Members of one sample share a key and are written contiguously, in this order::

    KEY.jpg        RGB image (the pixels every annotation refers to)
    KEY.txt        caption (UTF-8)
    KEY.json       metadata: source, size, sha256, person boxes, filter scores, and for every
                   annotation its annotator name, version and weights id
    KEY.pose.json  per-person bbox, score, COCO-17 (+ optional WholeBody-133) keypoints
    KEY.depth.png  16-bit depth          KEY.normal.png  8-bit RGB normals
    KEY.mask.png   8-bit person mask

See :mod:`shards.codecs` for each member's encoding.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field

import numpy as np

from shards import codecs

FORMAT_VERSION = "humanverse/1"
IMAGE, CAPTION, META = "jpg", "txt", "json"
POSE, DEPTH, NORMAL, MASK = "pose.json", "depth.png", "normal.png", "mask.png"
MEMBER_ORDER = (IMAGE, CAPTION, META, POSE, DEPTH, NORMAL, MASK)
REQUIRED_MEMBERS = (IMAGE, CAPTION, META)
ANNOTATION_MEMBERS = {"pose": POSE, "depth": DEPTH, "normal": NORMAL, "mask": MASK}
PROVENANCE_FIELDS = ("annotator", "version", "weights")
NORMAL_CONVENTION = "camera: x right, y up, z toward viewer; rgb = (n + 1) / 2 * 255"

_KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]+")


def check_key(key: str) -> str:
    """Keys name tar members, so dots (the extension separator) and path parts are refused."""
    if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
        raise ValueError(
            f"invalid sample key {key!r}: keys may contain only letters, digits, '_' and '-' "
            "(no dots, which start the member extension, and no path separators); "
            "derive keys from e.g. the partition id and row index, or a hash of the source"
        )
    return key


@dataclass
class Sample:
    """One kept sample, before encoding.

    ``image`` is an RGB uint8 array or already-encoded JPEG bytes (stored as-is, so a JPEG
    source is never re-compressed). ``annotations`` maps each modality present (``pose``,
    ``depth``, ``normal``, ``mask``, optionally ``caption``) to its provenance:
    ``{"annotator": ..., "version": ..., "weights": ...}``; depth also needs ``kind``.
    """

    key: str
    image: np.ndarray | bytes
    caption: str = ""
    source: str = ""
    pose: dict | None = None
    depth: np.ndarray | None = None
    normal: np.ndarray | None = None
    mask: np.ndarray | None = None
    annotations: dict[str, dict] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def _provenance(sample: Sample, modality: str) -> dict:
    entry = sample.annotations.get(modality)
    missing = [name for name in PROVENANCE_FIELDS if not entry or name not in entry]
    if missing:
        raise ValueError(
            f"sample {sample.key!r} has a {modality} annotation but annotations[{modality!r}] lacks "
            f"{missing}; every annotation records its annotator, version and weights id"
        )
    return dict(entry)


def encode_sample(sample: Sample, jpeg_quality: int = 95) -> dict[str, bytes]:
    """Encode a sample into its members, in ``MEMBER_ORDER``."""
    check_key(sample.key)
    if isinstance(sample.image, (bytes, bytearray)):
        image_bytes = bytes(sample.image)
        if codecs.open_image(image_bytes).format != "JPEG":
            raise ValueError(f"sample {sample.key!r}: encoded image bytes must be JPEG; pass an RGB array instead")
        width, height = codecs.image_size(image_bytes)
    else:
        image_bytes = codecs.encode_image(sample.image, quality=jpeg_quality)
        height, width = np.asarray(sample.image).shape[:2]

    members: dict[str, bytes] = {}
    annotations: dict[str, dict] = {}
    if "caption" in sample.annotations:
        annotations["caption"] = dict(sample.annotations["caption"])
    if sample.pose is not None:
        annotations["pose"] = _provenance(sample, "pose")
        members[POSE] = codecs.encode_pose(sample.pose)
    if sample.depth is not None:
        provenance = _provenance(sample, "depth")
        if "kind" not in provenance:
            raise ValueError(f"sample {sample.key!r}: annotations['depth'] needs a 'kind' (e.g. 'relative_inverse')")
        members[DEPTH], encoding = codecs.encode_depth(sample.depth, provenance["kind"])
        annotations["depth"] = {**provenance, **encoding.to_json()}
    if sample.normal is not None:
        annotations["normal"] = {**_provenance(sample, "normal"), "convention": NORMAL_CONVENTION}
        members[NORMAL] = codecs.encode_normal(sample.normal)
    if sample.mask is not None:
        annotations["mask"] = _provenance(sample, "mask")
        members[MASK] = codecs.encode_mask(sample.mask)

    meta = {
        **sample.meta,
        "key": sample.key,
        "format": FORMAT_VERSION,
        "source": sample.source,
        "width": int(width),
        "height": int(height),
        "sha256": hashlib.sha256(image_bytes).hexdigest(),
        "annotations": annotations,
    }
    encoded = {
        IMAGE: image_bytes,
        CAPTION: sample.caption.encode("utf-8"),
        META: json.dumps(_finite(meta), sort_keys=True, separators=(",", ":"), allow_nan=False).encode(),
        **members,
    }
    return {ext: encoded[ext] for ext in MEMBER_ORDER if ext in encoded}


def decode_member(extension: str, data: bytes):
    """Decode one member by its extension; None for extensions this format does not define."""
    if extension == IMAGE:
        return codecs.decode_image(data)
    if extension == CAPTION:
        return data.decode("utf-8")
    if extension == META:
        return json.loads(data)
    if extension == POSE:
        return codecs.decode_pose(data)
    if extension == DEPTH:
        return codecs.decode_depth(data)
    if extension == NORMAL:
        return codecs.decode_normal(data)
    if extension == MASK:
        return codecs.decode_mask(data)
    return None


def wds_handler(key: str, data: bytes):
    """A ``webdataset`` decoder handler for HumanVerse members::

        wds.WebDataset(urls).decode(shards.wds_handler)

    yields samples whose ``jpg`` is RGB uint8, ``depth.png`` float32 depth (full 16-bit
    precision, not webdataset's 8-bit PNG default), ``normal.png`` float32 unit normals,
    ``mask.png`` uint8, ``pose.json`` a dict with keypoint arrays. Other extensions are left
    to the next handler.
    """
    # webdataset calls handlers with "." + the field name, e.g. ".depth.png".
    extension = key.lower().removeprefix(".")
    return decode_member(extension, data) if extension in MEMBER_ORDER else None


def _finite(value):
    """``value`` with NaN and infinities as null: members must parse with :func:`strict_json`."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (Python writes it for a non-finite float unless allow_nan=False)")


def strict_json(data: bytes | str):
    """``json.loads`` that refuses NaN, Infinity and -Infinity, which Python accepts by default
    but other JSON parsers (and the JSON standard) do not."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    return json.loads(text, parse_constant=_refuse_constant)
