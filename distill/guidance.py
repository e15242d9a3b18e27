"""Classifier-free guidance folded into the student: a guidance-scale input, and the teacher's
guided prediction it learns from.

The student gets LCM's input (diffusers ``examples/consistency_distillation``): the guidance scale
embedded sinusoidally (VDM's embedding,
:func:`hyperhuman.lsdm.pipeline.guidance_embedding`) and passed as ``timestep_cond``,
which ``UNet2DConditionModel`` adds to the time embedding through a linear layer
(``time_cond_proj_dim``). Our guidance convention is the pipeline's, ``v = v_u + w·(v_c − v_u)``
(``w = 1``: no guidance); LCM writes ``v_c + w'·(v_c − v_u)``, so like its pipeline we embed
``w' = w − 1``. The new layer starts at zero, so a student fresh from :func:`add_guidance_input`
computes exactly what its teacher computes.
"""

from __future__ import annotations

import torch

from hyperhuman.lsdm.pipeline import guidance_embedding

__all__ = ["DEFAULT_DIM", "add_guidance_input", "guidance_dim", "guidance_embedding", "guided_v"]

DEFAULT_DIM = 256


def guidance_dim(model) -> int | None:
    """The width of a model's guidance input (``time_cond_proj_dim``), ``None`` if it has none."""
    config = model.config
    unet = config.get("unet") if "unet" in config else config  # LSDM: one branch's UNet config
    return unet.get("time_cond_proj_dim")


def add_guidance_input(model, dim: int = DEFAULT_DIM):
    """A copy of ``model`` (an LSDM or a ``UNet2DConditionModel``) with a guidance-scale input of
    width ``dim``; every other weight copied, the new projection zero."""
    if guidance_dim(model) is not None:
        raise ValueError(f"the model already has a guidance input (time_cond_proj_dim={guidance_dim(model)})")
    config = {key: value for key, value in dict(model.config).items() if not key.startswith("_")}
    if "unet" in config:
        config["unet"] = {**config["unet"], "time_cond_proj_dim": dim}
    else:
        config["time_cond_proj_dim"] = dim
    student = type(model).from_config(config).to(model.device, model.dtype)
    missing, unexpected = student.load_state_dict(model.state_dict(), strict=False)
    new = [key for key in missing if not key.endswith("time_embedding.cond_proj.weight")]
    if new or unexpected:
        raise RuntimeError(f"guidance input: unexpected weight mismatch, missing {new[:5]}, extra {unexpected[:5]}")
    for module in student.modules():
        if getattr(module, "cond_proj", None) is not None:
            torch.nn.init.zeros_(module.cond_proj.weight)
    return student


def guided_v(model, latents, timesteps, conditions: dict, unconditional: dict, guidance_scale: torch.Tensor):
    """The v-prediction at guidance ``guidance_scale`` (per sample): one call with the scale as
    input for a model that has one, else classifier-free guidance (a conditional and an
    unconditional half in one batch; only the conditional pass where every scale is 1).

    ``conditions`` / ``unconditional``: the model's keyword inputs besides ``sample``/``timestep``
    (text states, mask, pose latent), per sample."""
    scale = torch.as_tensor(guidance_scale, dtype=latents.dtype, device=latents.device).reshape(-1)
    timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(latents.shape[0])
    dim = guidance_dim(getattr(model, "module", model))  # through a data-parallel wrapper
    if dim is not None:
        embedded = guidance_embedding(scale.expand(latents.shape[0]), dim, latents.dtype).to(latents.device)
        return model(latents, timesteps, **conditions, timestep_cond=embedded).sample
    if bool((scale == 1).all()):
        return model(latents, timesteps, **conditions).sample
    both = {key: None if value is None else torch.cat([unconditional[key], value]) for key, value in conditions.items()}
    prediction = model(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), **both).sample
    uncond, cond = prediction.chunk(2)
    return uncond + scale.reshape(-1, *([1] * (latents.ndim - 1))) * (cond - uncond)
