"""Autoregressive transformer: [start ; bits of tokens so far] -> logits of all bits of the next token.

With config.bit_groups = g > 1 the head is factorised: the token's bits are g consecutive groups, group j a
categorical over its 2^(B/g) values given the values of groups < j (GroupedTokenHead). Every output of the trunk
is then the final normed hidden state, and `group_logits` turns it into one group's logits; the process draws a
group, then asks for the next. A pure network; the decoding loop (guidance, sampling, cache handling) is
binlat.processes.ar."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, cast

import torch
from torch import nn

from ..modeling import ModelMixin
from ..nn import Attention, GeluMLP, KVCache, RMSNorm, StaticKVCache, run_block
from .config import ARConfig, check_config_class, group_bits, initial_positions, make_text_refiner


class ARBlock(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = RMSNorm(dim)
        self.pos_emb = nn.Parameter(initial_positions(cfg, leading=1))
        self.text_proj = nn.Linear(cfg.text_dim, dim)
        self.attn = Attention(dim, cfg.num_heads, cfg.head_dim)
        self.norm2 = RMSNorm(dim)
        self.mlp = GeluMLP(dim, cfg.mlp_ratio * dim)

    def step(
        self, x: torch.Tensor, positions: torch.Tensor, attend: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """The block's one residual step, whichever way it attends: `positions` are the rows of pos_emb for the
        rows of x, and `attend` maps the normed, positioned rows to their attention output (causal attention over
        text and a KVCache in forward; Attention.step over a static cache in decode_step and static_step). Every
        path runs these same operations, so decode_step keeps forward's bits."""
        x = x + attend(self.norm1(x) + positions)
        return x + self.mlp(self.norm2(x))

    def forward(
        self,
        x: torch.Tensor,
        offset: int,
        text: torch.Tensor | None,
        text_mask: torch.Tensor | None,
        cache: KVCache | None,
        refined: torch.Tensor | None = None,
    ) -> torch.Tensor:
        context = None if text is None else self.text_proj(text)
        if refined is not None and context is not None:
            context = context + refined
        attend = partial(
            self.attn, context=context, context_mask=text_mask if text is not None else None, causal=True, cache=cache
        )
        return self.step(x, self.pos_emb[:, offset : offset + x.shape[1]], attend)


class GroupedTokenHead(nn.Module):
    """Logits of group j of a token from the trunk's normed hidden state h and the values of groups < j.

    Group 0 reads h alone (a linear to 2^b logits). Group j > 0 reads z = h + sum over i < j of a learned
    embedding of group i's value, through one residual GELU MLP, so the earlier values interact with h rather than
    only shifting the logits; then its own linear to 2^b logits. Values are integers in [0, 2^b); how bits map to
    a value is the process's convention (binlat.processes.ar.bits_to_values)."""

    def __init__(self, dim: int, groups: int, width: int, mlp_ratio: int):
        super().__init__()
        values = 1 << width
        embeds = [nn.Embedding(values, dim) for _ in range(groups - 1)]  # group i, read by > i
        for embed in embeds:  # small, as the start token: h (RMS about 1) dominates at first
            nn.init.normal_(embed.weight, std=0.02)
        self.embed = nn.ModuleList(embeds)
        self.norm = nn.ModuleList(RMSNorm(dim) for _ in range(groups - 1))
        self.mlp = nn.ModuleList(GeluMLP(dim, mlp_ratio * dim) for _ in range(groups - 1))
        self.out = nn.ModuleList(nn.Linear(dim, values) for _ in range(groups))

    def forward(self, hidden: torch.Tensor, earlier: torch.Tensor, j: int) -> torch.Tensor:
        if not 0 <= j < len(self.out):
            raise ValueError(f"group index {j} outside the head's {len(self.out)} groups")
        if earlier.shape[-1] != j or earlier.shape[:-1] != hidden.shape[:-1]:
            raise ValueError(
                f"group {j} reads the values of the {j} groups before it, one row per hidden row: "
                f"expected [{', '.join(map(str, hidden.shape[:-1]))}, {j}], got {list(earlier.shape)}"
            )
        if j == 0:
            return self.out[0](hidden)
        z = hidden
        for i in range(j):
            z = z + self.embed[i](earlier[..., i])
        z = z + self.mlp[j - 1](self.norm[j - 1](z))
        return self.out[j](z)


class ARCache:
    """Per-block key/value caches plus how many image rows they hold. Text keys enter on the first call."""

    def __init__(self, num_layers: int, layers: list | None = None):
        # per block: KVCache here, StaticKVCache in a StaticARCache
        self.layers: list[Any] = [KVCache() for _ in range(num_layers)] if layers is None else layers
        self.length = 0  # image rows (start token included) already in the cache


class StaticARCache(ARCache):
    """ARCache over preallocated StaticKVCache buffers sized for text + start + every token: nothing grows.

    `positions` [capacity] (0, 1, ...) and `index` (the key row of the next step, a 1-element tensor) serve the
    fixed-shape step (ARTransformer.static_step): static_step_inputs hands them over, advance counts the row."""

    def __init__(self, model: ARTransformer, batch: int, text_length: int):
        c = model.config
        weight = model.x_embed.weight
        capacity = text_length + c.num_tokens + 1
        super().__init__(
            c.num_layers,
            [
                StaticKVCache(batch, c.num_heads, capacity, c.head_dim, dtype=weight.dtype, device=weight.device)
                for _ in range(c.num_layers)
            ],
        )
        self.text_length = text_length
        self.positions = torch.arange(capacity, device=weight.device)
        self.index = torch.zeros(1, dtype=torch.long, device=weight.device)

    def static_step_inputs(self) -> tuple:
        """static_step's arguments after the bits, for the next row: `index` is set (in place, so a compiled step
        reads the same tensor every time) to the key position that row takes."""
        self.index.fill_(self.layers[0].length)
        return (
            self.index - self.text_length,
            self.index,
            self.positions,
            [layer.k_buffer for layer in self.layers],
            [layer.v_buffer for layer in self.layers],
            self.layers[0].valid_buffer,
        )

    def advance(self) -> None:
        """Count the row a step wrote into every layer in place (static_step, with only tensors in and out, cannot
        move these Python counters itself)."""
        self.length += 1
        for layer in self.layers:
            layer.length += 1


class _Buffers:
    """The two buffers Attention.step writes, as static_step hands them over (tensors only, for the tracer)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k_buffer, self.v_buffer = k, v


class ARTransformer(nn.Module, ModelMixin):
    config_class = ARConfig

    def __init__(self, config: ARConfig):
        super().__init__()
        check_config_class(self, config)
        self.config = config
        self.start_token = nn.Parameter(torch.randn(1, 1, config.dim) * 0.02)
        self.x_embed = nn.Linear(config.num_bits, config.dim)
        self.text_refiner = make_text_refiner(config)
        self.blocks = nn.ModuleList(ARBlock(config) for _ in range(config.num_layers))
        self.norm_out = RMSNorm(config.dim)
        self.proj_out: nn.Linear | None
        self.head: GroupedTokenHead | None
        if config.bit_groups == 1:  # the release: one independent logit per bit
            self.proj_out, self.head = nn.Linear(config.dim, config.num_bits), None
        else:
            self.proj_out = None
            self.head = GroupedTokenHead(config.dim, config.bit_groups, group_bits(config), config.mlp_ratio)

    def _blocks(self) -> Sequence[ARBlock]:
        return cast("Sequence[ARBlock]", self.blocks)  # the ModuleList holds only ARBlocks

    def _output(self, x: torch.Tensor) -> torch.Tensor:
        """Bit logits (the release's head), or with a grouped head the normed hidden state group_logits reads."""
        h = self.norm_out(x)
        return h if self.head is not None or self.proj_out is None else self.proj_out(h)  # one of them is None

    def group_logits(self, hidden: torch.Tensor, earlier: torch.Tensor, j: int) -> torch.Tensor:
        """Logits [..., 2^b] of group j given `hidden` [..., dim] (what forward, decode_step or static_step
        returned for the token's row) and `earlier` [..., j], the integer values of groups 0..j-1 of the same
        token. Only for bit_groups > 1."""
        if self.head is None:
            raise ValueError("group_logits needs a grouped head (bit_groups > 1); this network predicts bit logits")
        return self.head(hidden, earlier, j)

    def new_cache(self, batch: int | None = None, text_length: int | None = None) -> ARCache:
        """A growing cache, or with batch and text length a StaticARCache (what decode_step and static_step use)."""
        if batch is None:
            return ARCache(len(self.blocks))
        if text_length is None:  # was a TypeError from None + int inside StaticARCache
            raise TypeError("new_cache(batch) needs text_length too")
        return StaticARCache(self, batch, text_length)

    def decode_step(self, bits: torch.Tensor, cache: StaticARCache) -> torch.Tensor:
        """Logits [N, B] (grouped head: hidden states [N, dim]) of the token after `bits` [N, 1, B], the newest
        token, over a StaticARCache that a forward(..., cache) call filled with the text, start token and any
        prefix. The operations of
        forward(bits, ..., cache) on a KVCache, on the same numbers, minus what does not change between steps
        (the text, the mask: built once per step, not per block) and the cache's reallocations: the same logits
        bit for bit."""
        dtype = self.x_embed.weight.dtype
        offset, index = cache.length, cache.layers[0].length
        if offset + 1 > self.config.num_tokens + 1:
            raise ValueError(f"sequence longer than the model's {self.config.num_tokens} tokens")
        x = self.x_embed(bits.to(dtype))
        mask = cache.layers[0].valid_buffer[:, None, None, : index + 1]
        for block, layer in zip(self._blocks(), cache.layers):
            attend = partial(block.attn.step, cache=layer, mask=mask, index=index)
            x = block.step(x, block.pos_emb[:, offset : offset + 1], attend)
        cache.advance()
        return self._output(x)[:, -1]

    def static_step(
        self,
        bits: torch.Tensor,
        offset: torch.Tensor,
        index: torch.Tensor,
        positions: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        valid: torch.Tensor,
    ) -> torch.Tensor:
        """decode_step with every shape fixed, for torch.compile: row `offset` (1-element tensor) at key `index`,
        attention over the whole buffers (`keys`/`values` per block, written in place) with keys past `index`
        masked. Equal to decode_step to float tolerance, not bit for bit (longer reductions, fused kernels)."""
        x = self.x_embed(bits.to(self.x_embed.weight.dtype))
        mask = (valid & (positions <= index))[:, None, None, :]
        for block, k, v in zip(self._blocks(), keys, values):
            attend = partial(block.attn.step, cache=_Buffers(k, v), mask=mask, index=index)
            x = block.step(x, block.pos_emb.index_select(1, offset), attend)
        return self._output(x)[:, -1]

    def forward(
        self,
        bits: torch.Tensor | None,
        text: Sequence[torch.Tensor],
        text_mask: torch.Tensor,
        cache: ARCache | None = None,
        group_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Without a cache: rows [start ; embed(bits)] (bits [N, T, B] or None) -> logits [N, T+1, B]; row i
        predicts token i. With a cache: only the new tokens' bits are given (None on the first call, which
        also feeds the text) and logits for those rows come back.

        A grouped head (bit_groups = g > 1) returns the normed hidden states [N, rows, dim] instead, or, given
        `group_values` [N, rows, g] (row i: the true values of token i's groups), every group's logits under
        teacher forcing, [N, rows, g, 2^b]: group j given the true groups < j. Training goes through this call
        alone, so a wrapped module (DDP, FSDP, torch.compile) sees every parameter it uses."""
        if group_values is not None and self.head is None:
            raise ValueError("group_values is for a grouped head (bit_groups > 1); this network predicts bit logits")
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
        refined = None
        if first and self.text_refiner is not None:
            refined = self.text_refiner(text[-1].to(dtype), mask)
        for i, block in enumerate(self.blocks):
            states = text[i].to(dtype) if first else None
            layer_cache = None if cache is None else cache.layers[i]
            x = run_block(
                block,
                x,
                offset,
                states,
                mask if first else None,
                layer_cache,
                refined,
                checkpointing=self.gradient_checkpointing and cache is None,
            )
        if cache is not None:
            cache.length += x.shape[1]
        out = self._output(x)
        if group_values is None:
            return out
        if group_values.shape != (*out.shape[:-1], self.config.bit_groups):
            raise ValueError(
                f"group_values must be [{', '.join(map(str, out.shape[:-1]))}, "
                f"{self.config.bit_groups}] (one value per group of each row), got "
                f"{list(group_values.shape)}"
            )
        head = self.head
        assert head is not None  # group_values without a grouped head was refused at the top
        return torch.stack([head(out, group_values[..., :j], j) for j in range(self.config.bit_groups)], -2)
