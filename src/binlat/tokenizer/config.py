"""Binary tokenizer configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from ..config import check_number


@dataclass
class TokenizerConfig:
    """A ViT encoder turns an image into `num_tokens` x `num_bits` bits; a mirrored ViT decoder turns them back.

    Defaults are the paper's 512 px tokenizer (128 tokens x 64 bits, 12L x 768 encoder, 16L x 1024 decoder)."""

    in_channels: int = 3
    patch_size: int = 16
    num_tokens: int = 128
    num_bits: int = 64
    encoder_layers: int = 12
    encoder_heads: int = 12
    encoder_head_dim: int = 64
    decoder_layers: int = 16
    decoder_heads: int = 16
    decoder_head_dim: int = 64
    rope_axes_dims: tuple[int, int, int] = (16, 24, 24)
    rope_theta: float = 10000.0
    # Encoder blocks after which the image grid is down-sampled 2x2 (decoder: up-sampled).
    downsample_after: tuple[int, ...] = (3,)
    upsample_after: tuple[int, ...] = (3,)
    # When set, image positions are rescaled so any grid spans the positions of a grid of this many pixels
    # (the release's `set_scale`), which lets one model serve several resolutions.
    rope_reference_size: int | None = None
    mlp_ratio: int = 4
    # Bernoulli temperature tau used when bits are sampled in training.
    bernoulli_temperature: float = 1.0
    image_size: int = 512  # the default resolution for decode() when no size is given
    # Options beyond the release (their defaults keep the release architecture, RoPE-only, linear pixel head):
    # a learned absolute position embedding on the encoder's patch tokens and the decoder's mask tokens, laid out
    # for an image_size grid and resized for other sizes. Without it every decoder query starts identical and a
    # small model sits for thousands of images on the "paint it all white" plateau.
    abs_pos_embed: bool = False
    # 0: one linear map per patch to pixels (the release). N > 0: a linear map to N channels per pixel, then a
    # 3x3 convolution to RGB, which can draw edges across patch borders.
    pixel_head_channels: int = 0
    # Embed bit b as the codebook row times 2b - 1 (+-1) instead of b (0/1). With 0/1 every token's embedding
    # shares the offset sum(codebook)/2 while bits are near 1/2, so after the decoder's input norm the tokens look
    # almost alike and the decoder learns slowly; +-1 bits carry no common offset.
    signed_bits: bool = False
    # Latent token k starts as the learned token plus the mean of the patches of region k (the image cut into
    # num_tokens regions, row-major), and each decoder patch starts with the embedded token of its region.
    # Attention can still move information anywhere; the shortcut only breaks the symmetry among the tokens
    # from the first step, which otherwise takes a small model thousands of images to break.
    region_shortcut: bool = False

    def __post_init__(self) -> None:
        for name in (
            "in_channels",
            "patch_size",
            "num_tokens",
            "num_bits",
            "encoder_layers",
            "encoder_heads",
            "encoder_head_dim",
            "decoder_layers",
            "decoder_heads",
            "decoder_head_dim",
            "mlp_ratio",
            "image_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.rope_axes_dims = cast("tuple[int, int, int]", tuple(self.rope_axes_dims))  # its length is checked below
        self.downsample_after = tuple(self.downsample_after)
        self.upsample_after = tuple(self.upsample_after)
        if len(self.rope_axes_dims) != 3 or any(d % 2 for d in self.rope_axes_dims):
            raise ValueError(f"rope_axes_dims must be three even numbers, got {self.rope_axes_dims}")
        for name, heads in (("encoder_head_dim", self.encoder_head_dim), ("decoder_head_dim", self.decoder_head_dim)):
            if sum(self.rope_axes_dims) != heads:
                raise ValueError(f"sum(rope_axes_dims)={sum(self.rope_axes_dims)} must equal {name}={heads}")
        for name, idx, layers in (
            ("downsample_after", self.downsample_after, self.encoder_layers),
            ("upsample_after", self.upsample_after, self.decoder_layers),
        ):
            if len(set(idx)) != len(idx) or any(not 0 <= i < layers for i in idx):
                raise ValueError(f"{name} must list distinct block indices in [0, {layers}), got {list(idx)}")
        if self.pixel_head_channels < 0:
            raise ValueError(f"pixel_head_channels must be >= 0 (0: linear head), got {self.pixel_head_channels}")
        check_number("bernoulli_temperature", self.bernoulli_temperature, 0, low_open=True)
        check_number("rope_theta", self.rope_theta, 0, low_open=True)
        if self.rope_reference_size is not None and self.rope_reference_size < self.patch_size:
            raise ValueError("rope_reference_size must be at least one patch")

    @property
    def encoder_dim(self) -> int:
        return self.encoder_heads * self.encoder_head_dim

    @property
    def decoder_dim(self) -> int:
        return self.decoder_heads * self.decoder_head_dim

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this many pixels (patch x every 2x2 resampling)."""
        return self.patch_size * 2 ** max(len(self.downsample_after), len(self.upsample_after))
