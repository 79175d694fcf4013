"""Multi-head attention used by every network in binlat.

One module covers the three uses:
- tokenizer: full self-attention with rotary positions;
- diffusion: image rows query [text ; image] keys, padded text keys masked;
- AR: the same with a causal mask aligned bottom-right, plus a key/value cache for decoding.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .norms import RMSNorm
from .rotary import apply_rotary


class KVCache:
    """Keys and values ([B, H, L, Dh]) seen so far by one attention layer, and which keys are valid.

    Rows live in buffers that double when full, so appending one row per decoding step copies only that row."""

    def __init__(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None  # [B, capacity] bool, None while every key is valid
        self.length = 0

    def __len__(self) -> int:
        return self.length

    @property
    def k(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, : self.length]

    @property
    def v(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self.length]

    @property
    def valid(self) -> torch.Tensor | None:
        return None if self._valid is None else self._valid[:, : self.length]

    def _reserve(self, rows: int, like: torch.Tensor) -> None:
        capacity = 0 if self._k is None else self._k.shape[2]
        if self.length + rows <= capacity:
            return
        new_capacity = max(2 * (self.length + rows), 16)
        b, h, _, d = like.shape
        k = like.new_empty(b, h, new_capacity, d)
        v = like.new_empty(b, h, new_capacity, d)
        if self._k is not None and self._v is not None:  # set together
            k[:, :, : self.length] = self._k[:, :, : self.length]
            v[:, :, : self.length] = self._v[:, :, : self.length]
        self._k, self._v = k, v
        if self._valid is not None:
            valid = torch.ones(b, new_capacity, dtype=torch.bool, device=like.device)
            valid[:, : self.length] = self._valid[:, : self.length]
            self._valid = valid

    def update(
        self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        rows = k.shape[2]
        self._reserve(rows, k)
        k_buffer, v_buffer = self._k, self._v
        assert k_buffer is not None and v_buffer is not None  # _reserve allocated them
        if valid is not None and self._valid is None:
            self._valid = torch.ones(k.shape[0], k_buffer.shape[2], dtype=torch.bool, device=k.device)
        end = self.length + rows
        k_buffer[:, :, self.length : end] = k
        v_buffer[:, :, self.length : end] = v
        if self._valid is not None:
            self._valid[:, self.length : end] = True if valid is None else valid
        self.length = end
        return k_buffer[:, :, :end], v_buffer[:, :, :end], self.valid

    def repeat_batch(self, n: int) -> None:
        """Repeat every cached row n times along the batch (e.g. one prompt, many samples)."""
        for name in ("_k", "_v", "_valid"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.repeat_interleave(n, dim=0))


class KVBuffers(Protocol):
    """What Attention.step writes into: a StaticKVCache, or its two buffers alone (ARTransformer.static_step)."""

    k_buffer: torch.Tensor
    v_buffer: torch.Tensor


class StaticKVCache:
    """Keys and values of one attention layer in fixed-size buffers [B, H, capacity, Dh], written in place.

    Allocated once (zeros, so unwritten rows are finite numbers that a mask can hide), never grown: a decoding step
    writes one row at `length` and moves the counter. `valid` [B, capacity] is False only at masked (padded) keys.
    `update` has KVCache's contract (views of the rows written so far), so a prefill runs through
    Attention.forward unchanged; `Attention.step` is the one-row decoding step over it."""

    def __init__(
        self,
        batch: int,
        num_heads: int,
        capacity: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.k_buffer = torch.zeros(batch, num_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v_buffer = torch.zeros_like(self.k_buffer)
        self.valid_buffer = torch.ones(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0

    def __len__(self) -> int:
        return self.length

    @property
    def capacity(self) -> int:
        return self.k_buffer.shape[2]

    @property
    def k(self) -> torch.Tensor:
        return self.k_buffer[:, :, : self.length]

    @property
    def v(self) -> torch.Tensor:
        return self.v_buffer[:, :, : self.length]

    @property
    def valid(self) -> torch.Tensor:
        return self.valid_buffer[:, : self.length]

    def update(
        self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"static KV cache holds {self.capacity} keys; {end} asked for")
        self.k_buffer[:, :, self.length : end] = k
        self.v_buffer[:, :, self.length : end] = v
        if valid is not None:
            self.valid_buffer[:, self.length : end] = valid
        self.length = end
        return self.k, self.v, self.valid


def _all_valid(k: torch.Tensor) -> torch.Tensor:
    return torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)


def attention_mask(
    key_valid: torch.Tensor | None, num_queries: int, num_keys: int, causal: bool, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask [B or 1, 1, Lq, Lk] for SDPA (True = may attend), or None when nothing is masked.

    Causal masking is aligned bottom-right: query i (among the last Lq rows) sees key j iff
    j <= i + (Lk - Lq), so image rows always see every text key, themselves and earlier rows."""
    mask = None
    if causal:
        i = torch.arange(num_queries, device=device)[:, None]
        j = torch.arange(num_keys, device=device)[None, :]
        mask = (j <= i + (num_keys - num_queries))[None, None]
    if key_valid is not None:
        keys = key_valid[:, None, None, :]
        mask = keys if mask is None else mask & keys
    return mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """scaled_dot_product_attention, in float32 where a CPU trains under bf16 autocast: there PyTorch's bf16
    attention backward runs about 3x slower than float32's at these head sizes (fwd + bwd, 32 x 4 heads x 64 x 96,
    head 48, Intel Xeon with AMX: 25.9 ms against 9.3 ms), while the projections around it keep bf16's speed."""
    if q.device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    """Multi-head attention with per-head RMSNorm on queries and keys, no biases.

    forward(x, context): queries come from x only; keys and values from [context ; x]. This equals the
    release's "queries are the last Lq rows of the joint sequence" formulation."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.norm_q = RMSNorm(head_dim)
        self.norm_k = RMSNorm(head_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        causal: bool = False,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x [B, Lq, dim]; context [B, Lc, dim] key rows placed before x; context_mask [B, Lc] bool
        (True = real token; without context, [B, Lq] over x's own rows); rotary (cos, sin) [L, Dh] for the rows of x
        (self-attention only); cache: keys/values of earlier calls, extended in place."""
        b, num_queries, _ = x.shape
        source = x if context is None else torch.cat((context, x), dim=1)
        q = self.norm_q(self._heads(self.to_q(x)))
        k = self.norm_k(self._heads(self.to_k(source)))
        v = self._heads(self.to_v(source))
        if rotary is not None:
            if context is not None or cache is not None:
                raise ValueError("rotary positions are only supported for plain self-attention")
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)

        valid = None
        if context_mask is not None and context is None:  # plain self-attention: the mask covers x's own rows
            valid = context_mask.to(torch.bool)
        elif context_mask is not None:
            image_rows = torch.ones(b, num_queries, dtype=torch.bool, device=x.device)
            valid = torch.cat((context_mask.to(torch.bool), image_rows), dim=1)
        if cache is not None:
            k, v, valid = cache.update(k, v, valid)

        mask = attention_mask(valid, num_queries, k.shape[2], causal, x.device)
        out = attend(q, k, v, mask)
        return self.to_out(out.transpose(1, 2).reshape(b, num_queries, -1))

    def step(self, x: torch.Tensor, cache: KVBuffers, mask: torch.Tensor, index: int | torch.Tensor) -> torch.Tensor:
        """One decoding row x [B, 1, dim] at key position `index` of a StaticKVCache (causal self-attention over
        the cache, whose earlier rows hold the context): its key and value are written in place.

        index an int: attention over the `index + 1` keys written so far (mask [B, 1, 1, index + 1]), the same
        products as Attention.forward with a KVCache, so the same bits. index a 1-element long tensor: attention
        over the whole buffer (mask [B, 1, 1, capacity] hides what is not written yet): every shape is fixed, which
        is what torch.compile needs to trace the step once."""
        b = x.shape[0]
        q = self.norm_q(self._heads(self.to_q(x)))
        k = self.norm_k(self._heads(self.to_k(x)))
        v = self._heads(self.to_v(x))
        if isinstance(index, int):
            cache.k_buffer[:, :, index : index + 1] = k
            cache.v_buffer[:, :, index : index + 1] = v
            keys, values = cache.k_buffer[:, :, : index + 1], cache.v_buffer[:, :, : index + 1]
        else:
            cache.k_buffer.index_copy_(2, index, k)
            cache.v_buffer.index_copy_(2, index, v)
            keys, values = cache.k_buffer, cache.v_buffer
        out = attend(q, keys, values, mask)
        return self.to_out(out.transpose(1, 2).reshape(b, 1, -1))
