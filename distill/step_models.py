"""The two kinds of teacher ``hyperhuman distill steps`` distils, behind one interface.

- :class:`LSDMFamily`: a ``HyperHumanPipeline`` folder (``train-lsdm`` or an earlier distill
  stage). The sample is every branch's latent stacked (RGB, depth, normal: one shared timestep, as
  the LSDM samples), conditioned on the caption and the pose latent; guidance is text-only, as the
  pipeline guides.
- :class:`StableDiffusionFamily`: a diffusers ``StableDiffusionPipeline`` folder whose UNet is a
  plain ``UNet2DConditionModel``. The sample is the RGB latent (the VAE's scaled posterior),
  conditioned on the caption; the empty prompt is the unconditional input, as the pipeline's own
  ``encode_prompt`` makes it. Its scheduler must be DDIM (the distilled grid is DDIM's).

Each family turns a shard batch into ``(clean latents, conditions, unconditional)`` — the model's
keyword inputs besides ``sample``/``timestep`` — sums the loss over its branches, wraps a trained
UNet into a pipeline of the teacher's kind, and draws a validation grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hyperhuman.config import ConfigError

STABLE_DIFFUSION = "StableDiffusionPipeline"


def pipeline_class_name(folder: Path) -> str:
    return json.loads((folder / "model_index.json").read_text()).get("_class_name", "")


def load_teacher(path: str | Path):
    """The family of the pipeline at ``path`` (a run folder with ``pipeline/`` or a pipeline folder)."""
    from distill.measure import load_pipeline, pipeline_folder

    folder = pipeline_folder(path)
    if folder is None:
        raise ConfigError(f"teacher={str(path)!r} holds no pipeline (no model_index.json there or in pipeline/)")
    if pipeline_class_name(folder) != STABLE_DIFFUSION:
        return LSDMFamily(load_pipeline(folder))
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    if not isinstance(pipeline.scheduler, DDIMScheduler):
        raise ConfigError(
            f"teacher={str(path)!r} has a {type(pipeline.scheduler).__name__}; step distillation runs on DDIM: "
            "save the pipeline with DDIMScheduler.from_config(pipe.scheduler.config) (timestep_spacing='trailing')"
        )
    return StableDiffusionFamily(pipeline)


def _frozen(pipeline) -> None:
    for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        module.requires_grad_(False).eval()
    pipeline.set_progress_bar_config(disable=True)


class LatentCache:
    """Clean latents by sample key (``data.cache_latents``: each sample encoded once, at its mode)."""

    def __init__(self, enabled: bool):
        self.store = {} if enabled else None

    def __call__(self, batch: dict, encode, generator) -> dict[str, torch.Tensor]:
        if self.store is None:
            return encode(batch, generator)
        missing = [index for index, key in enumerate(batch["key"]) if key not in self.store]
        if missing:
            subset = {
                key: value[missing] if isinstance(value, torch.Tensor) else [value[i] for i in missing]
                for key, value in batch.items()
            }
            fresh = encode(subset, None)
            for position, index in enumerate(missing):
                self.store[batch["key"][index]] = {name: value[position] for name, value in fresh.items()}
        names = next(iter(self.store.values())).keys()
        return {name: torch.stack([self.store[key][name] for key in batch["key"]]) for name in names}


class LSDMFamily:
    kind = "lsdm"

    def __init__(self, pipeline):
        from hyperhuman.lsdm.model import LatentStructuralUNet

        if not isinstance(pipeline.unet, LatentStructuralUNet):
            raise ConfigError(f"the teacher holds a {type(pipeline.unet).__name__}, not an LSDM")
        _frozen(pipeline)
        self.pipeline, self.unet = pipeline, pipeline.unet
        self.names = list(self.unet.config.branches)
        self.empty = None

    def to(self, device) -> LSDMFamily:
        for module in (self.pipeline.vae, self.pipeline.text_encoder, self.unet):
            module.to(device)
        return self

    def inputs(self, batch: dict, cache: LatentCache, text_dropout: float, generator) -> tuple:
        from hyperhuman.lsdm.data import encode_batch
        from hyperhuman.lsdm.train import drop_conditions
        from hyperhuman.text import encode_prompts

        pipeline, device = self.pipeline, self.unet.device
        if self.empty is None:
            self.empty = encode_prompts(pipeline.tokenizer, pipeline.text_encoder, [""], device)
        empty_states, empty_mask = self.empty
        latents = cache(batch, lambda part, g: encode_batch(pipeline.vae, self.unet, part, self.names, g), generator)
        states, mask = encode_prompts(pipeline.tokenizer, pipeline.text_encoder, batch["caption"], device)
        states, mask, pose = drop_conditions(
            states, mask, latents["pose"], empty_states, empty_mask, text_dropout, 0.0, generator
        )
        size = states.shape[0]
        conditions = {"encoder_hidden_states": states, "encoder_attention_mask": mask, "pose_latent": pose}
        unconditional = {  # text-only guidance, as the pipeline guides
            "encoder_hidden_states": empty_states.expand(size, -1, -1),
            "encoder_attention_mask": empty_mask.expand(size, -1),
            "pose_latent": pose,
        }
        return torch.cat([latents[name] for name in self.names], dim=1), conditions, unconditional

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from hyperhuman.lsdm.train import branch_losses

        return sum(branch_losses(prediction, list(target.chunk(len(self.names), dim=1))))

    def make_pipeline(self, unet):
        from hyperhuman.lsdm.pipeline import HyperHumanPipeline

        return HyperHumanPipeline(**{**self.pipeline.components, "unet": unet})

    def validate(self, accelerator, pipeline, validation: dict, batch: dict, output: Path, step: int) -> Path:
        from hyperhuman.lsdm.train import run_validation

        return run_validation(accelerator, pipeline, validation, batch, output, step)


class StableDiffusionFamily:
    kind = "stable-diffusion"

    def __init__(self, pipeline):
        _frozen(pipeline)
        self.pipeline, self.unet = pipeline, pipeline.unet
        self.names = ["rgb"]
        self.empty = None

    def to(self, device) -> StableDiffusionFamily:
        self.pipeline.to(device)
        return self

    def _encode(self, batch: dict, generator) -> dict[str, torch.Tensor]:
        vae = self.pipeline.vae
        with torch.no_grad():
            posterior = vae.encode(batch["pixel_values"].to(vae.device, vae.dtype)).latent_dist
            if generator is None:
                latents = posterior.mode()
            else:
                noise = torch.randn(posterior.mean.shape, generator=generator, dtype=posterior.mean.dtype)
                latents = posterior.mean + posterior.std * noise.to(posterior.mean.device)
        return {"rgb": latents.float() * vae.config.scaling_factor}

    def _prompts(self, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            states, _ = self.pipeline.encode_prompt(prompts, self.unet.device, 1, False)
        return states

    def inputs(self, batch: dict, cache: LatentCache, text_dropout: float, generator) -> tuple:
        if self.empty is None:
            self.empty = self._prompts([""])
        clean = cache(batch, self._encode, generator)["rgb"].to(self.unet.device)
        states = self._prompts(list(batch["caption"]))
        dropped = torch.rand(states.shape[0], generator=generator) < text_dropout
        states = torch.where(dropped[:, None, None].to(states.device), self.empty, states)
        unconditional = {"encoder_hidden_states": self.empty.expand(states.shape[0], -1, -1)}
        return clean, {"encoder_hidden_states": states}, unconditional

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(prediction.float(), target.float())

    def make_pipeline(self, unet):
        from diffusers import StableDiffusionPipeline

        components = {**self.pipeline.components, "unet": unet, "safety_checker": None, "feature_extractor": None}
        return StableDiffusionPipeline(**components, requires_safety_checker=False)

    def validate(self, accelerator, pipeline, validation: dict, batch: dict, output: Path, step: int) -> Path:
        from hyperhuman.training import image_grid

        pipeline.set_progress_bar_config(disable=True)
        resolution = batch["pixel_values"].shape[-1]
        with torch.no_grad():
            images = pipeline(
                list(batch["caption"]),
                height=resolution,
                width=resolution,
                num_inference_steps=validation["num_inference_steps"],
                guidance_scale=validation.get("guidance_scale", 4.0),
                generator=torch.Generator().manual_seed(0),
            ).images
        grid = image_grid([images])
        path = output / "validation" / f"step-{step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        tracker = accelerator.get_tracker("tensorboard", unwrap=True)
        if tracker is not None:
            tracker.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        return path
