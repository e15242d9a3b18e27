"""Getting an input's bytes and turning them into a checked RGB image. Failures are data:
every function returns ``(value, None)`` or ``(None, reason)``, never raises for bad input.
"""

from __future__ import annotations

import hashlib
import io
import time
from urllib.parse import urlparse

import fsspec
import numpy as np
from PIL import Image, ImageOps

from shards import codecs

DEFAULT_FETCH = {"timeout_s": 10.0, "retries": 2, "backoff_s": 0.5, "max_bytes": 32 << 20}
TRANSIENT = "transient: "  # reasons that --retry-failed retries start with this


def download(url: str, options: dict) -> tuple[bytes | None, str | None]:
    """HTTP(S) GET with a timeout, bounded retries with backoff (for transient errors only) and
    a size cap. Other URL schemes are refused."""
    import requests

    scheme = urlparse(url).scheme.lower()
    if scheme not in ("http", "https"):
        return None, f"unsupported URL scheme {scheme or '(none)'!r}: only http and https are fetched"
    options = {**DEFAULT_FETCH, **options}
    reason = None
    for attempt in range(options["retries"] + 1):
        if attempt:
            time.sleep(options["backoff_s"] * 2 ** (attempt - 1))
        try:
            with requests.get(url, timeout=options["timeout_s"], stream=True) as response:
                if response.status_code >= 500 or response.status_code == 429:
                    reason = f"{TRANSIENT}HTTP {response.status_code}"
                    continue
                if response.status_code >= 400:
                    return None, f"HTTP {response.status_code}"
                chunks, size, started = [], 0, time.monotonic()
                for chunk in response.iter_content(65536):
                    size += len(chunk)
                    if size > options["max_bytes"]:
                        return None, f"body larger than max_bytes={options['max_bytes']}"
                    if time.monotonic() - started > options["timeout_s"]:
                        raise requests.Timeout(f"body took longer than {options['timeout_s']} s")
                    chunks.append(chunk)
                return b"".join(chunks), None
        except requests.TooManyRedirects:
            return None, "too many redirects"
        except (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            reason = f"{TRANSIENT}{type(exc).__name__}: {str(exc)[:200]}"
        except requests.RequestException as exc:
            return None, f"{type(exc).__name__}: {str(exc)[:200]}"
    return None, reason


def read_bytes(row: dict, fetch_options: dict, storage_options: dict | None = None) -> tuple[bytes | None, str | None]:
    """The row's image bytes; ``storage_options`` are the source's fsspec options (folder images)."""
    if row["kind"] == "bytes":
        return row["data"], None
    if row["kind"] == "url":
        return download(row["source"], fetch_options)
    try:
        with fsspec.open(row["source"], "rb", **(storage_options or {})) as handle:
            return handle.read(), None
    except OSError as exc:
        return None, f"cannot read {row['source']}: {exc}"


def decode(data: bytes, min_side: int = 1) -> tuple[dict | None, str | None]:
    """Bytes → ``{"rgb", "image_bytes", "sha256", "source_size"}`` with the EXIF orientation
    applied; the JPEG bytes are kept as they are when nothing had to change."""
    if not data:
        return None, "empty body"
    try:
        image = codecs.open_image(data)
        source_format = image.format
        image.load()
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)  # animated: the first frame
        upright = ImageOps.exif_transpose(image)
    except codecs.DecodeError as exc:
        return None, str(exc)
    except Exception as exc:  # PIL's many error types for corrupt data
        return None, f"image data is corrupt or truncated ({type(exc).__name__}: {exc})"
    if upright.mode.startswith("I") or upright.mode == "F":
        rgb = codecs.decode_image(_png(upright.convert("I;16") if upright.mode == "F" else upright))  # scales 16-bit
    else:
        rgb = np.asarray(upright.convert("RGB"))
    height, width = rgb.shape[:2]
    if min(width, height) < min_side:
        return None, f"image is {width}x{height}, smaller than {min_side} px on a side"
    rotated = image.getexif().get(0x0112, 1) not in (1, None)  # EXIF orientation
    unchanged = source_format == "JPEG" and not rotated and image.mode == "RGB"
    return {
        "rgb": rgb,
        "image_bytes": data if unchanged else None,
        "sha256": hashlib.sha256(data).hexdigest(),
        "source_size": [width, height],
    }, None


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
