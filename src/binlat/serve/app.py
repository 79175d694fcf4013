"""The HTTP API and page: `create_app(pipe, limits)` builds a FastAPI app around one loaded Pipeline.

Requests are checked completely before they reach the model; the model runs in a fixed pool of
`max_concurrent` worker threads, and at most `max_queue` requests may be admitted (running or waiting) at once:
one more is answered 429 straight away instead of piling up. Every error is JSON `{"error": "..."}` with a 4xx
status saying what was wrong, or 500 for an unexpected failure (logged; the server keeps running).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import editing
from ..pipeline import BUILTIN_SAMPLING, Pipeline
from .page import PAGE

log = logging.getLogger("binlat.serve")

MAX_FORM_FIELDS = 32
MAX_UPLOAD_PIXELS = 4096 * 4096  # decoded size of an uploaded image


# --- limits and errors --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for and how much work the server takes on at once."""

    max_concurrent: int = 1          # generations running at the same time (worker threads)
    max_queue: int = 8               # requests admitted at once, running + waiting; more get 429
    max_body_bytes: int = 16 * 2**20  # request body size; more gets 413
    max_n: int = 8                   # images per request (prompts x n)
    max_steps: int = 100             # diffusion steps
    max_prompt_chars: int = 1000     # characters per prompt
    max_size: int = 1024             # pixels per side

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_queue < self.max_concurrent:
            raise ValueError(f"max_queue ({self.max_queue}) counts running requests too, so it must be at least "
                             f"max_concurrent ({self.max_concurrent})")


class ApiError(Exception):
    """A request the server will not serve: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# --- request bodies (validated strictly; they also document the API in /openapi.json) ----------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _default(setting: str) -> str:
    return f"default: the model's, else {BUILTIN_SAMPLING[setting]}"


class _Sampling(_Strict):
    # Left out, a setting takes the model's tuned value (model_index.json "sampling", see /v1/models), else the
    # built-in default.
    steps: int | None = Field(None, ge=1, description=f"diffusion steps ({_default('num_steps')}; capped by the "
                                                        "server's max_steps; ignored by the AR generator)")
    guidance_scale: float | None = Field(None, ge=0, description=f"classifier-free guidance scale w "
                                                                   f"({_default('guidance_scale')})")
    temperature: float | None = Field(None, ge=0, description=f"sampling temperature; 0 thresholds "
                                                                f"({_default('temperature')})")
    rho: float | None = Field(None, gt=0, description=f"time-step spacing exponent ({_default('rho')})")
    protocol: Literal[1, 2] | None = Field(None, description=f"diffusion step protocol ({_default('protocol')})")
    seed: int | None = Field(None, ge=0, le=2**53, description="base seed; image i uses seed + i (default random)")
    size: int | str | list[int] | None = Field(None, description="N, 'HxW' or [H, W] in pixels (default: the "
                                                                   "model's image size)")
    n: int = Field(1, ge=1, description="images per prompt")


class GenerateRequest(_Sampling):
    prompt: str | None = Field(None, description="one prompt (or give `prompts`)")
    prompts: list[str] | None = Field(None, description="several prompts (or give `prompt`)")
    generator: Literal["diffusion", "ar"] = "diffusion"


class EditRequest(_Sampling):
    prompt: str = Field(description="what the edited image should show")
    strength: float = Field(0.6, ge=0, le=1, description="0 keeps the image, 1 ignores it")
    image_base64: str | None = Field(None, description="the image file, base64 (JSON requests only; multipart "
                                                       "requests upload it as the field `image`)")


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
_INT_FIELDS = {"steps", "protocol", "seed", "n"}
_FLOAT_FIELDS = {"guidance_scale", "temperature", "rho", "strength"}


def _validation_message(err: ValidationError, model: type[BaseModel]) -> str:
    parts, seen = [], set()
    for e in err.errors():
        loc = e.get("loc") or ()
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


def _validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ApiError(422, _validation_message(e, model)) from None


# --- body readers -------------------------------------------------------------------------------------------
def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _is_json(ctype: str) -> bool:
    return ctype in ("", "application/json") or ctype.endswith("+json")


async def _json_object(request: Request) -> dict[str, Any]:
    ctype = _content_type(request)
    if not _is_json(ctype):
        raise ApiError(415, f"unsupported content type {ctype!r}: send application/json")
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, "empty body: send a JSON object")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "body is not UTF-8 text; send a JSON object") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the JSON body must be an object, got {type(data).__name__}")
    return data


def _form_value(name: str, text: str) -> Any:
    """Form fields arrive as text: numbers for numeric fields, text otherwise (strict checks follow)."""
    text = text.strip() if name in _INT_FIELDS | _FLOAT_FIELDS | {"size"} else text
    if name in _INT_FIELDS:
        with contextlib.suppress(ValueError):
            return int(text)
    elif name in _FLOAT_FIELDS:
        with contextlib.suppress(ValueError):
            return float(text)
    return text


async def _image_request(request: Request) -> tuple[dict[str, Any], bytes]:
    """(fields, image file bytes) from multipart/form-data (file field `image`) or JSON (`image_base64`)."""
    ctype = _content_type(request)
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
                    fields[key] = _form_value(key, value)
        finally:
            await form.close()  # spooled upload files
        if data is None:
            raise ApiError(422, "image: missing; upload the image file as the multipart field 'image'")
        if not data:
            raise ApiError(422, "image: the uploaded file is empty")
        return fields, data
    if not _is_json(ctype):
        raise ApiError(415, f"unsupported content type {ctype!r}: send multipart/form-data or application/json")
    fields = await _json_object(request)
    encoded = fields.pop("image_base64", None)
    if encoded is None:
        raise ApiError(422, "image_base64: missing; send the image file base64-encoded (or upload it as "
                            "multipart/form-data field 'image')")
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


def _decode_image(data: bytes):
    """Decode an upload (run inside the work queue, so decoding too is bounded by max_concurrent)."""
    try:
        return editing.open_image(data, "upload", max_pixels=MAX_UPLOAD_PIXELS)
    except (ValueError, OSError) as e:
        raise ApiError(422, f"image: {e}") from None


# --- checks against the model and the limits ----------------------------------------------------------------
def _parse_size(value: int | str | list[int] | None) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value, value
    if isinstance(value, list):
        if len(value) != 2:
            raise ApiError(422, f"size: a list must be [H, W], got {len(value)} numbers")
        return value[0], value[1]
    m = re.fullmatch(r"\s*(\d{1,6})\s*(?:[xX]\s*(\d{1,6}))?\s*", value)
    if not m:
        raise ApiError(422, f"size: must be N, 'HxW' or [H, W] in pixels, got {value!r}")
    return int(m.group(1)), int(m.group(2) or m.group(1))


class _Checks:
    def __init__(self, pipe: Pipeline, limits: ServeLimits):
        self.pipe, self.limits = pipe, limits

    def size(self, value: int | str | list[int] | None) -> tuple[int, int]:
        size = _parse_size(value)
        if size is None:
            image = self.pipe.config.image_size
            size = (image, image)
        h, w = size
        if min(h, w) < 1:
            raise ApiError(422, f"size: {h}x{w} is not a positive size")
        if max(h, w) > self.limits.max_size:
            raise ApiError(422, f"size: {h}x{w} is over this server's limit of {self.limits.max_size} px per side "
                                f"(max_size)")
        try:
            self.pipe.tokenizer.check_size(h, w)
        except ValueError as e:
            raise ApiError(422, f"size: {e}") from None
        return h, w

    def prompt(self, text: str, field: str = "prompt") -> str:
        if not text.strip():
            raise ApiError(422, f"{field}: empty; describe the image")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON allows "\ud800"; the text encoder cannot take it
            raise ApiError(422, f"{field}: not valid Unicode text (unpaired surrogate at character {e.start})"
                           ) from None
        if len(text) > self.limits.max_prompt_chars:
            raise ApiError(422, f"{field}: {len(text)} characters is over this server's limit of "
                                f"{self.limits.max_prompt_chars} (max_prompt_chars)")
        return text

    def steps(self, steps: int | None, default: int) -> int:
        """The request's steps, else the model's `default` capped by this server's max_steps."""
        if steps is None:
            return min(default, self.limits.max_steps)
        if steps > self.limits.max_steps:
            raise ApiError(422, f"steps: {steps} is over this server's limit of {self.limits.max_steps} "
                                f"(max_steps)")
        return steps

    def count(self, total: int, detail: str) -> None:
        if total > self.limits.max_n:
            raise ApiError(422, f"n: {total} images ({detail}) is over this server's limit of {self.limits.max_n} "
                                f"per request (max_n)")

    def generator(self, kind: str) -> None:
        if kind not in self.pipe.generators:
            raise ApiError(422, f"generator: {kind!r} is not in this model; available: {sorted(self.pipe.generators)}")


# --- the work queue ----------------------------------------------------------------------------------------
class WorkQueue:
    """A fixed pool of worker threads and a bound on admitted jobs (running + waiting). A job stays counted
    until its thread finishes, even if the client that asked for it has gone, so the bound always holds."""

    def __init__(self, max_concurrent: int, max_queue: int):
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self._executor = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="binlat-serve")
        self._lock = threading.Lock()
        self.admitted = 0
        self.running = 0

    def submit(self, fn: Callable[[], Any]) -> Future:
        with self._lock:
            if self.admitted >= self.max_queue:
                raise ApiError(429, f"server busy: {self.admitted} requests are already running or waiting "
                                    f"(max_queue {self.max_queue}); retry shortly", headers={"Retry-After": "1"})
            self.admitted += 1
        queued = time.perf_counter()

        def job() -> Any:
            with self._lock:
                self.running += 1
            started = time.perf_counter()
            try:
                return fn(), started - queued, time.perf_counter() - started
            finally:
                with self._lock:
                    self.running -= 1
                    self.admitted -= 1

        try:
            return self._executor.submit(job)
        except BaseException:
            with self._lock:
                self.admitted -= 1
            raise

    async def run(self, fn: Callable[[], Any]) -> tuple[Any, float, float]:
        """(result, seconds waited, seconds worked)."""
        return await asyncio.wrap_future(self.submit(fn))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _serialise_text_encoder(pipe: Pipeline) -> None:
    """Fast tokenizers refuse concurrent calls ('Already borrowed'); with several workers, encode one at a time."""
    encoder = pipe.text_encoder
    if getattr(encoder, "_binlat_serve_lock", None) is not None:
        return
    lock, forward = threading.Lock(), encoder.forward

    def locked_forward(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return forward(*args, **kwargs)

    encoder.forward = locked_forward
    encoder._binlat_serve_lock = lock


def _png_base64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --- ASGI middleware ----------------------------------------------------------------------------------------
class BodyLimitMiddleware:
    """Reject a request body over `max_bytes` with 413: at once from Content-Length, else while reading (the
    body is read here, at most max_bytes of it, and handed on to the app)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await error_response(400, "invalid Content-Length header")(scope, receive, send)
                return
            if declared > self.max_bytes:
                await self._too_large(scope, receive, send, declared)
                return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await self._too_large(scope, receive, send, None)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send, declared: int | None) -> None:
        size = f"{declared} bytes" if declared is not None else "more"
        response = error_response(413, f"request body too large: {size} sent, this server accepts at most "
                                       f"{self.max_bytes} bytes (max_body_bytes)", headers={"Connection": "close"})
        await response(scope, receive, send)


class CatchAllMiddleware:
    """Any exception that escapes the app becomes a logged 500 JSON answer; the server carries on."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:  # noqa: BLE001 — the whole point: never let a request take the server down
            log.exception("unexpected error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await error_response(500, f"internal error ({type(e).__name__}); see the server log")(
                    scope, receive, send)


# --- the app -----------------------------------------------------------------------------------------------
def _body_doc(model: type[BaseModel], multipart: bool = False) -> dict:
    schema = model.model_json_schema()
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if multipart:
        props = {k: v for k, v in schema.get("properties", {}).items() if k != "image_base64"}
        props["image"] = {"type": "string", "format": "binary", "description": "the image file"}
        content["multipart/form-data"] = {"schema": {"type": "object", "properties": props, "required": ["image"]}}
    return {"requestBody": {"required": True, "content": content}}


_ERRORS = {code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 429, 500)}


def create_app(pipe: Pipeline, limits: ServeLimits | None = None) -> FastAPI:
    limits = limits or ServeLimits()
    queue = WorkQueue(limits.max_concurrent, limits.max_queue)
    checks = _Checks(pipe, limits)
    if limits.max_concurrent > 1:
        _serialise_text_encoder(pipe)
    tok = pipe.tokenizer.config

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        queue.shutdown()

    app = FastAPI(title="binlat", version=_version(), lifespan=lifespan,
                  description="Text-to-image generation in a 1D binary latent space. Every error answers "
                              "{\"error\": \"...\"}.")
    app.state.pipe, app.state.limits, app.state.queue = pipe, limits, queue
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes)
    app.add_middleware(CatchAllMiddleware)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        if e.status_code == 404:
            message = "not found: see /docs for the endpoints"
        return error_response(e.status_code, message, getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "body"
        return error_response(422, f"{where}: {first.get('msg', 'invalid request')}")

    def sampling(req: _Sampling, generator: str) -> dict[str, Any]:
        return pipe.sampling_settings(generator, guidance_scale=req.guidance_scale, temperature=req.temperature,
                                      rho=req.rho, protocol=req.protocol)

    def image_record(image, seed: int, prompt: str, **meta: Any) -> dict[str, Any]:
        return {"png_base64": _png_base64(image), "seed": seed, "prompt": prompt, "width": image.width,
                "height": image.height, **meta}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE, headers={
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                       "img-src data: blob:; connect-src 'self'; form-action 'none'; "
                                       "base-uri 'none'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})

    @app.get("/healthz", summary="liveness and load")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "running": queue.running, "admitted": queue.admitted,
                "max_concurrent": limits.max_concurrent, "max_queue": limits.max_queue}

    @app.get("/v1/models", summary="what the loaded model can do, and this server's limits")
    async def models() -> dict[str, Any]:
        return {"generators": sorted(pipe.generators), "image_size": pipe.config.image_size,
                "size_multiple": tok.size_multiple, "num_tokens": tok.num_tokens, "num_bits": tok.num_bits,
                "trained": pipe.config.trained, "description": pipe.config.description,
                "text_encoder": pipe.config.text_encoder, "limits": asdict(limits),
                "sampling": {g: pipe.sampling_settings(g) for g in sorted(pipe.generators)}}

    @app.post("/v1/generate", summary="images from prompts", openapi_extra=_body_doc(GenerateRequest),
              responses={200: {"model": ImagesResponse}, **_ERRORS})
    async def generate(request: Request) -> JSONResponse:
        req: GenerateRequest = _validate(GenerateRequest, await _json_object(request))
        if (req.prompt is None) == (req.prompts is None):
            raise ApiError(422, "prompt: give either `prompt` (one text) or `prompts` (a list of texts)"
                           if req.prompt is None else "prompt: give `prompt` or `prompts`, not both")
        if req.prompt is not None:
            prompts = [checks.prompt(req.prompt)]
        else:
            if not req.prompts:
                raise ApiError(422, "prompts: empty list; give at least one prompt")
            prompts = [checks.prompt(p, f"prompts[{i}]") for i, p in enumerate(req.prompts)]
        checks.generator(req.generator)
        settings = sampling(req, req.generator)
        steps = checks.steps(req.steps, settings["num_steps"])
        checks.count(len(prompts) * req.n, f"{len(prompts)} prompt(s) x n={req.n}")
        height, width = checks.size(req.size)
        expanded = [p for p in prompts for _ in range(req.n)]
        seed = editing.resolve_seed(req.seed)

        def work() -> list[dict[str, Any]]:
            out = pipe(expanded, generator=req.generator, num_steps=steps, guidance_scale=settings["guidance_scale"],
                       temperature=settings["temperature"], rho=settings["rho"], protocol=settings["protocol"],
                       seed=seed, height=height, width=width, progress=False)
            meta = {"generator": req.generator, "steps": steps if req.generator == "diffusion" else None,
                    "guidance_scale": settings["guidance_scale"], "temperature": settings["temperature"],
                    "rho": settings["rho"], "protocol": settings["protocol"]}
            return [image_record(im, s, p, **meta) for im, s, p in zip(out.images, out.seeds, out.prompts)]

        images, waited, worked = await queue.run(work)
        return JSONResponse({"images": images, "timing_s": round(worked, 4), "queue_s": round(waited, 4),
                             "trained": pipe.config.trained})

    @app.post("/v1/reconstruct", summary="an image's bits and what the tokenizer makes of them",
              openapi_extra=_body_doc(ReconstructRequest, multipart=True),
              responses={200: {"model": ReconstructResponse}, **_ERRORS})
    async def reconstruct(request: Request) -> JSONResponse:
        fields, data = await _image_request(request)
        req: ReconstructRequest = _validate(ReconstructRequest, fields)
        height, width = checks.size(req.size)

        def work() -> dict[str, Any]:
            out = editing.reconstruct(pipe, _decode_image(data), height, width)
            return {"bits_hex": editing.pack_bits_hex(out.bits[0]), "num_tokens": tok.num_tokens,
                    "num_bits": tok.num_bits, "png_base64": _png_base64(out.images[0]), "width": width,
                    "height": height}

        result, waited, worked = await queue.run(work)
        return JSONResponse(result | {"timing_s": round(worked, 4), "queue_s": round(waited, 4)})

    @app.post("/v1/edit", summary="re-draw an image under a new prompt (diffusion from t = strength)",
              openapi_extra=_body_doc(EditRequest, multipart=True),
              responses={200: {"model": ImagesResponse}, **_ERRORS})
    async def edit(request: Request) -> JSONResponse:
        fields, data = await _image_request(request)
        req: EditRequest = _validate(EditRequest, fields)
        prompt = checks.prompt(req.prompt)
        checks.generator("diffusion")
        settings = sampling(req, "diffusion")
        steps = checks.steps(req.steps, settings["num_steps"])
        checks.count(req.n, f"n={req.n}")
        height, width = checks.size(req.size)
        seed = editing.resolve_seed(req.seed)

        def work() -> list[dict[str, Any]]:
            out = editing.edit(pipe, _decode_image(data), prompt, strength=req.strength, num_steps=steps,
                               guidance_scale=settings["guidance_scale"], temperature=settings["temperature"],
                               rho=settings["rho"], protocol=settings["protocol"], seed=seed, height=height,
                               width=width, num_images=req.n)
            meta = {"generator": "diffusion", "strength": req.strength, "steps": steps,
                    "guidance_scale": settings["guidance_scale"], "temperature": settings["temperature"],
                    "rho": settings["rho"], "protocol": settings["protocol"]}
            return [image_record(im, s, prompt, **meta) for im, s in zip(out.images, out.seeds)]

        images, waited, worked = await queue.run(work)
        return JSONResponse({"images": images, "timing_s": round(worked, 4), "queue_s": round(waited, 4),
                             "trained": pipe.config.trained})

    return app


def _version() -> str:
    from .. import __version__
    return __version__
