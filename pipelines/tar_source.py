"""Webdataset tars as an annotation source: planned from member headers, read once per tar.

Three steps, so the driver never holds image bytes and every source sample ends as one row:

1. :func:`scan_tar` (a Ray task per tar, at planning) reads member *headers* only and returns
   the tar's sample stems in first-appearance order.
2. :func:`plan_keys` (driver) decides every sample's key before anything is fetched: a stem
   is kept iff it is a valid key and unique in the whole source, else the sample gets
   ``tTTTTTTsSSSSSSS`` (tar index, sample index). The plan depends on the source only, so a
   rerun of the same command gives the same keys.
3. :func:`read_tar_partition` (the fetch task) streams one tar once and returns exactly the
   planned number of rows; what cannot be used becomes a row with a ``problem``, never a
   missing row and never an exception.

Member names: the extension is the longest *known* suffix (``img.v2.jpg`` → ``img.v2`` +
``jpg``, ``KEY.depth.png`` → ``KEY`` + ``depth.png``), not webdataset's first dot, which
would read ``img.v2.jpg`` as extension ``v2.jpg`` and drop the image. Stems keep their
directory (``a/x``), so ``a/x.jpg`` and ``b/x.jpg`` are two samples.

Driver memory at planning: the stems of every tar pass through the driver once (the scan
results, plus a counter of about 100 bytes per distinct stem to find duplicates) — key
strings, not bytes; about 1–2 GB for 10M samples. The plans kept afterwards hold per tar
only counts and the re-key map, which is empty unless stems were invalid or duplicated.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field

import fsspec

from hyperhuman.config import ConfigError
from shards.sample import MEMBER_ORDER, check_key
from shards.tario import UnsafeMemberError, check_member

# Preference order when a sample has several images.
IMAGE_ORDER = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
KNOWN_SUFFIXES = tuple(sorted({*IMAGE_ORDER, "txt", "json", *MEMBER_ORDER}, key=len, reverse=True))
GENERATED_KEY = re.compile(r"t(\d{6,})s(\d{7,})")
# Member names are decoded the same way on every worker, so scan and read agree on stems.
NAME_ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}
BLOCK = tarfile.BLOCKSIZE


class TarSourceError(ConfigError):
    """A webdataset tar that cannot be planned; the message names the file and the fix."""


def split_member(name: str) -> tuple[str, str] | None:
    """``a/img.v2.JPG`` → ``("a/img.v2", "jpg")``; None when no known suffix ends the name.

    The extension is returned lower-case; the stem keeps its case and directory.
    """
    directory, base = posixpath.split(name)
    lower = base.lower()
    for suffix in KNOWN_SUFFIXES:  # longest first, so "depth.png" wins over "png"
        if lower.endswith("." + suffix) and len(base) > len(suffix) + 1:
            stem = base[: -len(suffix) - 1]
            return (posixpath.join(directory, stem) if directory else stem), suffix
    return None


def generated_key(tar_index: int, sample_index: int) -> str:
    return f"t{tar_index:06d}s{sample_index:07d}"


def stems_digest(stems: list[str]) -> str:
    """Fingerprint of a tar's stems, so the read can tell that a tar changed since planning."""
    joined = "\0".join(stems).encode("utf-8", "surrogateescape")  # tar names cannot hold NUL
    return hashlib.sha256(joined).hexdigest()


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _printable(text: str) -> str:
    # Undecodable name bytes are kept as surrogates; Arrow refuses those in string columns.
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# --- planning: headers only --------------------------------------------------------------


def scan_tar(url: str, storage_options: dict | None = None) -> dict:
    """Sample stems of one tar, from member headers only (member data is seeked past).

    Returns ``{"url", "bytes", "stems", "has_image", "digest", "ignored", "unsafe"}``:
    stems in first-appearance order (members of one stem need not be contiguous),
    ``has_image[i]`` whether stem i has an image member, and counts of members skipped for
    having no known suffix or for being unsafe (links, absolute paths, ``..``).
    On object stores fsspec's read-ahead cache may fetch more than the headers; the scan
    still keeps no member data. Raises :class:`TarSourceError` for a missing, truncated or
    non-tar file.
    """
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as handle:
            size = handle.seek(0, 2)
            handle.seek(0)
            return {"url": url, "bytes": size, **_scan_headers(handle, url, size)}
    except FileNotFoundError as error:
        raise TarSourceError(
            f"webdataset tar {url} does not exist ({_one_line(error)}); check the source path"
        ) from error
    except (tarfile.TarError, EOFError) as error:
        raise TarSourceError(
            f"webdataset tar {url} is truncated or not an uncompressed tar ({_one_line(error)}); "
            "re-download it or remove it from the source"
        ) from error
    except OSError as error:
        raise TarSourceError(
            f"webdataset tar {url} could not be read ({_one_line(error)}); check its permissions "
            "and source.storage_options"
        ) from error


def _scan_headers(handle, url: str, size: int) -> dict:
    has_image: dict[str, bool] = {}  # insertion order = first appearance
    skipped = {"ignored": [0, None], "unsafe": [0, None]}  # count, first name
    # "r:" (not a stream) so tarfile seeks past member data instead of reading it.
    with tarfile.open(fileobj=handle, mode="r:", **NAME_ENCODING) as archive:
        for member in archive:
            parts = _safe_split(member)
            if isinstance(parts, str):
                count_and_example = skipped[parts]
                count_and_example[0] += 1
                count_and_example[1] = count_and_example[1] or member.name
                continue
            stem, ext = parts
            has_image[stem] = has_image.get(stem, False) or ext in IMAGE_ORDER
        _check_end_marker(handle, archive.offset, size, url)
    if not has_image and (skipped["ignored"][0] or skipped["unsafe"][0]):
        _raise_no_samples(url, skipped)
    stems = list(has_image)
    return {
        "stems": stems,
        "has_image": list(has_image.values()),
        "digest": stems_digest(stems),
        "ignored": skipped["ignored"][0],
        "unsafe": skipped["unsafe"][0],
    }


def _safe_split(member: tarfile.TarInfo) -> tuple[str, str] | str:
    """``(stem, ext)``, or why the member is skipped: ``"unsafe"`` or ``"ignored"``."""
    try:
        check_member(member)
    except UnsafeMemberError:
        return "unsafe"  # links, absolute paths, '..': never read, never a sample
    return split_member(member.name) or "ignored"


def _check_end_marker(handle, offset: int, size: int, url: str) -> None:
    # tarfile ends iteration silently at a cut on a member boundary or at a damaged header;
    # only a zero block where the next header would be proves that every member was seen.
    handle.seek(offset)
    if handle.read(BLOCK) != b"\0" * BLOCK:
        raise TarSourceError(
            f"webdataset tar {url} is truncated or corrupt: no end-of-archive marker at byte {offset} "
            f"of {size}; re-download it or remove it from the source"
        )


def _raise_no_samples(url: str, skipped: dict) -> None:
    (ignored, example_ignored), (unsafe, example_unsafe) = skipped["ignored"], skipped["unsafe"]
    examples = ", ".join(repr(_printable(name)) for name in (example_ignored, example_unsafe) if name)
    raise TarSourceError(
        f"webdataset tar {url} has no samples: {ignored} members have no known extension and {unsafe} "
        f"are links or unsafe paths (e.g. {examples}); known extensions: {', '.join(sorted(KNOWN_SUFFIXES))}; "
        "convert the tar or remove it from the source"
    )


def _is_key(stem: str) -> bool:
    try:
        check_key(stem)
    except ValueError:
        return False
    return True


def plan_keys(scans: list[dict]) -> list[dict]:
    """One plan per tar, in source order: ``{"url", "tar_index", "bytes", "samples", "digest",
    "rekey"}`` where ``rekey`` maps a sample index (as a string) to its generated key.

    A sample keeps its stem iff the stem is a valid key and no other sample of the source
    has it; all others (both sides of a duplicate too, so the rule does not depend on which
    tar comes first) get :func:`generated_key`. Raises :class:`TarSourceError` if a kept
    stem equals a generated key.
    """
    counts = Counter(stem for scan in scans for stem in scan["stems"])
    plans, lookalikes = [], []
    for tar_index, scan in enumerate(scans):
        rekey = {}
        for sample_index, stem in enumerate(scan["stems"]):
            if counts[stem] > 1 or not _is_key(stem):
                rekey[str(sample_index)] = generated_key(tar_index, sample_index)
            elif GENERATED_KEY.fullmatch(stem):
                lookalikes.append((stem, tar_index))
        plans.append(
            {
                "url": scan["url"],
                "tar_index": tar_index,
                "bytes": scan["bytes"],
                "samples": len(scan["stems"]),
                "digest": scan.get("digest") or stems_digest(scan["stems"]),
                "rekey": rekey,
            }
        )
    for stem, tar_index in lookalikes:
        _check_no_collision(stem, tar_index, scans, plans)
    return plans


def _check_no_collision(stem: str, tar_index: int, scans: list[dict], plans: list[dict]) -> None:
    match = GENERATED_KEY.fullmatch(stem)
    other_tar, other_sample = int(match[1]), int(match[2])
    if generated_key(other_tar, other_sample) != stem or other_tar >= len(plans):
        return  # e.g. extra leading zeros: no generated key is spelled like this
    if str(other_sample) in plans[other_tar]["rekey"]:
        other_stem = scans[other_tar]["stems"][other_sample]
        raise TarSourceError(
            f"sample {stem!r} in webdataset tar {scans[tar_index]['url']} keeps its name as key, but "
            f"{stem!r} is also the generated key of sample {other_stem!r} in {scans[other_tar]['url']} "
            "(re-keyed because its name is not a valid key or not unique); rename one of them"
        )


# --- fetching: one streaming read per tar ------------------------------------------------


@dataclass
class _Sample:
    exts: list[str] = field(default_factory=list)
    image_rank: int = len(IMAGE_ORDER)
    image: bytes | None = None
    txt: bytes | None = None
    json: bytes | None = None


def _stream_samples(url: str, storage_options: dict | None, samples: dict[str, _Sample]) -> None:
    """Fill ``samples`` (stem → members kept, first-appearance order) from one pass over the tar;
    only the best image, the caption and the metadata of each sample are held."""
    with fsspec.open(url, "rb", **(storage_options or {})) as handle:
        with tarfile.open(fileobj=handle, mode="r|*", **NAME_ENCODING) as archive:
            for member in archive:
                parts = _safe_split(member)
                if isinstance(parts, str):
                    continue  # skipped at planning too; its data is never read
                stem, ext = parts
                sample = samples.setdefault(stem, _Sample())
                sample.exts.append(ext)
                rank = IMAGE_ORDER.index(ext) if ext in IMAGE_ORDER else len(IMAGE_ORDER)
                if rank < sample.image_rank:
                    sample.image, sample.image_rank = archive.extractfile(member).read(), rank
                elif ext in ("txt", "json") and getattr(sample, ext) is None:
                    setattr(sample, ext, archive.extractfile(member).read())


def read_tar_partition(descriptor: dict, storage_options: dict | None = None) -> list[dict]:
    """Exactly ``descriptor["samples"]`` rows for one tar, in stem first-appearance order.

    ``descriptor`` is a plan from :func:`plan_keys` plus ``kind``/``partition``. Each row is
    ``{"kind": "bytes", "source": "URL#STEM", "caption", "key", "data", "extra", "problem"}``;
    ``problem`` is None or ``(rule, reason)`` with rule ``no_image``, ``caption`` or
    ``source_read``, and a row with a problem carries no image bytes. Never raises: a tar
    that became unreadable or changed since planning gives ``source_read`` rows.
    """
    url, planned = descriptor["url"], descriptor["samples"]
    samples: dict[str, _Sample] = {}
    error = None
    try:
        _stream_samples(url, storage_options, samples)
    except Exception as caught:  # failures are data: recorded in the rows below, not hidden
        error = _one_line(caught)
    stems = list(samples)
    if error is None and len(stems) < planned:
        error = f"the tar ended after {len(stems)} of {planned} planned samples (damaged or changed since planning)"
    digest = descriptor.get("digest")
    if error is None and (len(stems) > planned or (digest and stems_digest(stems) != digest)):
        reason = f"the tar changed since planning ({len(stems)} samples now, {planned} planned); rerun the job"
        return [_failed_row(descriptor, index, stems, reason) for index in range(planned)]

    rows = []
    for index in range(planned):
        # On a failed read the last sample seen may miss members, and later ones were not reached.
        if error is not None and index >= len(stems) - 1:
            rows.append(_failed_row(descriptor, index, stems, error))
        else:
            rows.append(_sample_row(descriptor, index, stems[index], samples[stems[index]], error))
    return rows


def _key(descriptor: dict, index: int, stem: str | None) -> str:
    planned = descriptor["rekey"].get(str(index))
    if planned:
        return planned
    if stem is not None and _is_key(stem):
        return stem
    # Only reached when the tar changed since planning: never hand on an invalid key.
    return generated_key(descriptor.get("tar_index", descriptor["partition"]), index)


def _row(descriptor: dict, index: int, stem: str | None, caption="", data=None, extra="{}", problem=None) -> dict:
    name = _printable(stem) if stem is not None else f"[{index}]"
    return {
        "kind": "bytes",
        "source": f"{descriptor['url']}#{name}",
        "caption": caption,
        "key": _key(descriptor, index, stem),
        "data": data,
        "extra": extra,
        "problem": problem,
    }


def _failed_row(descriptor: dict, index: int, stems: list[str], reason: str) -> dict:
    stem = stems[index] if index < len(stems) else None
    name = repr(_printable(stem)) if stem is not None else f"sample {index}"
    return _row(
        descriptor, index, stem, problem=("source_read", f"could not read {name} from {descriptor['url']}: {reason}")
    )


def _sample_row(descriptor: dict, index: int, stem: str, sample: _Sample, read_error: str | None) -> dict:
    name, url = _printable(stem), descriptor["url"]
    extra = _extra(sample.json)
    if sample.image is None and read_error is not None:
        # Its image may lie past the point where the read failed.
        problem = ("source_read", f"could not read {name!r} from {url}: image not reached before {read_error}")
        return _row(descriptor, index, stem, extra=extra, problem=problem)
    if sample.image is None:
        members = ", ".join(sample.exts)
        problem = ("no_image", f"sample {name!r} in {url} has no image member (members: {members})")
        return _row(descriptor, index, stem, extra=extra, problem=problem)
    try:
        # utf-8-sig: strict UTF-8 that also drops a leading byte-order mark.
        caption = (sample.txt or b"").decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        problem = ("caption", f"caption of {name!r} in {url} is not UTF-8 text")
        return _row(descriptor, index, stem, extra=extra, problem=problem)
    return _row(descriptor, index, stem, caption=caption, data=sample.image, extra=extra)


def _extra(raw: bytes | None) -> str:
    """The sample's ``.json`` member re-serialised, when it is a JSON object; else ``"{}"``."""
    if raw is None:
        return "{}"
    try:
        value = json.loads(raw)
    except ValueError:  # also covers undecodable bytes
        return "{}"
    return json.dumps(value, sort_keys=True) if isinstance(value, dict) else "{}"
