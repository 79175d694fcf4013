"""Request and response bodies of the HTTP API, validated strictly; they also document it in /openapi.json.

The generate and edit bodies have one field per sampling setting (binlat.sampling), typed, described and checked
as the registered kinds' Settings dataclasses say: `request_bodies()` makes them when an app is made, so a kind
registered before then brings its settings with it. `validation_message` turns pydantic's errors on these models into
the one-line `{"error": ...}` text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from ..registry import generator_kinds, kinds_that_can
from ..sampling import Setting, check, settings
from .errors import ApiError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _ImageRequest(_Strict):
    # Beside these, a request has the sampling settings (request_bodies); left out, a setting takes the model's
    # tuned value (model_index.json "sampling", see /v1/models), else the built-in default.
    seed: int | None = Field(None, ge=0, le=2**53, description="base seed; image i uses seed + i (default random)")
    size: int | str | list[int] | None = Field(
        None, description="N, 'HxW' or [H, W] in pixels (default: the model's image size)"
    )
    n: int = Field(1, ge=1, description="images per prompt")


class _GenerateFields(_ImageRequest):
    prompt: str | None = Field(None, description="one prompt (or give `prompts`)")
    prompts: list[str] | None = Field(None, description="several prompts (or give `prompt`)")
    generator: str = Field("diffusion", description="a generator kind the model holds (see /v1/models)")

    @field_validator("generator")
    @classmethod
    def _known_kind(cls, kind: str) -> str:  # the registry's kinds, so a new kind needs no edit here
        if kind not in generator_kinds():
            raise ValueError(f"must be one of {', '.join(generator_kinds())}, got {kind!r}")
        return kind


class _EditFields(_ImageRequest):
    prompt: str = Field(description="what the edited image should show")
    strength: float = Field(0.6, ge=0, le=1, description="0 keeps the image, 1 ignores it")
    image_base64: str | None = Field(
        None,
        description="the image file, base64 (JSON requests only; multipart requests upload it as the field `image`)",
    )


# What this server adds to a setting's own description: its limit on steps (limits.Checks.steps).
_SERVER_NOTES = {"num_steps": "capped by the server's max_steps"}


def _setting_field(setting: Setting, kinds: Sequence[str]) -> tuple[Any, Any]:
    notes = [f"default: the model's, else {setting.default_text()}", _SERVER_NOTES.get(setting.name)]
    readers = [k for k in setting.kinds if k in kinds]
    if len(readers) < len(kinds):
        notes.append(f"read by {', '.join(readers)}")
    if setting.short:
        notes.append(f"`{setting.short}` is an alias")
    return setting.value_type | None, Field(
        None,
        validation_alias=AliasChoices(setting.name, setting.short) if setting.short else None,
        description=f"{setting.help} ({'; '.join(n for n in notes if n)})",
    )


def _checked_setting(cls, value: Any, info) -> Any:
    """A setting given is checked as its Settings dataclass checks it, so HTTP refuses what Python refuses."""
    if value is not None:
        try:
            check({info.field_name: value})
        except (ValueError, TypeError) as e:
            raise ValueError(str(e)) from None
    return value


def _with_settings(name: str, base: type[BaseModel], kinds: Sequence[str]) -> type[BaseModel]:
    """`base` and one optional field per sampling setting that one of `kinds` reads."""
    chosen = {s.name: s for s in settings().values() if set(s.kinds) & set(kinds)}
    clash = sorted(set(chosen) & set(base.model_fields))
    if clash:
        raise ValueError(f"sampling setting(s) {clash} are named like fields {name} already has; rename them")
    # (type, FieldInfo) per name; Any, as **field_definitions is checked against create_model's other keywords too
    fields: dict[str, Any] = {setting: _setting_field(s, kinds) for setting, s in chosen.items()}
    validators: dict[str, Callable[..., Any]] = (
        {"_settings_checked": field_validator(*fields)(_checked_setting)} if fields else {}
    )
    return create_model(name, __base__=base, __validators__=validators, **fields)


@dataclass(frozen=True)
class RequestBodies:
    """The bodies of one app's generate and edit requests, with the settings of the kinds registered when it was
    made: every kind's for generate, those that can redraw for edit (which runs on such a kind)."""

    generate: type[BaseModel]
    edit: type[BaseModel]


def request_bodies() -> RequestBodies:
    return RequestBodies(
        generate=_with_settings("GenerateRequest", _GenerateFields, generator_kinds()),
        edit=_with_settings("EditRequest", _EditFields, kinds_that_can("redraw")),
    )


def given_settings(request: BaseModel) -> dict[str, Any]:
    """The sampling settings a request's fields give, by name (None where left out)."""
    known = settings()
    return {name: getattr(request, name) for name in type(request).model_fields if name in known}


class ReconstructRequest(_Strict):
    image_base64: str | None = Field(None, description="the image file, base64 (JSON requests only)")
    size: int | str | list[int] | None = Field(None, description="N, 'HxW' or [H, W] in pixels")


class ImageResult(BaseModel):
    png_base64: str
    seed: int
    prompt: str
    width: int
    height: int


class ImagesResponse(BaseModel):
    images: list[ImageResult]
    timing_s: float
    queue_s: float


class ReconstructResponse(BaseModel):
    bits_hex: str = Field(description="K x B bits, row-major, 8 per byte, most significant bit first")
    num_tokens: int
    num_bits: int
    png_base64: str
    width: int
    height: int
    timing_s: float


class ErrorResponse(BaseModel):
    error: str


_FIELD_HINTS = {
    "size": "must be N, 'HxW' or [H, W] in pixels",
    "seed": "must be an integer in [0, 2^53] or null",
}


def validation_message(errors: Iterable[Mapping[str, Any]], model: type[BaseModel]) -> str:
    """One line naming each bad field once; `errors` as pydantic (or FastAPI, under "body") lists them."""
    parts, seen = [], set()
    for e in errors:
        loc = tuple(e.get("loc") or ())
        if loc[:1] == ("body",):  # FastAPI's prefix for a request body; no model here has a field named so
            loc = loc[1:]
        name = str(loc[0]) if loc else "body"
        if name in seen:
            continue
        seen.add(name)
        if e.get("type") == "extra_forbidden":
            known = ", ".join(model.model_fields)
            parts.append(f"{name}: unknown field (known fields: {known})")
            continue
        label = f"{name}[{loc[1]}]" if len(loc) > 1 and isinstance(loc[1], int) else name
        said = e.get("msg", "invalid value")
        if e.get("type") == "value_error" and "error" in (e.get("ctx") or {}):  # a check's own words, unprefixed
            said = str(e["ctx"]["error"])
        parts.append(f"{label}: {_FIELD_HINTS.get(name, said)}")
    return "; ".join(parts) or "invalid request"


def validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    """`data` as a `model`, else a 422 ApiError naming the bad fields."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ApiError(422, validation_message(e.errors(), model)) from None
