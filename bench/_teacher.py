"""The bench teacher (DESIGN.md, "Bench teacher"): one LSDM of mid size with SD's layout, trained
on shards of the real photos in ``../shared/data/humans`` at a stated budget, cached outside the
repository and reused by every distillation benchmark.

Stages, each kept once done (a rerun resumes at the first unfinished one):

1. photos: the 70 photos split by sorted name (every 5th held out), captioned from the
   ground truth's person count ("a photo of two people");
2. shards: the offline annotation job (``configs/annotate/offline.yaml``) on each split;
3. vae: ``train-vae`` (``configs/vae/tiny.yaml``, factor 4: 64 px → 16×16 latents);
4. lsdm: ``train-lsdm`` of :data:`TEACHER_UNET` (SD-2's layout at 1/10 of its width: attention in
   the three high-resolution stages, none in the innermost) for :data:`TEACHER_STEPS` steps on
   random crops and flips.

The cache folder is keyed by the digest of the photos and of every setting below, so changing
either trains a new teacher. ``teacher()`` returns the paths; ``python bench/_teacher.py`` builds it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hyperhuman.config import apply_overrides, json_digest, load_config  # noqa: E402

PHOTOS = REPO.parent / "shared" / "data" / "humans"
CACHE = Path(os.environ.get("HYPERHUMAN_CACHE", Path.home() / ".cache" / "hyperhuman")) / "bench"
RESOLUTION = 64
HELD_OUT_EVERY = 5

# SD-2-base's UNet layout (4 stages, 2 layers each, cross-attention in the first three) at 1/10 of
# its width: 10.2M parameters as the three-branch LSDM.
TEACHER_UNET = {
    "sample_size": RESOLUTION // 4,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [32, 64, 128, 128],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "norm_num_groups": 16,
    "cross_attention_dim": 384,  # the packaged MiniLM text encoder
    "attention_head_dim": 8,
}
# 24 training photos: the first teacher (1500 steps on fixed crops, cached latents) memorised them
# (train v-loss 0.12, held-out 2.77), which made every student look better than it on held-out
# data. Random crops and flips at two thirds of the steps keep it a model of the photos' domain.
TEACHER_STEPS = 1000
VAE_OVERRIDES = [
    "model.block_out_channels=[16, 32, 64]",  # factor 4
    f"model.sample_size={RESOLUTION}",
    f"data.resolution={RESOLUTION}",
    "train.max_train_steps=900",
    "data.num_workers=0",
]
LSDM_OVERRIDES = [
    f"data.resolution={RESOLUTION}",
    "data.random_crop=true",
    "data.min_crop_scale=0.7",
    "data.flip_prob=0.5",
    "data.cache_latents=false",
    "data.num_workers=0",
    "train.batch_size=4",
    f"train.max_train_steps={TEACHER_STEPS}",
    "train.learning_rate=3e-4",
    "train.checkpointing_steps=500",
    "train.log_every=100",
    "validation.every=0",
]


def settings() -> dict:
    return {"unet": TEACHER_UNET, "vae": VAE_OVERRIDES, "lsdm": LSDM_OVERRIDES, "held_out_every": HELD_OUT_EVERY}


def photos_digest() -> str:
    return json_digest([(p.name, p.stat().st_size) for p in sorted((PHOTOS / "images").iterdir())])


def teacher(log=print) -> dict:
    """Build (or find) the bench teacher; returns its folders and how it was made."""
    if not (PHOTOS / "keypoints_coco.json").is_file():
        raise FileNotFoundError(f"the bench teacher needs the real photos at {PHOTOS} (../shared beside the repo)")
    root = CACHE / f"teacher-{json_digest([settings(), photos_digest()])[:12]}"
    paths = {
        "root": root,
        "train_shards": root / "shards" / "train",
        "heldout_shards": root / "shards" / "heldout",
        "vae": root / "vae",
        "lsdm": root / "lsdm",
    }
    report_path = root / "teacher.json"
    if report_path.is_file() and (paths["lsdm"] / "pipeline" / "model_index.json").is_file():
        return {**paths, "report": json.loads(report_path.read_text())}
    times = {}
    started = time.perf_counter()
    split_photos(root / "photos")
    times["photos_s"] = time.perf_counter() - started

    from pipelines.job import run_job

    counts = {}
    for split in ("train", "heldout"):
        stage = time.perf_counter()
        log(f"[bench teacher] annotating the {split} photos ...")
        report = run_job(str(root / "photos" / split), str(paths[f"{split}_shards"]), load_config("annotate/offline"))
        counts[split] = report["samples"]
        times[f"annotate_{split}_s"] = time.perf_counter() - stage

    from hyperhuman.vae import train_vae

    stage = time.perf_counter()
    if not (paths["vae"] / "vae" / "config.json").is_file():
        log("[bench teacher] training the VAE ...")
        vae_config = apply_overrides(load_config("vae/tiny"), VAE_OVERRIDES)
        vae_config.update(output=str(paths["vae"]))
        vae_config["data"].update(train=str(paths["train_shards"]), eval=str(paths["heldout_shards"]))
        train_vae(vae_config)
    times["vae_s"] = time.perf_counter() - stage

    from hyperhuman.lsdm.train import train_lsdm

    stage = time.perf_counter()
    log(f"[bench teacher] training the teacher LSDM ({TEACHER_STEPS} steps) ...")
    lsdm_config = apply_overrides(load_config("lsdm/tiny"), LSDM_OVERRIDES)
    lsdm_config.update(output=str(paths["lsdm"]))
    lsdm_config["data"]["train"] = str(paths["train_shards"])
    lsdm_config["model"].update(unet=dict(TEACHER_UNET), vae=str(paths["vae"] / "vae"))
    lsdm_report = train_lsdm(lsdm_config, resume="latest")
    times["lsdm_s"] = time.perf_counter() - stage
    vae_report = json.loads((paths["vae"] / "vae_report.json").read_text())
    report = {
        "samples": counts,
        "settings": settings(),
        "times": {key: round(value, 1) for key, value in times.items()},
        "vae_psnr_heldout": vae_report.get("psnr_db"),
        "lsdm_steps": lsdm_report.get("steps"),
        "lsdm_first_loss": lsdm_report.get("first_loss"),
        "lsdm_last_loss": lsdm_report.get("last_loss"),
    }
    report_path.write_text(json.dumps(report, indent=1))
    return {**paths, "report": report}


def split_photos(target: Path) -> None:
    """Every ``HELD_OUT_EVERY``-th photo (by sorted name) into heldout/, the rest into train/, each
    with a caption from its ground-truth person count."""
    truth = json.loads((PHOTOS / "keypoints_coco.json").read_text())
    people = {}
    for annotation in truth["annotations"]:
        people[annotation["image_id"]] = people.get(annotation["image_id"], 0) + 1
    names = {image["file_name"].split("/")[-1]: people.get(image["id"], 0) for image in truth["images"]}
    words = {1: "a person", 2: "two people", 3: "three people"}
    for index, photo in enumerate(sorted((PHOTOS / "images").iterdir())):
        split = "heldout" if index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else "train"
        folder = target / split
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / photo.name
        if not link.exists():
            link.symlink_to(photo)
        caption = words.get(names.get(photo.name, 0), "a group of people")
        (folder / f"{photo.stem}.txt").write_text(f"a photo of {caption}\n")


if __name__ == "__main__":
    built = teacher()
    print(json.dumps({key: str(value) for key, value in built.items() if key != "report"}, indent=1))
    print(json.dumps(built["report"], indent=1))
