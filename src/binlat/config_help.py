"""Every key of a config with its type, default and one line of help, read from the dataclasses themselves (the
comment beside each field, else the class's), so `binlat config show` and the code cannot drift apart."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any

_FIELD = re.compile(r"^\s*(\w+)\s*:\s*[^=#]+(?:=[^#]*)?(?:#\s*(.*))?$")


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment on its line, or the comment lines just above it; inherited fields (a generator
    kind's config over the shared GeneratorConfig) from the source of the class that declares them."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            comments |= _own_field_comments(klass)
    return comments


def _own_field_comments(cls: type) -> dict[str, str]:
    comments: dict[str, str] = {}
    above: list[str] = []
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return comments
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        match = _FIELD.match(line)
        if match and match.group(1) in {f.name for f in dataclasses.fields(cls)}:
            comments[match.group(1)] = (match.group(2) or " ".join(above)).strip()
        above = []
    return comments


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


Row = tuple[str, str, str, str, str]


def describe(config: Any, prefix: str = "", extra: dict[str, Any] | None = None) -> list[Row]:
    """(key, value, type, default, help) rows of a config dataclass, nested ones dotted; `extra` maps a field
    holding a plain dict (TrainConfig.model) to the dataclass whose keys it takes."""
    rows = []
    hints = typing.get_type_hints(type(config))
    comments = field_comments(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            rows += describe(value, key + ".")
        elif extra and f.name in extra:
            rows += describe(extra[f.name], key + ".")
        else:
            rows.append(
                (key, repr(value), _type_name(hints.get(f.name, f.type)), repr(_default(f)), comments.get(f.name, ""))
            )
    return rows
