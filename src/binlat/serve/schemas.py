"""Request and response bodies of the HTTP API, validated strictly; they also document it in /openapi.json.

`validation_message` turns pydantic's errors on these models into the one-line `{"error": ...}` text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..pipeline import BUILTIN_SAMPLING
from ..registry import generator_kinds
from .errors import ApiError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _default(setting: str) -> str:
    return f"default: the model's, else {BUILTIN_SAMPLING[setting]}"


class Sampling(_Strict):
    # Left out, a setting takes the model's tuned value (model_index.json "sampling", see /v1/models), else the
    # built-in default.
    num_steps: int | None = Field(
        None,
        ge=1,
        validation_alias=AliasChoices("num_steps", "steps"),  # "steps", as the CLI's --steps, is kept as an alias
        description=f"diffusion steps ({_default('num_steps')}; capped by the "
        "server's max_steps; ignored by the AR generator; `steps` is an alias)",
    )
    guidance_scale: float | None = Field(
        None, ge=0, description=f"classifier-free guidance scale w ({_default('guidance_scale')})"
    )
    temperature: float | None = Field(
        None, ge=0, description=f"sampling temperature; 0 thresholds ({_default('temperature')})"
    )
    rho: float | None = Field(None, gt=0, description=f"time-step spacing exponent ({_default('rho')})")
    protocol: Literal[1, 2] | None = Field(None, description=f"diffusion step protocol ({_default('protocol')})")
    seed: int | None = Field(None, ge=0, le=2**53, description="base seed; image i uses seed + i (default random)")
    size: int | str | list[int] | None = Field(
        None, description="N, 'HxW' or [H, W] in pixels (default: the model's image size)"
    )
    n: int = Field(1, ge=1, description="images per prompt")


class GenerateRequest(Sampling):
    prompt: str | None = Field(None, description="one prompt (or give `prompts`)")
    prompts: list[str] | None = Field(None, description="several prompts (or give `prompt`)")
    generator: str = Field("diffusion", description="a generator kind the model holds (see /v1/models)")

    @field_validator("generator")
    @classmethod
    def _known_kind(cls, kind: str) -> str:  # the registry's kinds, so a new kind needs no edit here
        if kind not in generator_kinds():
            raise ValueError(f"must be one of {', '.join(generator_kinds())}, got {kind!r}")
        return kind


class EditRequest(Sampling):
    prompt: str = Field(description="what the edited image should show")
    strength: float = Field(0.6, ge=0, le=1, description="0 keeps the image, 1 ignores it")
    image_base64: str | None = Field(
        None,
        description="the image file, base64 (JSON requests only; multipart requests upload it as the field `image`)",
    )


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


# Form fields arrive as text: these are read as numbers (bodies.form_value) before the strict checks.
INT_FIELDS = frozenset({"num_steps", "steps", "protocol", "seed", "n"})
FLOAT_FIELDS = frozenset({"guidance_scale", "temperature", "rho", "strength"})

_FIELD_HINTS = {
    "size": "must be N, 'HxW' or [H, W] in pixels",
    "seed": "must be an integer in [0, 2^53] or null",
}


def validation_message(errors: Iterable[dict[str, Any]], model: type[BaseModel]) -> str:
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
        parts.append(f"{label}: {_FIELD_HINTS.get(name, e.get('msg', 'invalid value'))}")
    return "; ".join(parts) or "invalid request"


def validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    """`data` as a `model`, else a 422 ApiError naming the bad fields."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ApiError(422, validation_message(e.errors(), model)) from None
