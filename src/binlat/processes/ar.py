"""Autoregressive decoding: K steps, each predicting all B bits of the next token at once.

Modes (ARDecoding's `use_cache` and `decode`):
- "static" (the default): text keys/values computed once per block into preallocated buffers, then one
  ARTransformer.decode_step per token (one row, written in place; no growth, no per-block mask or concatenation);
- "appending": the same through forward(..., cache) on a KVCache that grows (the cache as it was first built);
- "compiled" (opt in): torch.compile of ARTransformer.static_step, every shape fixed; fused kernels and
  whole-buffer attention round differently, so it equals the others to float tolerance, not bit for bit;
- reference (use_cache=False): the released sampler's algorithm, the whole sequence recomputed at every step.
"static", "appending" and reference give the same logits bit for bit (tests/test_processes.py checks it).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..text import TextFeatures
from .common import bernoulli, check_sampling_args, guide, settings_of, uniform, with_guidance


@dataclass(frozen=True)
class ARSampling:
    guidance_scale: float = 7.5
    temperature: float = 1.0  # 0 thresholds the guided logits

    def __post_init__(self) -> None:
        check_sampling_args(None, self.guidance_scale, self.temperature)


DECODE_MODES = ("static", "appending", "compiled")


@dataclass
class ARDecoding:
    Settings = ARSampling

    use_cache: bool = True
    decode: str = "static"  # with the cache: "static" | "appending" | "compiled" (see the module docstring)
    context_flip: float = 0.0  # training: share of the teacher-forced context's bits flipped (targets stay clean)

    def __post_init__(self) -> None:
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {self.decode!r}")
        if not 0 <= self.context_flip < 0.5:
            raise ValueError(f"context_flip must lie in [0, 0.5), got {self.context_flip!r}")

    def loss(self, network: torch.nn.Module, bits: torch.Tensor, text: TextFeatures,
             generators: Sequence[torch.Generator] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher forcing: row i (start token + tokens < i) predicts every bit of token i; BCE on all bits.
        With `context_flip` each context bit is flipped with that probability (drawn from the sample's generator)
        while the targets stay the clean bits: the network learns to carry on correctly after a wrong bit, as it
        must when it reads its own samples. Without it nothing is drawn at random."""
        bits = bits.float()
        context = bits[:, :-1]
        if self.context_flip > 0:
            shape = tuple(context.shape[1:])
            u = torch.rand(context.shape, device=bits.device) if generators is None else uniform(
                shape, generators, bits.device)
            context = torch.where(u < self.context_flip, 1 - context, context)
        logits = network(context, text.layers, text.mask).float()
        loss = F.binary_cross_entropy_with_logits(logits, bits)
        with torch.no_grad():
            accuracy = ((logits > 0).float() == bits).float().mean()
        return loss, {"bit_accuracy": accuracy}

    @torch.inference_mode()
    def sample(self, network: torch.nn.Module, cond: TextFeatures, uncond: TextFeatures | None,
               generators: Sequence[torch.Generator], settings: ARSampling | None = None, *,
               progress: bool = False, prefix: torch.Tensor | None = None, return_logits: bool = False,
               **given: Any) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Bits [N, K, B] (float 0/1); `given` overrides fields of `settings`. temperature 0 thresholds the guided
        logits; otherwise bits are drawn from Bernoulli(sigmoid(logits / temperature)). `prefix` [N, k, B] fixes
        the first k tokens (see `continue_from`)."""
        s = settings_of(ARSampling, settings, given)
        guidance_scale, temperature = s.guidance_scale, s.temperature
        cfg = network.config
        n = cond.mask.shape[0]
        device = next(network.parameters()).device
        text = with_guidance(cond, uncond, guidance_scale).to(device)
        doubled = text.mask.shape[0] != n
        k0 = 0 if prefix is None else prefix.shape[1]
        if k0 > cfg.num_tokens:
            raise ValueError(f"prefix has {k0} tokens; the model makes {cfg.num_tokens}")
        tokens = torch.zeros(n, cfg.num_tokens, cfg.num_bits, device=device)
        if k0:
            tokens[:, :k0] = prefix.float().to(device)
        rows = text.mask.shape[0]
        if not self.use_cache:
            step = _Recompute(network, text, doubled)
        elif self.decode == "appending":
            step = _Appending(network, text, doubled)
        else:
            step = _Static(network, text, rows, compiled=self.decode == "compiled")
        all_logits = []
        for i in tqdm(range(k0, cfg.num_tokens), disable=not progress, desc="ar", leave=False):
            logits = guide(step(tokens, i).float(), guidance_scale, n)
            all_logits.append(logits)
            if temperature == 0:
                tokens[:, i] = (logits > 0).float()
            else:
                tokens[:, i] = bernoulli(torch.sigmoid(logits / temperature), generators)
        return (tokens, all_logits) if return_logits else tokens

    def continue_from(self, network: torch.nn.Module, prefix: torch.Tensor, cond: TextFeatures,
                      uncond: TextFeatures | None, generators: Sequence[torch.Generator],
                      settings: ARSampling | None = None, *, progress: bool = False) -> torch.Tensor:
        """Keep the tokens of `prefix` [N, k, B] and write the rest."""
        device = next(network.parameters()).device
        return self.sample(network, cond, uncond, generators, settings, progress=progress, prefix=prefix.to(device))


# --- the decoding steps: step(tokens [N, K, B], i) -> network output [N or 2N, B] for token i -------------------
def _rows(bits: torch.Tensor, doubled: bool) -> torch.Tensor:
    return torch.cat((bits, bits)) if doubled else bits


class _Recompute:
    """The release's algorithm: the whole sequence [start ; tokens < i] at every step."""

    def __init__(self, network: torch.nn.Module, text: TextFeatures, doubled: bool):
        self.network, self.text, self.doubled = network, text, doubled

    def __call__(self, tokens: torch.Tensor, i: int) -> torch.Tensor:
        seen = _rows(tokens[:, :i], self.doubled) if i else None
        return self.network(seen, self.text.layers, self.text.mask)[:, -1]


class _Appending:
    """forward(new rows, ..., cache) on the growing KVCache: the prefix (or nothing) first, then one token a step."""

    def __init__(self, network: torch.nn.Module, text: TextFeatures, doubled: bool):
        self.network, self.text, self.doubled = network, text, doubled
        self.cache, self.seen = network.new_cache(), None

    def __call__(self, tokens: torch.Tensor, i: int) -> torch.Tensor:
        start = 0 if self.seen is None else self.seen
        new = _rows(tokens[:, start:i], self.doubled) if i > start else None
        self.seen = i
        return self.network(new, self.text.layers, self.text.mask, self.cache)[:, -1]


class _Static:
    """The prefill (text, start token, any prefix) through forward into a StaticARCache, then one decode_step (or
    the compiled static_step) per token; the rows of the newest token live in one preallocated buffer."""

    def __init__(self, network: torch.nn.Module, text: TextFeatures, rows: int, compiled: bool):
        self.network, self.text, self.rows = network, text, rows
        self.cache = network.new_cache(rows, text.mask.shape[1])
        self.row = torch.zeros(rows, 1, network.config.num_bits, device=text.mask.device)
        self.compiled = _compiled_step(network) if compiled else None
        self.started = False

    def __call__(self, tokens: torch.Tensor, i: int) -> torch.Tensor:
        n = tokens.shape[0]
        if not self.started:
            self.started = True
            new = _rows(tokens[:, :i], self.rows != n) if i else None
            return self.network(new, self.text.layers, self.text.mask, self.cache)[:, -1]
        self.row[:n] = tokens[:, i - 1: i]
        if self.rows != n:
            self.row[n:] = tokens[:, i - 1: i]
        if self.compiled is None:
            return self.network.decode_step(self.row, self.cache)
        c = self.cache
        c.index.fill_(c.layers[0].length)
        offset = c.index - c.text_length
        out = self.compiled(self.row, offset, c.index, c.positions, [layer.k_buffer for layer in c.layers],
                            [layer.v_buffer for layer in c.layers], c.layers[0].valid_buffer)
        c.length += 1
        for layer in c.layers:
            layer.length += 1
        return out


def _compiled_step(network: torch.nn.Module):
    """torch.compile of network.static_step, made once per network (shapes are fixed: one trace per batch size)."""
    compiled = getattr(network, "_binlat_compiled_step", None)
    if compiled is None:
        compiled = torch.compile(network.static_step, dynamic=False)
        network._binlat_compiled_step = compiled
    return compiled
