"""Autoregressive transformer: [start ; bits of tokens so far] -> logits of all bits of the next token.

A pure network; the decoding loop (guidance, sampling, cache handling) is binlat.processes.ar."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..modeling import ModelMixin
from ..nn import Attention, GeluMLP, KVCache, RMSNorm, run_block, sincos_positions
from .config import GeneratorConfig


class ARBlock(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = RMSNorm(dim)
        self.pos_emb = nn.Parameter(sincos_positions(cfg.num_tokens + 1, dim))
        self.text_proj = nn.Linear(cfg.text_dim, dim)
        self.attn = Attention(dim, cfg.num_heads, cfg.head_dim)
        self.norm2 = RMSNorm(dim)
        self.mlp = GeluMLP(dim, cfg.mlp_ratio * dim)

    def forward(self, x: torch.Tensor, offset: int, text: torch.Tensor | None, text_mask: torch.Tensor | None,
                cache: KVCache | None) -> torch.Tensor:
        h = self.norm1(x) + self.pos_emb[:, offset: offset + x.shape[1]]
        context = None if text is None else self.text_proj(text)
        x = x + self.attn(h, context=context, context_mask=text_mask if text is not None else None,
                          causal=True, cache=cache)
        return x + self.mlp(self.norm2(x))


class ARCache:
    """Per-block key/value caches plus how many image rows they hold. Text keys enter on the first call."""

    def __init__(self, num_layers: int):
        self.layers = [KVCache() for _ in range(num_layers)]
        self.length = 0  # image rows (start token included) already in the cache


class ARTransformer(nn.Module, ModelMixin):
    config_class = GeneratorConfig

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = config
        self.start_token = nn.Parameter(torch.randn(1, 1, config.dim) * 0.02)
        self.x_embed = nn.Linear(config.num_bits, config.dim)
        self.blocks = nn.ModuleList(ARBlock(config) for _ in range(config.num_layers))
        self.norm_out = RMSNorm(config.dim)
        self.proj_out = nn.Linear(config.dim, config.num_bits)

    def new_cache(self) -> ARCache:
        return ARCache(len(self.blocks))

    def forward(self, bits: torch.Tensor | None, text: Sequence[torch.Tensor], text_mask: torch.Tensor,
                cache: ARCache | None = None) -> torch.Tensor:
        """Without a cache: rows [start ; embed(bits)] (bits [N, T, B] or None) -> logits [N, T+1, B]; row i
        predicts token i. With a cache: only the new tokens' bits are given (None on the first call, which
        also feeds the text) and logits for those rows come back."""
        if len(text) != len(self.blocks):
            raise ValueError(f"expected {len(self.blocks)} text layers (one per block), got {len(text)}")
        dtype = self.x_embed.weight.dtype
        first = cache is None or cache.length == 0
        rows = []
        if first:
            rows.append(self.start_token.expand(text[0].shape[0], -1, -1))
        if bits is not None:
            rows.append(self.x_embed(bits.to(dtype)))
        if not rows:
            raise ValueError("nothing to decode: give bits for the new tokens")
        x = torch.cat(rows, dim=1)
        offset = 0 if cache is None else cache.length
        if offset + x.shape[1] > self.config.num_tokens + 1:
            raise ValueError(f"sequence longer than the model's {self.config.num_tokens} tokens")
        mask = text_mask.to(torch.bool)
        for i, block in enumerate(self.blocks):
            states = text[i].to(dtype) if first else None
            layer_cache = None if cache is None else cache.layers[i]
            x = run_block(block, x, offset, states, mask if first else None, layer_cache,
                          checkpointing=self.gradient_checkpointing and cache is None)
        if cache is not None:
            cache.length += x.shape[1]
        return self.proj_out(self.norm_out(x))
