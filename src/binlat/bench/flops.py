"""FLOP formulas: the diffusion transformer's step counted analytically, anything else by torch's counter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .plan import TEXT_LENGTH


def diffusion_step_flops(
    config, batch: int, text_length: int = TEXT_LENGTH, num_tokens: int | None = None
) -> dict[str, int]:
    """Analytic FLOPs (2 per multiply-add) of one DiffusionTransformer forward on `batch` rows of `num_tokens`
    tokens (default: the config's) with `text_length` text positions (padded ones included: they are computed).

    Counts every matrix product: attention projections (q over image rows; k, v over text + image rows; out),
    attention scores and values, MLP, adaLN modulation, per-block text projections, and the input/timestep/output
    layers. Bias adds, norms, activations and softmax are not counted (they are not matmul work)."""
    n, k, m = batch, config.num_tokens if num_tokens is None else num_tokens, text_length  # rows, tokens, text
    d, b, r = config.dim, config.num_bits, config.mlp_ratio
    inner = config.num_heads * config.head_dim
    per_block = {
        "attention projections": 2 * n * (k * d * inner + 2 * (m + k) * d * inner + k * inner * d),
        "attention scores/values": 2 * 2 * n * k * (m + k) * inner,
        "MLP": 2 * 2 * n * k * d * r * d,
        "adaLN": 2 * n * d * 6 * d,
        "text projections": 2 * n * m * config.text_dim * d,
    }
    flops = {name: config.num_layers * v for name, v in per_block.items()}
    flops["adaLN"] += 2 * n * d * 2 * d  # output AdaLNContinuous
    flops["embed/timestep/output"] = 2 * n * (k * b * d + d + d * d + k * d * b)
    flops["total"] = sum(flops.values())
    return flops


def counted_flops(fn: Callable[[], Any]) -> int | None:
    """FLOPs of matrix products and convolutions that torch's FlopCounterMode sees while fn runs (None on failure).
    Run on the meta device it costs nothing and counts attention as the products it decomposes into."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            fn()
        return int(counter.get_total_flops())
    except Exception:  # noqa: BLE001 — a missing FLOP formula only costs a column
        return None
