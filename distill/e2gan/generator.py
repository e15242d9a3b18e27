"""The E2GAN generator: a text-conditioned image-to-image network small enough for a phone.

    conv_in (7×7) → down_blocks (3×3, stride 2) → res_blocks[0], res_blocks[1]
      → transformer: conv_down (stride 2) → self-attention → cross-attention to the text → MLP
                     → conv_up (nearest ×2 + 3×3), added to its input
      → res_blocks[2] → up_blocks (nearest ×2 + 3×3) → conv_out (7×7) → tanh

E2GAN's layout (ICML 2024): three ResNet blocks, one transformer block after the second, run on a
further down-sampled map so its attention costs a quarter. Images are in [-1, 1]; the text is the
per-token states of a frozen encoder (the packaged MiniLM offline, CLIP by path) and its mask.

Written for what later stages do to it: every weight sits in a plain ``nn.Conv2d`` / ``nn.Linear``
with a stable name (``res_blocks.1.conv2``, ``transformer.attn2.to_k``, ...), so peft's LoRA targets
them by name, a per-layer width mask multiplies a module's output channels, and ONNX export traces
one ``forward(image, encoder_hidden_states, encoder_attention_mask)`` with no in-place tricks.
Norms are per-channel (InstanceNorm): removing a channel never regroups the others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from hyperhuman.config import ConfigError

SKIP_CLAMP = 0.999  # atanh(±1) is infinite; atanh(0.999) ≈ 3.8 already saturates tanh


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, channels: int, inner: int | None = None):
        super().__init__()
        inner = inner or channels  # conv1's outputs, conv2's inputs: what a width search narrows
        self.conv1 = nn.Conv2d(channels, inner, 3, padding=1)
        self.norm1 = _norm(inner)
        self.conv2 = nn.Conv2d(inner, channels, 3, padding=1)
        self.norm2 = _norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        return x + self.norm2(self.conv2(h))


class Attention(nn.Module):
    """Multi-head attention with separate ``to_q/to_k/to_v/to_out`` linears (diffusers' names, so
    LoRA target lists written for diffusers' attention apply). ``head_dim`` defaults to ``dim / heads``;
    a width search keeps it and drops whole heads."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int | None = None):
        super().__init__()
        self.heads = heads
        inner = heads * (head_dim or dim // heads)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, _ = x.shape

        def split(t):  # (B, L, heads · head_dim) → (B, heads, L, head_dim)
            return t.reshape(batch, t.shape[1], self.heads, -1).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(out.transpose(1, 2).reshape(batch, length, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int, inner: int | None = None):
        super().__init__()
        inner = inner or dim * mult
        self.fc1 = nn.Linear(dim, inner)
        self.fc2 = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerStage(nn.Module):
    """Down-sample, one transformer block (self-attention, text cross-attention, MLP; pre-norm,
    residual), up-sample, added to the stage's input. ``widths``: the attentions' and the MLP's inner
    widths where a width search narrowed them (``attn1``, ``attn2``, ``ff``; whole heads)."""

    def __init__(self, channels: int, text_dim: int, heads: int, mlp_ratio: int, widths: dict | None = None):
        super().__init__()
        widths, head_dim = widths or {}, channels // heads
        self.conv_down = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.norm1 = nn.LayerNorm(channels)
        self.attn1 = Attention(channels, channels, widths.get("attn1", channels) // head_dim, head_dim)
        self.norm2 = nn.LayerNorm(channels)
        self.attn2 = Attention(channels, text_dim, widths.get("attn2", channels) // head_dim, head_dim)
        self.norm3 = nn.LayerNorm(channels)
        self.ff = FeedForward(channels, mlp_ratio, widths.get("ff"))
        self.conv_up = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        h = self.conv_down(x)
        batch, channels, height, width = h.shape
        tokens = h.flatten(2).transpose(1, 2)  # (B, h·w, C)
        normed = self.norm1(tokens)
        tokens = tokens + self.attn1(normed, normed)
        tokens = tokens + self.attn2(self.norm2(tokens), text, text_mask)
        tokens = tokens + self.ff(self.norm3(tokens))
        h = tokens.transpose(1, 2).reshape(batch, channels, height, width)
        h = F.interpolate(h, size=x.shape[-2:], mode="nearest")
        return x + self.conv_up(h)


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        # nearest up-sampling + conv rather than a transposed conv: no checkerboard, exports plainly
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm = _norm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))))


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.norm = _norm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


class E2GANGenerator(ModelMixin, ConfigMixin):
    """The ``__init__`` arguments are the config (``save_pretrained`` / ``from_pretrained``).

    ``base_channels`` doubles at each of ``num_downsamples`` down-samplings; the ResNet and
    transformer blocks run at ``base_channels · 2**num_downsamples`` on a map ``2**num_downsamples``
    (the transformer ``2**(num_downsamples + 1)``) times smaller than the image, whose sides must be
    multiples of the latter. ``text_dim``: the text encoder's state width; ``text_encoder``: its name
    or path, kept so a loaded generator says which encoder it was trained with. ``input_skip``: the
    output is ``tanh(conv_out(h) + atanh(image))``, so the network learns the change an edit makes
    and starts near the identity (most edits keep most of the photo); False: ``tanh(conv_out(h))``,
    pix2pix's plain output. ``widths``: the inner widths a width search
    (:mod:`distill.e2gan.search`) narrowed, by the names :func:`full_widths` gives (None: all full);
    the layers are built at those widths, so a searched generator saves and loads as any other.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        base_channels: int = 32,
        num_downsamples: int = 2,
        num_res_blocks: int = 3,
        attention_after: int = 2,
        attention_heads: int = 4,
        mlp_ratio: int = 2,
        text_dim: int = 384,
        text_encoder: str | None = "minilm",
        input_skip: bool = True,
        widths: dict[str, int] | None = None,
    ):
        super().__init__()
        check_generator_config(dict(self.config))
        width = {**full_widths(dict(self.config)), **(widths or {})}
        trunk = base_channels * 2**num_downsamples
        # the encoder's outputs: conv_in's, then each down-sampling's, the last at the trunk's width
        encoder = [width[f"down_blocks.{i}"] for i in range(num_downsamples - 1)] + [trunk]
        encoder = [width["conv_in"], *encoder] if num_downsamples else encoder
        decoder = [trunk, *(width[f"up_blocks.{j}"] for j in range(num_downsamples))]  # the up-samplings' inputs
        self.conv_in = nn.Conv2d(in_channels, encoder[0], 7, padding=3)
        self.norm_in = _norm(encoder[0])
        self.down_blocks = nn.ModuleList(DownBlock(encoder[i], encoder[i + 1]) for i in range(num_downsamples))
        self.res_blocks = nn.ModuleList(ResnetBlock(trunk, width[f"res_blocks.{k}"]) for k in range(num_res_blocks))
        inner = {name: width[f"transformer.{name}"] for name in ("attn1", "attn2", "ff")}
        self.transformer = TransformerStage(trunk, text_dim, attention_heads, mlp_ratio, inner)
        self.up_blocks = nn.ModuleList(UpBlock(decoder[j], decoder[j + 1]) for j in range(num_downsamples))
        self.conv_out = nn.Conv2d(decoder[-1], out_channels, 7, padding=3)

    @property
    def factor(self) -> int:
        """Image sides must be multiples of this."""
        return 2 ** (self.config.num_downsamples + 1)

    def forward(
        self,
        image: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``image`` (B, 3, H, W) in [-1, 1], text states (B, L, text_dim) and mask (B, L) (1: attend)
        → the edited image (B, 3, H, W) in [-1, 1]."""
        mask = None
        if encoder_attention_mask is not None:  # (B, L) → (B, 1, 1, L), broadcast over heads and queries
            mask = encoder_attention_mask.to(torch.bool)[:, None, None, :]
        h = F.relu(self.norm_in(self.conv_in(image)))
        for block in self.down_blocks:
            h = block(h)
        for index, block in enumerate(self.res_blocks):
            if index == self.config.attention_after:
                h = self.transformer(h, encoder_hidden_states.to(h.dtype), mask)
            h = block(h)
        if self.config.attention_after == len(self.res_blocks):
            h = self.transformer(h, encoder_hidden_states.to(h.dtype), mask)
        for block in self.up_blocks:
            h = block(h)
        out = self.conv_out(h)
        if self.config.input_skip:  # the network adds a change to the input, in tanh's pre-activation space
            clamped = image.clamp(-SKIP_CLAMP, SKIP_CLAMP)
            out = out + 0.5 * torch.log((1 + clamped) / (1 - clamped))  # atanh, in ops every ONNX exporter has
        return torch.tanh(out)


def full_widths(config: dict) -> dict[str, int]:
    """The generator's inner widths a search may narrow, unnarrowed, by name: the tensor each layer
    named here writes and only the next layer reads. ``conv_in`` and ``down_blocks.I`` (all but the
    last down-sampling, whose output is the trunk), each ResNet block's inner width
    (``res_blocks.K``: conv1's outputs), the transformer's attentions (``transformer.attn1`` /
    ``attn2``: heads × head size) and MLP (``transformer.ff``), each up-sampling's output
    (``up_blocks.J``). The trunk's width stays: residuals and LayerNorms span it."""
    base, downs = config["base_channels"], config["num_downsamples"]
    trunk = base * 2**downs
    widths = {"conv_in": base} if downs else {}
    widths.update({f"down_blocks.{i}": base * 2 ** (i + 1) for i in range(downs - 1)})
    widths.update({f"res_blocks.{k}": trunk for k in range(config["num_res_blocks"])})
    widths.update(
        {"transformer.attn1": trunk, "transformer.attn2": trunk, "transformer.ff": trunk * config["mlp_ratio"]}
    )
    widths.update({f"up_blocks.{j}": base * 2 ** (downs - 1 - j) for j in range(downs)})
    return widths


def check_generator_config(config: dict) -> None:
    """The generator's arguments, each error naming ``generator.KEY`` (its key in the GAN config)."""
    for key, least in (("in_channels", 1), ("out_channels", 1), ("base_channels", 1), ("num_downsamples", 0),
                       ("num_res_blocks", 1), ("attention_heads", 1), ("mlp_ratio", 1), ("text_dim", 1),
                       ("attention_after", 0)):  # fmt: skip
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"generator.{key} must be an integer ≥ {least}, got {value!r}")
    if not isinstance(config.get("input_skip", True), bool):
        raise ConfigError(f"generator.input_skip must be true or false, got {config['input_skip']!r}")
    if config["attention_after"] > config["num_res_blocks"]:
        raise ConfigError(
            f"generator.attention_after={config['attention_after']} is past the last of "
            f"generator.num_res_blocks={config['num_res_blocks']} ResNet blocks"
        )
    width = config["base_channels"] * 2 ** config["num_downsamples"]
    if width % config["attention_heads"]:
        raise ConfigError(
            f"generator.attention_heads={config['attention_heads']} does not divide the transformer's width {width} "
            "(base_channels · 2**num_downsamples)"
        )
    check_widths(config)


def check_widths(config: dict) -> None:
    """``generator.widths``: names of :func:`full_widths`, each a positive width no wider than the
    full one (the attentions' in whole heads)."""
    widths = config.get("widths")
    if widths is None:
        return
    if not isinstance(widths, dict):
        raise ConfigError(f"generator.widths must be a mapping of layer name → width (null: all full), got {widths!r}")
    full = full_widths(config)
    head = config["base_channels"] * 2 ** config["num_downsamples"] // config["attention_heads"]
    for name, value in widths.items():
        if name not in full:
            raise ConfigError(f"generator.widths.{name}: no such width; the generator's are {sorted(full)}")
        group = head if name.startswith("transformer.attn") else 1
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= full[name] or value % group:
            raise ConfigError(
                f"generator.widths.{name}={value!r} must be a positive multiple of {group} and at most {full[name]}"
            )


def load_generator(path: str, device: str | torch.device = "cpu") -> E2GANGenerator:
    """A generator saved by ``hyperhuman distill gan`` (``RUN/generator``, or the run folder itself),
    in eval mode."""
    from pathlib import Path

    folder = Path(path)
    if not (folder / "config.json").is_file() and (folder / "generator" / "config.json").is_file():
        folder = folder / "generator"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no E2GAN generator at {path!r} (no config.json): train one with `distill gan`")
    return E2GANGenerator.from_pretrained(str(folder)).to(device).eval()
