"""The Latent Structural Diffusion Model's denoiser: one UNet, three branches (HyperHuman sec. 3.2).

Each branch (RGB, depth, normal) owns the UNet's outer layers — ``conv_in``, the first
``replicated_blocks`` down blocks, the last ``replicated_blocks`` up blocks, ``conv_norm_out`` and
``conv_out`` — and the skip connections between them. Everything in between (the inner down
blocks, the mid block, the inner up blocks, the time embedding) is shared: the branches' features
are merged once on the way in and the shared result is fed to every branch's up blocks.

Parameter names keep the source UNet's numbering: ``trunk.down_blocks.1`` is the UNet's
``down_blocks.1`` and ``branch.depth.up_blocks.3`` its ``up_blocks.3``; the trunk's replicated
slots hold ``nn.Identity``. That keeps :meth:`from_unet` a plain copy and checkpoints readable.

Input and output are all branches' latents stacked on the channel axis (``rgb | depth | normal``,
4 channels each), so any diffusers scheduler steps them as one latent; ``pose_latent`` (the VAE
latent of the rendered skeleton) is concatenated to every branch's input.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from hyperhuman.unet_parts import remove_parts
from hyperhuman.unet_widths import shrink_to_widths

BRANCHES = ("rgb", "depth", "normal")
_UNET_DEFAULTS = inspect.signature(UNet2DConditionModel.__init__).parameters
MERGES = ("mean", "weighted")


@dataclass
class LSDMOutput(BaseOutput):
    """``sample``: ``(B, branches × latent_channels, H, W)``, in the order of ``config.branches``."""

    sample: torch.Tensor


class Branch(nn.Module):
    """One modality's own layers: input conv, first down blocks, last up blocks, output head."""

    def __init__(self, unet: UNet2DConditionModel, replicated_blocks: int):
        super().__init__()
        count = len(unet.up_blocks)
        self.conv_in = copy.deepcopy(unet.conv_in)
        self.down_blocks = copy.deepcopy(unet.down_blocks[:replicated_blocks])
        self.up_blocks = nn.ModuleDict(
            {str(i): copy.deepcopy(unet.up_blocks[i]) for i in range(count - replicated_blocks, count)}
        )
        self.conv_norm_out = copy.deepcopy(unet.conv_norm_out)
        self.conv_act = unet.conv_act
        self.conv_out = copy.deepcopy(unet.conv_out)


class LatentStructuralUNet(ModelMixin, ConfigMixin):
    """Joint RGB + depth + normal denoiser sharing one UNet trunk.

    Args:
        unet: ``UNet2DConditionModel`` keyword arguments for one branch's view of the network
            (``in_channels`` must be ``latent_channels + pose_channels``; ``out_channels`` =
            ``latent_channels``).
        branches: modality names, one branch each.
        replicated_blocks: how many outer down/up blocks each branch owns (paper: 1).
        merge: how branch features entering the trunk are combined: ``mean`` (ours) or
            ``weighted`` (learnt per-branch weights, initialised to the mean).
        latent_channels / pose_channels: channels per branch latent / of the pose latent.
        latent_norm: per modality (branches and ``pose``) ``[shift, scale]`` mapping VAE latents
            to the diffusion space, ``z' = (z - shift) * scale``; computed from data by
            ``hyperhuman lsdm-stats`` so each modality matches the RGB latent distribution.
        pose_renderer: the :data:`hyperhuman.skeleton.RENDERER_VERSION` of the pose renders the model
            was trained on (recorded by ``train-lsdm``; the pipeline warns when it renders with another).
        removed_parts: ResNets and attentions taken out of the architecture (a distilled student's,
            e.g. ``branch.rgb.down_blocks.0.attentions.1``; see :mod:`hyperhuman.unet_parts`).
        distilled_steps: the number of sampling steps a step-distilled student was trained for
            (the pipeline's default ``num_inference_steps``); ``None`` for a model trained as usual.
        widths: the inner widths of a pruned model's ResNets, attentions and feed-forwards (module
            path → channels, see :mod:`hyperhuman.unet_widths`; ``hyperhuman prune`` writes them);
            ``None``: every block at the width ``unet`` gives it.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        unet: dict,
        branches: tuple[str, ...] | list[str] = BRANCHES,
        replicated_blocks: int = 1,
        merge: str = "mean",
        latent_channels: int = 4,
        pose_channels: int = 4,
        latent_norm: dict | None = None,
        pose_renderer: str | None = None,
        removed_parts: list[str] | None = None,
        distilled_steps: int | None = None,
        widths: dict[str, int] | None = None,
    ):
        super().__init__()
        unet = dict(unet)
        check_lsdm_config(unet, branches, replicated_blocks, merge, latent_channels, pose_channels)
        source = UNet2DConditionModel(**unet)
        self.branch = nn.ModuleDict({name: Branch(source, replicated_blocks) for name in branches})
        for index in range(replicated_blocks):
            source.down_blocks[index] = nn.Identity()
            source.up_blocks[len(source.up_blocks) - 1 - index] = nn.Identity()
        source.conv_in = source.conv_norm_out = source.conv_out = None
        self.trunk = source
        if merge == "weighted":
            self.merge_weights = nn.Parameter(torch.full((len(branches),), 1.0 / len(branches)))
        remove_parts(self, removed_parts or [])
        shrink_to_widths(self, widths or {})

    # --- construction from a pretrained SD-style UNet ------------------------------------------
    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        *,
        branches=BRANCHES,
        replicated_blocks: int = 1,
        merge: str = "mean",
        pose_channels: int | None = None,
        latent_norm: dict | None = None,
        pose_renderer: str | None = None,
    ) -> LatentStructuralUNet:
        """Copy a pretrained UNet into every branch and the trunk; the pose input channels of each
        branch's ``conv_in`` start at zero, so the new model initially ignores the pose and each
        branch computes exactly what the UNet computes."""
        latent_channels = unet.config.in_channels
        pose_channels = latent_channels if pose_channels is None else pose_channels
        unet_config = {key: value for key, value in unet.config.items() if not key.startswith("_")}
        unet_config["in_channels"] = latent_channels + pose_channels
        model = cls(  # keywords only: register_to_config records positional arguments as defaults
            unet=unet_config,
            branches=list(branches),
            replicated_blocks=replicated_blocks,
            merge=merge,
            latent_channels=latent_channels,
            pose_channels=pose_channels,
            latent_norm=latent_norm,
            pose_renderer=pose_renderer,
        )
        source = unet.state_dict()
        conv_in_weight = source.pop("conv_in.weight")
        expected = set(model.state_dict())
        state = {}
        for key, value in source.items():
            for target in model.owners_of(key):
                state[target] = value
        for name in model.config.branches:
            widened = torch.zeros_like(model.branch[name].conv_in.weight)
            widened[:, :latent_channels] = conv_in_weight
            state[f"branch.{name}.conv_in.weight"] = widened
        if "merge_weights" in expected:
            state["merge_weights"] = model.merge_weights.detach().clone()
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise RuntimeError(
                f"UNet → LSDM weight copy mismatch: missing {sorted(missing)[:5]}, extra {sorted(unexpected)[:5]}"
            )
        model.load_state_dict(state, strict=True)
        return model if unet.dtype == torch.float32 else model.to(dtype=unet.dtype)

    def owners_of(self, unet_key: str) -> list[str]:
        """Names of this model's parameters that a UNet parameter ``unet_key`` initialises."""
        replicated = self.config.replicated_blocks
        num_up = len(self.trunk.up_blocks)
        parts = unet_key.split(".")
        in_branch = parts[0] in ("conv_in", "conv_norm_out", "conv_out")
        if parts[0] == "down_blocks":
            in_branch = int(parts[1]) < replicated
        elif parts[0] == "up_blocks":
            in_branch = int(parts[1]) >= num_up - replicated
        if not in_branch:
            return [f"trunk.{unet_key}"]
        return [f"branch.{name}.{unet_key}" for name in self.config.branches]

    # --- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        pose_latent: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> LSDMOutput | tuple[torch.Tensor]:
        """``sample`` ``(B, branches × C, H, W)`` noisy latents, ``pose_latent`` ``(B, C_pose, H, W)``
        (zeros when ``None``: the unconditional pose) → the prediction for every branch.
        ``timestep_cond`` ``(B, unet.time_cond_proj_dim)`` is added to the time embedding, as in
        ``UNet2DConditionModel`` (a step-distilled student's guidance-scale input)."""
        trunk = self.trunk
        names = self.config.branches
        channels = self.config.latent_channels
        if sample.shape[1] != len(names) * channels:
            raise ValueError(
                f"sample has {sample.shape[1]} channels; expected {len(names)} branches × {channels} = "
                f"{len(names) * channels} ({' | '.join(names)})"
            )
        up_factor = 2**trunk.num_upsamplers
        if sample.shape[-2] % up_factor or sample.shape[-1] % up_factor:
            raise ValueError(f"latent size {tuple(sample.shape[-2:])} must be divisible by {up_factor}")
        if pose_latent is None:
            pose_latent = sample.new_zeros(sample.shape[0], self.config.pose_channels, *sample.shape[-2:])
        if encoder_attention_mask is not None:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)

        if timestep_cond is not None and trunk.time_embedding.cond_proj is None:
            raise ValueError(
                "timestep_cond was given but this model has no input for it: build it with unet.time_cond_proj_dim"
            )
        emb = trunk.time_embedding(trunk.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        if trunk.time_embed_act is not None:
            emb = trunk.time_embed_act(emb)
        context = {"encoder_hidden_states": encoder_hidden_states, "encoder_attention_mask": encoder_attention_mask}

        # Each branch's outer down blocks; it keeps every skip but the last, which becomes shared.
        branch_skips, branch_features = [], []
        for name, latent in zip(names, sample.split(channels, dim=1), strict=True):
            branch = self.branch[name]
            hidden = branch.conv_in(torch.cat([latent, pose_latent], dim=1))
            skips = (hidden,)
            for block in branch.down_blocks:
                hidden, res = _run_down(block, hidden, emb, context)
                skips += res
            branch_skips.append(skips[:-1])
            branch_features.append(hidden)
        hidden = self._merge(branch_features)

        skips = (hidden,)
        for block in trunk.down_blocks[self.config.replicated_blocks :]:
            hidden, res = _run_down(block, hidden, emb, context)
            skips += res
        if trunk.mid_block is not None:
            if getattr(trunk.mid_block, "has_cross_attention", False):
                hidden = trunk.mid_block(hidden, emb, **context)
            else:
                hidden = trunk.mid_block(hidden, emb)
        for block in trunk.up_blocks[: len(trunk.up_blocks) - self.config.replicated_blocks]:
            hidden, skips = _run_up(block, hidden, emb, skips, context)

        outputs = []
        for name, skips in zip(names, branch_skips, strict=True):
            branch, out = self.branch[name], hidden
            for block in branch.up_blocks.values():
                out, skips = _run_up(block, out, emb, skips, context)
            if branch.conv_norm_out is not None:
                out = branch.conv_act(branch.conv_norm_out(out))
            outputs.append(branch.conv_out(out))
        prediction = torch.cat(outputs, dim=1)
        return LSDMOutput(sample=prediction) if return_dict else (prediction,)

    def _merge(self, features: list[torch.Tensor]) -> torch.Tensor:
        if self.config.merge == "weighted":
            return sum(w * f for w, f in zip(self.merge_weights, features, strict=True))
        # The mean written relative to the first branch: bit-exact when all branches agree, which
        # keeps a model fresh from `from_unet` identical to its UNet.
        first = features[0]
        return first + sum(f - first for f in features[1:]) / len(features)

    # --- latent normalisation --------------------------------------------------------------------
    def normalize(self, name: str, latent: torch.Tensor) -> torch.Tensor:
        shift, scale = self._norm(name)
        return (latent - shift) * scale

    def denormalize(self, name: str, latent: torch.Tensor) -> torch.Tensor:
        shift, scale = self._norm(name)
        return latent / scale + shift

    def _norm(self, name: str) -> tuple[float, float]:
        norm = self.config.latent_norm
        if not norm or name not in norm:
            raise ValueError(
                f"no latent normalisation for {name!r} in this model (latent_norm={norm}); compute it with "
                "`hyperhuman lsdm-stats` or set model.latent_norm in the training config"
            )
        shift, scale = norm[name]
        return float(shift), float(scale)


def _run_down(block, hidden, emb, context):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=hidden, temb=emb, **context)
    return block(hidden_states=hidden, temb=emb)


def _run_up(block, hidden, emb, skips, context):
    count = len(block.resnets)
    res, skips = skips[-count:], skips[:-count]
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res, **context), skips
    return block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res), skips


def check_lsdm_config(
    unet: dict, branches, replicated_blocks: int, merge: str, latent_channels: int, pose_channels: int
):
    """Refuse configs that cannot work, naming the key to change."""
    if not branches or len(set(branches)) != len(branches):
        raise ValueError(f"branches must be distinct modality names, got {branches!r}")
    blocks = len(unet.get("down_block_types", _UNET_DEFAULTS["down_block_types"].default))
    if not 1 <= replicated_blocks < blocks:
        raise ValueError(
            f"replicated_blocks must be in [1, {blocks - 1}] for a UNet with {blocks} down blocks, "
            f"got {replicated_blocks}"
        )
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    if unet.get("in_channels") != latent_channels + pose_channels:
        raise ValueError(
            f"unet.in_channels is {unet.get('in_channels')}; a branch reads its latent and the pose latent: "
            f"set it to latent_channels + pose_channels = {latent_channels + pose_channels}"
        )
    if unet.get("out_channels", 4) != latent_channels:
        raise ValueError(
            f"unet.out_channels is {unet.get('out_channels')}; set it to latent_channels = {latent_channels}"
        )
    for key in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type"):
        if unet.get(key) is not None:
            raise ValueError(f"unet.{key}={unet[key]!r} is not supported by the LSDM (text + pose conditioning only)")
