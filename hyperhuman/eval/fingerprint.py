"""What determines an eval run's images, so that a rerun resumes only generations it would make itself.

Generation is resumed by sample key; that is only sound when every image already on disk came
from the same weights and sampling settings. :func:`generation_fingerprint` collects those: the
digest of the model's pipeline folder (every file of the components its ``model_index.json``
names: weights and configs), its scheduler config, the steps, guidance, seed and resolution, and
the same for the refiner when there is one (hashing reads the weights once per run: seconds for an
SD-sized model, next to minutes of sampling). The batch size is not part of it (it changes pixels
by at most a level of rounding), nor is what only scores the images (pose annotator, Inception,
CLIP): scores are recomputed on every run.

:func:`prepare_output` records the fingerprint in ``OUTPUT/fingerprint.json`` before anything
is generated, and refuses a folder holding generations with another fingerprint (or with none,
written before fingerprints existed): the error names every difference and ``--overwrite``,
which discards the folder's generations and starts afresh. Nothing is ever silently mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from hyperhuman.config import ConfigError

FINGERPRINT_FILE = "fingerprint.json"
_CHUNK = 16 << 20
# diffusers bookkeeping in a saved scheduler config, not settings of the schedule
_SCHEDULER_BOOKKEEPING = ("_diffusers_version", "_use_default_values")


def folder_digest(pipeline: Path) -> str:
    """sha256 over ``model_index.json`` and every file of the components it names (relative path
    and bytes, in sorted order); other files in the folder, e.g. an eval output inside it, do not count."""
    index = json.loads((pipeline / "model_index.json").read_text())
    paths = [pipeline / "model_index.json"]
    for name in sorted(index):
        if not name.startswith("_") and (pipeline / name).is_dir():
            paths += sorted(path for path in (pipeline / name).rglob("*") if path.is_file())
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.relative_to(pipeline).as_posix().encode() + b"\0")
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def scheduler_config(pipeline: Path) -> dict:
    path = pipeline / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return {key: value for key, value in sorted(config.items()) if key not in _SCHEDULER_BOOKKEEPING}


def generation_fingerprint(model: Path, refiner: Path | None, settings: dict) -> dict:
    """Everything that determines the images of ``hyperhuman eval`` (``settings``: the checked eval
    settings with the resolution resolved)."""
    fingerprint = {
        "model": {"sha256": folder_digest(model), "scheduler": scheduler_config(model)},
        "num_inference_steps": settings["num_inference_steps"],
        "guidance_scale": settings["guidance_scale"],
        "seed": settings["seed"],
        "resolution": settings["resolution"],
        "refiner": None,
    }
    if refiner is not None:
        fingerprint["refiner"] = {
            "sha256": folder_digest(refiner),
            "scheduler": scheduler_config(refiner),
            "steps": settings["refiner_steps"],
            "guidance_scale": settings["refiner_guidance_scale"],
        }
    return fingerprint


def fingerprint_id(fingerprint: dict) -> str:
    """A short id of a fingerprint, shown in ``metrics.json``."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def differences(old, new, prefix: str = "") -> list[str]:
    """``key: old → new`` for every leaf that differs (nested keys joined with dots)."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            found += differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    if old == new:
        return []
    return [f"{prefix.rstrip('.')}: {_short(old)} → {_short(new)}"]


def _short(value) -> str:
    is_digest = isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    return value[:12] + "…" if is_digest else json.dumps(value)


def holds_generations(output: Path) -> bool:
    samples = output / "samples"
    return (samples.is_dir() and any(samples.iterdir())) or (output / "samples.jsonl").is_file()


def prepare_output(output: Path, fingerprint: dict, overwrite: bool) -> None:
    """Make ``output`` ready for generations with ``fingerprint``: resume, start afresh
    (``overwrite``: previous generations, samples.jsonl, metrics.json and the gallery are removed),
    or refuse with a ValueError naming the differences and ``--overwrite``."""
    recorded_path = output / FINGERPRINT_FILE
    if holds_generations(output) and not overwrite:
        if not recorded_path.is_file():
            raise ConfigError(
                f"{output} holds generations but no {FINGERPRINT_FILE} (written by an older hyperhuman eval), so "
                "it is unknown what made them: rerun with --overwrite to regenerate them, or pick another --output"
            )
        recorded = json.loads(recorded_path.read_text())
        changed = differences(recorded, fingerprint)
        if changed:
            raise ConfigError(
                f"{output} holds generations made with other settings ({'; '.join(changed)}); resuming would mix "
                "them with new ones: rerun with --overwrite to regenerate every sample, or pick another --output"
            )
    if overwrite:
        for name in ("samples", "gallery"):
            if (output / name).is_dir():
                shutil.rmtree(output / name)
        for name in ("samples.jsonl", "metrics.json", FINGERPRINT_FILE):
            (output / name).unlink(missing_ok=True)
    output.mkdir(parents=True, exist_ok=True)
    partial = recorded_path.with_name(FINGERPRINT_FILE + ".partial")
    partial.write_text(json.dumps(fingerprint, indent=2, sort_keys=True))
    os.replace(partial, recorded_path)
