"""Autoregressive decoding: K steps, each predicting all B bits of the next token at once.

Two modes give the same logits: "cached" (text keys/values computed once per block, image keys/values appended
each step) and "reference" (the released sampler's algorithm: recompute the whole sequence at every step).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..text import TextFeatures
from .common import bernoulli, check_sampling_args, guide, settings_of, with_guidance


@dataclass(frozen=True)
class ARSampling:
    guidance_scale: float = 7.5
    temperature: float = 1.0  # 0 thresholds the guided logits

    def __post_init__(self) -> None:
        check_sampling_args(None, self.guidance_scale, self.temperature)


@dataclass
class ARDecoding:
    Settings = ARSampling

    use_cache: bool = True

    def loss(self, network: torch.nn.Module, bits: torch.Tensor, text: TextFeatures,
             generators: Sequence[torch.Generator] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher forcing: row i (start token + tokens < i) predicts every bit of token i; BCE on all bits.
        Nothing is drawn at random, so `generators` go unused."""
        bits = bits.float()
        logits = network(bits[:, :-1], text.layers, text.mask).float()
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
        tokens = torch.zeros(n, 0, cfg.num_bits, device=device) if prefix is None else prefix.float().to(device)
        if tokens.shape[1] > cfg.num_tokens:
            raise ValueError(f"prefix has {tokens.shape[1]} tokens; the model makes {cfg.num_tokens}")
        cache = network.new_cache() if self.use_cache else None
        new = tokens if tokens.shape[1] else None  # rows the network has not seen yet
        all_logits = []
        for _ in tqdm(range(tokens.shape[1], cfg.num_tokens), disable=not progress, desc="ar", leave=False):
            if cache is None:
                seen = tokens if tokens.shape[1] else None
                seen = seen if seen is None or not doubled else torch.cat((seen, seen))
                out = network(seen, text.layers, text.mask)[:, -1]
            else:
                new = new if new is None or not doubled else torch.cat((new, new))
                out = network(new, text.layers, text.mask, cache)[:, -1]
            logits = guide(out.float(), guidance_scale, n)
            all_logits.append(logits)
            if temperature == 0:
                step = (logits > 0).float()
            else:
                step = bernoulli(torch.sigmoid(logits / temperature), generators)
            new = step[:, None]
            tokens = torch.cat((tokens, new), dim=1)
        return (tokens, all_logits) if return_logits else tokens

    def continue_from(self, network: torch.nn.Module, prefix: torch.Tensor, cond: TextFeatures,
                      uncond: TextFeatures | None, generators: Sequence[torch.Generator],
                      settings: ARSampling | None = None, *, progress: bool = False) -> torch.Tensor:
        """Keep the tokens of `prefix` [N, k, B] and write the rest."""
        device = next(network.parameters()).device
        return self.sample(network, cond, uncond, generators, settings, progress=progress, prefix=prefix.to(device))
