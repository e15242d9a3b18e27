"""The Structure-Guided Refiner (HyperHuman sec. 3.3): the trainable half of stage 2.

A frozen base ``UNet2DConditionModel`` (SDXL in the paper; any diffusers UNet2DConditionModel
here) renders the image; the refiner steers it with the structure maps:

- one :class:`ConditionEmbedder` per condition (pose render, depth, normal: 3-channel images in
  [-1, 1] at the output resolution) maps the map to the latent grid;
- the embeddings of the conditions present are summed and added to the ``conv_in`` output of a
  trainable copy of the base UNet's encoder (``conv_in``, time / class / added embeddings, down
  blocks, mid block) — ControlNet-style;
- zero-initialised 1×1 convs turn every down-block output and the mid-block output into the
  residuals the base UNet adds to its skip connections (``down_block_additional_residuals``,
  ``mid_block_additional_residual``); :func:`refiner_forward` runs both.

The control copy is a ``UNet2DConditionModel`` built from the base UNet's own config with the
decoder removed (``control.up_blocks`` empty, no ``conv_out``), rather than a diffusers
``ControlNetModel``: its embedding code is then the UNet's own (``get_time_embed``,
``get_class_embed``, ``get_aug_embed``, ``process_encoder_hidden_states``), so every UNet option
(SDXL ``text_time`` added conditioning, ``time_cond_proj_dim``, ``class_embeddings_concat``,
``time_embed_act``, ``encoder_hid_proj``, per-block layer counts...) is carried over unchanged,
and parameter names are the base UNet's under ``control.`` (``from_unet`` is a plain copy). The
residual convs keep ControlNet's names (``controlnet_down_blocks``, ``controlnet_mid_block``).

"No condition" means the base UNet, exactly. A freshly built refiner is a no-op everywhere (zero
convs, zero projections), but after training the control branch would still push the base with
all conditions dropped. So the refiner returns exact zeros for every sample that has no condition
present (per-sample selection of the residuals, ``torch.where``, not a product: exact even where a
residual is not finite). The text is *not* a refiner condition: dropping it changes the base's
input too.

With gradients enabled (training) every embedder whose condition is given runs and the control
branch always runs, masked to zero where dropped, so every trainable parameter is in every step's
graph: a micro-batch that lost every condition still has a loss to back-propagate (zero gradients
to the refiner), and DDP finds no unused parameters. Without gradients (sampling) what contributes
nothing is skipped; both give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

CONDITIONS = ("pose", "depth", "normal")
EMBEDDER_CHANNELS = (16, 32, 96, 256)
EMBEDDER_STRIDES = (1, 2, 2, 2)  # ×8, the SD / SDXL VAE factor; the paper's (2, 2, 2, 2) would be ×16
TEXT = "text"  # the name `drop_conditions` uses for the prompt; no condition may take it
UNSUPPORTED_UNET = {"addition_embed_type": ("image_hint",), "attention_type": ("gated", "gated-text-image")}


class ConditionEmbedder(nn.Module):
    """One structure map ``(B, in_channels, H, W)`` → ``(B, out_channels, H / s, W / s)``, ``s = prod(strides)``.

    Four 4×4 convolutions with ReLU (channels 16 / 32 / 96 / 256, as in the paper), then a
    zero-initialised 1×1 projection to the control branch's width, so a new embedder adds nothing.

    Strides: the paper uses stride 2 in all four layers, i.e. a 16× smaller map, but SD / SDXL
    latents are 8× below the image, so the default is ``(1, 2, 2, 2)``: the product of the strides
    must equal the VAE's downsampling factor (checked against the latent by the refiner). A
    stride-1 layer keeps the size (padding 1 left/top, 2 right/bottom: the kernel is even); stride
    ``s >= 2`` pads 1 on every side, which divides a side that is a multiple of ``s`` exactly by ``s``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = EMBEDDER_CHANNELS,
        strides: Sequence[int] = EMBEDDER_STRIDES,
    ):
        super().__init__()
        layers, width = [], in_channels
        for channel, stride in zip(channels, strides, strict=True):
            if stride == 1:  # "same" for an even kernel: pad 1 left/top, 2 right/bottom
                layers += [nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(width, channel, kernel_size=4)]
            else:
                layers.append(nn.Conv2d(width, channel, kernel_size=4, stride=stride, padding=1))
            layers.append(nn.ReLU())
            width = channel
        self.layers = nn.Sequential(*layers)
        self.proj_out = nn.Conv2d(width, out_channels, kernel_size=1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.downscale = math.prod(strides)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.layers(condition))


class StructureGuidedRefiner(ModelMixin, ConfigMixin):
    """The refiner's trainable parts: per-condition embedders, the encoder copy, the zero convs.

    Args:
        unet: the base ``UNet2DConditionModel``'s keyword arguments (its config); the control copy
            is built from them. Use :meth:`from_unet` to also copy the base's encoder weights.
        conditions: condition names, one embedder each (paper: pose, depth, normal).
        condition_channels: channels of every condition map (3: rendered skeleton, nearness
            replicated to 3 channels, normal vector; see ``hyperhuman.modalities``).
        embedder_channels / embedder_strides: the embedders' conv layers; the strides' product
            must be the VAE factor (latent size × factor = condition size), see :class:`ConditionEmbedder`.
        pose_renderer: the :data:`hyperhuman.skeleton.RENDERER_VERSION` of the pose renders the refiner
            was trained on (recorded by ``train-sgr``; the pipeline warns when it renders with another).

    ``forward`` returns ``(down_block_res_samples, mid_block_res_sample)`` for the base UNet.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        unet: dict,
        conditions: Sequence[str] = CONDITIONS,
        condition_channels: int = 3,
        embedder_channels: Sequence[int] = EMBEDDER_CHANNELS,
        embedder_strides: Sequence[int] = EMBEDDER_STRIDES,
        pose_renderer: str | None = None,
    ):
        super().__init__()
        unet = dict(unet)
        check_sgr_config(unet, conditions, condition_channels, embedder_channels, embedder_strides)
        control = UNet2DConditionModel(**unet)
        control.up_blocks = nn.ModuleList()  # the encoder only: the base UNet decodes
        control.conv_norm_out = control.conv_act = control.conv_out = None
        self.control = control
        width = control.conv_in.out_channels
        self.embedders = nn.ModuleDict(
            {
                name: ConditionEmbedder(condition_channels, width, embedder_channels, embedder_strides)
                for name in conditions
            }
        )

        # One zero conv per skip the base UNet keeps: conv_in's output, then each down block's
        # resnet outputs and downsampler output. `_levels[i]`: how many downsamplers precede skip i.
        zero_convs, levels, level = [_zero_conv(width)], [0], 0
        for block in control.down_blocks:
            channels = block.resnets[-1].out_channels
            zero_convs += [_zero_conv(channels) for _ in block.resnets]
            levels += [level] * len(block.resnets)
            if block.downsamplers is not None:
                zero_convs.append(_zero_conv(channels))
                level += 1
                levels.append(level)
        self.controlnet_down_blocks = nn.ModuleList(zero_convs)
        self.controlnet_mid_block = _zero_conv(control.down_blocks[-1].resnets[-1].out_channels)
        self._levels = levels

    # --- construction from the base UNet ---------------------------------------------------------
    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        *,
        conditions: Sequence[str] = CONDITIONS,
        condition_channels: int = 3,
        embedder_channels: Sequence[int] = EMBEDDER_CHANNELS,
        embedder_strides: Sequence[int] = EMBEDDER_STRIDES,
        pose_renderer: str | None = None,
    ) -> StructureGuidedRefiner:
        """A refiner whose control copy holds the base UNet's encoder weights (``conv_in``, time,
        class and added embeddings, ``encoder_hid_proj``, down blocks, mid block); the embedders'
        projections and the zero convs start at zero, so the new refiner changes nothing."""
        unet_config = {key: value for key, value in unet.config.items() if not key.startswith("_")}
        model = cls(  # keywords only: register_to_config records positional arguments as defaults
            unet=unet_config,
            conditions=list(conditions),
            condition_channels=condition_channels,
            embedder_channels=list(embedder_channels),
            embedder_strides=list(embedder_strides),
            pose_renderer=pose_renderer,
        )
        expected = {key for key in model.state_dict() if key.startswith("control.")}
        state = {f"control.{key}": value for key, value in unet.state_dict().items() if f"control.{key}" in expected}
        missing = expected - set(state)
        if missing:
            raise RuntimeError(f"UNet → refiner encoder copy: the UNet lacks {sorted(missing)[:5]}")
        model.load_state_dict(state, strict=False)
        return model if unet.dtype == torch.float32 else model.to(dtype=unet.dtype)

    # --- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        conditions: Mapping[str, torch.Tensor | None],
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
        condition_masks: Mapping[str, torch.Tensor] | None = None,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The base UNet's inputs plus ``conditions`` ``{name: (B, C, H·s, W·s) or None}`` → residuals.

        ``condition_masks`` ``{name: (B,) bool}`` (True = present) drops a condition for some
        samples only (see :func:`drop_conditions`); a missing name is present for every sample
        that has a tensor. A condition that is ``None``, absent, or masked out contributes nothing;
        a sample with no condition present gets exact-zero residuals (the base UNet unchanged).
        """
        masks = self._condition_masks(sample, conditions, condition_masks or {})
        keep_graph = torch.is_grad_enabled()  # training: every parameter in the graph, see the module notes
        if not keep_graph:
            masks = {name: mask for name, mask in masks.items() if bool(mask.any())}
        if not masks:
            return self._zero_residuals(sample)

        # A marked copy of the encoder half of UNet2DConditionModel.forward (diffusers 0.42.1),
        # with the summed condition embeddings added after conv_in.
        control = self.control
        if encoder_attention_mask is not None:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if control.config.center_input_sample:
            sample = 2 * sample - 1.0
        added_cond_kwargs = added_cond_kwargs or {}
        emb = control.time_embedding(control.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        class_emb = control.get_class_embed(sample=sample, class_labels=class_labels)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if control.config.class_embeddings_concat else emb + class_emb
        aug_emb = control.get_aug_embed(
            emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )
        emb = emb + aug_emb if aug_emb is not None else emb
        if control.time_embed_act is not None:
            emb = control.time_embed_act(emb)
        encoder_hidden_states = control.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )

        hidden = control.conv_in(sample)
        for name, mask in masks.items():
            embedding = self.embedders[name](conditions[name])
            if not bool(mask.all()):
                embedding = torch.where(mask[:, None, None, None], embedding, torch.zeros_like(embedding))
            hidden = hidden + embedding
        context = {"encoder_hidden_states": encoder_hidden_states, "encoder_attention_mask": encoder_attention_mask}
        skips = (hidden,)
        for block in control.down_blocks:
            if getattr(block, "has_cross_attention", False):
                hidden, res = block(hidden_states=hidden, temb=emb, **context)
            else:
                hidden, res = block(hidden_states=hidden, temb=emb)
            skips += res
        if control.mid_block is not None:
            if getattr(control.mid_block, "has_cross_attention", False):
                hidden = control.mid_block(hidden, emb, **context)
            else:
                hidden = control.mid_block(hidden, emb)

        down = [conv(skip) * conditioning_scale for conv, skip in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid = self.controlnet_mid_block(hidden) * conditioning_scale
        present = torch.stack(list(masks.values())).any(dim=0)
        if not bool(present.all()):  # samples without any condition: exactly the base UNet
            keep = present[:, None, None, None]
            down = [torch.where(keep, residual, torch.zeros_like(residual)) for residual in down]
            mid = torch.where(keep, mid, torch.zeros_like(mid))
        return tuple(down), mid

    def _condition_masks(self, sample, conditions, condition_masks) -> dict[str, torch.Tensor]:
        """Check the inputs; ``{name: (B,) bool}`` (True = present) for every condition given a tensor."""
        names = list(self.config.conditions)
        for name in [*conditions, *condition_masks]:
            if name not in names:
                raise ValueError(f"unknown condition {name!r}; this refiner has embedders for {names}")
        batch, latent_size = sample.shape[0], tuple(sample.shape[-2:])
        factor = 2 ** sum(block.downsamplers is not None for block in self.control.down_blocks)
        if latent_size[0] % factor or latent_size[1] % factor:
            raise ValueError(f"latent size {latent_size} must be divisible by {factor} (the UNet's downsampling)")
        strides = tuple(self.config.embedder_strides)
        scale = math.prod(strides)
        expected = (batch, self.config.condition_channels, latent_size[0] * scale, latent_size[1] * scale)
        masks = {}
        for name in names:
            condition, mask = conditions.get(name), condition_masks.get(name)
            if condition is None:
                continue
            if tuple(condition.shape) != expected:
                raise ValueError(
                    f"condition {name!r} has shape {tuple(condition.shape)}; expected {expected}: the latent is "
                    f"{latent_size[0]}×{latent_size[1]} and embedder_strides {strides} downsample ×{scale}, so "
                    f"conditions must be {expected[2]}×{expected[3]} (set embedder_strides so their product is "
                    "the VAE factor)"
                )
            if mask is None:
                mask = torch.ones(batch, dtype=torch.bool, device=sample.device)
            elif mask.dtype != torch.bool or tuple(mask.shape) != (batch,):
                raise ValueError(
                    f"condition_masks[{name!r}] must be a bool tensor of shape ({batch},), "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
            masks[name] = mask
        return masks

    def _zero_residuals(self, sample: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        batch, height, width = sample.shape[0], sample.shape[-2], sample.shape[-1]

        def zeros(conv, level):
            return sample.new_zeros(batch, conv.out_channels, height >> level, width >> level)

        down = tuple(zeros(conv, level) for conv, level in zip(self.controlnet_down_blocks, self._levels, strict=True))
        return down, zeros(self.controlnet_mid_block, self._levels[-1])


def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def check_sgr_config(unet: dict, conditions, condition_channels: int, embedder_channels, embedder_strides):
    """Refuse configs that cannot work, naming the key to change."""
    if isinstance(conditions, str) or not conditions or len(set(conditions)) != len(conditions):
        raise ValueError(f"conditions must be a non-empty list of distinct names, got {conditions!r}")
    if TEXT in conditions:
        raise ValueError(f"conditions must not include {TEXT!r}: drop_conditions uses that name for the prompt")
    if condition_channels < 1:
        raise ValueError(f"condition_channels must be positive, got {condition_channels}")
    if not embedder_channels or len(embedder_channels) != len(embedder_strides):
        raise ValueError(
            f"embedder_channels {tuple(embedder_channels)} and embedder_strides {tuple(embedder_strides)} "
            "must be non-empty and of the same length (one per conv layer)"
        )
    if any(c < 1 for c in embedder_channels) or any(s < 1 for s in embedder_strides):
        raise ValueError(
            f"embedder_channels and embedder_strides must be positive, got {embedder_channels=}, {embedder_strides=}"
        )
    for key, values in UNSUPPORTED_UNET.items():
        if unet.get(key) in values:
            raise ValueError(f"unet.{key}={unet[key]!r} is not supported by the refiner")


# --- running the base UNet with the refiner ---------------------------------------------------------
def refiner_forward(
    base_unet: UNet2DConditionModel,
    refiner: StructureGuidedRefiner,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    conditions: Mapping[str, torch.Tensor | None],
    *,
    condition_masks: Mapping[str, torch.Tensor] | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    conditioning_scale: float = 1.0,
    class_labels: torch.Tensor | None = None,
    timestep_cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """The base UNet's prediction (noise / v, per its scheduler) steered by the refiner's residuals.

    ``refiner`` may be wrapped (DDP, ``accelerate``): it is only called. Freezing the base
    (``requires_grad_(False)``) is the caller's choice; gradients still flow through it.
    """
    down, mid = refiner(
        sample,
        timestep,
        encoder_hidden_states,
        conditions,
        added_cond_kwargs=added_cond_kwargs,
        encoder_attention_mask=encoder_attention_mask,
        conditioning_scale=conditioning_scale,
        condition_masks=condition_masks,
        class_labels=class_labels,
        timestep_cond=timestep_cond,
    )
    return base_unet(
        sample,
        timestep,
        encoder_hidden_states,
        class_labels=class_labels,
        timestep_cond=timestep_cond,
        added_cond_kwargs=added_cond_kwargs,
        encoder_attention_mask=encoder_attention_mask,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
        return_dict=False,
    )[0]


# --- robust conditioning (training) ------------------------------------------------------------------
PAPER_DROP_PROBABILITIES = {"pose": 0.5, "depth": 0.5, "normal": 0.5, TEXT: 0.5}


@dataclass
class DroppedConditions:
    """What :func:`drop_conditions` drew. ``conditions``: the input tensors (not copied, kept even
    where dropped for the whole batch: the masks carry the drop, and a training step needs every
    embedder in its graph); ``condition_masks`` ``{name: (B,) bool}``, True = kept, for
    the refiner's ``condition_masks``; ``text_states``: the prompt states with dropped samples
    replaced by the empty prompt's; ``text_kept`` ``(B,) bool`` — drop the matching pooled
    ``text_embeds`` (SDXL) and attention masks with it."""

    conditions: dict[str, torch.Tensor | None]
    condition_masks: dict[str, torch.Tensor]
    text_states: torch.Tensor
    text_kept: torch.Tensor


def drop_conditions(
    conditions: Mapping[str, torch.Tensor | None],
    text_states: torch.Tensor,
    probabilities: Mapping[str, float],
    generator: torch.Generator | None = None,
    *,
    empty_text_states: torch.Tensor | None = None,
) -> DroppedConditions:
    """Drop each condition, and the text, independently per sample (HyperHuman's robust conditioning).

    ``probabilities`` ``{name: p}`` over condition names and ``"text"`` (paper: 0.5 each,
    :data:`PAPER_DROP_PROBABILITIES`); a name left out is never dropped. A dropped condition
    contributes nothing for that sample (its embedding is masked in the refiner, not its image
    zeroed: a zero image still has a non-zero embedding); a sample with every condition dropped
    gets the base UNet exactly. Dropped text becomes ``empty_text_states`` (``(1 or B, L, D)``, the
    empty prompt's encoder states), the same unconditional input classifier-free guidance uses at
    sampling, so it is required whenever the text can be dropped.

    Draws are one ``torch.rand(B)`` per name in sorted order of ``conditions`` then ``"text"``, from
    ``generator`` on its device; masks are moved to each tensor's device.
    """
    names = sorted(conditions)
    unknown = set(probabilities) - {*names, TEXT}
    if unknown:
        raise ValueError(f"drop probabilities for unknown names {sorted(unknown)}; conditions are {names} and {TEXT!r}")
    for name, probability in probabilities.items():
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"drop probability for {name!r} must be in [0, 1], got {probability}")
    text_p = probabilities.get(TEXT, 0.0)
    if text_p > 0 and empty_text_states is None:
        raise ValueError("the text can be dropped (probabilities['text'] > 0): pass empty_text_states")
    batch = text_states.shape[0]
    device = generator.device if generator is not None else torch.device("cpu")

    def kept(name: str) -> torch.Tensor:
        return torch.rand(batch, generator=generator, device=device) >= probabilities.get(name, 0.0)

    out, masks = {}, {}
    for name in names:
        condition, mask = conditions[name], kept(name)
        if condition is None:
            mask = torch.zeros_like(mask)
        elif condition.shape[0] != batch:
            raise ValueError(f"condition {name!r} has batch {condition.shape[0]}, the text states {batch}")
        masks[name] = mask if condition is None else mask.to(condition.device)
        out[name] = condition
    text_kept = kept(TEXT).to(text_states.device)
    if not bool(text_kept.all()):
        text_states = torch.where(text_kept[:, None, None], text_states, empty_text_states.to(text_states.dtype))
    return DroppedConditions(conditions=out, condition_masks=masks, text_states=text_states, text_kept=text_kept)
