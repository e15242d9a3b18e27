"""``make demo``: the whole pipeline on offline defaults, on photos that ship inside packages.

Stages, each writing one folder under OUTPUT. A rerun resumes each stage whose inputs are the
same, and clears and redoes each one whose inputs changed: other photos (``--data``), another
config or overrides, or a stage before it that was redone (``OUTPUT/demo_state.json`` records
what each folder was made from):

1. ``photos/``     the public-domain photos (or ``--data DIR``, your own images + NAME.txt captions)
2. ``shards/``     the annotation job on Ray Data (``configs/annotate/offline.yaml``), validated
3. ``gallery/shards/``  the shard gallery (kept samples with every modality, rejected rows)
4. ``vae/``        the offline VAE (``hyperhuman train-vae``; skipped once ``vae/vae`` exists)
5. ``lsdm/``       a tiny LSDM (``hyperhuman train-lsdm``; resumes from its latest checkpoint)
6. ``eval/``       generations from the shards' poses and captions, ``metrics.json`` and the
                   generation gallery (``hyperhuman eval``; resumes by sample key)

The stage configs are the usual ones (``configs/vae/tiny.yaml``, ``configs/lsdm/tiny.yaml``,
``configs/eval/default.yaml``) with the overrides in ``configs/demo.yaml``, which size the
training runs to the demo's budget (under 15 minutes on 2 CPU cores).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from hyperhuman.config import apply_overrides, json_digest, load_config


def packaged_photos() -> dict[str, np.ndarray]:
    """Public-domain photos of people that ship inside installed packages (RGB uint8)."""
    import matplotlib.cbook
    import skimage.data

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        grace_hopper = np.asarray(Image.open(handle).convert("RGB"))
    return {"astronaut": skimage.data.astronaut(), "grace_hopper": grace_hopper}


def export_photos(config: dict, photo_dir: Path) -> None:
    photo_dir.mkdir(parents=True, exist_ok=True)
    photos = packaged_photos()
    for name, caption in config["photos"].items():
        if not (photo_dir / f"{name}.png").is_file():
            Image.fromarray(photos[name]).save(photo_dir / f"{name}.png")
            (photo_dir / f"{name}.txt").write_text(caption + "\n")
    print(f"[demo] photos: {len(config['photos'])} public-domain photos in {photo_dir}")


def digest(*parts) -> str:
    return json_digest(parts)


def photos_digest(photo_dir: Path) -> str:
    """Every file under the photo folder (images and captions), by name and content."""
    files = hashlib.sha256()
    for path in sorted(p for p in photo_dir.rglob("*") if p.is_file()):
        files.update(path.relative_to(photo_dir).as_posix().encode() + b"\0")
        files.update(hashlib.sha256(path.read_bytes()).digest())
    return files.hexdigest()


class StageState:
    """What each stage's folders were made from, as a digest of its inputs (``demo_state.json``).

    ``enter`` is called before a stage runs: same inputs, the folders stay and the stage resumes
    (an interrupted run included); other inputs, or no record of them, the folders are cleared.
    Each stage's digest includes the one before it, so redoing a stage redoes every later one;
    ``redo`` clears them anyway (the stage before was retrained in this run).
    """

    def __init__(self, output_dir: Path):
        self.path = output_dir / "demo_state.json"
        self.digests = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def enter(self, stage: str, inputs: str, folders: list[Path], redo: bool = False) -> None:
        if self.digests.get(stage) == inputs and not redo:
            return
        stale = [folder for folder in folders if folder.exists()]
        if stale:
            print(f"[demo] {stage}: made from other inputs than this run's (photos, config or an earlier stage): "
                  f"clearing {', '.join(map(str, stale))} and redoing it")  # fmt: skip
            for folder in stale:
                shutil.rmtree(folder)
        self.digests[stage] = inputs
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.digests, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path)


def stage_config(name: str, overrides: list[str], extra: dict[str, object]) -> dict:
    """A stage's config file with the demo's overrides, then the demo's own paths."""
    return apply_overrides(load_config(name), [*overrides, *(f"{key}={value}" for key, value in extra.items())])


def fit_batch_to_data(config: dict, key: str, samples: int) -> None:
    """A handful of your own photos may keep fewer samples than a batch: train on what there is."""
    section, _, name = key.rpartition(".")
    section = config[section]
    if section.get(name, 0) > samples:
        print(f"[demo] {key} lowered from {section[name]} to {samples}: only {samples} samples were kept")
        section[name] = samples


def run_demo(config: dict, output: str, data: str | None = None) -> int:
    from hyperhuman.eval.evaluate import run_eval
    from hyperhuman.eval.gallery import shard_gallery
    from hyperhuman.lsdm.train import train_lsdm
    from hyperhuman.vae import train_vae
    from pipelines.job import run_job
    from shards.validate import validate

    started = time.perf_counter()
    output_dir = Path(output)
    times = {}
    state = StageState(output_dir)

    if data:
        photo_dir = Path(data).resolve()
        if not photo_dir.is_dir():  # before anything is cleared for the new photos
            raise FileNotFoundError(f"--data {data}: no such folder (your images + NAME.txt captions)")
        print(f"[demo] photos: your images in {photo_dir}")
    else:
        photo_dir = output_dir.resolve() / "photos"
        export_photos(config, photo_dir)

    shard_dir = output_dir / "shards"
    shard_gallery_dir = output_dir / "gallery" / "shards"
    stage_started = time.perf_counter()
    job_config = apply_overrides(load_config(config["job_config"]), config.get("job_overrides", []))
    annotate_inputs = digest(str(photo_dir), photos_digest(photo_dir), job_config)
    state.enter("annotate", annotate_inputs, [shard_dir, shard_gallery_dir])
    report = run_job(str(photo_dir), str(shard_dir), job_config)
    times["annotate"] = time.perf_counter() - stage_started
    print(f"[demo] shards: {report['samples']} samples kept, rows {report['counts']} in {shard_dir}")
    if not report["samples"]:
        print("[demo] no sample passed the filters (1–3 people, each large enough): nothing to train on")
        return 1
    problems = validate(str(shard_dir))
    for problem in problems:
        print(f"[demo] {problem}")
    if problems:
        print(f"[demo] validation FAILED with {len(problems)} problem(s)")
        return 1
    print("[demo] validation OK")

    shard_index = shard_gallery(str(shard_dir), str(shard_gallery_dir))
    print(f"[demo] shard gallery: {shard_index}")

    vae_dir = output_dir / "vae"
    stage_started = time.perf_counter()
    vae_inputs = digest(annotate_inputs, stage_config(config["vae_config"], config.get("vae_overrides", []), {}))
    state.enter("vae", vae_inputs, [vae_dir])
    if (vae_dir / "vae" / "config.json").is_file():
        print(f"[demo] vae: already trained in {vae_dir / 'vae'}")
        vae_trained_now = False
    else:
        vae_config = stage_config(config["vae_config"], config.get("vae_overrides", []), {
            "output": vae_dir, "data.train": shard_dir,
        })  # fmt: skip
        fit_batch_to_data(vae_config, "train.batch_size", report["samples"])
        vae_report = train_vae(vae_config)
        print(f"[demo] vae: PSNR {vae_report['psnr_db']} dB in {vae_report['train_s']} s")
        vae_trained_now = True
    times["vae"] = time.perf_counter() - stage_started

    lsdm_dir = output_dir / "lsdm"
    stage_started = time.perf_counter()
    lsdm_inputs = digest(vae_inputs, stage_config(config["lsdm_config"], config.get("lsdm_overrides", []), {}))
    state.enter("lsdm", lsdm_inputs, [lsdm_dir], redo=vae_trained_now)
    if (lsdm_dir / "train_report.json").is_file() and (lsdm_dir / "pipeline" / "model_index.json").is_file():
        print(f"[demo] lsdm: already trained in {lsdm_dir}")
        lsdm_trained_now = False
    else:
        lsdm_config = stage_config(config["lsdm_config"], config.get("lsdm_overrides", []), {
            "output": lsdm_dir, "data.train": shard_dir, "model.vae": vae_dir / "vae",
        })  # fmt: skip
        for key in ("train.batch_size", "validation.num_samples"):
            fit_batch_to_data(lsdm_config, key, report["samples"])
        lsdm_report = train_lsdm(lsdm_config, resume="latest")
        print(f"[demo] lsdm: {lsdm_report.get('steps')} steps, loss {lsdm_report.get('last_loss')}")
        lsdm_trained_now = True
    times["lsdm"] = time.perf_counter() - stage_started

    eval_dir = output_dir / "eval"
    stage_started = time.perf_counter()
    eval_config = stage_config(config["eval_config"], config.get("eval_overrides", []), {})
    state.enter("eval", digest(lsdm_inputs, eval_config), [eval_dir], redo=lsdm_trained_now)  # a new model
    eval_report = run_eval(str(lsdm_dir), str(shard_dir), str(eval_dir), eval_config)
    times["eval"] = time.perf_counter() - stage_started
    shown = {name: value for name, value in eval_report["metrics"].items() if value is not None}
    print(f"[demo] eval: {json.dumps({name: round(value, 4) for name, value in shown.items()})}")
    print(f"[demo] skipped (no weights here): {', '.join(eval_report['skipped']) or 'nothing'}")

    stage_times = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in times.items())
    print(f"[demo] done in {time.perf_counter() - started:.0f} s ({stage_times})")
    print(f"[demo] shard gallery:      {shard_index}")
    print(f"[demo] generation gallery: {eval_report['gallery']}")
    return 0
