"""Bernoulli diffusion transformer: noisy bits + t + per-layer text states -> one logit per bit.

A pure network: it knows nothing of the noise schedule or of sampling (see binlat.processes.diffusion)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..modeling import ModelMixin
from ..nn import (
    AdaLNContinuous,
    AdaLNZero,
    Attention,
    GeluMLP,
    PooledTextEmbedding,
    TimestepEmbedding,
    layer_norm,
    modulate,
    run_block,
)
from .config import DiffusionConfig, check_config_class, initial_positions, make_text_refiner


class DiffusionBlock(nn.Module):
    """AdaLN-Zero block; image rows query [own projection of this block's text layer ; image rows]."""

    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        dim = cfg.dim
        self.adaln = AdaLNZero(dim)
        self.pos_emb = nn.Parameter(initial_positions(cfg))
        self.text_proj = nn.Linear(cfg.text_dim, dim)
        self.attn = Attention(dim, cfg.num_heads, cfg.head_dim)
        self.mlp = GeluMLP(dim, cfg.mlp_ratio * dim)
        self.text_update = nn.Linear(dim, dim) if cfg.joint_text else None
        if self.text_update is not None:  # zero: the text stream starts empty, the network as one without it
            nn.init.zeros_(self.text_update.weight)
            nn.init.zeros_(self.text_update.bias)

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        refined: torch.Tensor | None = None,
        stream: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """With config.joint_text, `stream` is the text stream so far ([N, L, dim], None before the first block)
        and (x, stream) comes back; otherwise x."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(temb)
        h = modulate(layer_norm(x), shift1, scale1) + self.pos_emb[:, : x.shape[1]]
        context = self.text_proj(text) if refined is None else self.text_proj(text) + refined
        if self.text_update is None:
            x = x + gate1.unsqueeze(1) * self.attn(h, context=context, context_mask=text_mask)
            return x + gate2.unsqueeze(1) * self.mlp(modulate(layer_norm(x), shift2, scale2))
        if stream is not None:
            context = context + stream
        # one attention over [text ; image] with every row a query: the image rows get what the release's cross
        # attention gives them (the same keys), the text rows what they read of the image and of each other
        rows = torch.cat((context, h), dim=1)
        valid = torch.cat((text_mask, torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)), dim=1)
        out = self.attn(rows, context_mask=valid)
        text_out, image_out = out[:, : context.shape[1]], out[:, context.shape[1] :]
        update = self.text_update(text_out)
        stream = update if stream is None else stream + update
        x = x + gate1.unsqueeze(1) * image_out
        return x + gate2.unsqueeze(1) * self.mlp(modulate(layer_norm(x), shift2, scale2)), stream


class DiffusionTransformer(nn.Module, ModelMixin):
    config_class = DiffusionConfig

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        check_config_class(self, config)
        self.config = config
        self.x_embed = nn.Linear(config.num_bits, config.dim)
        # Self-conditioning: the previous x_0 estimate enters beside x_t. Zero-initialised, so the network starts
        # as if it read no estimate.
        self.estimate_embed = nn.Linear(config.num_bits, config.dim) if config.self_condition else None
        if self.estimate_embed is not None:
            nn.init.zeros_(self.estimate_embed.weight)
            nn.init.zeros_(self.estimate_embed.bias)
        self.t_embed = TimestepEmbedding(config.dim)
        self.pooled_text = PooledTextEmbedding(config.text_dim, config.dim) if config.pooled_text else None
        self.text_refiner = make_text_refiner(config)
        self.blocks = nn.ModuleList(DiffusionBlock(config) for _ in range(config.num_layers))
        self.norm_out = AdaLNContinuous(config.dim)
        self.proj_out = nn.Linear(config.dim, config.num_bits)
        self.align_head: nn.Sequential | None = (
            None  # REPA's projector (training only): block align_block's rows -> align_dim
        )
        if config.align_dim:
            self.align_head = nn.Sequential(
                nn.Linear(config.dim, config.dim), nn.SiLU(), nn.Linear(config.dim, config.align_dim)
            )

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text: Sequence[torch.Tensor],
        text_mask: torch.Tensor,
        estimate: torch.Tensor | None = None,
        aligned: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x_t [N, K, B] bits (0/1, any dtype); t [N] in [0, 1]; text: one [N, L, text_dim] per block;
        text_mask [N, L] (True/1 = real token); with `config.self_condition`, `estimate` [N, K, B] is a previous
        estimate of P(x_0 = 1) (None: no estimate yet, read as 1/2 everywhere). Returns logits [N, K, B]; with
        `aligned` (config.align_dim), (logits, the alignment head's output [N, K, align_dim])."""
        if aligned and self.align_head is None:
            raise ValueError("this network was built without an alignment head (model.align_dim is 0)")
        if len(text) != len(self.blocks):
            raise ValueError(f"expected {len(self.blocks)} text layers (one per block), got {len(text)}")
        dtype = self.x_embed.weight.dtype
        x = self.x_embed(x_t.to(dtype))
        if self.estimate_embed is not None:
            if estimate is not None:  # centred: 1/2, "no idea", reads as the zero input of "no estimate"
                x = x + self.estimate_embed(2 * estimate.to(dtype) - 1)
            else:
                x = x + self.estimate_embed.bias
        elif estimate is not None:
            raise ValueError("this network was built without self_condition; it reads no x_0 estimate")
        temb = self.t_embed(t.to(dtype))
        mask = text_mask.to(torch.bool)
        if self.pooled_text is not None:
            temb = temb + self.pooled_text(text[-1].to(dtype), mask)
        refined = None if self.text_refiner is None else self.text_refiner(text[-1].to(dtype), mask)
        stream = None  # config.joint_text: the text rows' own updates, carried from block to block
        projected = None
        for i, (block, states) in enumerate(zip(self.blocks, text)):
            if block.text_update is None:
                x = run_block(
                    block, x, temb, states.to(dtype), mask, refined, checkpointing=self.gradient_checkpointing
                )
            else:
                x, stream = run_block(
                    block, x, temb, states.to(dtype), mask, refined, stream, checkpointing=self.gradient_checkpointing
                )
            if aligned and i == self.config.align_block and self.align_head is not None:  # refused above if None
                projected = self.align_head(x)
        logits = self.proj_out(self.norm_out(x, temb))
        if not aligned:
            return logits
        assert projected is not None  # the config keeps align_block below num_layers
        return logits, projected
