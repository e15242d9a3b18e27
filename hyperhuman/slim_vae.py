"""An ``AutoencoderKL`` whose decoder is narrower than its encoder: SnapFusion's efficient decoder,
as ``hyperhuman distill vae-decoder`` trains it. It lives here, beside the pipeline that loads it,
so a pipeline folder naming it loads in any process (diffusers finds a component class only in a
module already imported); :func:`hyperhuman.vae.load_vae` reads either class.
"""

from __future__ import annotations

from diffusers import (
    AutoencoderKL,
    ModelMixin,  # noqa: F401  diffusers' pipeline loader finds the load method by this name here
)
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import Decoder


class AutoencoderKLSlimDecoder(AutoencoderKL):
    """``AutoencoderKL`` whose decoder has its own ``decoder_block_out_channels`` and
    ``decoder_norm_num_groups`` (``None``: the encoder's, i.e. a plain ``AutoencoderKL``)."""

    @register_to_config
    def __init__(  # the signature of AutoencoderKL (diffusers 0.42), plus the last two
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: tuple[float] | None = None,
        latents_std: tuple[float] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
        decoder_block_out_channels: tuple[int, ...] | None = None,
        decoder_norm_num_groups: int | None = None,
    ):
        kwargs = dict(locals())  # every argument: AutoencoderKL's go to it, the last two to our decoder
        for own in ("self", "__class__", "decoder_block_out_channels", "decoder_norm_num_groups"):
            kwargs.pop(own, None)
        super().__init__(**kwargs)
        if decoder_block_out_channels is not None or decoder_norm_num_groups is not None:
            self.decoder = Decoder(  # replaces the full-width one (built and dropped: init time only)
                in_channels=latent_channels,
                out_channels=out_channels,
                up_block_types=up_block_types,
                block_out_channels=decoder_block_out_channels or block_out_channels,
                layers_per_block=layers_per_block,
                norm_num_groups=decoder_norm_num_groups or norm_num_groups,
                act_fn=act_fn,
                mid_block_add_attention=mid_block_add_attention,
            )
