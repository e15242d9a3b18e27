"""Sampling with the Structure-Guided Refiner, and HyperHuman's two-stage generation.

Stage 2 alone (prompt + any subset of pose / depth / normal → image), as a ``DiffusionPipeline``:

    pipe = StructureGuidedRefinerPipeline.from_pretrained("runs/sgr-tiny/pipeline")
    out = pipe("a woman jogging in a park", pose=pose_json, depth=depth_image, normal=normal_image,
               height=1024, width=1024, generator=torch.Generator().manual_seed(0))
    out.images[0].save("refined.png")

Both stages (prompt + pose → LSDM RGB / depth / normal → refiner at the higher resolution):

    two = TwoStagePipeline.from_pretrained("runs/lsdm/pipeline", "runs/sgr/pipeline")
    out = two("a woman jogging in a park", pose_json, height=1024, width=1024)
    out.stage1.rgb[0], out.stage1.depth[0], out.stage1.normal[0], out.refined[0]

Conditions follow the training conversions (:func:`condition_units`): the pose skeleton rendered
OpenPose-style at the output size, depth as *nearness* (bright = near) replicated to 3 channels,
normals as unit vectors (x right, y up, z toward the viewer); each map ends up ``(B, 3, H, W)`` in
[-1, 1] at the output resolution. A condition that is not given is dropped, and with none given
the pipeline samples from the frozen base UNet alone, exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from hyperhuman import modalities
from hyperhuman.lsdm.pipeline import (
    HyperHumanPipeline,
    HyperHumanPipelineOutput,
    check_num_inference_steps,
    np_output_to_pil,
    render_pose_condition,
)

# Imported by name so that ``from_pretrained`` can resolve the refiner: ``save_pretrained`` records it
# in model_index.json as ["hyperhuman.sgr.model", "StructureGuidedRefiner"], and diffusers only
# resolves such a library from modules already imported (as with hyperhuman.lsdm.model).
from hyperhuman.sgr.model import StructureGuidedRefiner, refiner_forward
from hyperhuman.skeleton import check_renderer_version
from hyperhuman.text import encode_prompts, encode_sdxl_prompts

# Base-UNet config keys the refiner's control copy must share with the base UNet it steers.
MATCHING_UNET_KEYS = (
    "in_channels",
    "block_out_channels",
    "down_block_types",
    "layers_per_block",
    "cross_attention_dim",
)
NORMAL_TOLERANCE = 1e-3  # float normals may exceed [-1, 1] by rounding only


# --- conditions: inputs → the refiner's [-1, 1] maps ---------------------------------------------------
def condition_units(
    pose: np.ndarray | torch.Tensor | None = None,
    depth: np.ndarray | torch.Tensor | None = None,
    normal: np.ndarray | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Structure maps at the output size → ``{name: (B, 3, H, W) float32 in [-1, 1]}`` for the refiner.

    The same conversions as training (:func:`hyperhuman.modalities.batch_to_units`):

    - ``pose``: uint8 ``(B, H, W, 3)`` skeleton renders → :func:`modalities.image_to_unit`;
    - ``depth``: float ``(B, H, W)`` *nearness* in [0, 1] (1 = nearest, as ``depth_to_unit``
      normalises it and as :class:`HyperHumanPipeline` returns it) → ``2 · nearness − 1`` on 3
      identical channels;
    - ``normal``: float ``(B, H, W, 3)`` unit vectors (x right, y up, z toward the viewer) → the
      vectors themselves, channels first, clamped to [-1, 1].

    Only the conditions given are in the result.
    """
    units = {}
    if pose is not None:
        units["pose"] = modalities.image_to_unit(pose)
    if depth is not None:
        depth = torch.as_tensor(np.asarray(depth) if not isinstance(depth, torch.Tensor) else depth).float()
        if depth.ndim != 3:
            raise ValueError(f"depth must be nearness of shape (B, H, W), got {tuple(depth.shape)}")
        units["depth"] = (depth.clamp(0, 1) * 2 - 1)[:, None].expand(-1, 3, -1, -1).contiguous()
    if normal is not None:
        normal = torch.as_tensor(np.asarray(normal) if not isinstance(normal, torch.Tensor) else normal).float()
        if normal.ndim != 4 or normal.shape[-1] != 3:
            raise ValueError(f"normal must be unit vectors of shape (B, H, W, 3), got {tuple(normal.shape)}")
        units["normal"] = normal.permute(0, 3, 1, 2).clamp(-1, 1).contiguous()
    return units


def prepare_depth(depth, batch_size: int, height: int, width: int) -> torch.Tensor:
    """Nearness maps → float ``(B, height, width)`` in [0, 1], resized bilinearly.

    ``depth``: a PIL image (mode ``L`` or a gray ``RGB``; 255 = nearest), a uint8 ``(H, W)`` array
    (same scale), a float array ``(H, W)`` or ``(B, H, W)`` with nearness in [0, 1] (the
    ``output_type="np"`` depth of :class:`HyperHumanPipeline`), or a list of those, one per
    prompt. One map for several prompts is used for all of them.
    """
    maps = [_depth_item(item) for item in _per_prompt(depth, batch_size, "depth", item_ndim=2)]
    return torch.stack([_resize(item[None], height, width)[0] for item in maps])


def prepare_normal(normal, batch_size: int, height: int, width: int) -> torch.Tensor:
    """Normal maps → float ``(B, height, width, 3)`` unit vectors, resized bilinearly and renormalised.

    ``normal``: a PIL ``RGB`` image or uint8 ``(H, W, 3)`` array encoding ``rgb = (n + 1) · 127.5``
    (our shards' ``.normal.png``), a float array ``(H, W, 3)`` or ``(B, H, W, 3)`` of unit vectors in
    [-1, 1] (x right, y up, z toward the viewer), or a list of those, one per prompt.
    """
    maps = [_normal_item(item) for item in _per_prompt(normal, batch_size, "normal", item_ndim=3)]
    resized = torch.stack([_resize(item.permute(2, 0, 1), height, width) for item in maps])
    resized = resized / resized.norm(dim=1, keepdim=True).clamp_min(1e-6)  # as the shard reader does
    return resized.permute(0, 2, 3, 1).contiguous()


def prepare_pose(pose, batch_size: int, height: int, width: int) -> np.ndarray:
    """Pose annotations (scaled to the output size) or skeleton images (resized) → uint8 ``(B, H, W, 3)``.

    ``pose``: our pose JSON dict (``width``, ``height``, ``people`` with COCO-17 ``keypoints``), a
    rendered skeleton (PIL or uint8 ``(H, W, 3)``), or a list of those, one per prompt.
    """
    poses = pose if isinstance(pose, list | tuple) else [pose]
    if len(poses) == 1:
        poses = poses * batch_size
    if len(poses) != batch_size:
        raise ValueError(f"got {len(poses)} poses for {batch_size} prompts; pass one pose or one per prompt")
    return np.stack([render_pose_condition(p, height, width) for p in poses])


def _per_prompt(value, batch_size: int, name: str, item_ndim: int) -> list:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, list | tuple):
        items = list(value)
    elif isinstance(value, PIL.Image.Image):
        items = [value]
    else:
        array = np.asarray(value)
        if array.ndim == item_ndim:
            items = [array]
        elif array.ndim == item_ndim + 1:
            items = list(array)
        else:
            raise ValueError(
                f"{name} arrays must have {item_ndim} dimensions (one map) or {item_ndim + 1} (a batch), "
                f"got shape {array.shape}"
            )
    if len(items) == 1:
        items = items * batch_size
    if len(items) != batch_size:
        raise ValueError(f"got {len(items)} {name} maps for {batch_size} prompts; pass one map or one per prompt")
    return items


def _depth_item(item) -> torch.Tensor:
    if isinstance(item, PIL.Image.Image):
        if item.mode not in ("L", "RGB"):
            raise ValueError(
                f"depth images must be 8-bit nearness (PIL mode 'L' or a gray 'RGB'), got mode {item.mode!r}; "
                "raw depth (e.g. 16-bit PNGs) must first be turned into nearness in [0, 1] "
                "(see hyperhuman.modalities.depth_to_unit)"
            )
        item = np.asarray(item.convert("L"))
    array = np.asarray(item)
    if array.ndim != 2:
        raise ValueError(f"a depth map must be (H, W), got shape {array.shape}")
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float32) / 255.0)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"depth arrays must be uint8 or float nearness in [0, 1], got {array.dtype}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise ValueError(
            f"float depth must be nearness in [0, 1] (1 = nearest), got values in [{array.min()}, {array.max()}]"
        )
    return torch.from_numpy(array)


def _normal_item(item) -> torch.Tensor:
    if isinstance(item, PIL.Image.Image):
        if item.mode != "RGB":
            raise ValueError(f"normal images must be PIL 'RGB' (rgb = (n + 1) · 127.5), got mode {item.mode!r}")
        item = np.asarray(item)
    array = np.asarray(item)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"a normal map must be (H, W, 3), got shape {array.shape}")
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float32) / 127.5 - 1.0)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"normal arrays must be uint8 images or float unit vectors, got {array.dtype}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all() or np.abs(array).max() > 1 + NORMAL_TOLERANCE:
        raise ValueError(f"float normals must be unit vectors in [-1, 1], got values up to {np.abs(array).max()}")
    return torch.from_numpy(array)


def _resize(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(C, h, w)`` → ``(C, height, width)``, bilinear (antialiased when shrinking); unchanged if the size fits."""
    if tuple(tensor.shape[-2:]) == (height, width):
        return tensor
    return F.interpolate(tensor[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True)[0]


# --- stage 2 ---------------------------------------------------------------------------------------
@dataclass
class StructureGuidedRefinerPipelineOutput(BaseOutput):
    """``images`` per prompt: PIL (``"pil"``), float ``(B, H, W, 3)`` in [0, 1] (``"np"``) or the
    latents (``"latent"``). ``pose``: the pose render the refiner saw, uint8 ``(B, H, W, 3)``
    (a list of PIL images for ``"pil"``), ``None`` without a pose."""

    images: list | np.ndarray | torch.Tensor
    pose: list | np.ndarray | None = None


class StructureGuidedRefinerPipeline(DiffusionPipeline):
    """HyperHuman stage 2: a frozen base text-to-image UNet steered by the Structure-Guided Refiner.

    Components: ``vae``, ``text_encoder`` + ``tokenizer`` (those of the base model; see
    :func:`hyperhuman.text.encode_prompts`), ``unet`` (the frozen base ``UNet2DConditionModel``),
    ``refiner`` (:class:`StructureGuidedRefiner` trained for that UNet) and ``scheduler`` (the
    base model's: its ``prediction_type`` must be what the base UNet predicts; nothing here can
    check that). SDXL-style bases (``addition_embed_type="text_time"``) also take ``text_encoder_2``
    + ``tokenizer_2``: the prompt is encoded as SDXL's pipeline does
    (:func:`hyperhuman.text.encode_sdxl_prompts`), with size ``time_ids`` ``(H, W, 0, 0, H, W)``;
    the negative prompt is encoded too (not zeroed), as ``train-sgr`` drops the text to the empty
    prompt's encoding.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["text_encoder_2", "tokenizer_2"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder,
        tokenizer,
        unet: UNet2DConditionModel,
        refiner: StructureGuidedRefiner,
        scheduler,
        text_encoder_2=None,
        tokenizer_2=None,
    ):
        super().__init__()
        check_components(vae, unet, refiner, text_encoder_2)
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, refiner=refiner, scheduler=scheduler,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        )  # fmt: skip
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    def prepare_conditions(self, pose, depth, normal, batch_size: int, height: int, width: int) -> dict:
        """The given conditions → ``{name: (B, 3, height, width)}`` in [-1, 1] (:func:`condition_units`),
        plus ``"pose_images"`` (uint8 renders) when a pose is given."""
        given = {name for name, value in (("pose", pose), ("depth", depth), ("normal", normal)) if value is not None}
        unknown = given - set(self.refiner.config.conditions)
        if unknown:
            raise ValueError(
                f"this refiner has no embedder for {sorted(unknown)}; it was trained with conditions "
                f"{list(self.refiner.config.conditions)}"
            )
        if any(isinstance(p, dict) for p in (pose if isinstance(pose, list | tuple) else [pose])):
            check_renderer_version(self.refiner.config.get("pose_renderer"), "this refiner")
        pose_images = None if pose is None else prepare_pose(pose, batch_size, height, width)
        units = condition_units(
            pose=pose_images,
            depth=None if depth is None else prepare_depth(depth, batch_size, height, width),
            normal=None if normal is None else prepare_normal(normal, batch_size, height, width),
        )
        return {"units": units, "pose_images": pose_images}

    def encode(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Prompts → (encoder states, attention mask, pooled embeddings or None for SD-style bases)."""
        if self.text_encoder_2 is not None:
            tokenizers, encoders = [self.tokenizer, self.tokenizer_2], [self.text_encoder, self.text_encoder_2]
            return encode_sdxl_prompts(tokenizers, encoders, prompts, device)
        return (*encode_prompts(self.tokenizer, self.text_encoder, prompts, device), None)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images ``(B, 3, H, W)`` in [-1, 1] (the VAE's scaling and shift undone)."""
        latents = latents / self.vae.config.scaling_factor
        if getattr(self.vae.config, "shift_factor", None) is not None:
            latents = latents + self.vae.config.shift_factor
        return self.vae.decode(latents.to(self.vae.dtype)).sample.float().clamp(-1, 1)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        pose=None,
        depth=None,
        normal=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        conditioning_scale: float = 1.0,
        return_dict: bool = True,
    ) -> StructureGuidedRefinerPipelineOutput | tuple:
        """Generate ``height`` × ``width`` images from prompts and any subset of structure conditions.

        Args:
            prompt: one prompt or a list (the batch).
            pose: our pose JSON dict (``width``, ``height``, ``people`` with COCO-17 ``keypoints`` in
                the pixels of that width × height; scaled to the output size and rendered OpenPose-style)
                or a rendered skeleton (PIL / uint8 ``(H, W, 3)``, resized); one for all prompts or a list.
            depth: nearness (bright = near): PIL ``L`` / gray ``RGB``, uint8 ``(H, W)``, or float
                ``(H, W)`` / ``(B, H, W)`` in [0, 1] as :class:`HyperHumanPipeline`'s ``np`` output.
            normal: PIL ``RGB`` / uint8 ``(H, W, 3)`` encoding ``(n + 1) · 127.5``, or float unit vectors
                ``(H, W, 3)`` / ``(B, H, W, 3)`` in [-1, 1] (x right, y up, z toward the viewer).
            height, width: output size in pixels (default: the base UNet's ``sample_size`` × the VAE
                factor). Every condition is resized to it (bilinear), whatever its own size: that
                is how stage 1's low-resolution depth and normal are upsampled.
            num_inference_steps, guidance_scale, negative_prompt: sampling and text-only classifier-free
                guidance (the conditions go to both halves; ``guidance_scale <= 1`` disables it).
            generator, latents: the initial noise ``(B, C, height / f, width / f)``, drawn from
                ``generator`` unless given.
            output_type: ``"pil"``, ``"np"`` (float ``(B, H, W, 3)`` in [0, 1]) or ``"latent"``.
            conditioning_scale: multiplies the refiner's residuals (0: the base UNet).

        A condition left ``None`` is dropped (as in training's robust conditioning); with none
        given the refiner is not run and the images are the frozen base UNet's, exactly.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts)
        height, width = self.check_inputs(prompts, negative_prompt, height, width, latents, output_type)
        check_num_inference_steps(num_inference_steps)
        device = self._execution_device
        do_cfg = guidance_scale > 1.0

        states, mask, pooled = self.encode(prompts, device)
        if do_cfg:
            negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * batch
            negative_states, negative_mask, negative_pooled = self.encode(negatives, device)
            states, mask = torch.cat([negative_states, states]), torch.cat([negative_mask, mask])
            pooled = None if pooled is None else torch.cat([negative_pooled, pooled])
        states = states.to(self.unet.dtype)
        added_cond_kwargs = None
        if pooled is not None:  # SDXL: pooled text and size micro-conditioning (no crop)
            time_ids = torch.tensor([[height, width, 0, 0, height, width]] * len(states), device=device)
            added_cond_kwargs = {"text_embeds": pooled.to(self.unet.dtype), "time_ids": time_ids.to(self.unet.dtype)}

        prepared = self.prepare_conditions(pose, depth, normal, batch, height, width)
        conditions = {}
        for name, units in prepared["units"].items():
            units = units.to(device=device, dtype=self.refiner.dtype)
            conditions[name] = torch.cat([units, units]) if do_cfg else units  # text-only guidance

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        latents = latents.to(device) * self.scheduler.init_noise_sigma

        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            if conditions:
                prediction = refiner_forward(
                    self.unet,
                    self.refiner,
                    model_input,
                    t,
                    states,
                    conditions,
                    encoder_attention_mask=mask,
                    conditioning_scale=conditioning_scale,
                    added_cond_kwargs=added_cond_kwargs,
                )
            else:  # every condition dropped: the base UNet alone
                prediction = self.unet(
                    model_input, t, states, encoder_attention_mask=mask, added_cond_kwargs=added_cond_kwargs,
                    return_dict=False,
                )[0]  # fmt: skip
            if do_cfg:
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
            latents = self.scheduler.step(prediction, t, latents, generator=generator).prev_sample

        pose_images = prepared["pose_images"]
        if output_type == "latent":
            output = StructureGuidedRefinerPipelineOutput(images=latents, pose=pose_images)
            return output if return_dict else tuple(output.values())
        images = modalities.unit_to_image(self.decode_latents(latents))
        self.maybe_free_model_hooks()
        if output_type == "np":
            output = StructureGuidedRefinerPipelineOutput(images=images.astype(np.float32) / 255.0, pose=pose_images)
        else:
            output = StructureGuidedRefinerPipelineOutput(
                images=[PIL.Image.fromarray(image) for image in images],
                pose=None if pose_images is None else [PIL.Image.fromarray(image) for image in pose_images],
            )
        return output if return_dict else tuple(output.values())

    def check_inputs(self, prompts, negative_prompt, height, width, latents, output_type) -> tuple[int, int]:
        """Refuse bad arguments before any work, naming the argument; returns the output size."""
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompts!r}")
        if isinstance(negative_prompt, list) and len(negative_prompt) != len(prompts):
            raise ValueError(f"got {len(negative_prompt)} negative prompts for {len(prompts)} prompts")
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        default = self.unet.config.sample_size * self.vae_scale_factor
        height, width = height or default, width or default
        factor = self.vae_scale_factor * 2**self.unet.num_upsamplers
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {height}×{width}")
        if latents is not None:
            expected = (
                len(prompts),
                self.unet.config.in_channels,
                height // self.vae_scale_factor,
                width // self.vae_scale_factor,
            )
            if tuple(latents.shape) != expected:
                raise ValueError(f"latents must have shape {expected}, got {tuple(latents.shape)}")
        return height, width


def check_components(
    vae: AutoencoderKL, unet: UNet2DConditionModel, refiner: StructureGuidedRefiner, text_encoder_2=None
) -> None:
    """Refuse component sets that cannot sample, naming what is wrong or missing."""
    config = unet.config
    if config.addition_embed_type == "text_time" and text_encoder_2 is None:
        raise ValueError(
            "the base UNet is SDXL-style (addition_embed_type='text_time'): it needs pooled text embeddings "
            "(added_cond_kwargs['text_embeds']) from a second text encoder: pass text_encoder_2 and tokenizer_2"
        )
    if text_encoder_2 is not None and config.addition_embed_type != "text_time":
        raise ValueError("text_encoder_2 is given but the base UNet has no SDXL text_time conditioning to use it")
    if config.addition_embed_type not in (None, "text", "text_time"):
        raise NotImplementedError(
            f"the base UNet's addition_embed_type={config.addition_embed_type!r} needs image embeddings, "
            "which StructureGuidedRefinerPipeline does not provide"
        )
    if config.class_embed_type is not None or config.num_class_embeds is not None:
        raise NotImplementedError(
            f"the base UNet needs class_labels (class_embed_type={config.class_embed_type!r}, "
            f"num_class_embeds={config.num_class_embeds}), which StructureGuidedRefinerPipeline does not provide"
        )
    if config.encoder_hid_dim_type not in (None, "text_proj"):
        raise NotImplementedError(
            f"the base UNet's encoder_hid_dim_type={config.encoder_hid_dim_type!r} needs image embeddings, "
            "which StructureGuidedRefinerPipeline does not provide"
        )
    if config.in_channels != vae.config.latent_channels:
        raise ValueError(
            f"unet.in_channels={config.in_channels} but the VAE has latent_channels={vae.config.latent_channels}: "
            "the base must be a plain text-to-image UNet"
        )
    refiner_unet = refiner.config.unet
    mismatched = [key for key in MATCHING_UNET_KEYS if _as_list(refiner_unet.get(key)) != _as_list(config[key])]
    if mismatched:
        raise ValueError(
            f"the refiner was built for another base UNet: {', '.join(mismatched)} differ "
            f"(refiner {[refiner_unet.get(k) for k in mismatched]}, unet {[config[k] for k in mismatched]})"
        )
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    strides = tuple(refiner.config.embedder_strides)
    if math.prod(strides) != vae_factor:
        raise ValueError(
            f"refiner.embedder_strides {strides} downsample ×{math.prod(strides)} but the VAE's factor is "
            f"×{vae_factor}: conditions at the image size must land on the latent grid"
        )


def _as_list(value) -> list:
    """Config values compare equal whether saved as tuples or (after JSON) lists."""
    return list(value) if isinstance(value, list | tuple) else [value]


# --- both stages -----------------------------------------------------------------------------------
@dataclass
class TwoStageOutput(BaseOutput):
    """``stage1``: the LSDM's :class:`HyperHumanPipelineOutput` (rgb, depth, normal, pose at its
    resolution); ``refined``: the refiner's images at stage 2's size (PIL list, or float
    ``(B, H, W, 3)`` in [0, 1] for ``"np"``)."""

    stage1: HyperHumanPipelineOutput
    refined: list | np.ndarray


class TwoStagePipeline:
    """HyperHuman's two-stage generation: the LSDM (stage 1) then the Structure-Guided Refiner (stage 2).

    Stage 1 generates RGB, depth and normal from the prompt and pose at its own resolution; its
    depth and normal (unless the caller passes their own), upsampled bilinearly, and the pose,
    rendered again at stage 2's size, condition the refiner at the higher resolution. Stage 1's
    depth and normal are passed as floats (no 8-bit rounding) whatever the ``output_type``.
    """

    def __init__(self, stage1: HyperHumanPipeline, stage2: StructureGuidedRefinerPipeline):
        self.stage1, self.stage2 = stage1, stage2

    @classmethod
    def from_pretrained(cls, lsdm_path: str, sgr_path: str, **kwargs) -> TwoStagePipeline:
        """Both pipelines from their saved directories (``save_pretrained``); ``kwargs`` (e.g.
        ``torch_dtype``) go to both ``from_pretrained`` calls."""
        return cls(
            HyperHumanPipeline.from_pretrained(lsdm_path, **kwargs),
            StructureGuidedRefinerPipeline.from_pretrained(sgr_path, **kwargs),
        )

    def to(self, *args, **kwargs) -> TwoStagePipeline:
        self.stage1.to(*args, **kwargs)
        self.stage2.to(*args, **kwargs)
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        self.stage1.set_progress_bar_config(**kwargs)
        self.stage2.set_progress_bar_config(**kwargs)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        pose,
        stage1_steps: int = 50,
        stage2_steps: int = 30,
        stage1_guidance_scale: float = 7.5,
        stage2_guidance_scale: float = 5.0,
        height: int | None = None,
        width: int | None = None,
        stage1_height: int | None = None,
        stage1_width: int | None = None,
        negative_prompt: str | list[str] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        depth=None,
        normal=None,
        conditioning_scale: float = 1.0,
        output_type: str = "pil",
    ) -> TwoStageOutput:
        """Prompt + pose → stage 1 (rgb, depth, normal) → refined images at ``height`` × ``width``.

        Args:
            prompt, pose, negative_prompt: as in both pipelines (``pose`` is required: stage 1
                needs it; give our pose JSON so stage 2 renders it sharply at its own size).
            stage1_steps / stage2_steps, stage1_guidance_scale / stage2_guidance_scale: each stage's sampling.
            height, width: stage 2's output size (default: its base UNet's); stage1_height /
                stage1_width: stage 1's (default: the LSDM's). Keep the aspect ratios equal: stage 1's
                maps are resized to stage 2's size as they are.
            generator: used by stage 1, then by stage 2 (one seed fixes both).
            depth, normal: the caller's own maps for the refiner instead of stage 1's, in any form
                :class:`StructureGuidedRefinerPipeline` takes.
            conditioning_scale: the refiner's residual scale.
            output_type: ``"pil"`` or ``"np"`` for both stages' outputs.
        """
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np' for the two-stage pipeline, got {output_type!r}")
        stage1 = self.stage1(
            prompt,
            pose,
            height=stage1_height,
            width=stage1_width,
            num_inference_steps=stage1_steps,
            guidance_scale=stage1_guidance_scale,
            negative_prompt=negative_prompt,
            generator=generator,
            output_type="np",
        )
        refined = self.stage2(
            prompt,
            pose=pose,
            depth=stage1.depth if depth is None else depth,
            normal=stage1.normal if normal is None else normal,
            height=height,
            width=width,
            num_inference_steps=stage2_steps,
            guidance_scale=stage2_guidance_scale,
            negative_prompt=negative_prompt,
            generator=generator,
            output_type=output_type,
            conditioning_scale=conditioning_scale,
        ).images
        if output_type == "pil":
            stage1 = np_output_to_pil(stage1)
        return TwoStageOutput(stage1=stage1, refined=refined)
