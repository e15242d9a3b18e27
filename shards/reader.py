"""Reading HumanVerse shards: finding complete shards, decoding samples, webdataset and Ray.

Three documented ways in, all with the full 16-bit depth::

    # plain webdataset
    wds.WebDataset(urls).decode(shards.wds_handler)
    # training (safe tar reading, consistent crop/resize/flip): shards.dataset.humanverse_dataset
    # Ray Data
    ray.data.read_webdataset(paths, decoder=shards.ray_decoder)
"""

from __future__ import annotations

import json

import fsspec
from braceexpand import braceexpand

from shards import tario
from shards.commit import RECORD_SUFFIX, join, read_records
from shards.sample import MEMBER_ORDER, POSE, decode_member


def complete_shard_urls(root: str, storage_options: dict | None = None) -> list[str]:
    """Tar URLs of the shards under ``root`` that a partition commit record names (the only
    complete ones), in partition and part order."""
    fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    records = read_records(fs, path)
    return [
        fs.unstrip_protocol(join(path, part["shard"] + ".tar"))
        for _, record in sorted(records.items())
        for part in record["parts"]
    ]


def expand_urls(urls: str | list[str], storage_options: dict | None = None) -> list[str]:
    """A dataset root (directory with stats markers), a brace pattern, or a list of tar URLs."""
    if isinstance(urls, str):
        if urls.endswith(".tar") or "{" in urls:
            return list(braceexpand(urls))
        found = complete_shard_urls(urls, storage_options)
        if not found:
            raise FileNotFoundError(f"no complete shards (no *{RECORD_SUFFIX} commit record) under {urls!r}")
        return found
    return [expanded for url in urls for expanded in expand_urls(url, storage_options)]


def decode_sample(raw: dict) -> dict:
    """Decode every known member of a raw sample dict (extension → bytes); other keys pass."""
    decoded = {}
    for name, value in raw.items():
        if name in MEMBER_ORDER and isinstance(value, bytes):
            decoded[name] = decode_member(name, value)
        else:
            decoded[name] = value
    return decoded


def read_shard(url: str, decode: bool = True, storage_options: dict | None = None):
    """Iterate the samples of one shard tar (safely: unsafe members raise)."""
    with fsspec.open(url, "rb", **(storage_options or {})) as handle:
        for raw in tario.iter_samples(handle, url=url):
            yield decode_sample(raw) if decode else raw


def ray_decoder(sample: dict) -> dict:
    """``decoder=`` for ``ray.data.read_webdataset``: decodes HumanVerse members.

    Arrays stay arrays (Ray stores them as tensor columns); the pose and metadata are kept as
    JSON strings in ``pose.json`` / ``json`` because their nesting varies per sample and Arrow
    columns need one type — parse them with ``json.loads`` (or :func:`shards.codecs.decode_pose`).
    """
    out = {}
    for name, value in sample.items():
        if name in (POSE, "json") and isinstance(value, bytes):
            json.loads(value)  # fail here, at read time, on corrupt JSON
            out[name] = value.decode("utf-8")
        elif name in MEMBER_ORDER and isinstance(value, bytes):
            out[name] = decode_member(name, value)
        else:
            out[name] = value
    return out
