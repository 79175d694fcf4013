"""Pieces shared by the processes: per-sample random streams, guidance, text batching, settings.

Every process keeps one calling convention, so the pipeline, the trainer and editing never ask which one it is
(`Process` writes its `sample` once for the processes here):
  `Settings`                                         a frozen dataclass of its sampling settings (checked when made;
                                                     every field has a default, and binlat.sampling derives the
                                                     Python, CLI and HTTP settings from these fields)
  `sample(network, cond, uncond, generators, settings=None, *, progress=False, **settings_fields) -> bits [N, K, B]`
  `loss(network, bits, text, generators=None, *, negatives=None) -> (loss, metrics)`, every random draw of sample i
                                                     from generators[i]; `negatives` (hard-negative captions for some
                                                     rows) adds the process's `contrast_weight` times `contrast_term`
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F

from ..modeling import Network
from ..text import TextFeatures
from ..validators import check_int, is_number

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

S = TypeVar("S", bound="DataclassInstance")


def setting(
    default: Any,
    help: str,
    *,
    short: str | None = None,
    cli_aliases: tuple[str, ...] = (),
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[Any, ...] = (),
) -> Any:
    """A `Settings` field with the words the entry points show for it (binlat.sampling reads them): `help` for
    --help and the HTTP schema; `short`, a shorter name that is the CLI option's and an HTTP alias (steps for
    num_steps); `cli_aliases`, more option spellings (cfg); `minimum`/`maximum` (inclusive) or `choices`, the
    values the Settings' own check allows, which a form offers (the served page). The check stays the Settings'
    own; these declare what it allows. A plain `name: type = default` field works as well."""
    words = {"help": help, "short": short, "cli_aliases": cli_aliases}
    values = {"minimum": minimum, "maximum": maximum, "choices": tuple(choices)}
    return dataclasses.field(default=default, metadata=words | values)


def guidance_scale_setting(default: float = 7.5) -> Any:
    """The guidance scale field that diffusion and AR decoding share, so both show it alike."""
    return setting(default, "classifier-free guidance scale w", cli_aliases=("cfg",), minimum=0.0)


def temperature_setting(default: float = 1.0) -> Any:
    return setting(default, "sampling temperature; 0 thresholds the guided logits", minimum=0.0)


def settings_of(cls: type[S], settings: S | None, given: dict[str, Any]) -> S:
    """`settings` (default: `cls()`) with the keyword arguments `given` laid over it, checked as `cls` checks."""
    if settings is None:
        return cls(**given)
    return dataclasses.replace(settings, **given) if given else settings


MAX_STEPS = 10_000  # sampling steps: far past any useful count, well before sizes overflow


def make_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample, so an image depends only on its own seed, not on batch size or position."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def uniform(
    shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """[N, *shape] uniforms in [0, 1), row i drawn from generators[i]."""
    # Drawn where each generator lives, then moved: a CPU generator serves any device with the same numbers.
    return torch.stack([torch.rand(tuple(shape), generator=g, device=g.device) for g in generators]).to(device)


def bernoulli(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Float 0/1 samples of Bernoulli(probs), row i drawn from generators[i]."""
    if len(generators) != probs.shape[0]:
        raise ValueError(f"need one generator per sample: {len(generators)} for {probs.shape[0]} samples")
    return (uniform(probs.shape[1:], generators, probs.device) < probs).to(probs.dtype)


def categorical(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Long [N] draws of Categorical(probs[i]) (probs [N, V], rows summing to about 1), row i from generators[i]:
    one uniform u per sample, and the first value whose cumulative probability passes u times the row's total
    (the inverse CDF; a value of probability 0 is never drawn)."""
    if len(generators) != probs.shape[0]:
        raise ValueError(f"need one generator per sample: {len(generators)} for {probs.shape[0]} samples")
    cdf = probs.double().cumsum(-1)  # float64: rounding of a long sum never skips or repeats a value
    u = uniform((1,), generators, probs.device).double() * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)


@dataclasses.dataclass
class Negatives:
    """Hard-negative captions for some rows of a training batch: row `rows[j]`'s caption with its roles swapped
    ("a square above a circle" for a render of "a circle above a square") has the features `text.index([j])`."""

    rows: torch.Tensor  # [M] long, indices into the batch
    text: TextFeatures  # M rows


def contrast_term(own_nll: torch.Tensor, negative_nll: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """The hard-negative term: -log sigmoid(NLL under the negative caption - NLL under its own), per image in nats,
    summed over the rows that have a negative and divided by the whole batch (so its weight does not depend on how
    many rows have one). It is log 2 where the network cannot tell the two captions apart and falls toward 0 as the
    image becomes likelier under its own caption; unlike an unbounded unlikelihood term it stops pushing once the
    gap is a few nats. Also the mean gap over those rows (role_gap, 0 without rows), a metric."""
    gap = negative_nll - own_nll
    term = F.softplus(-gap).sum() / batch
    mean_gap = gap.detach().mean() if len(gap) else gap.new_zeros(())
    return {"contrast": term, "role_gap": mean_gap}


def with_guidance(cond: TextFeatures, uncond: TextFeatures | None, guidance_scale: float) -> TextFeatures:
    """Conditional rows first, then unconditional rows, so both run in one forward pass."""
    if guidance_scale == 0 or uncond is None:
        return cond
    if uncond.mask.shape[0] == 1 and cond.mask.shape[0] > 1:
        uncond = uncond.index([0] * cond.mask.shape[0])
    return TextFeatures.cat([cond, uncond])


def guide(logits: torch.Tensor, guidance_scale: float, batch: int) -> torch.Tensor:
    """(1 + w) * cond - w * uncond on a [cond ; uncond] batch; the plain logits when w == 0."""
    if logits.shape[0] == batch:
        return logits
    cond, uncond = logits[:batch], logits[batch:]
    return (1 + guidance_scale) * cond - guidance_scale * uncond


def check_sampling_args(
    num_steps: int | None = None,
    guidance_scale: float = 0.0,
    temperature: float = 1.0,
    rho: float | None = None,
    protocol: int | None = None,
) -> None:
    import math

    if num_steps is not None:
        check_int("steps", num_steps, 1)
        if num_steps > MAX_STEPS:  # said apart from the type: a count past the limit is a different mistake
            raise ValueError(f"steps must be at most {MAX_STEPS}, got {num_steps}")
    for name, value, low in (("guidance scale", guidance_scale, 0.0), ("temperature", temperature, 0.0)):
        if not is_number(value) or not math.isfinite(value) or value < low:  # True is not a scale of 1
            raise ValueError(f"{name} must be a finite number >= {low}, got {value!r}")
    if rho is not None and (not is_number(rho) or not math.isfinite(rho) or rho <= 0):
        raise ValueError(f"rho must be a finite number > 0, got {rho!r}")
    if protocol is not None and protocol not in (1, 2):
        raise ValueError(f"protocol must be 1 or 2, got {protocol!r}")


class Process:
    """`sample` as the convention above has it, for a process that draws with classifier-free guidance: it lays
    `given` over `settings` and checks them (`Settings`), puts the text rows of one forward pass on the network's
    device ([cond ; uncond] when guided, `with_guidance`), and leaves the drawing to the process's `_draw`."""

    Settings: ClassVar[type]
    # sample's keywords that are the process's own (passed to _draw), not settings; any other name is a setting
    draw_options: ClassVar[tuple[str, ...]] = ()

    @torch.inference_mode()
    def sample(
        self,
        network: Network,
        cond: TextFeatures,
        uncond: TextFeatures | None,
        generators: Sequence[torch.Generator],
        settings: Any = None,
        *,
        progress: bool = False,
        **given: Any,
    ) -> Any:
        """Bits [N, K, B] (float 0/1) for the N rows of `cond`, sample i drawn from generators[i]; `given` overrides
        fields of `settings`. The process's `draw_options` (see its `_draw`) may be given too."""
        options = {name: given.pop(name) for name in self.draw_options if name in given}
        s = settings_of(self.Settings, settings, given)
        device = next(network.parameters()).device
        text = with_guidance(cond, uncond, s.guidance_scale).to(device)
        return self._draw(network, text, cond.mask.shape[0], s, generators, progress=progress, **options)

    def _draw(
        self,
        network: Network,
        text: TextFeatures,
        n: int,
        s: Any,
        generators: Sequence[torch.Generator],
        *,
        progress: bool,
    ) -> Any:
        """`sample`'s bits for n samples under the checked settings `s`, from `text` (n rows, or 2n when guided, on
        the network's device); a process's `draw_options` that the call gave come as keyword arguments of its own
        `_draw`."""
        raise NotImplementedError
