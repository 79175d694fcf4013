"""A small transformer over the caption's tokens that the generator trains beside itself (HunyuanVideo's token
refiner): the frozen text encoder carries word order only implicitly, and the generators' image rows read text keys
that have no position of their own. Binding "a circle above a square" takes a token's role, which rests on order
(the noun before "above" goes on top). The refiner's self-attention sees order through RoPE, which depends on
relative position only, so a leading "a photo of" shifts nothing."""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from .mlp import GeluMLP
from .norms import RMSNorm
from .rotary import rope_1d


class RefinerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads, head_dim)
        self.norm2 = RMSNorm(dim)
        self.mlp = GeluMLP(dim, mlp_ratio * dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), context_mask=mask, rotary=rotary)
        return x + self.mlp(self.norm2(x))


class TextRefiner(nn.Module):
    """Text states [N, L, text_dim] and their mask [N, L] -> refined states [N, L, dim], which every generator block
    adds to its own projection of its text layer.

    The output passes a linear projection that starts at zero, so a new network starts as one without a refiner:
    an ungated refiner's unit-scale output swamped the projected text at first and slowed every category
    (docs/recipe.md, probe R1). A zero matrix, not a per-channel gate: a gate's channel c opens only as far as
    refined channel c happens to match channel c's gradient, and stayed near zero (probe A1, mean |g| 0.014);
    a matrix's first gradient is the full outer product, so any refined feature that helps can open it."""

    def __init__(self, text_dim: int, dim: int, num_layers: int, num_heads: int, head_dim: int, mlp_ratio: int):
        super().__init__()
        self.head_dim = head_dim
        self.proj_in = nn.Linear(text_dim, dim)
        self.blocks = nn.ModuleList(RefinerBlock(dim, num_heads, head_dim, mlp_ratio) for _ in range(num_layers))
        self.norm_out = RMSNorm(dim)
        self.proj_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(text)
        rotary = rope_1d(text.shape[1], self.head_dim, device=text.device)
        for block in self.blocks:
            x = block(x, mask, rotary)
        return self.proj_out(self.norm_out(x))
