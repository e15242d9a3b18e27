"""Sampling: prompt + pose → RGB, depth and normal, as a diffusers ``DiffusionPipeline``.

    pipe = HyperHumanPipeline.from_pretrained("runs/lsdm-tiny/pipeline")
    out = pipe("a woman jogging in a park", pose=pose_json, num_inference_steps=25, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0))
    out.rgb[0].save("rgb.png"); out.depth[0].save("depth.png"); out.normal[0].save("normal.png")

``pose`` is a pose annotation from our shards (``KEY.pose.json``: ``width``, ``height``, ``people``
with COCO-17 ``keypoints``), a rendered skeleton image (PIL or uint8 array), or a list of either
(one per prompt). The schedule follows the paper: zero terminal SNR, v-prediction, trailing
timesteps (:func:`make_scheduler`); any diffusers scheduler configured for v-prediction works.

A step-distilled student (``hyperhuman distill steps``) samples with the same call: its config's
``distilled_steps`` is the default ``num_inference_steps``, and with guidance folded in (a
``time_cond_proj_dim`` input) ``guidance_scale`` is fed to the model, one evaluation per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from hyperhuman import modalities
from hyperhuman.lsdm.model import LatentStructuralUNet
from hyperhuman.skeleton import check_renderer_version
from hyperhuman.slim_vae import AutoencoderKLSlimDecoder  # noqa: F401  a distilled decoder loads by this name
from hyperhuman.text import encode_prompts

# DDIM with zero terminal SNR, v-prediction and trailing spacing (Lin et al. 2024, used by HyperHuman).
SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
    "clip_sample": False,
    "set_alpha_to_one": False,
}


def make_scheduler(**overrides) -> DDIMScheduler:
    """The training recipes' ``scheduler:`` section → a DDIMScheduler (:data:`SCHEDULER_DEFAULTS` for
    what it leaves out)."""
    options = dict(SCHEDULER_DEFAULTS)
    options.update(overrides)
    return DDIMScheduler(**options)


def guidance_embedding(guidance_scale: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(B,)`` guidance scales (the pipeline's ``w``) → ``(B, dim)``, the input of a student with
    guidance folded in: LCM's embedding of ``w − 1`` (``get_guidance_scale_embedding``), so that
    ``w = 1``, no guidance, embeds as LCM's 0."""
    w = (torch.as_tensor(guidance_scale, dtype=torch.float32).reshape(-1) - 1.0) * 1000.0
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    angles = w[:, None] * frequencies.to(w.device)[None]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        embedding = torch.nn.functional.pad(embedding, (0, 1))
    return embedding.to(dtype)


@dataclass
class HyperHumanPipelineOutput(BaseOutput):
    """Per prompt: ``rgb``, ``depth`` (nearness: bright = near), ``normal`` and the conditioning ``pose``
    render. ``output_type="pil"``: PIL images. ``"np"``: ``rgb`` float (B, H, W, 3) in [0, 1],
    ``depth`` float (B, H, W) nearness in [0, 1], ``normal`` unit vectors (B, H, W, 3) (x right,
    y up, z toward the viewer), ``pose`` uint8 (B, H, W, 3). ``"latent"``: the stacked latents."""

    rgb: list | np.ndarray | torch.Tensor
    depth: list | np.ndarray | None = None
    normal: list | np.ndarray | None = None
    pose: list | np.ndarray | None = None


class HyperHumanPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, vae: AutoencoderKL, text_encoder, tokenizer, unet: LatentStructuralUNet, scheduler):
        super().__init__()
        if scheduler.config.prediction_type != "v_prediction":
            raise ValueError(
                f"the LSDM predicts v; scheduler.prediction_type is {scheduler.config.prediction_type!r}: "
                "load the scheduler with prediction_type='v_prediction'"
            )
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    # --- conditions ------------------------------------------------------------------------------
    def render_poses(self, pose, batch_size: int, height: int, width: int) -> np.ndarray:
        """uint8 ``(B, H, W, 3)`` skeleton renders at the output size."""
        poses = pose if isinstance(pose, list | tuple) else [pose] * batch_size
        if len(poses) != batch_size:
            raise ValueError(f"got {len(poses)} poses for {batch_size} prompts; pass one pose or one per prompt")
        if any(isinstance(p, dict) for p in poses):  # we draw them: with the drawing the model learnt?
            check_renderer_version(self.unet.config.get("pose_renderer"), "this LSDM")
        return np.stack([render_pose_condition(p, height, width) for p in poses])

    @torch.no_grad()
    def encode_images(self, units: torch.Tensor, name: str) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] → normalised latents of modality ``name``."""
        units = units.to(device=self._execution_device, dtype=self.vae.dtype)
        latents = self.vae.encode(units).latent_dist.mode()
        return self.unet.normalize(name, latents)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, name: str) -> torch.Tensor:
        latents = self.unet.denormalize(name, latents).to(self.vae.dtype)
        return self.vae.decode(latents).sample.float().clamp(-1, 1)

    # --- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        pose,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        negative_prompt: str | list[str] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> HyperHumanPipelineOutput | tuple:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts)
        default = self.unet.config.unet["sample_size"] * self.vae_scale_factor
        height, width = height or default, width or default
        factor = self.vae_scale_factor * 2**self.unet.trunk.num_upsamplers
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {height}×{width}")
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        if num_inference_steps is None:  # a step-distilled student's own count, else 50
            num_inference_steps = self.unet.config.get("distilled_steps") or 50
        check_num_inference_steps(num_inference_steps)
        device = self._execution_device
        # A student with guidance folded in takes the scale as an input: one evaluation per step.
        folded = self.unet.config.unet.get("time_cond_proj_dim")
        do_cfg = guidance_scale > 1.0 and not folded

        states, mask = encode_prompts(self.tokenizer, self.text_encoder, prompts, device)
        if do_cfg:
            negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * batch
            negative_states, negative_mask = encode_prompts(self.tokenizer, self.text_encoder, negatives, device)
            states, mask = torch.cat([negative_states, states]), torch.cat([negative_mask, mask])
        states = states.to(self.unet.dtype)

        pose_images = self.render_poses(pose, batch, height, width)
        pose_latent = self.encode_images(modalities.image_to_unit(pose_images), "pose").to(self.unet.dtype)
        if do_cfg:  # text-only guidance: the pose conditions both halves
            pose_latent = torch.cat([pose_latent, pose_latent])

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        channels = len(self.unet.config.branches) * self.unet.config.latent_channels
        shape = (batch, channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        latents = latents.to(device) * self.scheduler.init_noise_sigma

        scale = torch.full((batch,), float(max(guidance_scale, 1.0)))
        guidance = {"timestep_cond": guidance_embedding(scale, folded, self.unet.dtype).to(device)} if folded else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            prediction = self.unet(
                model_input, t, states, pose_latent=pose_latent, encoder_attention_mask=mask, **guidance
            ).sample
            if do_cfg:
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
                if guidance_rescale > 0:
                    prediction = rescale_noise_cfg(prediction, conditional, guidance_rescale=guidance_rescale)
            latents = self.scheduler.step(prediction, t, latents, generator=generator).prev_sample

        if output_type == "latent":
            output = HyperHumanPipelineOutput(rgb=latents, pose=pose_images)
            return output if return_dict else tuple(output.values())
        names = self.unet.config.branches
        decoded = {
            name: self.decode_latents(chunk, name)
            for name, chunk in zip(names, latents.split(self.unet.config.latent_channels, dim=1), strict=True)
        }
        self.maybe_free_model_hooks()
        output = to_output(decoded, pose_images, output_type)
        return output if return_dict else tuple(output.values())


def check_num_inference_steps(steps) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer (denoising steps), got {steps!r}")


def render_pose_condition(pose, height: int, width: int) -> np.ndarray:
    """A pose annotation (scaled to the output size) or a skeleton image (resized) → uint8 (H, W, 3)."""
    from hyperhuman.skeleton import render_pose

    if isinstance(pose, dict):
        if not {"width", "height", "people"} <= set(pose):
            raise ValueError(f"a pose annotation needs width, height and people; got keys {sorted(pose)}")
        sx, sy = width / float(pose["width"]), height / float(pose["height"])
        people = [
            {"keypoints": (np.asarray(person["keypoints"], dtype=np.float32) * [sx, sy, 1.0]).tolist()}
            for person in pose["people"]
        ]
        return render_pose({"width": width, "height": height, "people": people}, wholebody=False)
    if isinstance(pose, PIL.Image.Image):
        return np.asarray(pose.convert("RGB").resize((width, height), PIL.Image.BILINEAR))
    array = np.asarray(pose)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(
            f"pose must be a pose annotation dict, a PIL image or a uint8 (H, W, 3) array; "
            f"got {array.dtype} {array.shape}"
        )
    return np.asarray(PIL.Image.fromarray(array).resize((width, height), PIL.Image.BILINEAR))


def to_output(decoded: dict[str, torch.Tensor], pose_images: np.ndarray, output_type: str) -> HyperHumanPipelineOutput:
    rgb = modalities.unit_to_image(decoded["rgb"]).astype(np.float32) / 255.0 if "rgb" in decoded else None
    depth = modalities.unit_to_nearness(decoded["depth"]) if "depth" in decoded else None
    normal = modalities.unit_to_normal(decoded["normal"]) if "normal" in decoded else None
    output = HyperHumanPipelineOutput(rgb=rgb, depth=depth, normal=normal, pose=pose_images)
    return output if output_type == "np" else np_output_to_pil(output)


def np_output_to_pil(output: HyperHumanPipelineOutput) -> HyperHumanPipelineOutput:
    """The ``"np"`` output → its ``"pil"`` form (depth as mode ``L``, normals as ``(n + 1) · 127.5``)."""
    rgb, depth, normal = output.rgb, output.depth, output.normal
    return HyperHumanPipelineOutput(
        rgb=None if rgb is None else [PIL.Image.fromarray((image * 255).round().astype(np.uint8)) for image in rgb],
        depth=None if depth is None else [PIL.Image.fromarray((d * 255).round().astype(np.uint8), "L") for d in depth],
        normal=None
        if normal is None
        else [PIL.Image.fromarray(np.clip((n + 1) * 127.5, 0, 255).round().astype(np.uint8)) for n in normal],
        pose=[PIL.Image.fromarray(image) for image in output.pose],
    )
