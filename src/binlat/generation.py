"""What a generation call takes and gives, apart from the Pipeline that makes it: prompts checked as text, images
as PIL, outputs, the record of the settings a call used, a pipeline's generators by kind, loaded on first use, the
signature of entry points that share their options (`with_options`), and the one place that still accepts the
generator kind under its old keyword, `generator=`.
The CLI, the server, editing, training's sample grids and evaluation use these without needing a Pipeline.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import registry
from .modeling import Network


def generator_keyword(function: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an entry point whose generator-kind parameter is `kind`. Up to 0.1.0 it was `generator`, a word
    that also named the network and torch RNGs, and that diffusers' callers pass a torch.Generator as. For one
    release a caller's `generator="ar"` still works, with a DeprecationWarning naming `kind=`; a `generator` that
    is not a string (a torch.Generator) is a TypeError saying how binlat seeds, and so is the kind given both
    ways."""
    position = list(inspect.signature(function).parameters).index("kind")

    @functools.wraps(function)
    def accepting(*args: Any, **kwargs: Any) -> Any:
        if "generator" in kwargs:
            kwargs["kind"] = _old_kind(
                function.__qualname__, kwargs.pop("generator"), "kind" in kwargs or len(args) > position
            )
        return function(*args, **kwargs)

    return accepting


def with_options(source: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate an entry point that takes `**options` and hands them to `source`, which declares them once as
    keyword-only parameters (and its own **kwargs): the entry point's signature, as help() and inspect show it,
    lists those in place of `**options`, so two entry points that take the same options write them once and
    each still shows every parameter."""
    shared = [p for p in inspect.signature(source).parameters.values() if p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD)]

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        own = inspect.signature(function)
        kept = [p for p in own.parameters.values() if p.kind != p.VAR_KEYWORD]
        # inspect reads a function's __signature__ attribute; Callable does not declare it
        function.__signature__ = own.replace(parameters=kept + shared)  # type: ignore[attr-defined]
        return function

    return decorate


def _old_kind(name: str, value: Any, kind_given: bool) -> str:
    if not isinstance(value, str):
        raise TypeError(
            f"{name}() got a {type(value).__name__} as generator=: binlat seeds with seed= (image i uses seed + i), "
            f"and the generator kind goes in kind= (e.g. kind='ar')"
        )
    if kind_given:
        raise TypeError(f"{name}() got the generator kind twice, as kind and as generator={value!r}; pass kind= only")
    warnings.warn(
        f"{name}(generator={value!r}) is deprecated: the generator kind is now kind={value!r}",
        DeprecationWarning,
        stacklevel=3,
    )
    return value


def settings_record(kind: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings generator `kind`'s process reads (the fields of its Settings, binlat.registry), taken from a
    complete settings dict (Pipeline.sampling_settings) under their own names, as Python and HTTP take them: what a
    record (a metadata.jsonl line, an HTTP image's metadata) keeps. AR decoding reads no steps, rho or protocol, so
    its records leave them out instead of listing values it ignored."""
    fields = dataclasses.fields(registry.generator(kind).settings)
    return {f.name: settings[f.name] for f in fields}


@dataclass
class PipelineOutput:
    images: list[Image.Image]
    seeds: list[int]
    bits: torch.Tensor | None = None  # [N, K, B] uint8 when asked for
    prompts: list[str] = field(default_factory=list)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [-1, 1] -> PIL RGB images (values outside the range are clipped)."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def check_prompts(prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given: pass at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompt {i} is not text: {p!r}")
        if not p.strip():
            raise ValueError(f"prompt {i} is empty: describe the image to generate")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates, e.g. from undecodable command-line bytes
            raise ValueError(
                f"prompt {i} is not valid Unicode text (unpaired surrogate at character {e.start})"
            ) from None
    return prompts


class Generators(Mapping):
    """The pipeline's generators by kind. One given as a loader is read from disk on first use, so a pipeline
    holds in memory only the generators its calls have used (the release's two cost ~8 GB together)."""

    def __init__(
        self,
        models: dict[str, Network],
        loaders: dict[str, Callable[[], Network]],
        prepare: Callable[[str, Network], Network],
    ):
        self._models, self._loaders, self._prepare = dict(models), dict(loaders), prepare
        self._lock = threading.Lock()  # two server threads asking at once load it once

    def __getitem__(self, kind: str) -> Network:
        if kind not in self._models:
            with self._lock:
                if kind not in self._models:
                    if kind not in self._loaders:
                        raise KeyError(kind)
                    self._models[kind] = self._prepare(kind, self._loaders[kind]())
                    del self._loaders[kind]
        return self._models[kind]

    def __contains__(self, kind: object) -> bool:  # without loading (Mapping's default would load)
        return kind in self._models or kind in self._loaders

    def __iter__(self) -> Iterator[str]:
        return iter([k for k in registry.generator_kinds() if k in self])

    def __len__(self) -> int:
        return len(list(iter(self)))

    def loaded(self) -> dict[str, Network]:
        """The generators in memory now."""
        return dict(self._models)
