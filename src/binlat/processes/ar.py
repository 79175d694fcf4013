"""Autoregressive decoding: K steps, each predicting all B bits of the next token at once.

Modes (ARDecoding's `use_cache` and `decode`):
- "static" (the default): text keys/values computed once per block into preallocated buffers, then one
  ARTransformer.decode_step per token (one row, written in place; no growth, no per-block mask or concatenation);
- "appending": the same through forward(..., cache) on a KVCache that grows (the cache as it was first built);
- "compiled" (opt in): torch.compile of ARTransformer.static_step, every shape fixed; fused kernels and
  whole-buffer attention round differently, so it equals the others to float tolerance, not bit for bit;
- reference (use_cache=False): the released sampler's algorithm, the whole sequence recomputed at every step.
"static", "appending" and reference give the same logits bit for bit (tests/test_processes_ar.py checks it).

A network with a grouped head (config.bit_groups = g > 1; the step then yields hidden states) has each token
drawn group by group: group j's logits given the groups already drawn (cond and uncond rows given the same
values), guided as bit logits are, then one categorical draw from the sample's own generator. A group's value is
its bits read as a binary number, first bit most significant (bits_to_values / values_to_bits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..modeling import Network
from ..text import TextFeatures
from .common import (
    Negatives,
    Process,
    bernoulli,
    categorical,
    check_sampling_args,
    contrast_term,
    guidance_scale_setting,
    guide,
    temperature_setting,
    uniform,
)


def bit_groups(network: Network) -> int:
    """The network's config.bit_groups (1, bit logits, for a network without a config)."""
    return getattr(getattr(network, "config", None), "bit_groups", 1)


def bits_to_values(bits: torch.Tensor, groups: int) -> torch.Tensor:
    """Bits [..., B] (0/1, any dtype) -> the integer values [..., groups] of its consecutive groups of B / groups
    bits, the group's first bit most significant."""
    width = bits.shape[-1] // groups
    weights = 1 << torch.arange(width - 1, -1, -1, device=bits.device)
    return (bits.reshape(*bits.shape[:-1], groups, width).long() * weights).sum(-1)


def values_to_bits(values: torch.Tensor, width: int) -> torch.Tensor:
    """Integer values [..., groups] of `width` bits each -> float 0/1 bits [..., groups * width] (inverse of
    bits_to_values)."""
    shifts = torch.arange(width - 1, -1, -1, device=values.device)
    return ((values[..., None] >> shifts) & 1).flatten(-2).float()


def teacher_forced_logits(
    network: Network, context: torch.Tensor, bits: torch.Tensor, text: TextFeatures, groups: int
) -> torch.Tensor:
    """The network's logits for every token of `bits` given the true tokens before it: bit logits [N, K, B], or a
    grouped head's [N, K, g, 2^b], each group's given the true groups before it."""
    if groups > 1:
        return network(context, text.layers, text.mask, group_values=bits_to_values(bits, groups)).float()
    return network(context, text.layers, text.mask).float()


def image_nll(logits: torch.Tensor, bits: torch.Tensor, groups: int) -> torch.Tensor:
    """Each image's NLL [N] in nats under teacher_forced_logits' output."""
    if groups > 1:
        values = bits_to_values(bits, groups)
        nll = F.cross_entropy(logits.flatten(0, 2), values.flatten(), reduction="none")
        return nll.view(bits.shape[0], -1).sum(1)
    return F.binary_cross_entropy_with_logits(logits, bits, reduction="none").sum((1, 2))


@dataclass(frozen=True)
class ARSampling:
    guidance_scale: float = guidance_scale_setting()
    temperature: float = temperature_setting()

    def __post_init__(self) -> None:
        check_sampling_args(None, self.guidance_scale, self.temperature)


DECODE_MODES = ("static", "appending", "compiled")


@dataclass
class ARDecoding(Process):
    Settings = ARSampling
    draw_options = ("prefix", "return_logits")

    use_cache: bool = True
    decode: str = "static"  # with the cache: "static" | "appending" | "compiled" (see the module docstring)
    context_flip: float = 0.0  # training: share of the teacher-forced context's bits flipped (targets stay clean)
    # training: weight of the hard-negative term (common.contrast_term) on the rows a batch gives negatives for
    contrast_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {self.decode!r}")
        if not 0 <= self.context_flip < 0.5:
            raise ValueError(f"context_flip must lie in [0, 0.5), got {self.context_flip!r}")

    def loss(
        self,
        network: Network,
        bits: torch.Tensor,
        text: TextFeatures,
        generators: Sequence[torch.Generator] | None = None,
        *,
        negatives: Negatives | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher forcing: row i (start token + tokens < i) predicts every bit of token i; BCE on all bits (a
        grouped head: each group's cross-entropy given the true groups before it, summed over a token's groups and
        divided by its B bits, so both heads' losses read as a token's NLL per bit).
        With `context_flip` each context bit is flipped with that probability (drawn from the sample's generator)
        while the targets stay the clean bits: the network learns to carry on correctly after a wrong bit, as it
        must when it reads its own samples. Without it nothing is drawn at random. With `negatives` and
        contrast_weight, plus the hard-negative term: the rows' NLLs under their negative captions, from the same
        context, against those under their own."""
        bits = bits.float()
        context = bits[:, :-1]
        if self.context_flip > 0:
            shape = tuple(context.shape[1:])
            u = (
                torch.rand(context.shape, device=bits.device)
                if generators is None
                else uniform(shape, generators, bits.device)
            )
            context = torch.where(u < self.context_flip, 1 - context, context)
        groups = bit_groups(network)
        logits = teacher_forced_logits(network, context, bits, text, groups)
        if groups > 1:
            values = bits_to_values(bits, groups)
            loss = F.cross_entropy(logits.flatten(0, 2), values.flatten(), reduction="sum") / bits.numel()
        else:
            loss = F.binary_cross_entropy_with_logits(logits, bits)
        with torch.no_grad():  # a grouped head: the bits of each group's most likely value given the true groups before
            guess = (logits > 0).float() if groups == 1 else values_to_bits(logits.argmax(-1), bits.shape[-1] // groups)
            metrics = {"bit_accuracy": (guess == bits).float().mean()}
        if negatives is not None and self.contrast_weight > 0:
            rows = negatives.rows
            own = image_nll(logits[rows], bits[rows], groups)
            other = own  # no rows: an empty term (the metrics keep their names on every process and step)
            if len(rows):
                negative_logits = teacher_forced_logits(network, context[rows], bits[rows], negatives.text, groups)
                other = image_nll(negative_logits, bits[rows], groups)
            metrics.update(contrast_term(own, other, bits.shape[0]))
            loss = loss + self.contrast_weight * metrics["contrast"]
        return loss, metrics

    def _draw(
        self,
        network: Network,
        text: TextFeatures,
        n: int,
        s: ARSampling,
        generators: Sequence[torch.Generator],
        *,
        progress: bool,
        prefix: torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """`sample` (Process.sample): temperature 0 thresholds the guided logits; otherwise bits are drawn from
        Bernoulli(sigmoid(logits / temperature)). `prefix` [N, k, B] fixes the first k tokens (see
        `continue_from`). A grouped head draws each group from softmax(logits / temperature) (temperature 0: the
        most likely value) given the groups drawn before it. `return_logits` also returns each step's guided
        logits: [N, B], or for a grouped head [N, g, 2^b]."""
        guidance_scale, temperature = s.guidance_scale, s.temperature
        cfg = network.config
        device = next(network.parameters()).device
        doubled = text.mask.shape[0] != n
        k0 = 0 if prefix is None else prefix.shape[1]
        if k0 > cfg.num_tokens:
            raise ValueError(f"prefix has {k0} tokens; the model makes {cfg.num_tokens}")
        tokens = torch.zeros(n, cfg.num_tokens, cfg.num_bits, device=device)
        if prefix is not None and k0:
            tokens[:, :k0] = prefix.float().to(device)
        rows = text.mask.shape[0]
        step: _Recompute | _Appending | _Static
        if not self.use_cache:
            step = _Recompute(network, text, doubled)
        elif self.decode == "appending":
            step = _Appending(network, text, doubled)
        else:
            step = _Static(network, text, rows, compiled=self.decode == "compiled")
        groups = bit_groups(network)
        all_logits = []
        for i in tqdm(range(k0, cfg.num_tokens), disable=not progress, desc="ar", leave=False):
            if groups > 1:
                tokens[:, i], logits = _draw_groups(network, step(tokens, i), n, groups, s, generators)
                all_logits.append(logits)
                continue
            logits = guide(step(tokens, i).float(), guidance_scale, n)
            all_logits.append(logits)
            if temperature == 0:
                tokens[:, i] = (logits > 0).float()
            else:
                tokens[:, i] = bernoulli(torch.sigmoid(logits / temperature), generators)
        return (tokens, all_logits) if return_logits else tokens

    def continue_from(
        self,
        network: Network,
        prefix: torch.Tensor,
        cond: TextFeatures,
        uncond: TextFeatures | None,
        generators: Sequence[torch.Generator],
        settings: ARSampling | None = None,
        *,
        progress: bool = False,
    ) -> torch.Tensor:
        """Keep the tokens of `prefix` [N, k, B] and write the rest."""
        device = next(network.parameters()).device
        return self.sample(network, cond, uncond, generators, settings, progress=progress, prefix=prefix.to(device))


def _draw_groups(
    network: Network,
    hidden: torch.Tensor,
    n: int,
    groups: int,
    s: ARSampling,
    generators: Sequence[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of a grouped head from the step's hidden rows [N or 2N, dim]: for j = 0..g-1, group j's logits
    given the values drawn so far (the unconditional rows read the same values as their conditional twins), guided,
    then the most likely value (temperature 0) or one categorical draw per sample. Returns the token's bits [N, B]
    and the guided logits [N, g, 2^b]."""
    values = torch.zeros(n, groups, dtype=torch.long, device=hidden.device)
    all_logits = []
    for j in range(groups):
        earlier = _rows(values[:, :j], hidden.shape[0] != n)
        logits = guide(network.group_logits(hidden, earlier, j).float(), s.guidance_scale, n)
        all_logits.append(logits)
        if s.temperature == 0:
            values[:, j] = logits.argmax(-1)
        else:
            values[:, j] = categorical(torch.softmax(logits / s.temperature, -1), generators)
    width = network.config.num_bits // groups
    return values_to_bits(values, width), torch.stack(all_logits, 1)


def teacher_forced(network: Network, bits: torch.Tensor, text: TextFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """How the network scores `bits` [N, K, B] under `text` (conditional, no guidance), each token given the true
    tokens before it: per unit of the head (a bit, or a group of a grouped head, given the true groups before it)
    the log-probability of its true value and the probability of its most likely value, both [N, K, units].
    A token's log-likelihood is the sum over its units, with either head."""
    groups = bit_groups(network)
    bits = bits.float()
    with torch.inference_mode():
        if groups == 1:
            logits = network(bits[:, :-1], text.layers, text.mask).float()
            log_p = -F.binary_cross_entropy_with_logits(logits, bits, reduction="none")
            return log_p, torch.sigmoid(logits.abs())
        values = bits_to_values(bits, groups)
        logits = network(bits[:, :-1], text.layers, text.mask, group_values=values).float()
        log_probs = torch.log_softmax(logits, -1)
        return log_probs.gather(-1, values[..., None])[..., 0], log_probs.exp().amax(-1)


# --- the decoding steps: step(tokens [N, K, B], i) -> network output [N or 2N, B] for token i -------------------
# (with a grouped head the output is the hidden state [N or 2N, dim] that group_logits reads)
def _rows(bits: torch.Tensor, doubled: bool) -> torch.Tensor:
    return torch.cat((bits, bits)) if doubled else bits


class _Recompute:
    """The release's algorithm: the whole sequence [start ; tokens < i] at every step."""

    def __init__(self, network: Network, text: TextFeatures, doubled: bool):
        self.network, self.text, self.doubled = network, text, doubled

    def __call__(self, tokens: torch.Tensor, i: int) -> torch.Tensor:
        seen = _rows(tokens[:, :i], self.doubled) if i else None
        return self.network(seen, self.text.layers, self.text.mask)[:, -1]


class _Appending:
    """forward(new rows, ..., cache) on the growing KVCache: the prefix (or nothing) first, then one token a step."""

    def __init__(self, network: Network, text: TextFeatures, doubled: bool):
        self.network, self.text, self.doubled = network, text, doubled
        self.cache = network.new_cache()
        self.seen: int | None = None

    def __call__(self, tokens: torch.Tensor, i: int) -> torch.Tensor:
        start = 0 if self.seen is None else self.seen
        new = _rows(tokens[:, start:i], self.doubled) if i > start else None
        self.seen = i
        return self.network(new, self.text.layers, self.text.mask, self.cache)[:, -1]


class _Static:
    """The prefill (text, start token, any prefix) through forward into a StaticARCache, then one decode_step (or
    the compiled static_step) per token; the rows of the newest token live in one preallocated buffer."""

    def __init__(self, network: Network, text: TextFeatures, rows: int, compiled: bool):
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
        self.row[:n] = tokens[:, i - 1 : i]
        if self.rows != n:
            self.row[n:] = tokens[:, i - 1 : i]
        if self.compiled is None:
            return self.network.decode_step(self.row, self.cache)
        out = self.compiled(self.row, *self.cache.static_step_inputs())
        self.cache.advance()
        return out


def _compiled_step(network: Network):
    """torch.compile of network.static_step, made once per network (shapes are fixed: one trace per batch size)."""
    compiled = getattr(network, "_binlat_compiled_step", None)
    if compiled is None:
        compiled = torch.compile(network.static_step, dynamic=False)
        network._binlat_compiled_step = compiled
    return compiled
