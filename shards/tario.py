"""Reading shard tars safely: member names are checked before anything is trusted.

A tar from the web (or from a crashed writer) may hold members named ``../x``, ``/etc/x``,
links, or devices. Nothing here writes a member outside the target directory: such members
raise :class:`UnsafeMemberError` (or are reported by ``shards validate``).
"""

from __future__ import annotations

import os
import posixpath
import tarfile
from collections.abc import Iterable, Iterator
from typing import BinaryIO


class UnsafeMemberError(ValueError):
    """A tar member that could write outside its directory or is not a regular file."""


class NonContiguousKeyError(ValueError):
    """A sample's members are split by another sample's members."""


def check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    if not member.isfile():
        kind = "link" if member.issym() or member.islnk() else "directory" if member.isdir() else "special file"
        raise UnsafeMemberError(f"tar member {name!r} is a {kind}; shards hold regular files only")
    if name.startswith("/") or posixpath.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeMemberError(f"tar member {name!r} has an absolute path")
    if ".." in name.replace("\\", "/").split("/"):
        raise UnsafeMemberError(f"tar member {name!r} escapes its directory with '..'")


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/KEY.depth.png`` → (``dir/KEY``, ``depth.png``): the key ends at the first dot of
    the base name, as in webdataset."""
    directory, base = posixpath.split(name)
    stem, dot, extension = base.partition(".")
    if not dot or not stem:
        raise ValueError(f"tar member {name!r} has no KEY.EXT name")
    return posixpath.join(directory, stem) if directory else stem, extension


def iter_members(fileobj: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, data)`` for every member of a tar stream, checking each one first."""
    with tarfile.open(fileobj=fileobj, mode="r|*") as archive:
        for member in archive:
            check_member(member)
            handle = archive.extractfile(member)
            yield member.name, handle.read()


def group_samples(members: Iterable[tuple[str, bytes]], url: str | None = None) -> Iterator[dict]:
    """Group consecutive members by key into webdataset-style sample dicts.

    Raises :class:`NonContiguousKeyError` when a key comes back after another key started:
    reading such a tar naively (as webdataset's ``group_by_keys`` does) silently splits the
    sample in two.
    """
    seen: set[str] = set()
    current: dict | None = None
    for name, data in members:
        key, extension = split_member_name(name)
        if current is not None and key != current["__key__"]:
            yield current
            current = None
        if current is None:
            if key in seen:
                raise NonContiguousKeyError(f"members of key {key!r} are not contiguous in {url or 'the tar'}")
            seen.add(key)
            current = {"__key__": key, "__url__": url}
        if extension in current:
            raise ValueError(f"key {key!r} has two members with extension {extension!r} in {url or 'the tar'}")
        current[extension] = data
    if current is not None:
        yield current


def iter_samples(fileobj: BinaryIO, url: str | None = None) -> Iterator[dict]:
    """Samples (dicts of extension → bytes, plus ``__key__``/``__url__``) of one shard tar."""
    return group_samples(iter_members(fileobj), url)


def extract(tar_path: str | os.PathLike, target_dir: str | os.PathLike) -> list[str]:
    """Extract a shard tar into ``target_dir``; every member is checked before it is written."""
    target = os.path.realpath(target_dir)
    os.makedirs(target, exist_ok=True)
    written = []
    with open(tar_path, "rb") as handle:
        for name, data in iter_members(handle):
            path = os.path.realpath(os.path.join(target, name))
            if os.path.commonpath([path, target]) != target:
                raise UnsafeMemberError(f"tar member {name!r} resolves outside {target}")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as out:
                out.write(data)
            written.append(path)
    return written
