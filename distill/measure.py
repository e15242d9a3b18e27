"""The quality measure every distillation stage reports, so numbers compare across stages.

Two numbers need no Inception or CLIP weights (none exist offline):

- **held-out v-loss**: the training objective of ``train-lsdm`` (sum over branches of the
  v-prediction MSE, loss weights 1, no condition dropout) on a fixed set of held-out
  (sample, timestep, noise) triples;
- **sample agreement**: the PSNR of RGB, depth and normal sampled by the model and by a reference
  pipeline (usually the teacher) from the same initial noise, captions and poses.

Determinism. The held-out samples are the first ``num`` of the shards in their stored order, at a
fixed centre crop, never flipped (as the validation samples of ``train-lsdm``). Their VAE latents
are posterior *modes* (no sampling). Each sample's timestep and per-branch noise are drawn from one
``torch.Generator().manual_seed(seed)`` sample by sample, in order, and the noise of every branch in
:data:`hyperhuman.lsdm.model.BRANCHES` is drawn whether the model has it or not: so the first ``k``
triples are the same whatever ``num`` is, whatever branches the model has, and whatever batch size
measures them. The sampling noise follows the same rule with its own generator. Latents are stored
raw (un-normalised): teacher and student share the VAE but each normalises with its own
``unet.normalize``, as training does.

    result = measure("runs/student", "data/shards", reference="runs/teacher", num=16, steps=8)
    print(json.dumps(result))   # also: hyperhuman distill measure --model RUN --reference RUN --shards PATH
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hyperhuman.config import ConfigError
from hyperhuman.lsdm.model import BRANCHES
from hyperhuman.lsdm.pipeline import HyperHumanPipeline

PSNR_CLAMP_DB = 100.0  # identical outputs have infinite PSNR; JSON has no infinity
ENCODE_BATCH = 8


def pipeline_folder(path: str | Path) -> Path | None:
    """``path/pipeline`` of a run folder, ``path`` of a pipeline folder, else ``None``."""
    path = Path(path)
    if (path / "pipeline" / "model_index.json").is_file():
        return path / "pipeline"
    return path if (path / "model_index.json").is_file() else None


def check_teacher_run(value) -> None:
    """A config's ``teacher:``: a run (or pipeline) folder, or a ConfigError saying how to give one."""
    if pipeline_folder(value) is None:
        raise ConfigError(
            f"teacher={value!r} is not a run folder with pipeline/ (what train-lsdm or a distill stage writes): "
            "--set teacher=runs/NAME"
        )


def load_pipeline(path: str | Path) -> HyperHumanPipeline:
    """The pipeline of a run folder (holding ``pipeline/``) or a pipeline folder itself (holding
    ``model_index.json``), in eval mode with its progress bar off."""
    folder = pipeline_folder(path)
    if folder is None:
        raise FileNotFoundError(
            f"{str(path)!r} is not a run folder with pipeline/ or a pipeline folder with model_index.json; "
            "point it at what train-lsdm or a distill stage wrote"
        )
    pipeline = HyperHumanPipeline.from_pretrained(folder)
    for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        module.eval()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# --- the held-out set ----------------------------------------------------------------------------
@dataclass
class HeldOut:
    """Fixed held-out samples and their (timestep, noise) draws; see the module docstring.

    ``latents``: raw VAE posterior modes ``(N, C, h, w)`` for every branch of the pipeline it was
    built with and for ``pose``; ``noise``: ``(N, C, h, w)`` for every name in ``BRANCHES``;
    ``poses``: pose annotations at the held-out resolution, the format the pipeline samples from.
    """

    source: str
    resolution: int
    seed: int
    keys: list[str]
    captions: list[str]
    poses: list[dict]
    latents: dict[str, torch.Tensor]
    timesteps: torch.Tensor
    noise: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def from_shards(
        cls,
        shards: str | Path,
        pipeline: HyperHumanPipeline,
        num: int = 16,
        resolution: int | None = None,
        seed: int = 0,
    ) -> HeldOut:
        """The first ``num`` samples of ``shards`` (fewer if the shards hold fewer) encoded by
        ``pipeline``'s VAE at ``resolution`` (default: the pipeline's own sample size)."""
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"num must be a positive number of held-out samples, got {num!r}")
        unet = pipeline.unet
        resolution = resolution or unet.config.unet["sample_size"] * pipeline.vae_scale_factor
        factor = pipeline.vae_scale_factor * 2**unet.trunk.num_upsamplers
        if resolution % factor:
            raise ValueError(
                f"resolution={resolution} is not a multiple of {factor} (VAE factor × UNet down factor); "
                f"use e.g. {max(factor, resolution // factor * factor)}"
            )
        samples = read_samples(str(shards), num, resolution)
        if not samples:
            raise ValueError(f"the shards {str(shards)!r} hold no samples; the held-out set needs at least one")

        latents = encode_samples(pipeline, samples, list(unet.config.branches))
        generator = torch.Generator().manual_seed(seed)
        channels, size = unet.config.latent_channels, resolution // pipeline.vae_scale_factor
        timesteps, noise = [], {name: [] for name in BRANCHES}
        for _ in samples:  # sample by sample, so sample i's draws do not depend on num
            timesteps.append(torch.randint(0, pipeline.scheduler.config.num_train_timesteps, (1,), generator=generator))
            for name in BRANCHES:
                noise[name].append(torch.randn((1, channels, size, size), generator=generator))
        return cls(
            source=str(shards),
            resolution=resolution,
            seed=seed,
            keys=[sample["key"] for sample in samples],
            captions=[sample["caption"] for sample in samples],
            poses=[pose_annotation(sample, resolution) for sample in samples],
            latents=latents,
            timesteps=torch.cat(timesteps),
            noise={name: torch.cat(values) for name, values in noise.items()},
        )


def read_samples(shards: str, num: int, resolution: int) -> list[dict]:
    """The first ``num`` samples in stored order at a centre crop, never flipped (``first_samples``
    in train.py, without its need for a full batch)."""
    from shards.dataset import SampleTransform, humanverse_dataset

    transform = SampleTransform(resolution, random_crop=False, flip_prob=0.0)
    dataset = humanverse_dataset(shards, transform, shuffle_buffer=0, split_by_node=False)
    return list(itertools.islice(iter(dataset), num))


@torch.no_grad()
def encode_samples(pipeline: HyperHumanPipeline, samples: list[dict], names: list[str]) -> dict[str, torch.Tensor]:
    """Raw VAE posterior modes of every branch and the pose, on the CPU in float32: ``encode_batch``
    without its ``unet.normalize`` (the latents each model normalises itself)."""
    from torch.utils.data import default_collate

    from hyperhuman import modalities

    vae = pipeline.vae
    chunks = {name: [] for name in [*names, "pose"]}
    for start in range(0, len(samples), ENCODE_BATCH):
        units = modalities.batch_to_units(default_collate(samples[start : start + ENCODE_BATCH]))
        for name in chunks:
            mode = vae.encode(units[name].to(vae.device, vae.dtype)).latent_dist.mode()
            chunks[name].append(mode.float().cpu())
    return {name: torch.cat(values) for name, values in chunks.items()}


def pose_annotation(sample: dict, resolution: int) -> dict:
    """The sample's people as the pipeline's ``pose=`` (the dict ``run_validation`` builds)."""
    people = sample["keypoints"][: int(sample["num_people"])]
    return {"width": resolution, "height": resolution, "people": [{"keypoints": k.tolist()} for k in people]}


# --- held-out v-loss -----------------------------------------------------------------------------
@torch.no_grad()
def v_loss(pipeline: HyperHumanPipeline, heldout: HeldOut, batch_size: int = 8) -> dict:
    """``{"v_loss": sum over branches, "branch_v_loss": {branch: MSE(v̂, v)}}`` over all held-out
    triples (mean over every element of every sample; the batch size changes only float rounding)."""
    from hyperhuman.text import encode_prompts

    unet, scheduler = pipeline.unet, pipeline.scheduler
    names = list(unet.config.branches)
    missing = [name for name in names if name not in heldout.latents]
    if missing:
        raise ValueError(
            f"the held-out set has no latents for branches {missing} of this model (it has {sorted(heldout.latents)}); "
            "build it with HeldOut.from_shards(shards, this_pipeline)"
        )
    device, dtype = unet.device, unet.dtype
    squared_error = dict.fromkeys(names, 0.0)
    elements = dict.fromkeys(names, 0)
    for start in range(0, len(heldout), batch_size):
        rows = slice(start, start + batch_size)
        states, mask = encode_prompts(pipeline.tokenizer, pipeline.text_encoder, heldout.captions[rows])
        timesteps = heldout.timesteps[rows].to(device)
        noisy, targets = [], []
        for name in names:
            latent = unet.normalize(name, heldout.latents[name][rows].to(device))
            noise = heldout.noise[name][rows].to(device)
            noisy.append(scheduler.add_noise(latent, noise, timesteps))
            targets.append(scheduler.get_velocity(latent, noise, timesteps))
        pose_latent = unet.normalize("pose", heldout.latents["pose"][rows].to(device))
        prediction = unet(
            torch.cat(noisy, dim=1).to(dtype),
            timesteps,
            states.to(device, dtype),
            pose_latent=pose_latent.to(dtype),
            encoder_attention_mask=mask.to(device),
        ).sample
        for name, predicted, target in zip(
            names, prediction.split(unet.config.latent_channels, dim=1), targets, strict=True
        ):
            squared_error[name] += float((predicted.double() - target.double()).square().sum())
            elements[name] += target.numel()
    branch = {name: squared_error[name] / elements[name] for name in names}
    return {"v_loss": sum(branch.values()), "branch_v_loss": branch}


# --- sample agreement ----------------------------------------------------------------------------
def initial_noise(heldout: HeldOut, channels: int, count: int, seed: int) -> dict[str, torch.Tensor]:
    """Per branch ``(count, channels, h, w)`` sampling noise, drawn like the held-out noise: sample by
    sample, every name of ``BRANCHES``, so two models get the same noise for the branches they share."""
    generator = torch.Generator().manual_seed(seed)
    size = heldout.noise[BRANCHES[0]].shape[-1]
    draws = {name: [] for name in BRANCHES}
    for _ in range(count):
        for name in BRANCHES:
            draws[name].append(torch.randn((1, channels, size, size), generator=generator))
    return {name: torch.cat(values) for name, values in draws.items()}


def sample_outputs(
    pipeline: HyperHumanPipeline,
    heldout: HeldOut,
    noise: dict,
    steps: int,
    guidance_scale: float,
    batch_size: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """The pipeline's ``"np"`` outputs per branch for the first ``len(noise)`` held-out samples."""
    count = len(next(iter(noise.values())))
    names = list(pipeline.unet.config.branches)
    outputs = {name: [] for name in names}
    for start in range(0, count, batch_size):
        rows = slice(start, min(start + batch_size, count))
        result = pipeline(
            heldout.captions[rows],
            pose=heldout.poses[rows],
            height=heldout.resolution,
            width=heldout.resolution,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            latents=torch.cat([noise[name][rows] for name in names], dim=1).to(pipeline.unet.dtype),
            # unused by DDIM (eta 0); a stochastic scheduler draws its step noise here, not from the global RNG
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        )
        for name in names:
            outputs[name].append(getattr(result, name))
    return {name: np.concatenate(values) for name, values in outputs.items()}


def psnr(first: np.ndarray, second: np.ndarray) -> float:
    """PSNR in dB of two arrays on [0, 1] (peak 1), from their mean squared error over all elements;
    clamped at :data:`PSNR_CLAMP_DB` (identical arrays would give infinity)."""
    mse = float(np.mean(np.square(first.astype(np.float64) - second.astype(np.float64))))
    return PSNR_CLAMP_DB if mse == 0 else min(PSNR_CLAMP_DB, 10 * math.log10(1.0 / mse))


def sample_psnr(
    pipeline: HyperHumanPipeline,
    reference: HyperHumanPipeline,
    heldout: HeldOut,
    steps: int = 8,
    guidance_scale: float = 3.0,
    seed: int = 0,
    num: int | None = None,
    batch_size: int = 8,
    reference_outputs: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """PSNR (dB) between ``pipeline``'s and ``reference``'s samples of the held-out captions and poses
    from the same initial noise, per modality both have: ``rgb`` and ``depth`` on [0, 1], ``normal``
    mapped by ``(n + 1) / 2`` to [0, 1]. PSNR is taken over the pooled squared error of all samples
    and clamped at 100 dB (identical outputs: infinity, which JSON cannot hold). ``num``: only the
    first ``num`` held-out samples. ``reference_outputs``: the reference's samples as
    :func:`reference_samples` gave them with the same settings (scoring several models against one
    reference samples it once)."""
    count = len(heldout) if num is None else min(num, len(heldout))
    channels = pipeline.unet.config.latent_channels
    if reference.unet.config.latent_channels != channels:
        raise ValueError(
            f"the model's latents have {channels} channels but the reference's "
            f"{reference.unet.config.latent_channels}: sample agreement needs the same VAE latent space"
        )
    noise = initial_noise(heldout, channels, count, seed)
    ours = sample_outputs(pipeline, heldout, noise, steps, guidance_scale, batch_size, seed)
    if reference_outputs is None:
        reference_outputs = sample_outputs(reference, heldout, noise, steps, guidance_scale, batch_size, seed)
    theirs = reference_outputs
    shared = [name for name in ours if name in theirs]
    return {name: psnr(unit_range(name, ours[name]), unit_range(name, theirs[name])) for name in shared}


def reference_samples(
    reference: HyperHumanPipeline,
    heldout: HeldOut,
    steps: int = 8,
    guidance_scale: float = 3.0,
    seed: int = 0,
    num: int | None = None,
    batch_size: int = 8,
) -> dict[str, np.ndarray]:
    """The reference's samples :func:`sample_psnr` compares against, for its ``reference_outputs``."""
    count = len(heldout) if num is None else min(num, len(heldout))
    noise = initial_noise(heldout, reference.unet.config.latent_channels, count, seed)
    return sample_outputs(reference, heldout, noise, steps, guidance_scale, batch_size, seed)


def unit_range(name: str, output: np.ndarray) -> np.ndarray:
    """A ``"np"`` output on [0, 1]: normals (unit vectors) map by ``(n + 1) / 2``, the rest already are."""
    return (output + 1) / 2 if name == "normal" else output


# --- latency -------------------------------------------------------------------------------------
def step_inputs(pipeline: HyperHumanPipeline, heldout: HeldOut) -> dict:
    """One guided step's denoiser inputs at the held-out resolution: batch 2 (the unconditional and
    the conditional half), what :func:`step_ms` times and the latency table measures blocks at."""
    from hyperhuman.text import encode_prompts

    unet = pipeline.unet
    device, dtype = unet.device, unet.dtype
    names = list(unet.config.branches)
    states, mask = encode_prompts(pipeline.tokenizer, pipeline.text_encoder, ["", heldout.captions[0]])
    latent = torch.cat([heldout.noise[name][:1] for name in names], dim=1)
    pose_latent = unet.normalize("pose", heldout.latents["pose"][:1])
    return {
        "sample": latent.repeat(2, 1, 1, 1).to(device, dtype),
        "timestep": heldout.timesteps[0].to(device),
        "encoder_hidden_states": states.to(device, dtype),
        "pose_latent": pose_latent.repeat(2, 1, 1, 1).to(device, dtype),
        "encoder_attention_mask": mask.to(device),
    }


def step_ms(pipeline: HyperHumanPipeline, heldout: HeldOut, runtime: str = "eager", repeats: int = 5) -> float:
    """Median milliseconds of one denoiser call at batch 2 (one guided step at batch 1) at the
    held-out resolution on ``runtime`` (see :mod:`distill.latency`)."""
    from distill.latency import measure_step

    inputs = step_inputs(pipeline, heldout)
    return measure_step(pipeline.unet, inputs, runtime, warmup=1, repeats=repeats)  # one call compiles, if compiled


# --- everything at once --------------------------------------------------------------------------
def measure(
    model: str | Path,
    shards: str | Path,
    reference: str | Path | None = None,
    num: int = 16,
    steps: int = 8,
    seed: int = 0,
    runtime: str = "eager",
) -> dict:
    """The quality measure of ``model`` (a run or pipeline folder) as a JSON-ready dict: ``model``,
    ``reference``, ``num`` (held-out samples used), ``seed``, ``resolution``, ``v_loss``,
    ``branch_v_loss``, ``psnr`` (per modality, only with a ``reference``), ``steps`` (sampling
    steps of the PSNR) and ``step_ms`` (one guided denoiser step on ``runtime``)."""
    pipeline = load_pipeline(model)
    heldout = HeldOut.from_shards(shards, pipeline, num=num, seed=seed)
    result = {
        "model": str(model),
        "reference": None if reference is None else str(reference),
        "num": len(heldout),
        "seed": seed,
        "resolution": heldout.resolution,
        **v_loss(pipeline, heldout),
    }
    if reference is not None:
        result["psnr"] = sample_psnr(pipeline, load_pipeline(reference), heldout, steps=steps, seed=seed)
    result["steps"] = steps
    result["step_ms"] = step_ms(pipeline, heldout, runtime)
    return result
