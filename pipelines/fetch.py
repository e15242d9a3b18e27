"""Getting an input's bytes and turning them into a checked RGB image. Failures are data:
every function returns ``(value, None)`` or ``(None, reason)`` and never raises, whatever the
input value (a malformed URL, a hostile server, bytes that are no image).

A partition's inputs are read up to ``fetch.concurrency`` at a time by a thread pool
(:func:`read_many`; the threads wait on sockets, not on the GIL), each with its own timeout and
retries, so one hanging URL costs one slot, not the partition its timeout × attempts.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import io
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from urllib.parse import urljoin, urlsplit

import fsspec
import numpy as np
from PIL import Image, ImageOps

from hyperhuman.config import ConfigError
from shards import codecs

DEFAULT_FETCH = {"timeout_s": 10.0, "retries": 2, "backoff_s": 0.5, "max_bytes": 32 << 20, "concurrency": 16}
TRANSIENT = "transient: "  # reasons that --retry-failed retries start with this
MAX_REDIRECTS = 30  # requests' own limit


def check_fetch(options: dict | None) -> dict:
    """The ``fetch`` section with its defaults, checked at start; each error names the key."""
    options = options or {}
    unknown = set(options) - set(DEFAULT_FETCH)
    if unknown:
        raise ConfigError(
            f"unknown fetch keys {sorted(unknown)}; known: {sorted(DEFAULT_FETCH)} (see configs/annotate/offline.yaml)"
        )
    options = {**DEFAULT_FETCH, **options}
    for key, least in (("concurrency", 1), ("max_bytes", 1), ("retries", 0)):
        value = options[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            kind = "a positive integer" if least else "an integer ≥ 0"
            raise ConfigError(f"fetch.{key} must be {kind}, got {value!r}")
    for key, positive in (("timeout_s", True), ("backoff_s", False)):
        value = options[key]
        number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not number or value < 0 or (positive and value == 0):
            raise ConfigError(f"fetch.{key} must be a number {'> 0' if positive else '≥ 0'} (seconds), got {value!r}")
    return options


def check_url(url) -> str | None:
    """Why ``url`` cannot be fetched (not a string, malformed, not http/https), or None."""
    if not isinstance(url, str):
        return f"URL is {type(url).__name__}, not a string"
    if not url.strip():
        return "URL is empty"
    if any(ord(char) < 0x20 or char == "\x7f" for char in url):
        return f"malformed URL {_clip(url)}: it contains control characters"
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            return f"unsupported URL scheme {scheme or '(none)'!r}: only http and https are fetched"
        port = parts.port  # ValueError when out of range or not a number
        host = parts.hostname
    except ValueError as exc:
        return f"malformed URL {_clip(url)}: {exc}"
    if not host:
        return f"malformed URL {_clip(url)}: no host"
    if port == 0:
        return f"malformed URL {_clip(url)}: port 0"
    return None


def download(url: str, options: dict, session=None) -> tuple[bytes | None, str | None]:
    """HTTP(S) GET with a timeout, bounded retries with backoff (for transient errors only) and
    a size cap. Other URL schemes are refused, and so are redirects to them. ``session``: a
    session from :func:`new_session` to reuse connections with (one thread's own); a new one by
    default."""
    if (refused := check_url(url)) is not None:
        return None, refused
    options = {**DEFAULT_FETCH, **options}
    try:
        own = session is None
        if own:
            session = new_session()
        try:
            reason = None
            for attempt in range(options["retries"] + 1):
                if attempt:
                    time.sleep(options["backoff_s"] * 2 ** (attempt - 1))
                data, reason = _attempt(session, url, options)
                if reason is None or not reason.startswith(TRANSIENT):
                    return data, reason
            return None, reason
        finally:
            if own:
                session.close()
    except MemoryError:
        return None, f"{TRANSIENT}out of memory while downloading (MemoryError): a resource error, not bad data"
    except Exception as exc:  # the last line of "failures are data": a type requests does not wrap
        return None, f"unexpected error while fetching ({_describe(exc)})"


def new_session():
    """A ``requests.Session`` for :func:`download`. It never reads a redirect's body (requests'
    own ``Session`` reads it all, unbounded, even with ``allow_redirects=False``): ``download``
    follows redirects itself."""
    return _session_class()()


@functools.cache
def _session_class():
    import requests

    class Session(requests.Session):
        def resolve_redirects(self, *args, **kwargs):
            return iter(())

    return Session


def _attempt(session, url: str, options: dict) -> tuple[bytes | None, str | None]:
    """One try, following redirects here (each target is checked like the URL itself, and a
    redirect's body is never read)."""
    import requests
    import urllib3
    from requests import exceptions as errors

    session.cookies.clear()  # every URL starts like a fresh requests.get: no state across URLs
    try:
        for _ in range(MAX_REDIRECTS + 1):
            with session.get(url, timeout=options["timeout_s"], stream=True, allow_redirects=False) as response:
                location = session.get_redirect_target(response)
                if location is None:
                    return _read_body(response, options)
                try:
                    target = urljoin(response.url, location)
                except ValueError as exc:
                    return None, f"redirect to a malformed URL {_clip(location)}: {exc}"
                if (refused := check_url(target)) is not None:
                    return None, f"redirect to {_clip(target)} refused: {refused}"
                url = target
        return None, "too many redirects"
    except (requests.Timeout, requests.ConnectionError, errors.ChunkedEncodingError) as exc:
        return None, f"{TRANSIENT}{_describe(exc)}"
    except (errors.InvalidURL, errors.InvalidSchema, errors.MissingSchema) as exc:
        return None, f"malformed URL ({_describe(exc)})"
    except requests.RequestException as exc:
        return None, _describe(exc)
    except (ValueError, http.client.HTTPException, urllib3.exceptions.HTTPError) as exc:  # unwrapped by requests
        return None, f"malformed URL or response ({_describe(exc)})"
    except OSError as exc:  # a socket error requests did not wrap
        return None, f"{TRANSIENT}{_describe(exc)}"


def _read_body(response, options: dict) -> tuple[bytes | None, str | None]:
    status = response.status_code
    if status >= 500 or status == 429:
        return None, f"{TRANSIENT}HTTP {status}"
    if status >= 400:
        return None, f"HTTP {status}"
    if status >= 300:
        return None, f"HTTP {status} without a redirect target"
    too_big = f"body larger than max_bytes={options['max_bytes']}"
    length = response.headers.get("Content-Length", "")
    if length.isascii() and length.isdigit() and (len(length) > 18 or int(length) > options["max_bytes"]):
        return None, too_big  # refused before reading any of it
    chunks, size, started = [], 0, time.monotonic()
    for chunk in response.iter_content(65536):
        size += len(chunk)
        if size > options["max_bytes"]:
            return None, too_big
        if time.monotonic() - started > options["timeout_s"]:
            return None, f"{TRANSIENT}Timeout: body took longer than {options['timeout_s']} s"
        chunks.append(chunk)
    return b"".join(chunks), None


def read_bytes(
    row: dict, fetch_options: dict, storage_options: dict | None = None, session=None
) -> tuple[bytes | None, str | None]:
    """The row's image bytes; ``storage_options`` are the source's fsspec options (folder images),
    ``session`` is passed on to :func:`download`."""
    kind = _kind(row)
    if kind == "bytes":
        return row.get("data"), None
    if kind == "url":
        return download(row.get("source"), fetch_options, session)
    if kind == "file":
        return _read_file(row.get("source"), storage_options)
    return None, f"unknown input kind {kind!r} (expected url, file or bytes)"


def _read_file(source, storage_options: dict | None) -> tuple[bytes | None, str | None]:
    if not isinstance(source, str) or not source:
        return None, f"file path is {type(source).__name__} {_clip(source)}, not a path"
    try:
        with fsspec.open(source, "rb", **(storage_options or {})) as handle:
            return handle.read(), None
    except MemoryError:
        return None, f"{TRANSIENT}out of memory reading {_clip(source)} (MemoryError): a resource error, not bad data"
    except OSError as exc:
        return None, f"cannot read {source}: {exc}"
    except Exception as exc:  # fsspec backends raise their own types (unknown protocol, credentials)
        return None, f"cannot read {source}: {_describe(exc)}"


def read_many(rows: list[dict], fetch_options: dict, storage_options: dict | None = None):
    """Yield ``(index, data, reason)`` for every row, as :func:`read_bytes` would return it,
    in the order the reads finish: up to ``fetch_options["concurrency"]`` at once, each thread
    with its own session. The pool and the sessions are closed before it returns
    (or when the consumer stops early)."""
    options = {**DEFAULT_FETCH, **fetch_options}
    workers = min(options["concurrency"], sum(1 for row in rows if _kind(row) in ("url", "file")))
    sessions = _ThreadSessions()
    try:
        if workers <= 1:  # nothing to wait on in parallel: read in this thread, in order
            for index, row in enumerate(rows):
                yield index, *_read_row(row, options, storage_options, sessions)
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="hyperhuman-fetch") as pool:
            futures = {}
            try:
                for index, row in enumerate(rows):
                    futures[pool.submit(_read_row, row, options, storage_options, sessions)] = index
                for future in as_completed(futures):
                    yield futures[future], *future.result()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # early stop: drop what has not started
    finally:
        sessions.close()


def _read_row(row: dict, options: dict, storage_options: dict | None, sessions: _ThreadSessions):
    return read_bytes(row, options, storage_options, sessions.get() if _kind(row) == "url" else None)


def _kind(row) -> str | None:
    return row.get("kind") if isinstance(row, dict) else None


class _ThreadSessions:
    """One session (:func:`new_session`) per thread (a requests Session is not thread-safe),
    made on first use and all closed together."""

    def __init__(self):
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sessions = []

    def get(self):
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = new_session()
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()


def decode(data: bytes, min_side: int = 1) -> tuple[dict | None, str | None]:
    """Bytes → ``{"rgb", "image_bytes", "sha256", "source_size"}`` with the EXIF orientation
    applied; the JPEG bytes are kept as they are when nothing had to change. Running out of
    memory is reported as a (transient) resource error, never as corrupt data."""
    if data is None or (isinstance(data, bytes | bytearray | memoryview) and not len(data)):
        return None, "empty body"
    if not isinstance(data, bytes | bytearray | memoryview):
        return None, f"image data is {type(data).__name__}, not bytes"
    data = bytes(data)
    try:
        try:
            image = codecs.open_image(data)
            source_format = image.format
            image.load()
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # animated: the first frame
            upright = ImageOps.exif_transpose(image)
            rotated = image.getexif().get(0x0112, 1) not in (1, None)  # EXIF orientation
        except codecs.DecodeError as exc:
            if isinstance(exc.__cause__, MemoryError):
                raise exc.__cause__ from None
            return None, str(exc)
        except MemoryError:
            raise
        except Exception as exc:  # PIL's many error types for corrupt data
            return None, f"image data is corrupt or truncated ({type(exc).__name__}: {exc})"
        try:
            if upright.mode.startswith("I") or upright.mode == "F":
                rgb = codecs.decode_image(_png(upright.convert("I;16") if upright.mode == "F" else upright))  # 16-bit
            else:
                rgb = np.asarray(upright.convert("RGB"))
        except MemoryError:
            raise
        except Exception as exc:
            return None, f"cannot convert the {upright.mode} image to RGB ({type(exc).__name__}: {exc})"
    except MemoryError:
        return None, f"{TRANSIENT}out of memory while decoding (MemoryError): a resource error, not bad data"
    height, width = rgb.shape[:2]
    if min(width, height) < min_side:
        return None, f"image is {width}x{height}, smaller than {min_side} px on a side"
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


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _clip(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
