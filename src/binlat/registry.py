"""The generator kinds: for each, its network class (and so its config class) and its process.

This is the one place that knows which generators exist. The pipeline, the trainer, the converter, editing, the
server and the evaluations look a kind up here and then work through the common interfaces: a network built from
its config, and a process with `Settings`, `sample` and `loss` (binlat.processes.common). A new generator is its
own network and process files plus one `register` call; `tests/test_registry.py` registers toy ones. The fields of
its process's `Settings` are its sampling settings: binlat.sampling makes them keyword arguments, CLI options,
HTTP fields and the served page's controls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .generators import ARTransformer, DiffusionTransformer
from .processes import ARDecoding, BernoulliDiffusion
from .release_formats import AR_RELEASE, DIFFUSION_RELEASE, TOKENIZER_RELEASE, ReleaseFormat
from .tokenizer import BinaryTokenizer

TOKENIZER = "tokenizer"  # the one model kind that is not a generator


@dataclass(frozen=True)
class GeneratorKind:
    name: str
    network: type[Any]  # an nn.Module taking one config (`network.config_class`), with from_pretrained/save_pretrained
    process: type[Any]  # its `Settings` dataclass, sample(...), loss(...); optional operations such as `redraw`
    sampler: Callable[[Any], Any]  # the network's config -> the process that samples it
    # A run's generator options (train.config.GeneratorTraining) and the network's config -> its process
    trainer: Callable[[Any, Any], Any]
    release: ReleaseFormat | None = None  # how the Instella-T2I release stores it, if it has one

    @property
    def config(self) -> type[Any]:
        return self.network.config_class

    @property
    def settings(self) -> type[Any]:
        return self.process.Settings

    def uses(self, setting: str) -> bool:
        """Whether sampling reads this setting (e.g. "num_steps"); the others are accepted and ignored."""
        return setting in {f.name for f in dataclasses.fields(self.settings)}

    def sampling(self, settings: Mapping[str, Any]) -> Any:
        """The kind's settings object from a settings dict (Pipeline.sampling_settings): the entries it reads; a
        field the dict leaves out keeps its default."""
        return self.settings(
            **{f.name: settings[f.name] for f in dataclasses.fields(self.settings) if f.name in settings}
        )

    def can(self, operation: str) -> bool:
        """Whether the process offers `operation` (e.g. "redraw" for editing, "continue_from" for continuation)."""
        return callable(getattr(self.process, operation, None))


_KINDS: dict[str, GeneratorKind] = {}

# The names a generation call takes beside its sampling settings. A setting is a keyword argument, a CLI option
# and an HTTP field beside these, so a setting spelt like one would be shadowed by it (or break the CLI's parser):
# `register` refuses such a setting. tests/test_registry.py checks that this list covers the calls as they are.
RESERVED_SETTING_NAMES: frozenset[str] = frozenset(
    {
        # Python: Pipeline.__call__ and .batches; binlat.editing's edit and continue_ar ("kind" is the new name of
        # "generator", issue 28)
        *("self", "prompts", "generator", "kind", "seed", "height", "width", "batch_size", "return_bits"),
        *("progress", "pipe", "image", "prompt", "strength", "keep_tokens", "num_images"),
        # HTTP: the fields of /v1/generate and /v1/edit besides the settings
        *("size", "n", "image_base64"),
        # the CLI: the options of generate, edit, continue and eval shapes besides the settings (argparse dests)
        *("model", "out", "prompts_file", "grid", "text_encoder", "allow_nonfinite_weights", "max_memory"),
        *("no_progress", "threads", "dtype", "compile", "help", "device", "ground_truth", "json", "per_category"),
        *("no_held_out", "no_tokenizer"),
    }
)


def _reserved_spellings(settings: type) -> list[str]:
    """The Settings fields whose name, short name or CLI alias (binlat.processes.common.setting) is reserved,
    each as a message names it: 'seed', or 'count' (its short name 'n')."""
    clashes = []
    for f in dataclasses.fields(settings):
        spellings = [(f.name, ""), (f.metadata.get("short"), "short name")]
        spellings += [(alias, "CLI alias") for alias in f.metadata.get("cli_aliases", ())]
        clashes += [
            f"{f.name!r} (its {what} {name!r})" if what else repr(f.name)
            for name, what in spellings
            if name in RESERVED_SETTING_NAMES
        ]
    return clashes


def register(kind: GeneratorKind) -> GeneratorKind:
    if kind.name in _KINDS or kind.name == TOKENIZER:
        raise ValueError(f"generator kind {kind.name!r} is already taken")
    # A default is the setting's built-in value (binlat.sampling): a call may leave any setting out.
    missing = dataclasses.MISSING
    bare = [f.name for f in dataclasses.fields(kind.settings) if f.default is missing and f.default_factory is missing]
    if bare:
        raise ValueError(f"generator kind {kind.name!r}: its Settings fields {bare} need a default")
    clashes = _reserved_spellings(kind.settings)
    if clashes:
        which = f"field {clashes[0]} is" if len(clashes) == 1 else f"fields {', '.join(clashes)} are"
        raise ValueError(
            f"generator kind {kind.name!r}: its Settings {which} spelt like a parameter that the generation calls "
            f"take themselves (Pipeline.__call__, binlat.editing, the CLI or HTTP; registry.RESERVED_SETTING_NAMES), "
            f"which would shadow the setting; rename it"
        )
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


def release_kinds() -> tuple[str, ...]:
    """The model kinds the release has (binlat.official converts them)."""
    return tuple(k for k in model_kinds() if k == TOKENIZER or _KINDS[k].release is not None)


def release_format(kind: str) -> ReleaseFormat:
    if kind not in release_kinds():
        raise ValueError(f"unknown kind {kind!r}; choose one of {release_kinds()}")
    if kind == TOKENIZER:
        return TOKENIZER_RELEASE
    release = _KINDS[kind].release
    assert release is not None  # release_kinds() holds only the kinds that have one
    return release


def model_class(kind: str) -> type[Any]:
    return BinaryTokenizer if kind == TOKENIZER else generator(kind).network


class _ModelClasses(Mapping):
    """kind -> model class, for the tokenizer and every registered generator."""

    def __getitem__(self, kind: str) -> type[Any]:
        if kind not in model_kinds():
            raise KeyError(kind)
        return model_class(kind)

    def __iter__(self) -> Iterator[str]:
        return iter(model_kinds())

    def __len__(self) -> int:
        return len(model_kinds())


MODEL_CLASSES: Mapping[str, type[Any]] = _ModelClasses()


# --- the generators ---------------------------------------------------------------------------------------------
register(
    GeneratorKind(
        "diffusion",
        DiffusionTransformer,
        BernoulliDiffusion,
        sampler=lambda config: BernoulliDiffusion(prediction=config.prediction, self_condition=config.self_condition),
        trainer=lambda options, config: BernoulliDiffusion(
            prediction=config.prediction,
            time_sampling=options.time_sampling,
            logit_mean=options.time_logit_mean,
            self_condition=config.self_condition,
            align_weight=options.repa_weight,
            contrast_weight=options.role_contrast,
        ),
        release=DIFFUSION_RELEASE,
    )
)
register(
    GeneratorKind(
        "ar",
        ARTransformer,
        ARDecoding,
        sampler=lambda config: ARDecoding(),
        trainer=lambda options, config: ARDecoding(
            context_flip=options.context_flip, contrast_weight=options.role_contrast
        ),
        release=AR_RELEASE,
    )
)
