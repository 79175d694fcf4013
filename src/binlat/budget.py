"""Bounded work, decided before allocation (issue 29, item 3).

Every job that could allocate a lot is first estimated from its config and its request: the parameters of a network
(built on the meta device, so nothing is allocated; very deep configs are extrapolated from two shallow builds), the
activations of a generation (text features, generator blocks and KV cache, the tokenizer decoder at the requested
size, whose patches grow with size² and whose full attention with size⁴) and the images it keeps. An estimate above
the limit is a one-line `MemoryBudgetError` (a ValueError) naming the estimate, the limit and the fix.

The limit is, in order: `limited(...)` (the CLI's --max-memory), $BINLAT_MAX_MEMORY, else the memory available now
(psutil's available RAM, and the headroom under RLIMIT_AS when the process has one). Estimates are upper bounds of
the order of magnitude, not exact figures: they exist to refuse 8 TB requests at once, not to pack memory tightly."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import re
import resource
from collections.abc import Iterator
from typing import Any

import torch

from .validators import is_int

MEMORY_ENV = "BINLAT_MAX_MEMORY"
# Layer counts up to this are built on the meta device as they are; deeper ones are extrapolated (a million meta
# blocks would still take minutes and gigabytes of Python objects).
EXACT_LAYERS = 64
LAYER_FIELDS = ("num_layers", "encoder_layers", "decoder_layers", "text_refiner_layers")
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_given: contextvars.ContextVar[int | None] = contextvars.ContextVar("binlat_max_memory", default=None)


class MemoryBudgetError(ValueError):
    """A job whose estimated memory exceeds the limit; refused before anything is allocated."""


def parse_memory(text: str | int) -> int:
    """ "8G", "512M", "1.5GiB", "4096" (bytes) -> bytes (K, M, G, T are powers of 1024)."""
    if is_int(text):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
        if not m:
            raise ValueError(f"memory must be a size such as 8G, 512M or 1.5GiB, got {text!r}")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value < 1:
        raise ValueError(f"memory must be positive, got {text!r}")
    return value


def fmt(n: int | float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n < 1000 * 2**40 or unit != "TiB" else f"{n / size:.3e} {unit}"
    return f"{int(n)} bytes"


@contextlib.contextmanager
def limited(max_memory: str | int | None) -> Iterator[None]:
    """Within the block, jobs are measured against `max_memory` (None: the default limit)."""
    token = _given.set(None if max_memory is None else parse_memory(max_memory))
    try:
        yield
    finally:
        _given.reset(token)


def _available() -> int:
    import psutil

    available = psutil.virtual_memory().available
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        available = min(available, max(0, soft - psutil.Process().memory_info().vms))
    return available


def memory_limit() -> tuple[int, str]:
    """(bytes, what they are) of the limit jobs are measured against now."""
    given = _given.get()
    if given is not None:
        return given, "--max-memory"
    env = os.environ.get(MEMORY_ENV, "").strip()
    if env:
        try:
            return parse_memory(env), MEMORY_ENV
        except ValueError as e:
            raise ValueError(f"{MEMORY_ENV}: {e}") from None
    return _available(), "memory available"


def check(estimate: int, what: str, fix: str) -> None:
    """Refuse (MemoryBudgetError, one line) when `estimate` bytes exceed the limit."""
    limit, source = memory_limit()
    if estimate > limit:
        raise MemoryBudgetError(
            f"{what} needs about {fmt(estimate)}, more than the {source} ({fmt(limit)}): "
            f"{fix}, or set --max-memory (or {MEMORY_ENV}) if the machine has more"
        )


# --- networks -------------------------------------------------------------------------------------------------------
def _meta_count(model_class: type, config: Any) -> int:
    with torch.device("meta"):
        model = model_class(config)
    return sum(t.numel() for t in model.state_dict().values())


def parameter_count(model_class: type, config: Any) -> int:
    """Parameters (and persistent buffers) of `model_class(config)`, without allocating them: built on the meta
    device, and for configs deeper than EXACT_LAYERS extrapolated from builds at EXACT_LAYERS and EXACT_LAYERS + 1
    blocks (blocks of one stack are alike)."""
    deep = {
        f: getattr(config, f)
        for f in LAYER_FIELDS
        if isinstance(getattr(config, f, None), int) and getattr(config, f) > EXACT_LAYERS
    }
    if not deep:
        return _meta_count(model_class, config)
    try:
        indices = {"text_layers": None} if getattr(config, "text_layers", None) is not None else {}  # no weights
        shallow = dataclasses.replace(config, **{f: EXACT_LAYERS for f in deep}, **indices)
        base = _meta_count(model_class, shallow)
        total = base
        for field, layers in deep.items():
            per_block = _meta_count(model_class, dataclasses.replace(shallow, **{field: EXACT_LAYERS + 1})) - base
            total += (layers - EXACT_LAYERS) * per_block
    except ValueError:  # e.g. a resampling index beyond EXACT_LAYERS: no shallow twin to measure
        raise MemoryBudgetError(
            f"{model_class.__name__}: {', '.join(f'{k}={v}' for k, v in deep.items())} is too "
            f"deep to estimate (a resampling index past block {EXACT_LAYERS}); "
            f"binlat builds at most {EXACT_LAYERS} blocks of a stack as given"
        ) from None
    return total


def check_network(model_class: type, config: Any, source: str, dtype: torch.dtype | None = None) -> int:
    """Refuse a network whose parameters would not fit, before it is built; returns its bytes."""
    bytes_per = (dtype or torch.float32).itemsize
    estimate = parameter_count(model_class, config) * bytes_per
    check(
        estimate,
        f"{source}: the {model_class.__name__} this config describes",
        "check the config's layer counts and widths",
    )
    return estimate


# --- generation -----------------------------------------------------------------------------------------------------
def decoder_bytes(tok: Any, height: int, width: int, bytes_per: int = 4) -> int:
    """The tokenizer decoder on one image of height x width (images are decoded one at a time): block activations
    over the finest patch grid plus the latent tokens, and a full attention map per head."""
    n = (height // tok.patch_size) * (width // tok.patch_size) + tok.num_tokens
    blocks = n * tok.decoder_dim * (6 + 2 * tok.mlp_ratio)
    attention = tok.decoder_heads * n * n
    pixels = 3 * height * width * 4
    return (blocks + attention) * bytes_per + pixels


def generator_bytes(cfg: Any, rows: int, text_len: int, text_layers: int, bytes_per: int = 4) -> int:
    """One sampling step of a generator on `rows` sequences (the batch, doubled for guidance): block activations,
    attention over image and text tokens, a KV cache for every block, and the text features it reads."""
    n = cfg.num_tokens + 1
    width = cfg.num_heads * cfg.head_dim
    blocks = rows * n * width * (6 + 2 * cfg.mlp_ratio)
    attention = rows * cfg.num_heads * n * (n + text_len)
    cache = 2 * cfg.num_layers * rows * (n + text_len) * width
    text = rows * text_layers * text_len * cfg.text_dim
    return (blocks + attention + cache + text) * bytes_per


def generation_bytes(
    tok: Any,
    cfg: Any,
    *,
    batch: int,
    height: int,
    width: int,
    text_len: int,
    text_layers: int,
    kept_images: int,
    bytes_per: int = 4,
) -> int:
    """A generation request: one batch through the generator, one image through the decoder, and the images kept
    (uint8 RGB) until the call returns."""
    return (
        generator_bytes(cfg, 2 * batch, text_len, text_layers, bytes_per)
        + decoder_bytes(tok, height, width, bytes_per)
        + kept_images * 3 * height * width
    )
