"""Reading request bodies: the JSON-object check every JSON body gets before it is parsed (nesting at most
MAX_JSON_DEPTH deep), and the image endpoints' bodies, which are either multipart/form-data (file field `image`) or
JSON (`image_base64`) and must hold a PNG, JPEG or WebP file."""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import re
import typing
from typing import Any

from fastapi import Request
from PIL import Image, UnidentifiedImageError
from pydantic import AliasChoices, BaseModel

from .. import editing, jsondepth
from .errors import ApiError
from .schemas import validate

MAX_FORM_FIELDS = 32
MAX_UPLOAD_PIXELS = 4096 * 4096  # decoded size of an uploaded image
MAX_JSON_DEPTH = 32  # nested arrays and objects in a JSON body; the API's own bodies need 2
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")  # Pillow's names; no other decoder (EPS runs Ghostscript) is ever tried


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def is_json(ctype: str) -> bool:
    # The media types FastAPI parses as JSON for a typed body (no Content-Type at all is read as JSON too).
    return ctype in ("", "application/json") or (ctype.startswith("application/") and ctype.endswith("+json"))


async def json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object, else a 415 or 400 ApiError saying what is wrong with it."""
    ctype = content_type(request)
    if not is_json(ctype):
        raise ApiError(415, f"unsupported content type {ctype!r}: send application/json")
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, "empty body: send a JSON object")
    try:
        data = jsondepth.loads(raw.decode("utf-8"), MAX_JSON_DEPTH)
    except UnicodeDecodeError:
        raise ApiError(400, "body is not UTF-8 text; send a JSON object") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except jsondepth.JSONNestingError as e:
        raise ApiError(400, f"body: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the JSON body must be an object, got {type(data).__name__}")
    return data


def _field_types(model: type[BaseModel], name: str) -> set[Any]:
    """The types a field of `model` (by its name or an alias) may take, None left out; none for an unknown name."""
    for field_name, field in model.model_fields.items():
        alias = field.validation_alias
        if name == field_name or (isinstance(alias, AliasChoices) and name in alias.choices):
            return set(typing.get_args(field.annotation) or (field.annotation,)) - {type(None)}
    return set()


def form_value(model: type[BaseModel], name: str, text: str) -> Any:
    """Form fields arrive as text: a number where `model`'s field is one, text otherwise (strict checks follow)."""
    types = _field_types(model, name)
    if not types or types == {str}:  # text as given (a prompt keeps its spaces); unknown names are refused later
        return text
    text = text.strip()
    for kind in (int, float):
        if kind in types:
            with contextlib.suppress(ValueError):
                return kind(text)
    return text


async def image_request(request: Request, model: type[BaseModel]) -> tuple[Any, bytes]:
    """(the fields as a `model`, the image file's bytes) from multipart/form-data (file field `image`) or JSON
    (`image_base64`). The file's format is checked here, from its header; the image is only decoded later, in the
    work queue (`decode_image`)."""
    fields, data = await _image_fields(request, model)
    check_upload_format(data)
    return validate(model, fields), data


def check_upload_format(data: bytes) -> None:
    """A 422 ApiError unless Pillow identifies `data` as PNG, JPEG or WebP (it reads the header only)."""
    try:
        with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS):
            pass
    except UnidentifiedImageError:
        raise ApiError(
            422, "image: not a recognised image format; this server accepts PNG, JPEG and WebP files"
        ) from None
    except Exception:  # noqa: BLE001 — a damaged header of an accepted format: decode_image says what is wrong
        pass


async def _image_fields(request: Request, model: type[BaseModel]) -> tuple[dict[str, Any], bytes]:
    ctype = content_type(request)
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS)
        except Exception as e:  # noqa: BLE001 — the multipart parser has several error types
            detail = getattr(e, "detail", None) or str(e) or type(e).__name__
            raise ApiError(400, f"malformed multipart body: {detail}") from None
        fields: dict[str, Any] = {}
        data = None
        try:
            for key, value in form.multi_items():
                if key in fields or (key == "image" and data is not None):
                    raise ApiError(422, f"{key}: given more than once")
                if key == "image":
                    if isinstance(value, str):
                        raise ApiError(422, "image: must be an uploaded file, not a text field")
                    data = await value.read()
                elif not isinstance(value, str):
                    raise ApiError(422, f"{key}: only the field 'image' may be a file")
                elif value.strip() or key == "prompt":  # an empty optional form field means "default"
                    fields[key] = form_value(model, key, value)
        finally:
            await form.close()  # spooled upload files
        if data is None:
            raise ApiError(422, "image: missing; upload the image file as the multipart field 'image'")
        if not data:
            raise ApiError(422, "image: the uploaded file is empty")
        return fields, data
    if not is_json(ctype):
        raise ApiError(415, f"unsupported content type {ctype!r}: send multipart/form-data or application/json")
    fields = await json_object(request)
    encoded = fields.pop("image_base64", None)
    if encoded is None:
        raise ApiError(
            422,
            "image_base64: missing; send the image file base64-encoded (or upload it as "
            "multipart/form-data field 'image')",
        )
    if not isinstance(encoded, str):
        raise ApiError(422, "image_base64: must be a base64 string")
    encoded = re.sub(r"^data:[^,]*;base64,", "", encoded.strip())
    try:
        data = base64.b64decode(re.sub(r"\s+", "", encoded), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "image_base64: not valid base64") from None
    if not data:
        raise ApiError(422, "image_base64: the image is empty")
    return fields, data


def decode_image(data: bytes):
    """Decode an upload (run inside the work queue, so decoding too is bounded by max_concurrent)."""
    try:
        return editing.open_image(data, "upload", max_pixels=MAX_UPLOAD_PIXELS, formats=UPLOAD_FORMATS)
    except (ValueError, OSError) as e:
        raise ApiError(422, f"image: {e}") from None


def image_body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI text for a body that is JSON (`model`) or multipart with the file `image`: a typed FastAPI body
    describes one content type only, so the image endpoints read theirs by hand and describe it here."""
    schema = model.model_json_schema()
    props = {k: v for k, v in schema.get("properties", {}).items() if k != "image_base64"}
    props["image"] = {"type": "string", "format": "binary", "description": "the image file"}
    content = {
        "application/json": {"schema": schema},
        "multipart/form-data": {"schema": {"type": "object", "properties": props, "required": ["image"]}},
    }
    return {"requestBody": {"required": True, "content": content}}
