"""Bernoulli diffusion over bits.

Forward process: every bit drifts toward a fair coin, x_t ~ Bernoulli(x_0 (1 - t) + t / 2), t in [0, 1].
The network reads x_t and returns one logit per bit: with the "flip" parametrisation (the paper's epsilon) the
logit says whether that bit of x_t was flipped relative to x_0; with "x0" it is the logit of x_0 itself.
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
    MAX_STEPS,
    Negatives,
    Process,
    bernoulli,
    check_sampling_args,
    contrast_term,
    guidance_scale_setting,
    guide,
    setting,
    temperature_setting,
    uniform,
)


def q_probs(x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """P(x_t = 1) = x_0 (1 - t) + t / 2: each bit moves toward a fair coin; t has one value per sample."""
    return x0 * (1 - t.view(-1, 1, 1)) + t.view(-1, 1, 1) / 2


def q_sample(x0: torch.Tensor, t: torch.Tensor, generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """x_t ~ Bernoulli(q_probs(x_0, t))."""
    if generators is None:
        return torch.bernoulli(q_probs(x0, t))
    return bernoulli(q_probs(x0, t), generators)


def x0_logits_from_flip(flip_logits: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """logit p(x_0 = 1): where x_t = 1 a flip means x_0 = 0 (logit -out), where x_t = 0 it means x_0 = 1."""
    return (1 - 2 * x_t) * flip_logits


def x0_prob_from_flip(flip_prob: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """p(x_0 = 1) = x_t (1 - f) + (1 - x_t) f."""
    return x_t * (1 - flip_prob) + (1 - x_t) * flip_prob


def timesteps(num_steps: int, rho: float = 1.0) -> torch.Tensor:
    """t_i = (1 - i / N)^rho for i = 0..N: from pure noise (t = 1) to clean (t = 0)."""
    return (1 - torch.arange(num_steps + 1, dtype=torch.float64) / num_steps) ** rho


def step_protocol1(p: torch.Tensor, t_next: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """x_{t'} ~ Bernoulli(p (1 - t') + t' / 2): re-noise the x_0 estimate to the next level."""
    return bernoulli(p * (1 - t_next) + t_next / 2, generators)


def protocol2_prob(p: torch.Tensor, x_t: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """P(x_{t'} = 1) proportional to [p (1 - t') + t'/2] [x_t (1 - s) + s/2], s = t - t', against the same
    product for 0; this keeps bits of x_t that agree with the estimate more often than protocol 1."""
    s = t - t_next
    one = (p * (1 - t_next) + t_next / 2) * (x_t * (1 - s) + s / 2)
    zero = ((1 - p) * (1 - t_next) + t_next / 2) * ((1 - x_t) * (1 - s) + s / 2)
    return one / (one + zero)


@dataclass(frozen=True)
class DiffusionSampling:
    num_steps: int = setting(20, "sampling steps", short="steps", minimum=1, maximum=MAX_STEPS)
    guidance_scale: float = guidance_scale_setting()
    temperature: float = temperature_setting()
    rho: float = setting(1.0, "time-step spacing exponent")  # > 0: no inclusive bound to declare
    protocol: int = setting(
        1, "step protocol, 1 or 2: 1 re-noises the x_0 estimate, 2 also weighs in the current x_t", choices=(1, 2)
    )

    def __post_init__(self) -> None:
        check_sampling_args(self.num_steps, self.guidance_scale, self.temperature, self.rho, self.protocol)


@dataclass
class BernoulliDiffusion(Process):
    Settings = DiffusionSampling
    draw_options = ("x_start", "t_start")

    prediction: str = "flip"  # "flip" (epsilon) or "x0"
    time_sampling: str = "logit_normal"  # "logit_normal" (paper) or "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # The network reads its previous x_0 estimate (DiffusionConfig.self_condition): sampling hands each step the
    # last step's estimate; training gives half the samples the network's own estimate of the same x_t.
    self_condition: bool = False
    # REPA (Yu et al., 2024): the loss also pulls the network's alignment head towards the given features of the
    # clean image, by this weight times (1 - cosine similarity) per token. 0: off.
    align_weight: float = 0.0
    # Weight of the hard-negative term (common.contrast_term) on the rows a batch gives negatives for. 0: off.
    contrast_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.prediction not in ("flip", "x0"):
            raise ValueError(f"prediction must be 'flip' or 'x0', got {self.prediction!r}")
        if self.time_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"time_sampling must be 'logit_normal' or 'uniform', got {self.time_sampling!r}")

    # --- training -----------------------------------------------------------------------------------------
    def sample_t(
        self, batch: int, device: torch.device | str = "cpu", generators: Sequence[torch.Generator] | None = None
    ) -> torch.Tensor:
        """Training times: uniform, or sigmoid(N(mean, std)) (logistic-normal, the paper's choice)."""
        if generators is None:
            u = torch.rand(batch, device=device)
            z = torch.randn(batch, device=device)
        else:
            u = torch.stack([torch.rand((), generator=g) for g in generators]).to(device)
            z = torch.stack([torch.randn((), generator=g) for g in generators]).to(device)
        if self.time_sampling == "uniform":
            return u
        return torch.sigmoid(self.logit_mean + self.logit_std * z)

    def x0_logits(self, out: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        return x0_logits_from_flip(out, x_t) if self.prediction == "flip" else out

    def loss(
        self,
        network: Network,
        x0: torch.Tensor,
        text: TextFeatures,
        generators: Sequence[torch.Generator] | None = None,
        *,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        align_to: torch.Tensor | None = None,
        negatives: Negatives | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Binary cross-entropy of the predicted x_0 against the clean bits, and the bit accuracy; with
        `align_to` [N, K, D] (features of the clean images) and align_weight, plus REPA's alignment term; with
        `negatives` and contrast_weight, plus the hard-negative term: the rows' NLLs under their negative captions,
        from the same x_t and t, against those under their own.

        With `generators` (one per sample) sample i's time and noise come from generators[i] alone (identical
        losses on 1 or many processes, exact resume); `t` [N] and `noise` [N, K, B] (uniforms deciding x_t) may
        also be given directly."""
        x0 = x0.float()
        if t is None:
            t = self.sample_t(x0.shape[0], x0.device, generators=generators)
        if noise is None:
            noise = torch.rand_like(x0) if generators is None else uniform(tuple(x0.shape[1:]), generators, x0.device)
        x_t = (noise < q_probs(x0, t)).float()
        estimate = self._training_estimate(network, x_t, t, text, generators) if self.self_condition else None
        align = align_to is not None and self.align_weight > 0
        given = () if estimate is None else (estimate,)  # a network without self-conditioning takes four inputs
        out = (
            network(x_t, t, text.layers, text.mask, *given, aligned=True)
            if align
            else network(x_t, t, text.layers, text.mask, *given)
        )
        logits = self.x0_logits((out[0] if align else out).float(), x_t)
        loss = F.binary_cross_entropy_with_logits(logits, x0)
        metrics = {}
        if negatives is not None and self.contrast_weight > 0:
            rows, neg = negatives.rows, negatives.text
            own = F.binary_cross_entropy_with_logits(logits[rows], x0[rows], reduction="none").sum((1, 2))
            other = own  # no rows: an empty term (the metrics keep their names on every process and step)
            if len(rows):
                given_rows = () if estimate is None else (estimate[rows],)
                neg_out = network(x_t[rows], t[rows], neg.layers, neg.mask, *given_rows)
                neg_logits = self.x0_logits(neg_out.float(), x_t[rows])
                other = F.binary_cross_entropy_with_logits(neg_logits, x0[rows], reduction="none").sum((1, 2))
            metrics.update(contrast_term(own, other, x0.shape[0]))
            loss = loss + self.contrast_weight * metrics["contrast"]
        if align and align_to is not None:  # align says both
            similarity = F.cosine_similarity(out[1].float(), align_to.float(), dim=-1).mean()
            loss = loss + self.align_weight * (1 - similarity)
            metrics["align_similarity"] = similarity.detach()
        with torch.no_grad():
            accuracy = ((logits > 0).float() == x0).float().mean()
        return loss, {"bit_accuracy": accuracy, **metrics}

    def _training_estimate(
        self,
        network: Network,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text: TextFeatures,
        generators: Sequence[torch.Generator] | None,
    ) -> torch.Tensor:
        """Self-conditioning's input in training: for a random half of the samples (a coin from each sample's
        generator) the network's own estimate of P(x_0 = 1) from x_t with no estimate, without gradient; 1/2
        (no estimate) for the rest, so the network learns both the first sampling step and the later ones."""
        n = x_t.shape[0]
        coins = torch.rand(n) if generators is None else torch.stack([torch.rand((), generator=g) for g in generators])
        rows = (coins < 0.5).nonzero().flatten().to(x_t.device)
        estimate = torch.full_like(x_t, 0.5)
        if len(rows):
            with torch.no_grad():
                first = network(x_t[rows], t[rows], [layer[rows] for layer in text.layers], text.mask[rows]).float()
                estimate[rows] = torch.sigmoid(self.x0_logits(first, x_t[rows]))
        return estimate

    # --- sampling -----------------------------------------------------------------------------------------
    def _draw(
        self,
        network: Network,
        text: TextFeatures,
        n: int,
        s: DiffusionSampling,
        generators: Sequence[torch.Generator],
        *,
        progress: bool,
        x_start: torch.Tensor | None = None,
        t_start: float = 1.0,
    ) -> torch.Tensor:
        """`sample` (Process.sample): `num_steps` steps from t = 1 to 0. x_start/t_start start from a partly
        noised input instead of pure noise (see `redraw`); by default sampling starts from Bernoulli(1/2) at t = 1."""
        num_steps, guidance_scale, temperature = s.num_steps, s.guidance_scale, s.temperature
        cfg = network.config
        device = next(network.parameters()).device
        ts = timesteps(num_steps, s.rho) * t_start
        if x_start is None:
            x = (uniform((cfg.num_tokens, cfg.num_bits), generators, device) < 0.5).float()
        else:
            x = x_start.float().to(device)
        estimate = None  # self-conditioning: the last step's estimate of P(x_0 = 1)
        for i in tqdm(range(num_steps), disable=not progress, desc="diffusion", leave=False):
            t, t_next = float(ts[i]), float(ts[i + 1])
            doubled = text.mask.shape[0] != n
            batch_x = torch.cat((x, x)) if doubled else x
            t_vec = torch.full((batch_x.shape[0],), t, device=device)
            if self.self_condition:
                given = None if estimate is None else torch.cat((estimate, estimate)) if doubled else estimate
                out = network(batch_x, t_vec, text.layers, text.mask, given).float()
            else:
                out = network(batch_x, t_vec, text.layers, text.mask).float()
            logits = guide(out, guidance_scale, n)
            if temperature == 0:
                q = (logits > 0).float()
            else:
                q = torch.sigmoid(logits / temperature)
            p = x0_prob_from_flip(q, x) if self.prediction == "flip" else q
            estimate = p
            if i == num_steps - 1:
                x = (p > 0.5).float()
            elif s.protocol == 1:
                x = step_protocol1(p, t_next, generators)
            else:
                x = bernoulli(protocol2_prob(p, x, t, t_next), generators)
        return x

    def redraw(
        self,
        network: Network,
        x0: torch.Tensor,
        strength: float,
        cond: TextFeatures,
        uncond: TextFeatures | None,
        generators: Sequence[torch.Generator],
        settings: DiffusionSampling | None = None,
        *,
        progress: bool = False,
    ) -> torch.Tensor:
        """Re-draw clean bits x0 [N, K, B]: noise them to t = strength with the forward process, then sample from
        there down to 0 (SDEdit in bit space). Sample i's noise and steps both come from generators[i]."""
        device = next(network.parameters()).device
        x_t = q_sample(x0.to(device), torch.full((x0.shape[0],), strength, device=device), generators)
        return self.sample(
            network, cond, uncond, generators, settings, progress=progress, x_start=x_t, t_start=strength
        )
