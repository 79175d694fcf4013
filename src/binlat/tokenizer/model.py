"""The binary tokenizer: ViT encoder -> K x B bits -> ViT decoder.

encoder:  [K latent tokens ; image patches] -> blocks (with 2x2 down-sampling) -> latent rows -> features [N, K, D]
quantizer: features -> B bit-logits per token; bits = sigmoid(logit) > 1/2 (inference) or Bernoulli (training)
decoder:  bits @ codebook -> [K rows ; mask tokens on a small grid] -> blocks (with 2x2 up-sampling) -> pixels
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import ModelMixin
from ..nn import Attention, RMSNorm, SwiGLU, rotary_tables, run_block
from .config import TokenizerConfig
from .resample import Downsample, Upsample, map_to_tokens, tokens_to_map


class TokenizerBlock(nn.Module):
    """Pre-norm transformer block: x + Attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)); full attention."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads, head_dim)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_ratio * dim)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rotary=rotary)
        return x + self.mlp(self.norm2(x))


def token_positions(
    num_latent: int, height: int, width: int, scale: float | None, device: torch.device | None = None
) -> torch.Tensor:
    """3-axis positions [num_latent + h*w, 3]: latent k -> (k, 0, 0); patch (r, c) -> (0, r, c).

    With a scale S, rows and columns are stretched to span [0, S-1] whatever the grid size (division first,
    in float32, as the release does); a side of one patch sits at 0."""

    def axis(n: int) -> torch.Tensor:
        idx = torch.arange(n, dtype=torch.float32, device=device)
        if scale is None:
            return idx
        return idx / (n - 1) * (scale - 1) if n > 1 else idx

    latent = torch.zeros(num_latent, 3, device=device)
    latent[:, 0] = torch.arange(num_latent, dtype=torch.float32, device=device)
    rows, cols = torch.meshgrid(axis(height), axis(width), indexing="ij")
    image = torch.stack((torch.zeros_like(rows), rows, cols), dim=-1).reshape(-1, 3)
    return torch.cat((latent, image), dim=0)


class GridEmbedding(nn.Module):
    """A learned absolute position embedding for a `side` x `side` token grid, resized bicubically for others."""

    def __init__(self, side: int, dim: int):
        super().__init__()
        self.side = side
        self.table = nn.Parameter(torch.randn(1, dim, side, side) * 0.02)

    def forward(self, height: int, width: int) -> torch.Tensor:
        """[1, height*width, dim]."""
        table: torch.Tensor = self.table
        if (height, width) != (self.side, self.side):
            table = F.interpolate(table, size=(height, width), mode="bicubic", align_corners=False)
        return map_to_tokens(table)


def region_grid(num_tokens: int, height: int, width: int) -> tuple[int, int]:
    """Rows x columns of the regions that num_tokens cut a height x width grid into: the factor pair of
    num_tokens whose aspect is closest to the grid's."""
    pairs = [(r, num_tokens // r) for r in range(1, num_tokens + 1) if num_tokens % r == 0]
    return min(pairs, key=lambda p: (round(abs(math.log(p[0] / p[1]) - math.log(height / width)), 9), p[0]))


def pool_regions(grid: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[N, D, h, w] -> [N, num_tokens, D]: the mean of each region, row-major."""
    rows, cols = region_grid(num_tokens, *grid.shape[-2:])
    return map_to_tokens(F.adaptive_avg_pool2d(grid, (rows, cols)))


def unpool_regions(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[N, K, D] -> [N, height*width, D]: every grid cell takes the token of the region it lies in."""
    rows, cols = region_grid(tokens.shape[1], height, width)
    regions = tokens_to_map(tokens, rows, cols)
    return map_to_tokens(F.interpolate(regions, size=(height, width), mode="nearest"))


class _Stack(nn.Module):
    """Shared by encoder and decoder: blocks with a 2x2 resampling of the image rows after chosen blocks."""

    gradient_checkpointing = False
    blocks: nn.ModuleList  # set by Encoder and Decoder
    resample: nn.ModuleDict
    rope_axes_dims: tuple[int, int, int]
    rope_theta: float

    def _run(
        self, x: torch.Tensor, num_latent: int, height: int, width: int, scale: float | None, down: bool
    ) -> tuple[torch.Tensor, int, int]:
        rotary = self._rotary(num_latent, height, width, scale, x.device)
        for i, block in enumerate(self.blocks):
            x = run_block(block, x, rotary, checkpointing=self.gradient_checkpointing)
            if str(i) in self.resample:
                latent, image = x[:, :num_latent], x[:, num_latent:]
                image = map_to_tokens(self.resample[str(i)](tokens_to_map(image, height, width)))
                x = torch.cat((latent, image), dim=1)
                height, width = (height // 2, width // 2) if down else (height * 2, width * 2)
                if scale is not None:
                    scale = float(math.floor(scale / 2)) if down else scale * 2
                rotary = self._rotary(num_latent, height, width, scale, x.device)
        return x, height, width

    def _rotary(self, num_latent: int, height: int, width: int, scale: float | None, device: torch.device):
        positions = token_positions(num_latent, height, width, scale, device)
        return rotary_tables(positions, self.rope_axes_dims, self.rope_theta)


class Encoder(_Stack):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        dim = cfg.encoder_dim
        self.rope_axes_dims, self.rope_theta = cfg.rope_axes_dims, cfg.rope_theta
        self.patch_embed = nn.Conv2d(cfg.in_channels, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = GridEmbedding(max(1, cfg.image_size // cfg.patch_size), dim) if cfg.abs_pos_embed else None
        self.region_shortcut = cfg.region_shortcut
        self.latent_tokens = nn.Parameter(torch.randn(1, cfg.num_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(
            TokenizerBlock(dim, cfg.encoder_heads, cfg.encoder_head_dim, cfg.mlp_ratio)
            for _ in range(cfg.encoder_layers)
        )
        self.resample = nn.ModuleDict({str(i): Downsample(dim) for i in cfg.downsample_after})
        self.norm_out = RMSNorm(dim)
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, images: torch.Tensor, scale: float | None) -> torch.Tensor:
        grid = self.patch_embed(images)
        height, width = grid.shape[-2:]
        latent = self.latent_tokens.expand(images.shape[0], -1, -1)
        if self.region_shortcut:
            latent = latent + pool_regions(grid, latent.shape[1])
        patches = map_to_tokens(grid)
        if self.pos_embed is not None:
            patches = patches + self.pos_embed(height, width)
        x = torch.cat((latent, patches), dim=1)
        x, _, _ = self._run(x, latent.shape[1], height, width, scale, down=True)
        return self.proj_out(self.norm_out(x[:, : latent.shape[1]]))


class Quantizer(nn.Module):
    """Features -> bit-logits; bits -> decoder inputs through a learned [B, D] matrix."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.to_logits = nn.Linear(cfg.encoder_dim, cfg.num_bits)
        self.codebook = nn.Parameter(torch.randn(cfg.num_bits, cfg.encoder_dim) * 0.02)
        self.signed = cfg.signed_bits

    def embed(self, bits: torch.Tensor) -> torch.Tensor:
        """Bits (or their probabilities) in [0, 1] -> [.., D]."""
        bits = bits.to(self.codebook.dtype)
        return (2 * bits - 1 if self.signed else bits) @ self.codebook


class Decoder(_Stack):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        dim = cfg.decoder_dim
        self.rope_axes_dims, self.rope_theta = cfg.rope_axes_dims, cfg.rope_theta
        self.patch_size, self.channels = cfg.patch_size, cfg.in_channels
        self.norm_in = RMSNorm(cfg.encoder_dim)
        self.proj_in = nn.Linear(cfg.encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        side = max(1, cfg.image_size // cfg.patch_size // 2 ** len(cfg.upsample_after))
        self.pos_embed = GridEmbedding(side, dim) if cfg.abs_pos_embed else None
        self.region_shortcut = cfg.region_shortcut
        self.blocks = nn.ModuleList(
            TokenizerBlock(dim, cfg.decoder_heads, cfg.decoder_head_dim, cfg.mlp_ratio)
            for _ in range(cfg.decoder_layers)
        )
        self.resample = nn.ModuleDict({str(i): Upsample(dim) for i in cfg.upsample_after})
        self.norm_out = RMSNorm(dim)
        head = cfg.pixel_head_channels or cfg.in_channels
        self.to_pixels = nn.Linear(dim, cfg.patch_size**2 * head)
        self.pixel_conv = nn.Conv2d(head, cfg.in_channels, 3, padding=1) if cfg.pixel_head_channels else None

    @property
    def last_layer(self) -> nn.Module:
        """The layer that writes pixels (the adversarial loss balances its gradient against reconstruction's)."""
        return self.pixel_conv if self.pixel_conv is not None else self.to_pixels

    def forward(self, latent: torch.Tensor, grid_height: int, grid_width: int, scale: float | None) -> torch.Tensor:
        """latent [N, K, D] (embedded bits) -> images [N, C, grid_height*p, grid_width*p], unclamped."""
        factor = 2 ** len(self.resample)
        height, width = grid_height // factor, grid_width // factor
        if scale is not None:
            scale = float(math.floor(scale / factor))
        x = self.proj_in(self.norm_in(latent))
        masks = self.mask_token.expand(x.shape[0], height * width, -1)
        if self.pos_embed is not None:
            masks = masks + self.pos_embed(height, width)
        if self.region_shortcut:
            masks = masks + unpool_regions(x, height, width)
        x = torch.cat((x, masks), dim=1)
        x, height, width = self._run(x, latent.shape[1], height, width, scale, down=False)
        pixels = self.to_pixels(self.norm_out(x[:, latent.shape[1] :]))
        p = self.patch_size
        c = self.pixel_conv.in_channels if self.pixel_conv is not None else self.channels
        pixels = pixels.reshape(-1, height, width, p, p, c).permute(0, 5, 1, 3, 2, 4)
        pixels = pixels.reshape(-1, c, height * p, width * p)
        return pixels if self.pixel_conv is None else self.pixel_conv(pixels)


@dataclass
class TokenizerOutput:
    reconstruction: torch.Tensor  # [N, C, H, W]
    logits: torch.Tensor  # [N, K, B]
    bits: torch.Tensor  # [N, K, B] float 0/1 (sampled in training, thresholded otherwise)
    probs: torch.Tensor  # sigmoid(logits / tau) in training, sigmoid(logits) otherwise


class BinaryTokenizer(nn.Module, ModelMixin):
    """Images in [-1, 1] <-> bits [N, num_tokens, num_bits]."""

    config_class = TokenizerConfig

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = Quantizer(config)
        self.decoder = Decoder(config)

    @property
    def scale(self) -> float | None:
        """Grid-unit reference size S = rope_reference_size / patch_size (true division, as `set_scale`)."""
        size = self.config.rope_reference_size
        return None if size is None else size / self.config.patch_size

    def check_size(self, height: int, width: int) -> None:
        m = self.config.size_multiple
        if height < m or width < m or height % m or width % m:
            fit = lambda n: max(m, round(n / m) * m)  # noqa: E731
            raise ValueError(
                f"image size {height}x{width} is not supported by this tokenizer: height and width must "
                f"be positive multiples of {m} px (patch size times 2 per resampling stage); "
                f"nearest allowed: {fit(height)}x{fit(width)}"
            )

    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> the encoder's per-token features [N, K, encoder_dim], before the bit projection."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"images must be [N, {self.config.in_channels}, H, W], got {tuple(images.shape)}")
        self.check_size(images.shape[-2], images.shape[-1])
        return self.encoder(images.to(self.quantizer.codebook.dtype), self.scale)

    def encode_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.quantizer.to_logits(self.encode_features(images))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [N, C, H, W] in [-1, 1] -> bits [N, K, B] (torch.bool)."""
        return self.encode_with_features(images)[0]

    def encode_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """encode(images) and the features it thresholds (one encoder pass)."""
        features = self.encode_features(images)
        return torch.sigmoid(self.quantizer.to_logits(features).float()) > 0.5, features

    def decode(self, bits: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """Bits [N, K', B] (bool, uint8 or float 0/1) -> images [N, C, height, width], unclamped (~[-1, 1])."""
        height = self.config.image_size if height is None else height
        width = height if width is None else width
        if bits.ndim != 3 or bits.shape[-1] != self.config.num_bits:
            raise ValueError(f"bits must be [N, tokens, {self.config.num_bits}], got {tuple(bits.shape)}")
        self.check_size(height, width)
        return self._decode_latent(self.quantizer.embed(bits), height, width)

    def _decode_latent(self, latent: torch.Tensor, height: int, width: int) -> torch.Tensor:
        p = self.config.patch_size
        return self.decoder(latent, height // p, width // p, self.scale)

    def forward(
        self,
        images: torch.Tensor,
        temperature: float | None = None,
        noise: torch.Tensor | None = None,
        soft: bool = False,
    ) -> TokenizerOutput:
        """Full round trip. In training mode bits are Bernoulli(sigmoid(logit / tau)) samples with a
        straight-through gradient (`noise`: optional uniforms [N, K, B] deciding them); in eval mode they are
        thresholded. `soft` (training only) feeds the decoder the probabilities sigmoid(logit) themselves
        (no temperature), a continuous latent that trains faster early on; `bits` then holds the thresholded bits."""
        logits = self.encode_logits(images)
        if self.training and soft:
            probs = torch.sigmoid(logits.float())
            recon = self._decode_latent(self.quantizer.embed(probs), images.shape[-2], images.shape[-1])
            return TokenizerOutput(reconstruction=recon, logits=logits, bits=(probs > 0.5).float(), probs=probs)
        if self.training:
            tau = self.config.bernoulli_temperature if temperature is None else temperature
            probs = torch.sigmoid(logits.float() / tau)
            bits = torch.bernoulli(probs) if noise is None else (noise.to(probs.device) < probs).float()
        else:
            probs = torch.sigmoid(logits.float())
            bits = (probs > 0.5).float()
        # Straight-through: the value is the bits, the gradient flows as if they were the probabilities.
        st_bits = (bits + probs) - probs.detach()
        latent = self.quantizer.embed(st_bits)
        recon = self._decode_latent(latent, images.shape[-2], images.shape[-1])
        return TokenizerOutput(reconstruction=recon, logits=logits, bits=bits, probs=probs)


def bit_regularizer(probs: torch.Tensor) -> torch.Tensor:
    """Mean p(1 - p): pushes bit probabilities away from 1/2 so thresholding at inference loses little."""
    return (probs * (1 - probs)).mean()
