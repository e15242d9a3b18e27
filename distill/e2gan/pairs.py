"""``hyperhuman distill edit-pairs``: shard photos → (input, edited) pairs per concept, as shards.

Each source photo is centre-cropped to a square and resized to ``resolution``; the teacher editor of
each concept (:mod:`distill.e2gan.teachers`) edits it. A pair is one HumanVerse sample whose ``jpg``
is the input and the edit side by side (``resolution`` × ``2·resolution``, left input, right edited:
pix2pix's "aligned" layout, so every shard reader and ``shards validate`` take it as it is), whose
``txt`` is the concept's prompt (what the GAN is conditioned on) and whose ``json`` holds, under
``edit``, the concept, the layout and the teacher's name, version and settings. The JPEG is written
here, 4:4:4 (no chroma subsampling: its upsampling on decode would smear one half's colour into the
other's edge column), at a resolution that is a multiple of 8, so no 8×8 block straddles the halves.

Output: ``OUTPUT/train/`` and ``OUTPUT/heldout/``, each a dataset with a manifest; concept ``i`` (in
config order) is partition ``i``, so names are deterministic. The last ``heldout_images`` photos are
held out for every concept (the same photos, never trained on). A partition already committed with
the same settings is kept, so a rerun (or one with a concept added) only edits what is new; the
partitions of concepts past the config's last are removed.
``OUTPUT/edit_pairs.json`` reports counts and the teachers.
"""

from __future__ import annotations

import json
import posixpath
import time
import zlib
from pathlib import Path

import numpy as np

from hyperhuman.config import ConfigError, check_known_keys, json_digest

REFERENCE = "configs/distill/edit-pairs-tiny.yaml"
KNOWN_KEYS = {
    "source": None,
    "output": None,
    "seed": None,
    "resolution": None,
    "max_images": None,
    "heldout_images": None,
    "teacher": dict.fromkeys(
        [
            "kind",
            "path",
            "num_inference_steps",
            "guidance_scale",
            "image_guidance_scale",
            "strength",
            "batch_size",
            "device",
            "dtype",
        ]  # fmt: skip
    ),
    "concepts": None,  # name → {prompt, stand_in}: checked below (names are the user's)
    "writer": dict.fromkeys(["max_samples", "jpeg_quality"]),
}
CONCEPT_KEYS = ("prompt", "stand_in")
LAYOUT = "side-by-side: left input, right edited"
SPLITS = ("train", "heldout")


# --- configuration ---------------------------------------------------------------------------------
def check_config(config: dict, check_paths: bool = True) -> None:
    """Everything that would fail after the first edits fails here, naming the key to fix."""
    from distill.e2gan.teachers import DTYPES, STAND_INS, TEACHER_KINDS, check_teacher_path

    for section in ("source", "output", "resolution", "concepts"):
        if config.get(section) is None:
            raise ConfigError(f"edit-pairs config lacks {section!r} (e.g. --set {section}=...); see {REFERENCE}")
    check_known_keys(config, KNOWN_KEYS, REFERENCE)
    resolution = config["resolution"]
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8 or resolution % 8:
        raise ConfigError(f"resolution must be a positive multiple of 8 (JPEG's 8×8 blocks), got {resolution!r}")
    for key, least in (("max_images", 1), ("heldout_images", 0)):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ConfigError(f"{key} must be an integer ≥ {least} (or null), got {value!r}")
    teacher = config.get("teacher") or {}
    kind = teacher.get("kind", "stand-in")
    if kind not in TEACHER_KINDS:
        raise ConfigError(f"teacher.kind={kind!r}: one of {TEACHER_KINDS}")
    if kind != "stand-in" and not teacher.get("path"):
        raise ConfigError(
            f"teacher.kind={kind} needs teacher.path: a diffusers pipeline folder; offline, use teacher.kind=stand-in"
        )
    if teacher.get("dtype", "float32") not in DTYPES:
        raise ConfigError(f"teacher.dtype={teacher.get('dtype')!r}: one of {DTYPES}")
    for key in ("num_inference_steps", "batch_size"):
        value = teacher.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"teacher.{key} must be a positive integer, got {value!r}")
    concepts = config["concepts"]
    if not isinstance(concepts, dict) or not concepts:
        raise ConfigError(f"concepts must map concept names to {{prompt, stand_in}}, got {concepts!r}")
    for name, concept in concepts.items():
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"concept name {name!r}: letters, digits, '-' and '_' only (it becomes part of keys)")
        if not isinstance(concept, dict) or not isinstance(concept.get("prompt"), str) or not concept["prompt"]:
            raise ConfigError(f"concepts.{name}.prompt must be a non-empty string (the edit instruction)")
        if unknown := sorted(set(concept) - set(CONCEPT_KEYS)):
            raise ConfigError(f"unknown config key 'concepts.{name}.{unknown[0]}'; known: {list(CONCEPT_KEYS)}")
        if kind == "stand-in" and concept.get("stand_in") not in STAND_INS:
            raise ConfigError(
                f"concepts.{name}.stand_in={concept.get('stand_in')!r}: teacher.kind=stand-in needs one of "
                f"{sorted(STAND_INS)} per concept"
            )
    writer = config.get("writer") or {}
    quality = writer.get("jpeg_quality", 95)
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ConfigError(f"writer.jpeg_quality must be an integer in [1, 100], got {quality!r}")
    if check_paths:
        from shards.reader import expand_urls

        try:
            expand_urls(config["source"])
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(
                f"source={config['source']!r}: {exc}; make shards with `hyperhuman annotate`, "
                "`hyperhuman shards pack` or `make demo`, or fix the path"
            ) from exc
        check_teacher_path(teacher)


# --- the pair layout (read back by the GAN's data) -------------------------------------------------
def join_pair(image: np.ndarray, edited: np.ndarray) -> np.ndarray:
    return np.concatenate([image, edited], axis=1)


def encode_pair(image: np.ndarray, edited: np.ndarray, quality: int) -> bytes:
    """The pair image as JPEG bytes, 4:4:4 (see the module's note); deterministic."""
    import io

    import PIL.Image

    buffer = io.BytesIO()
    PIL.Image.fromarray(join_pair(image, edited)).save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def split_pair(pair: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(input, edited)`` from a pair image (``H × 2W``), the inverse of :func:`join_pair`."""
    width = pair.shape[1] // 2
    return pair[:, :width], pair[:, width:]


def square(image: np.ndarray, resolution: int) -> np.ndarray:
    """The centred largest square, resized to ``resolution`` (bicubic, antialiased by PIL)."""
    import PIL.Image

    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = PIL.Image.fromarray(np.ascontiguousarray(image[top : top + side, left : left + side]))
    return np.asarray(crop.resize((resolution, resolution), PIL.Image.BICUBIC))


def read_sources(source: str, resolution: int, max_images: int | None) -> list[dict]:
    """The source photos in shard order: ``{key, source, image}`` (square, ``resolution``)."""
    from shards.reader import expand_urls, read_shard

    photos = []
    for url in expand_urls(source):
        for sample in read_shard(url):
            photos.append({"key": sample["__key__"], "source": f"{url}#{sample['__key__']}",
                           "image": square(sample["jpg"], resolution)})  # fmt: skip
            if max_images and len(photos) >= max_images:
                return photos
    return photos


def image_seed(seed: int, key: str, concept: str) -> int:
    """The teacher's noise seed for one photo and concept (crc32: Python's ``hash`` of a string
    changes between processes)."""
    return (seed * 1_000_003 + zlib.crc32(f"{key}/{concept}".encode())) % (2**63)


# --- the job ---------------------------------------------------------------------------------------
def edit_pairs(config: dict) -> dict:
    from distill.e2gan.teachers import make_teachers
    from shards.commit import read_record
    from shards.sample import Sample
    from shards.writer import ShardWriter, write_manifest

    check_config(config)
    output, seed, resolution = Path(config["output"]), config.get("seed", 0), config["resolution"]
    teacher_config, writer_config = config.get("teacher") or {}, config.get("writer") or {}
    started = time.perf_counter()
    photos = read_sources(config["source"], resolution, config.get("max_images"))
    held = config.get("heldout_images", 0) or 0
    if len(photos) <= held:
        raise ConfigError(
            f"source={config['source']!r} gave {len(photos)} photo(s), not more than heldout_images={held}: "
            "lower heldout_images or add shards"
        )
    splits = {"train": photos[: len(photos) - held], "heldout": photos[len(photos) - held :]}
    teachers = make_teachers(teacher_config, config["concepts"])
    batch_size, quality = teacher_config.get("batch_size", 4), writer_config.get("jpeg_quality", 95)
    report = {"source": config["source"], "resolution": resolution, "layout": LAYOUT, "concepts": {}, "kept": []}
    for partition, (name, concept) in enumerate(config["concepts"].items()):
        teacher = teachers[name]
        record = teacher.record()
        # what decides this partition's bytes: a committed partition with the same digest is kept
        settings = {"source": config["source"], "resolution": resolution, "seed": seed, "concept": concept,
                    "teacher": record, "photos": [p["source"] for p in photos], "heldout_images": held,
                    "writer": writer_config}  # fmt: skip
        job = json_digest(settings)
        report["concepts"][name] = {"prompt": concept["prompt"], "teacher": record, "partition": partition}
        for split, items in splits.items():
            if not items:  # heldout_images: 0
                continue
            root = str(output / split)
            existing = read_record(*_fs(root), partition)
            if existing is not None and existing.get("job") == job:
                report["kept"].append(f"{split}/{name}")
                report["concepts"][name][split] = existing["samples"]
                continue
            with ShardWriter(root, partition, job=job, max_samples=writer_config.get("max_samples", 1000)) as writer:
                for start in range(0, len(items), batch_size):
                    batch = items[start : start + batch_size]
                    seeds = [image_seed(seed, item["key"], name) for item in batch]
                    edited = teacher.edit([item["image"] for item in batch], concept["prompt"], seeds)
                    for item, out, item_seed in zip(batch, edited, seeds, strict=True):
                        edit = {"concept": name, "prompt": concept["prompt"], "layout": LAYOUT, "split": split,
                                "input_key": item["key"], "input_source": item["source"], "teacher": record,
                                "seed": item_seed if not record["stand_in"] else None}  # fmt: skip
                        writer.write(Sample(key=f"{item['key']}-{name}", image=encode_pair(item["image"], out, quality),
                                            caption=concept["prompt"], source=item["source"],
                                            meta={"edit": edit}))  # fmt: skip
            report["concepts"][name][split] = len(items)
            print(f"[edit-pairs] {name}: {len(items)} {split} pair(s) by {record['name']}")
    for split in SPLITS:
        kept = len(config["concepts"]) if splits[split] else 0  # heldout_images: 0 leaves no held-out pairs
        report["dropped"] = report.get("dropped", []) + drop_partitions(str(output / split), kept)
        if splits[split]:
            write_manifest(str(output / split))
    report.update(photos=len(photos), train_photos=len(splits["train"]), heldout_photos=held,
                  wall_s=round(time.perf_counter() - started, 2),
                  output={split: str(output / split) for split in SPLITS if splits[split]})  # fmt: skip
    output.mkdir(parents=True, exist_ok=True)
    (output / "edit_pairs.json").write_text(json.dumps(report, indent=1))
    return report


def drop_partitions(root: str, keep: int) -> list[str]:
    """Remove the partitions numbered ``keep`` and up (concepts an earlier run had and this config
    no longer has; readers would trust them): the commit record first, so no reader trusts a part
    that is about to go, then its parts. Returns them as ``SPLIT/partition-N``."""
    from shards.commit import committed_names, join, read_records, record_name

    fs, path = _fs(root)
    if not fs.exists(path):
        return []
    dropped = []
    for partition, record in sorted(read_records(fs, path).items()):
        if partition < keep:
            continue
        fs.rm(join(path, record_name(partition)))
        for name in sorted(committed_names(record)):
            if fs.exists(join(path, name)):
                fs.rm(join(path, name))
        dropped.append(f"{posixpath.basename(path)}/partition-{partition}")
    return dropped


def _fs(root: str):
    import fsspec

    fs, path = fsspec.core.url_to_fs(root)
    return fs, path
