"""Pack a folder of images (with optional ``NAME.txt`` captions) into HumanVerse shards.

Image-only samples (no annotations yet): the starting point the annotation job enriches, and
a quick way to turn a photo folder into shards. Unreadable images become ``failed`` rows.
"""

from __future__ import annotations

import posixpath

import fsspec

from shards import codecs
from shards.sample import Sample
from shards.writer import STATUS_FAILED, ShardWriter, write_manifest


def list_images(source: str, extensions: list[str], storage_options: dict | None = None) -> list[str]:
    fs, root = fsspec.core.url_to_fs(source, **(storage_options or {}))
    wanted = {"." + extension.lower().lstrip(".") for extension in extensions}
    paths = [path for path in fs.find(root) if posixpath.splitext(path)[1].lower() in wanted]
    return [fs.unstrip_protocol(path) for path in sorted(paths)]


def pack_folder(
    source: str,
    output: str,
    *,
    extensions: list[str],
    partition: int = 0,
    max_samples: int = 1000,
    max_bytes: int = 1 << 30,
    jpeg_quality: int = 95,
) -> dict:
    """Write every image under ``source`` into shards under ``output``; returns the manifest."""
    images = list_images(source, extensions)
    if not images:
        raise FileNotFoundError(f"no images with extensions {extensions} under {source!r}")
    with ShardWriter(
        output, partition, max_samples=max_samples, max_bytes=max_bytes, jpeg_quality=jpeg_quality
    ) as writer:
        for index, url in enumerate(images):
            key = f"{partition:06d}{index:06d}"
            with fsspec.open(url, "rb") as handle:
                data = handle.read()
            caption_url = posixpath.splitext(url)[0] + ".txt"
            fs, caption_path = fsspec.core.url_to_fs(caption_url)
            caption = fs.cat_file(caption_path).decode("utf-8").strip() if fs.exists(caption_path) else ""
            try:
                rgb = codecs.decode_image(data)
                is_jpeg = codecs.open_image(data).format == "JPEG"
            except codecs.DecodeError as exc:
                writer.reject(key, str(exc), status=STATUS_FAILED, source=url, caption=caption)
                continue
            sample = Sample(key=key, image=data if is_jpeg else rgb, caption=caption, source=url)
            if caption:
                sample.annotations["caption"] = {"annotator": "source", "version": "1", "weights": "none"}
            writer.write(sample)
    return write_manifest(output)
