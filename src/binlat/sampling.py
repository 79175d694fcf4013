"""Sampling settings, read off the registered generator kinds.

Each kind's process has a `Settings` dataclass (binlat.processes.common), and its fields are the one list of
settings: their names are the keywords Python takes, the HTTP fields and the keys of records and of a bundle's
`sampling`; their defaults are the built-in values; their annotations their types; their metadata
(processes.common.setting) their help, other spellings and the bounds or choices a form offers; and each value is
checked by the dataclass that declares it, as it is made. The pipeline, the CLI, the server (its API and its page)
and the records all go through here, so a kind with a setting of its own needs its `register` call and nothing else.

Every generator takes every registered setting and reads those of its own Settings, so one settings dict serves
whichever generator a call picks (AR decoding ignores num_steps). A setting's built-in value is that of the first
registered kind that reads it; a generator's own defaults stand for it where they differ.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from . import registry


@dataclass(frozen=True)
class Setting:
    """One setting, gathered from every registered Settings field of its name."""

    name: str  # the Python keyword, HTTP field and record key (num_steps)
    value_type: Any  # the field's annotation (int, float, ...): what the CLI reads text as, what HTTP expects
    defaults: dict[str, Any] = dataclasses.field(compare=False)  # kind -> its default, for the kinds that read it
    help: str = ""
    short: str | None = None  # a shorter name: the CLI option's, and an HTTP alias (steps)
    cli_aliases: tuple[str, ...] = ()  # more option spellings (cfg)
    minimum: Any = None  # the least value allowed, where the Settings declare it (inclusive)
    maximum: Any = None  # the greatest
    choices: tuple[Any, ...] = ()  # the values allowed, where the Settings list them

    @property
    def default(self) -> Any:
        """The built-in value: the first registered kind's that reads it."""
        return next(iter(self.defaults.values()))

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.defaults)

    @property
    def label(self) -> str:
        """How messages name it: "steps", "guidance scale"."""
        return (self.short or self.name).replace("_", " ")

    @property
    def dest(self) -> str:
        """The attribute the CLI parses it into (args.steps)."""
        return self.short or self.name

    @property
    def options(self) -> tuple[str, ...]:
        """Its CLI spellings, --help's first: --steps and --num-steps; --guidance-scale and --cfg."""
        return tuple(dict.fromkeys(f"--{n.replace('_', '-')}" for n in (self.dest, *self.cli_aliases, self.name)))

    def default_text(self) -> str:
        """The built-in value as help texts give it: "20", or per kind where kinds differ ("diffusion 20, toy 4")."""
        if len({repr(v) for v in self.defaults.values()}) == 1:
            return str(self.default)
        return ", ".join(f"{kind} {value}" for kind, value in self.defaults.items())


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is dataclasses.MISSING:  # was a TypeError from calling MISSING; now it says which
        raise TypeError(f"sampling setting {field.name!r} has no default")
    return field.default_factory()


def _annotations(cls: type) -> dict[str, Any]:
    """A Settings class's field types; none where a string annotation names what its module cannot reach (the
    default's type stands in)."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError, AttributeError):
        return {}


def settings() -> dict[str, Setting]:
    """Every registered setting by name, in the order the kinds (in registration order) declare them."""
    declared: dict[str, list[tuple[str, dataclasses.Field, Any]]] = {}
    for kind in registry.generator_kinds():
        cls = registry.generator(kind).settings
        hints = _annotations(cls)
        for f in dataclasses.fields(cls):
            declared.setdefault(f.name, []).append((kind, f, hints.get(f.name)))
    return {name: _gathered(name, fields) for name, fields in declared.items()}


def _gathered(name: str, declared: list[tuple[str, dataclasses.Field, Any]]) -> Setting:
    def first(key: str) -> Any:
        return next((f.metadata[key] for _, f, _ in declared if f.metadata.get(key) not in (None, "", ())), None)

    defaults = {kind: _default(f) for kind, f, _ in declared}
    return Setting(
        name=name,
        value_type=declared[0][2] or type(next(iter(defaults.values()))),
        defaults=defaults,
        help=first("help") or name.replace("_", " "),
        short=first("short"),
        cli_aliases=tuple(dict.fromkeys(a for _, f, _ in declared for a in f.metadata.get("cli_aliases", ()))),
        minimum=first("minimum"),
        maximum=first("maximum"),
        choices=first("choices") or (),
    )


def builtin(kind: str | None = None) -> dict[str, Any]:
    """Every setting's built-in value; with a generator `kind`, its own Settings' defaults for the settings it reads."""
    values = {name: s.default for name, s in settings().items()}
    if kind is not None:
        values |= {f.name: _default(f) for f in dataclasses.fields(registry.generator(kind).settings)}
    return values


def names() -> list[str]:
    """Every registered setting's name, sorted (as messages list them)."""
    return sorted(settings())


def unknown(given: Iterable[str]) -> list[str]:
    """The names among `given` that no registered kind's Settings has, sorted."""
    return sorted(set(given) - set(settings()))


def unknown_message(given: Iterable[str]) -> str:
    return f"unknown sampling setting(s) {sorted(given)}; valid: {names()}"


def check(values: Mapping[str, Any], kind: str | None = None) -> None:
    """Check each value by making one kind's Settings with it, so the dataclass's own checks judge it (a
    ValueError naming the setting, the value and what is allowed): generator `kind`'s Settings for the settings it
    reads, the first registered kind's that reads it for the rest. An unknown name is a TypeError."""
    left = dict(values)
    if unknown(left):
        raise TypeError(unknown_message(unknown(left)))
    order = [] if kind is None else [kind]
    for other in order + [k for k in registry.generator_kinds() if k != kind]:
        cls = registry.generator(other).settings
        mine = {f.name: left.pop(f.name) for f in dataclasses.fields(cls) if f.name in left}
        if mine:
            cls(**mine)


def resolve(kind: str, tuned: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """The complete, checked settings a call on generator `kind` uses: each one `given` (None counts as left out),
    else `tuned` (the bundle's for this kind), else the built-in value. An unknown name is a TypeError."""
    if unknown(given):
        raise TypeError(unknown_message(unknown(given)))
    values = builtin(kind) | dict(tuned) | {k: v for k, v in given.items() if v is not None}
    check(values, kind)
    return values


class _Builtin(Mapping):
    """builtin() as a read-only mapping that follows the registry: a kind registered later adds its settings."""

    def __getitem__(self, name: str) -> Any:
        return builtin()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(builtin())

    def __len__(self) -> int:
        return len(builtin())

    def __or__(self, other: Any) -> Any:  # `BUILTIN_SAMPLING | {...}` makes a dict, as it does for a dict
        return dict(self) | dict(other) if isinstance(other, Mapping) else NotImplemented

    def __ror__(self, other: Any) -> Any:
        return dict(other) | dict(self) if isinstance(other, Mapping) else NotImplemented

    def __repr__(self) -> str:
        return repr(dict(self))


BUILTIN_SAMPLING: Mapping[str, Any] = _Builtin()
