"""The generator kinds: for each, its network class (and so its config class) and its process.

This is the one place that knows which generators exist. The pipeline, the trainer, the converter, editing, the
server and the evaluations look a kind up here and then work through the common interfaces: a network built from
its config, and a process with `Settings`, `sample` and `loss` (binlat.processes.common). A new generator is its
own network and process files plus one `register` call; `tests/test_registry.py` registers a toy one.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .generators import ARTransformer, DiffusionTransformer
from .processes import ARDecoding, BernoulliDiffusion
from .tokenizer import BinaryTokenizer

TOKENIZER = "tokenizer"  # the one model kind that is not a generator


@dataclass(frozen=True)
class GeneratorKind:
    name: str
    network: type  # an nn.Module taking one config (`network.config_class`), with from_pretrained/save_pretrained
    process: type  # its `Settings` dataclass, sample(...), loss(...); optional operations such as `redraw`
    sampler: Callable[[Any], Any]  # the network's config -> the process that samples it
    trainer: Callable[[Any], Any]  # a run's generator options (train.config.GeneratorTraining) -> its process
    release: Any = None            # how the Instella-T2I release stores it (release_formats.ReleaseFormat), if it does

    @property
    def config(self) -> type:
        return self.network.config_class

    @property
    def settings(self) -> type:
        return self.process.Settings

    def uses(self, setting: str) -> bool:
        """Whether sampling reads this setting (e.g. "num_steps"); the others are accepted and ignored."""
        return setting in {f.name for f in dataclasses.fields(self.settings)}

    def sampling(self, settings: Mapping[str, Any]) -> Any:
        """The kind's settings object from a complete settings dict (Pipeline.sampling_settings)."""
        return self.settings(**{f.name: settings[f.name] for f in dataclasses.fields(self.settings)})

    def can(self, operation: str) -> bool:
        """Whether the process offers `operation` (e.g. "redraw" for editing, "continue_from" for continuation)."""
        return callable(getattr(self.process, operation, None))


_KINDS: dict[str, GeneratorKind] = {}


def register(kind: GeneratorKind) -> GeneratorKind:
    if kind.name in _KINDS or kind.name == TOKENIZER:
        raise ValueError(f"generator kind {kind.name!r} is already taken")
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    del _KINDS[name]


def generator_kinds() -> tuple[str, ...]:
    """Registered generators, in registration order (the order bundles, listings and menus use)."""
    return tuple(_KINDS)


def model_kinds() -> tuple[str, ...]:
    """Everything `binlat train`, `convert-official` and the conformance cases can name: the tokenizer first."""
    return (TOKENIZER, *_KINDS)


def generator(name: str) -> GeneratorKind:
    try:
        return _KINDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown generator kind {name!r}; choose one of {generator_kinds()}") from None


def kinds_that_can(operation: str) -> list[str]:
    return [k for k, spec in _KINDS.items() if spec.can(operation)]


def model_class(kind: str) -> type:
    return BinaryTokenizer if kind == TOKENIZER else generator(kind).network


class _ModelClasses(Mapping):
    """kind -> model class, for the tokenizer and every registered generator."""

    def __getitem__(self, kind: str) -> type:
        if kind not in model_kinds():
            raise KeyError(kind)
        return model_class(kind)

    def __iter__(self) -> Iterator[str]:
        return iter(model_kinds())

    def __len__(self) -> int:
        return len(model_kinds())


MODEL_CLASSES: Mapping[str, type] = _ModelClasses()


register(GeneratorKind(
    "diffusion", DiffusionTransformer, BernoulliDiffusion,
    sampler=lambda config: BernoulliDiffusion(prediction=config.prediction),
    trainer=lambda options: BernoulliDiffusion(prediction=options.prediction, time_sampling=options.time_sampling)))
register(GeneratorKind("ar", ARTransformer, ARDecoding, sampler=lambda config: ARDecoding(),
                       trainer=lambda options: ARDecoding()))
