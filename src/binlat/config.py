"""Plain dataclass configs, serialised to JSON, read back strictly (unknown or mistyped keys are errors)."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from . import jsondepth
from .validators import check_bool, check_int, is_int, is_number

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")  # a config dataclass


class ConfigError(ValueError):
    """A config file or dict that does not describe a valid config."""


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """Raise ValueError naming `name` unless `value` is a finite number (an integer with `integer`) in the range:
    `low`/`high` inclusive unless `low_open`/`high_open`; None leaves that side open."""
    kind = "an integer" if integer else "a finite number"

    def show(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"

    bounds = [
        f"{'>' if low_open else '>='} {show(low)}" if low is not None else "",
        f"{'<' if high_open else '<='} {show(high)}" if high is not None else "",
    ]
    want = f"{name} must be {kind}" + (f" {' and '.join(b for b in bounds if b)}" if any(bounds) else "")
    if not (is_int(value) if integer else is_number(value)):
        raise ValueError(f"{want}, got {value!r}")
    if not integer and not math.isfinite(value):
        raise ValueError(f"{want}, got {value}")
    if (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and (value >= high if high_open else value > high)
    ):
        raise ValueError(f"{want}, got {value}")


def config_to_dict(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _check(value: Any, hint: Any, name: str) -> Any:
    """Return value coerced to the annotated type (lists become tuples), or raise ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        errors = []
        for option in typing.get_args(hint):
            if option is type(None):
                continue
            try:
                return _check(value, option, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: invalid value {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{name}' must be a list, got {value!r}")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        items = [_check(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is Any:
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return config_from_dict(hint, value, source=name)
    if hint is bool:
        return check_bool(f"'{name}'", value, error=ConfigError)
    if hint is int:
        return check_int(f"'{name}'", value, error=ConfigError)
    if hint is float:
        if not is_number(value):
            raise ConfigError(f"'{name}' must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an integer past the float range
            raise ConfigError(f"'{name}' must be a finite number, got {value!r:.40}") from None
        if not math.isfinite(value):  # JSON's NaN / Infinity, which Python's json reads
            raise ConfigError(f"'{name}' must be a finite number, got {value}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{name}' must be a string, got {value!r}")
        return value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{name}' must be an object, got {value!r}")
        return value
    return value


def config_from_dict(cls: type[C], data: Any, source: str = "config") -> C:
    """Build dataclass `cls` from `data`, naming every unknown key and every mistyped value.

    A class may take keys that are not its fields, such as the other kind's options that a generator kind's older
    files hold (binlat.generators.GeneratorConfig): its classmethod `drop_foreign_keys(data)` removes them first,
    or raises ValueError saying why one is refused."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    drop_foreign_keys = getattr(cls, "drop_foreign_keys", None)
    if drop_foreign_keys is not None:
        try:
            data = drop_foreign_keys(data)
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; valid keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        try:
            kwargs[key] = _check(value, hints[key], key)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from None


def apply_overrides(data: dict, overrides: list[str], source: str = "--set") -> dict:
    """Apply `KEY=VALUE` overrides to a config dict. KEY may be dotted (`generator.tokenizer`); VALUE is read as
    JSON when it parses (numbers, true/false, lists) and as a plain string otherwise."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{source} {item!r}: expected KEY=VALUE, e.g. lr=1e-4 or generator.tokenizer=DIR")
        try:
            value = jsondepth.loads(raw)
        except jsondepth.JSONNestingError as e:
            raise ConfigError(f"{source} {key}: {e}") from None
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source} {item!r}: {part!r} is not a section of the config")
        node[leaf] = value
    return data


PRESETS = Path(__file__).resolve().parent / "presets"


def preset_names() -> list[str]:
    """The packaged training presets as names: "tokenizer/shapes-64", "diffusion/shapes-64", ..."""
    return sorted(f"{p.parent.name}/{p.stem}" for p in PRESETS.glob("*/*.json"))


def resolve_config(name: str | Path, kind: str | None = None) -> Path:
    """A config file's path: an existing file as is, else a packaged preset by name, from any folder:
    "diffusion/shapes-64", "configs/diffusion/shapes-64.json" (as the README writes it), or a bare "shapes-64"
    (in `kind`'s presets when given, else wherever the name is unique)."""
    path = Path(name)
    if path.is_file():
        return path
    text = str(name).strip().removeprefix("./").removeprefix("configs/").removesuffix(".json")
    names = preset_names()
    if text in names:
        return PRESETS / f"{text}.json"
    if "/" not in text:
        matches = [n for n in names if n.split("/")[1] == text and (kind is None or n.startswith(kind + "/"))]
        if len(matches) == 1:
            return PRESETS / f"{matches[0]}.json"
        if len(matches) > 1:
            raise ConfigError(f"{name}: more than one preset has that name ({', '.join(matches)}); name one of them")
    near = [n for n in names if kind is None or n.startswith(kind + "/")]
    raise ConfigError(
        f"{name}: no such file, and no preset of that name; presets: {', '.join(near)} "
        f"(`binlat config show NAME` prints one)"
    )


def load_config(cls: type[C], path: str | Path, overrides: Sequence[str] = (), kind: str | None = None) -> C:
    """`path`: a JSON file or a packaged preset's name (see resolve_config); `overrides` are --set KEY=VALUE. An
    error names what it is in: the file, or the override that brought it."""
    path = resolve_config(path, kind)
    try:
        from .io import read_bounded  # a regular file of bounded size, checked before reading

        text = read_bounded(path, what="config").decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    try:
        data = jsondepth.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except jsondepth.JSONNestingError as e:
        raise ConfigError(f"{path}: {e}") from None
    overrides = list(overrides)
    # An entry it cannot apply is named by apply_overrides' own errors; a file that is no object, by config_from_dict
    merged = apply_overrides(data, overrides) if isinstance(data, dict) else data
    try:
        return config_from_dict(cls, merged, source=str(path))
    except ConfigError as e:
        raise _blamed(cls, data, overrides, path, e) from None


def _blamed(cls: type, data: dict, overrides: list[str], path: Path, error: ConfigError) -> ConfigError:
    """`error` (the file with every override) labelled with what it came from: the first `--set KEY=VALUE` after
    which the config fails as it does with them all ("--set lr=abc: 'lr' must be a number, got 'abc'"), else the
    file. The file alone may fail otherwise, an override mending that, so the first failure is not enough."""
    for count in range(len(overrides) + 1):
        try:
            config_from_dict(cls, apply_overrides(data, overrides[:count]), source=str(path))
        except ConfigError as e:
            if str(e) == str(error):
                if count == 0:
                    return error
                message = str(error).removeprefix(f"{path}: ")
                return ConfigError(f"--set {overrides[count - 1]}: {message}")
    return error
